"""Overlap (async scheduling): the core launches step N + 1 before it reads step N, feeding each decoding
sequence the token step N drew straight from the device. On CUDA it is on by default; here it is forced on
the CPU, where the same bookkeeping runs: every output must equal the synchronous engine's, under preemption,
n > 1, seeded sampling, penalties (which fall back to synchronous steps), grammars (whose masks are filled after
reading step N, while step N + 1's forward runs), stop tokens and strings, eos, aborts, and no page may leak."""
import threading

import pytest
import torch

from conftest import assert_no_leak
from slipstream import LLM, SamplingParams
from slipstream.sampling_params import StructuredOutputs

PROMPTS = ["The three most important ideas in physics are", "Write a haiku about the sea.", "List the planets:",
           "def fibonacci(n):", "Once upon a time, in a small village,", "The recipe for bread is simple:",
           "A user record as JSON:", "Today's date:"]
RECORD = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "tags": {
    "type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}}, "required": ["name", "tags"]}


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=90, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=1, max_tokens=70, n=2, logprobs=1, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=2, max_tokens=25, repetition_penalty=1.2, presence_penalty=0.3),
        SamplingParams(temperature=0, max_tokens=60, stop=["\n\n"]),
        SamplingParams(temperature=0.9, top_p=0.9, seed=4, max_tokens=35, min_tokens=5),
        SamplingParams(temperature=0, max_tokens=3),
        SamplingParams(temperature=0.9, seed=6, n=2, max_tokens=80, structured_outputs=StructuredOutputs(json=RECORD)),
        SamplingParams(temperature=0, max_tokens=30, structured_outputs=StructuredOutputs(regex=r"20[0-9]{2}-[01][0-9]")),
    ]


TIGHT = dict(dtype="float32", device="cpu", block_size=16, num_blocks=14, max_model_len=224, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def tight(gguf_path):
    """A small pool so that the batch preempts, with overlap on and off."""
    return LLM(gguf_path, async_scheduling="off", **TIGHT), LLM(gguf_path, async_scheduling="on", **TIGHT)


@pytest.fixture(scope="module")
def reference(tight):
    """The synchronous engine's outputs for PROMPTS and _params(), which every overlapped run must equal."""
    return tight[0].generate(PROMPTS, _params())


def test_overlap_changes_no_output(tight, reference, monkeypatch):
    sync, overlap = tight
    core = overlap.engine.core
    assert core.overlap and not sync.engine.core.overlap
    fill, reading = core._fill_masks, []

    def filled(owners, before):  # noqa: ANN001, ANN202
        # a constrained step in flight: it is read first, then these masks are filled
        flight = core._inflight
        reading.append(flight is not None and any(seq.seq_id in core._matchers for seq in flight.batch.seqs))
        return fill(owners, before)

    monkeypatch.setattr(core, "_fill_masks", filled)
    out = overlap.generate(PROMPTS, _params())
    assert overlap.engine.stats.num_preemptions >= 1, "the pool was meant to force preemption"
    assert sum(reading) > 20, f"constrained steps were meant to overlap: {sum(reading)} of {len(reading)}"
    for a, b in zip(out, reference):
        for x, y in zip(a.outputs, b.outputs):
            assert x.token_ids == y.token_ids and x.text == y.text and x.finish_reason == y.finish_reason
            if y.logprobs is not None:
                assert [lp.keys() for lp in x.logprobs] == [lp.keys() for lp in y.logprobs]
    for llm in tight:
        assert_no_leak(llm)


class _BlockingGate:
    """A GPU stream's wait for a mask, emulated on the CPU (which computes a draw as it is queued): `wait` blocks the
    queueing thread until the mask's fill, on the grammar service's thread, opens the ticket."""

    def __init__(self) -> None:
        self.opened, self.tickets, self.waits = 0, 0, 0
        self._cv = threading.Condition()

    def next_ticket(self) -> int:
        self.tickets += 1
        return self.tickets

    def wait(self, ticket: int) -> None:
        self.waits += 1
        with self._cv:
            assert self._cv.wait_for(lambda: self.opened >= ticket, timeout=60), "a mask's fill never opened its gate"

    def open(self, ticket: int) -> None:
        with self._cv:
            self.opened = max(self.opened, ticket)
            self._cv.notify_all()


def test_masks_filled_behind_a_gate_change_no_output(tight, reference, monkeypatch):
    """Masks filled on a thread while the draw waits behind a gate (as a GPU's stream waits for them): the same
    outputs as the synchronous engine, under preemption, with every ticket opened. (The overlapped engine of `tight`
    is given a grammar service with a gate: loading another engine would only repeat what `tight` loaded.)"""
    import sys

    from slipstream.grammar import Grammars

    _, overlap = tight
    core, gate, interval = overlap.engine.core, _BlockingGate(), sys.getswitchinterval()
    try:
        monkeypatch.setattr(core, "_grammars", Grammars(core.tokenizer, core.model_config.vocab_size, sorted(core.eos_ids),
                                                         gate=gate))
        preempted = overlap.engine.stats.num_preemptions
        out = overlap.generate(PROMPTS, _params())
    finally:
        sys.setswitchinterval(interval)  # (Grammars shortened it for its filling thread; the suite runs as before)
    assert overlap.engine.stats.num_preemptions > preempted
    assert gate.waits > 20 and gate.opened == gate.tickets == gate.waits
    assert core._filling is None  # the last fill was awaited
    for a, b in zip(out, reference):
        for x, y in zip(a.outputs, b.outputs):
            assert x.token_ids == y.token_ids and x.text == y.text and x.finish_reason == y.finish_reason
    assert_no_leak(overlap)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device's wait on the host")
def test_masks_behind_the_gate_on_a_gpu_change_no_output(gguf_path, monkeypatch):
    """On a GPU, the stream waits for each mask by the driver's memory operation: the same outputs as masks filled
    before each draw, under preemption (a float32 engine: the same kernels either way)."""
    from slipstream.runner.host_gate import HostGate

    gpu = dict(TIGHT, device="cuda")
    ungated = LLM(gguf_path, async_scheduling="on", **gpu)
    with monkeypatch.context() as m:
        m.setattr(HostGate, "for_device", staticmethod(lambda device: None))
        want = ungated.generate(PROMPTS, _params())
    gated = LLM(gguf_path, async_scheduling="on", **gpu)
    out = gated.generate(PROMPTS, _params())
    assert gated.engine.core._grammars.gate is not None and ungated.engine.core._grammars.gate is None
    for a, b in zip(out, want):
        for x, y in zip(a.outputs, b.outputs):
            assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason


def test_overlap_with_ngram_drafts_changes_no_output(reference, gguf_path):
    """n-gram drafting with overlap on: steps that verify drafts are read before the next is scheduled, a step that
    will draft reads the one in flight first, and the others overlap; under preemption, grammars (masks after drafts),
    penalties, n > 1."""
    spec = LLM(gguf_path, async_scheduling="on", speculative_method="ngram", num_speculative_tokens=3,
               speculative_adaptive=False, **TIGHT)
    core = spec.engine.core
    assert core.overlap
    out = spec.generate(PROMPTS, _params())
    assert spec.engine.stats.num_preemptions >= 1 and core.stats.accepted_draft_tokens > 0
    for a, b in zip(out, reference):
        for x, y in zip(a.outputs, b.outputs):
            assert x.token_ids == y.token_ids and x.text == y.text and x.finish_reason == y.finish_reason
    assert_no_leak(spec)


def test_overlap_streams_and_aborts(tight):
    _, overlap = tight
    got = []
    for out in overlap.stream("Count from one to fifty: one, two,", SamplingParams(temperature=0, max_tokens=200)):
        got.append(out.outputs[0].delta_text)
        if len(got) == 5:
            break  # the consumer goes away with a step in flight
    assert len(got) == 5
    while overlap.engine.has_unfinished():
        overlap.engine.step()
    # eos ends a sequence while its next step is already launched: that step's token is dropped
    out = overlap.generate(["Say just 'yes'."], SamplingParams(temperature=0, max_tokens=100))[0].outputs[0]
    assert out.finish_reason == "stop" and len(out.token_ids) < 100
    assert_no_leak(overlap)
