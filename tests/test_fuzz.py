"""Fuzzing the OpenAI endpoints with hypothesis: random bodies (known fields with values of any type and size,
unknown fields, odd nesting, constraints that compile grammars) never get a 5xx, every refusal is an OpenAI error
body naming a field, every stream ends with [DONE], and the engine still serves afterwards. Generation stays short (max_tokens is small whenever it is valid) so a few
hundred requests fit in a minute on the CPU."""
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_util import LiveServer
from slipstream import LLM

MODEL = "smollm2"

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=False, allow_infinity=False), st.floats(min_value=-2, max_value=3), st.text(max_size=12),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)
small = st.one_of(st.integers(min_value=-2, max_value=3), values)
# Constraints compile grammars: shapes that are sometimes valid (a schema, a regex, choices), sometimes not
schemas = st.one_of(values, st.fixed_dictionaries({"type": st.sampled_from(["object", "string", "integer", "array", "x"])},
                                                  optional={"properties": st.dictionaries(st.text(max_size=4), values, max_size=2),
                                                            "required": values, "enum": values, "pattern": st.text(max_size=6)}))
patterns = st.one_of(st.text(alphabet="ab[]()*+?{}|\\.0-9^$", max_size=8), values)
constraint = st.fixed_dictionaries({}, optional={"json": st.one_of(schemas, st.text(max_size=12)), "regex": patterns,
                                                 "choice": st.one_of(st.lists(st.text(max_size=4), max_size=3), values),
                                                 "grammar": st.one_of(st.just('root ::= "a" | "b"'), st.text(max_size=12)),
                                                 "json_object": values})
formats = st.one_of(values, st.fixed_dictionaries({"type": st.sampled_from(["json_object", "json_schema", "text", "x"])},
                                                  optional={"json_schema": st.one_of(values, st.fixed_dictionaries(
                                                      {"name": st.text(max_size=4), "schema": schemas}))}))

COMMON = {
    "temperature": values, "top_p": values, "top_k": values, "min_p": values, "seed": values, "n": small,
    "stop": values, "stop_token_ids": values, "logit_bias": values, "logprobs": values, "presence_penalty": values,
    "frequency_penalty": values, "repetition_penalty": values, "min_tokens": small, "ignore_eos": values,
    "stream": st.booleans(), "stream_options": values, "user": values, "priority": values, "timeout": values,
    "model": st.one_of(st.just(MODEL), values), "response_format": formats, "best_of": values,
    "structured_outputs": st.one_of(constraint, values), "guided_json": st.one_of(schemas, st.text(max_size=12)),
    "guided_regex": patterns, "guided_choice": st.one_of(st.lists(st.text(max_size=4), max_size=3), values),
    "guided_grammar": st.one_of(st.text(max_size=12), values), "include_stop_str_in_output": values,
    "skip_special_tokens": values,
}
COMPLETIONS = {**COMMON, "prompt": st.one_of(st.text(max_size=40), st.lists(st.integers(min_value=-5, max_value=60000), max_size=8), values),
               "echo": values, "suffix": values}
CHAT = {**COMMON, "messages": st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "x"]),
                                     "content": st.one_of(st.text(max_size=30), values)}), max_size=3), values),
    "max_completion_tokens": small, "top_logprobs": values, "tools": values, "tool_choice": values,
    "parallel_tool_calls": values, "add_generation_prompt": values}


def bodies(fields: dict):
    return st.fixed_dictionaries({}, optional={**fields, "max_tokens": small, "extra_field": values})


@pytest.fixture(scope="module")
def server(gguf_path):
    llm = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=512)
    with LiveServer(llm.engine, MODEL) as s:
        yield s


def _check(server, path: str, body: dict) -> None:
    body.setdefault("max_tokens", 2)
    if isinstance(body.get("n"), int) and body["n"] > 3:
        body["n"] = 3
    r = httpx.post(f"{server.url}/v1/{path}", json=body, timeout=120)
    assert r.status_code < 500, (body, r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and err["type"], r.text
        if r.status_code == 400:  # every body here is an object: a refusal is about one of its fields
            assert err["param"], r.text
    elif not body.get("stream"):
        assert r.json()["choices"], r.text
    else:  # a stream that fails part-way ends with an error event, never a broken one
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=True)


@FUZZ
@given(body=bodies(COMPLETIONS))
def test_fuzz_completions(server, body):
    _check(server, "completions", body)


@FUZZ
@given(body=bodies(CHAT))
def test_fuzz_chat(server, body):
    _check(server, "chat/completions", body)


def test_engine_alive_after_fuzzing(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(server.url + "/health").status_code == 200
