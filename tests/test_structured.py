"""Structured output: the mask kernel against an explicit mask, matchers with drafts, constraints that hold on
every sampled output (regex, choice, JSON schema, EBNF) through `LLM` with n > 1, preemption and speculative
decoding, compilation that holds up no other request, and the official `openai` client's `parse` against a real
server for ten schemas."""
from __future__ import annotations

import json
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from enum import Enum
from typing import Optional

import openai
import pytest
import torch
from pydantic import BaseModel, Field

from conftest import assert_no_leak
from server_util import LiveServer
from slipstream import LLM, SamplingParams
from slipstream.grammar import Grammars
from slipstream.layers.sampler import apply_token_mask
from slipstream.sampling_params import StructuredOutputs

MODEL = "smollm2"


def test_property_order_is_part_of_a_schema():
    a = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}}
    b = {"type": "object", "properties": {"y": {"type": "integer"}, "x": {"type": "integer"}}}
    assert StructuredOutputs(json=a).key != StructuredOutputs(json=b).key
    assert StructuredOutputs(json=a).key == StructuredOutputs(json=json.dumps(a, indent=2)).key


def test_token_mask_keeps_exactly_the_set_bits():
    g = torch.Generator().manual_seed(0)
    vocab = 100  # not a multiple of 32: the last word's high bits fall past the vocabulary
    keep = torch.rand(3, vocab, generator=g) < 0.3
    words = torch.zeros(3, 4, dtype=torch.int64)
    for t in range(vocab):
        words[:, t // 32] |= keep[:, t].long() << (t % 32)
    bitmask = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # as int32, sign bit included
    logits = torch.randn(3, vocab, generator=g)
    out = apply_token_mask(logits, bitmask)
    assert torch.equal(out == float("-inf"), ~keep)
    assert torch.equal(out[keep], logits[keep])


@pytest.fixture(scope="module")
def llm(gguf_path):
    return LLM(gguf_path, dtype="float32", device="cpu", max_model_len=512)


def _grammars(llm):
    return llm.engine.core._grammar_service()


def test_masks_follow_drafts_and_roll_back(llm):
    grammars = _grammars(llm)
    compiled = grammars.compile(StructuredOutputs(regex="(ab|ac)d")).result()
    m = grammars.matcher(compiled)
    tok = llm.engine.tokenizer
    a, b, c, d = (tok.convert_tokens_to_ids(x) for x in "abcd")
    out = grammars.masks(4, [(0, m, []), (1, m, [a]), (3, m, [a, b])]).widen(torch.device("cpu"))  # row 2: free

    def allowed(row):
        return {t for t in range(grammars.vocab_size) if (int(out[row, t // 32]) >> (t % 32)) & 1}

    assert a in allowed(0) and b not in allowed(0)
    assert {b, c} <= allowed(1) and d not in allowed(1)
    assert d in allowed(3) and c not in allowed(3)
    assert len(allowed(2)) == grammars.vocab_size
    again = grammars.masks(1, [(0, m, [])]).widen(torch.device("cpu"))  # the drafts were rolled back
    assert torch.equal(again[0], out[0])
    eos = tok.eos_token_id  # a draft may be the stop token (n-gram drafts copy the prompt): rows after it are free
    past = grammars.masks(2, [(0, m, [a, b, d, eos]), (1, m, [a, b, d, eos, a])]).words
    assert torch.equal(past, grammars.masks(2, []).words)
    assert m.advance(a) and not m.advance(d)


def test_masks_filled_later_open_their_gate_even_when_the_fill_fails(llm):
    """`masks_later`: the same words as `masks` once its future is done, the device's wait queued for its ticket
    when the mask is widened, and the ticket opened whether the fill succeeds or raises."""
    from slipstream.grammar import Grammars

    class Gate:  # records what a GPU stream would be asked
        def __init__(self) -> None:
            self.tickets, self.waited, self.opened = 0, [], []

        def next_ticket(self) -> int:
            self.tickets += 1
            return self.tickets

        def wait(self, ticket: int) -> None:
            self.waited.append(ticket)

        def open(self, ticket: int) -> None:
            self.opened.append(ticket)

    tok, gate, interval = llm.engine.tokenizer, Gate(), sys.getswitchinterval()
    grammars = Grammars(tok, llm.engine.model_config.vocab_size, [tok.eos_token_id], gate=gate)
    assert sys.getswitchinterval() <= 0.0005  # (the filling thread's waits for the GIL kept short)
    sys.setswitchinterval(interval)  # (the rest of the suite runs as before)
    compiled = grammars.compile(StructuredOutputs(regex="(ab|ac)d")).result()
    rows = [(0, grammars.matcher(compiled), []), (2, grammars.matcher(compiled), [])]
    mask, done = grammars.masks_later(3, rows)
    done.result()
    assert gate.opened == [1] and mask.ticket == 1 and mask.held == [0, 2]
    assert torch.equal(mask.words, grammars.masks(3, rows).words)
    mask.widen(torch.device("cpu"))
    assert gate.waited == [1]

    class Broken:  # a matcher whose fill raises
        done, _m = False, None

    mask, done = grammars.masks_later(1, [(0, Broken(), [])])
    assert done.exception() is not None and gate.opened == [1, 2]


PATTERN = r"[A-Z][a-z]{2,6}-\d{2}"
COLORS = ["red", "green", "blue", "dark purple"]


def test_masks_refuse_a_models_padding_rows(llm):
    """A head wider than the tokenizer (padded vocabularies): the grammar covers the tokenizer's ids and the stop
    token, the rows past them are refused in constrained rows and left alone in the others; rows filled together in
    xgrammar's threads allow what rows filled one at a time do."""
    tok = llm.engine.tokenizer
    n = len(tok)
    stop = n + 5  # past the tokenizer: the grammar's vocabulary ends mid-word, at n + 6
    wide = Grammars(tok, n + 75, [stop])
    narrow = Grammars(tok, n + 6, [stop])
    assert wide.grammar_vocab == n + 6
    so = StructuredOutputs(json={"type": "object", "properties": {"name": {"type": "string"}}})
    texts = ['{"na', '{"name": "A', '{"name": "Ann"}']

    def matchers(g):
        out = []
        for text in texts:
            m = g.matcher(g.compile(so).result())
            ids = tok.encode(text, add_special_tokens=False)
            assert m.take(ids) == len(ids)
            out.append(m)
        return out

    def allowed(row, limit):
        return {t for t in range(limit) if (int(row[t // 32]) >> (t % 32)) & 1}

    got = wide.masks(4, [(r, m, []) for r, m in zip((0, 2, 3), matchers(wide))]).widen(torch.device("cpu"))
    one = narrow.masks(1, []).words
    for row, m in zip((0, 2, 3), matchers(narrow)):
        m.fill(one, 0)
        assert allowed(got[row], n + 75) == allowed(one[0], n + 6)
    assert allowed(got[3], n + 75) == {stop}
    assert allowed(got[1], n + 75) == set(range(n + 75))

    # as a step hands it to the sampler: the held rows staged with the step's other small inputs, widened there
    from slipstream.runner.batch import SamplingRow
    from slipstream.runner.inputs import Stager
    from slipstream.runner.sampling import SamplingTensors

    mask = wide.masks(4, [(r, m, []) for r, m in zip((0, 2, 3), matchers(wide))])
    cpu = torch.device("cpu")
    ints = Stager(cpu, torch.int64, 64)
    ints.reset()
    rows = [SamplingRow(SamplingParams(temperature=0), seed=0, num_output_tokens=0)] * 4
    sb = SamplingTensors(cpu, n + 75, [stop], 4).build(rows, [0] * 4, None, ints, mask)
    assert torch.equal(sb.allowed, got)
    # sent to other tensor-parallel ranks: the rows only, not the staging buffer they may be a view of
    import pickle

    staged = torch.full((256, mask.words.shape[1]), 7, dtype=torch.int32)
    staged[:4] = mask.words
    sent = pickle.dumps(replace(mask, words=staged[:4]))
    assert len(sent) < 2 * mask.words.numel() * 4 + 1000
    assert torch.equal(pickle.loads(sent).widen(cpu), got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device's queue")
def test_widening_a_mask_never_waits_for_the_device(llm):
    """On a GPU `Bitmask.widen` only queues work: the host must not wait there for the step's forward to drain. An
    indexed assignment of a Python number did (37% of the engine's time in a constrained run, H100, lease AX);
    torch's sync check in "error" mode raises at any call that synchronizes."""
    tok = llm.engine.tokenizer
    n = len(tok)
    wide = Grammars(tok, n + 75, [n + 5], pin_memory=True)  # (the grammar's vocabulary ends mid-word, at n + 6)
    compiled = wide.compile(StructuredOutputs(json={"type": "object"})).result()
    mask = wide.masks(4, [(1, wide.matcher(compiled), []), (3, wide.matcher(compiled), [])])
    expected = mask.widen(torch.device("cpu"))
    dev = torch.device("cuda")
    held = torch.tensor(mask.held, device=dev)
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # a forward still running ahead of the mask's work
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = mask.widen(dev, held)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), expected)


def test_regex_and_choice_hold_on_every_sample(llm):
    sampled = dict(temperature=1.0, max_tokens=24, seed=7, n=100)
    outs = llm.generate(["Name a code:", "Pick a color:"], [
        SamplingParams(structured_outputs=StructuredOutputs(regex=PATTERN), **sampled),
        SamplingParams(structured_outputs=StructuredOutputs(choice=COLORS), **sampled),
    ])
    codes, colors = [c.text for c in outs[0].outputs], [c.text for c in outs[1].outputs]
    assert len(codes) == len(colors) == 100
    assert all(re.fullmatch(PATTERN, t) for t in codes), codes
    assert all(t in COLORS for t in colors) and len(set(colors)) > 1, colors
    assert {c.finish_reason for o in outs for c in o.outputs} == {"stop"}
    assert_no_leak(llm)


def test_ebnf_grammar_and_json_object(llm):
    grammar = 'root ::= "(" expr ")"\nexpr ::= num | num " + " num\nnum ::= [1-9] [0-9]?'
    outs = llm.generate(["Write a sum:", "A user record in JSON: "], [
        SamplingParams(temperature=0.9, seed=1, n=8, max_tokens=16, structured_outputs=StructuredOutputs(grammar=grammar)),
        SamplingParams(temperature=0, max_tokens=200, structured_outputs=StructuredOutputs(json_object=True)),
    ])
    assert all(re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)?\)", c.text) for c in outs[0].outputs)
    assert isinstance(json.loads(outs[1].outputs[0].text), dict)


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


def test_constraint_survives_preemption_and_speculation(llm, gguf_path):
    """A pool too small for every sequence preempts and recomputes; n-gram drafts are verified row by row against
    masks computed after the drafts before them. Greedy outputs equal the unconstrained-pool, draft-free run."""
    params = SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputs(json=SCHEMA))
    prompts = [f"Person number {i} as JSON:" for i in range(6)]
    base = [o.outputs[0].text for o in llm.generate(prompts, params)]
    assert all(set(json.loads(t)) == {"name", "age"} for t in base)
    small = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=128, block_size=16, num_blocks=8)
    assert [o.outputs[0].text for o in small.generate(prompts, params)] == base
    assert small.engine.core.stats.num_preemptions > 0
    spec = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=256, speculative_method="ngram",
               speculative_adaptive=False)
    assert [o.outputs[0].text for o in spec.generate(prompts, params)] == base
    assert spec.engine.core.stats.draft_tokens > 0
    for e in (small, spec):
        assert_no_leak(e)


def test_a_compiling_grammar_holds_up_no_other_request(llm, monkeypatch):
    grammars = _grammars(llm)
    release = threading.Event()
    slow = grammars._compile

    def blocked(so):
        release.wait(60)
        return slow(so)

    monkeypatch.setattr(grammars, "_compile", blocked)
    core = llm.engine.core
    core.add_request("slow", llm.engine.tokenize("Hi"), SamplingParams(temperature=0, max_tokens=8, structured_outputs=StructuredOutputs(regex="x{2,3}y")))
    core.add_request("plain", llm.engine.tokenize("Hi"), SamplingParams(max_tokens=4, ignore_eos=True, temperature=0))
    done = set()
    for _ in range(50):
        done |= {(d.request_id, d.finish_reason) for d in core.step() if d.finish_reason}
        if ("plain", "length") in done:
            break
    assert ("plain", "length") in done and not any(r == "slow" for r, _ in done)
    release.set()
    while core.has_unfinished():
        done |= {(d.request_id, d.finish_reason) for d in core.step() if d.finish_reason}
    assert ("slow", "stop") in done
    assert_no_leak(llm)


def test_a_grammar_can_start_after_a_marker(llm):
    """A reasoning model thinks freely and answers under the constraint: the output is the unconstrained one up to
    the marker tokens (here the third and fourth tokens greedy decoding writes), then matches the regex."""
    prompt = "The capital of France is"
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    marker = tuple(free[2:4])
    so = StructuredOutputs(regex=r" [0-9]{3}", start_after_ids=marker)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, structured_outputs=so))[0].outputs[0]
    assert out.token_ids[:4] == free[:4]
    tail = llm.engine.tokenizer.decode(out.token_ids[4:], skip_special_tokens=True)
    assert re.fullmatch(r" [0-9]{3}", tail) and out.finish_reason == "stop", tail
    with pytest.raises(ValueError, match="min_tokens"):  # the grammar decides where the output ends
        llm.generate(prompt, SamplingParams(min_tokens=3, structured_outputs=StructuredOutputs(choice=["yes", "no"])))
    with pytest.raises(ValueError, match="start_after_ids"):
        llm.generate(prompt, SamplingParams(structured_outputs=StructuredOutputs(regex="a", start_after_ids=(10**7,))))
    assert_no_leak(llm)


# ---- the OpenAI API -------------------------------------------------------------------------------------------------

class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)


class Team(BaseModel):
    lead: Person
    members: list[Person] = Field(max_length=2)


class Paint(BaseModel):
    color: Color
    shade: int = Field(ge=1, le=9)


class Tags(BaseModel):
    tags: list[str] = Field(min_length=1, max_length=3)


class Maybe(BaseModel):
    title: str = Field(max_length=20)
    subtitle: Optional[str] = Field(default=None, max_length=20)


class Reading(BaseModel):
    celsius: float = Field(ge=-50, le=60)
    ok: bool


class Order(BaseModel):
    item: str = Field(max_length=16)
    qty: int = Field(ge=1, le=10)
    express: bool


class Vote(BaseModel):
    choice: Color
    weights: list[int] = Field(max_length=3)


class Nested(BaseModel):
    city: City
    population: int = Field(ge=0, le=10**8)


SCHEMAS = [City, Person, Team, Paint, Tags, Maybe, Reading, Order, Vote, Nested]


@pytest.fixture(scope="module")
def client(llm):
    with LiveServer(llm.engine, MODEL) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_parse_returns_a_valid_instance(client):
    """Ten schemas at once: ten grammars compile and constrain rows of the same steps."""
    def parse(model):
        return client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": f"Give me a {model.__name__} as JSON."}],
                                             response_format=model, max_tokens=150, temperature=0)

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        for model, r in zip(SCHEMAS, pool.map(parse, SCHEMAS)):
            assert r.choices[0].finish_reason == "stop", (model.__name__, r.choices[0].message.content)
            assert isinstance(r.choices[0].message.parsed, model), model.__name__


def test_streamed_constrained_output_equals_the_full_one(client):
    body = dict(model=MODEL, messages=[{"role": "user", "content": "A person:"}], max_tokens=80, temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}})
    full = client.chat.completions.create(**body).choices[0].message.content
    parts = client.chat.completions.create(**body, stream=True)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == full
    assert set(json.loads(full)) == {"name", "age"}
    comp = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=8, temperature=1.0, seed=3, n=20,
                                     extra_body={"structured_outputs": {"choice": COLORS}})
    assert all(c.text in COLORS for c in comp.choices)
    regex = client.completions.create(model=MODEL, prompt="Code:", max_tokens=16, temperature=1.0, seed=4, n=20,
                                      extra_body={"guided_regex": PATTERN})
    assert all(re.fullmatch(PATTERN, c.text) for c in regex.choices)




def test_serve_bench_holds_every_request_to_a_schema(client):
    """`slipstream bench serve --structured json-unique`: each request's own schema is accepted and an output that
    ends before max_tokens is its complete JSON (the first schema's object fits in 80 tokens, the second's does not)."""
    import asyncio

    from slipstream.bench.serve_bench import run_rate

    prompts = [(f"Reply with a JSON object for record {i}:", 8, 80) for i in range(2)]
    r = asyncio.run(run_rate(str(client.base_url).removesuffix("/v1/"), MODEL, prompts, float("inf"), None, (1.0, 1.0), 0,
                             "json-unique"))
    assert r["failed"] == 0, r["errors"]
    assert (r["json_complete"], r["json_broken"]) == (1, 0), r


def test_a_constraint_is_parsed_once():
    """The front end, the input check and the compiler all ask for a constraint's grammar: parsed once per text (property
    order kept apart: it is the order the output writes them in); a bad one is refused every time."""
    from slipstream.grammar import _parsed, grammar_of

    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    first = grammar_of(StructuredOutputs(json=schema))
    before = _parsed.cache_info()
    assert grammar_of(StructuredOutputs(json=dict(schema))) is first
    assert _parsed.cache_info().hits == before.hits + 1
    swapped = dict(schema, properties=dict(reversed(list(schema["properties"].items()))))
    assert grammar_of(StructuredOutputs(json=swapped)) is not first
    for _ in range(2):
        with pytest.raises(ValueError, match="invalid regex"):
            grammar_of(StructuredOutputs(regex="(unclosed"))
