"""Tool calling: the call extractors on text in each model family's format, streamed split at every character
boundary (the deltas must assemble to exactly the finished parse), and the OpenAI protocol against a real server
with the embedded model: `required` and named choices (grammar-enforced), streamed and not, a full round trip
call -> `tool` message -> answer, and a reasoning model's <think> block sent as reasoning_content."""
from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from server_util import LiveServer
from slipstream import LLM, SamplingParams
from slipstream.loader import load_tokenizer
from slipstream.server.tools import (ReasoningStream, ToolStream, detect_format, extract, finished_calls, reasoning_end_ids, render_messages,
                                     required_schema, split_reasoning)

MODEL = "smollm2"

TEXTS = {  # as the families' models write them
    "hermes": 'Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "note": "say \\"hi\\" {}"}}\n'
              '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    "mistral": 'Sure. [TOOL_CALLS] [{"name": "lookup", "arguments": {"ids": [1, 2, {"k": "]"}]}}, {"name": "b", "arguments": {"q": null}}]',
    "llama3_json": '<|python_tag|>{"name": "search", "parameters": {"query": "cats; dogs"}}; {"name": "x", "parameters": {}}',
    "json_array": '[{"name": "f", "arguments": {"a": 1.5e3}}, {"name": "g", "arguments": {"b": "[}"}}]',
    # GLM-4.5: a string argument that reads as JSON stays a string where the schema says string
    "glm45": 'I will look.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n'
             '<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>zip</arg_key>\n<arg_value>75001</arg_value>\n'
             '<arg_key>opts</arg_key>\n<arg_value>{"units": "C", "hours": [6, 18]}</arg_value>\n</tool_call>'
             '<tool_call>get_time</tool_call>',
}
EXPECTED = {
    "hermes": ("Let me check both.", [("get_weather", '{"city": "Paris", "note": "say \\"hi\\" {}"}'), ("get_time", "{}")]),
    "mistral": ("Sure.", [("lookup", '{"ids": [1, 2, {"k": "]"}]}'), ("b", '{"q": null}')]),
    "llama3_json": (None, [("search", '{"query": "cats; dogs"}'), ("x", "{}")]),
    "json_array": (None, [("f", '{"a": 1.5e3}'), ("g", '{"b": "[}"}')]),
    "glm45": ("I will look.", [("get_weather", '{"city": "Paris", "days": 3, "zip": "75001", "opts": {"units": "C", "hours": [6, 18]}}'),
                               ("get_time", "{}")]),
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "zip": {"type": "string"},
                                     "opts": {"type": "object"}}}}}] + [
    {"type": "function", "function": {"name": name}} for name in ("get_time", "lookup", "b", "search", "x", "f", "g")]


def _assemble(fmt: str, pieces: list[str], tools=TOOLS, parallel=True) -> tuple[str, list[tuple[str, str]]]:
    stream, content, calls = ToolStream(fmt, tools=tools, parallel=parallel), "", {}
    for i, text in enumerate(pieces):
        c, deltas = stream.feed(text, i == len(pieces) - 1)
        content += c
        for d in deltas:
            entry = calls.setdefault(d["index"], ["", ""])
            if "id" in d:
                assert d["id"].startswith("call_") and d["type"] == "function"
                entry[0] = d["function"]["name"]
            entry[1] += d["function"]["arguments"]
    return content, [tuple(e) for e in calls.values()]


@pytest.mark.parametrize("fmt", list(TEXTS))
def test_extractors_parse_each_family(fmt):
    content, calls, complete = finished_calls(fmt, TEXTS[fmt], tools=TOOLS)
    assert complete
    assert (content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls]) == EXPECTED[fmt]
    assert all(json.loads(c["function"]["arguments"]) is not None for c in calls)


@pytest.mark.parametrize("fmt", list(TEXTS))
def test_streamed_calls_equal_the_finished_parse_at_every_split(fmt):
    text = TEXTS[fmt]
    content, calls = EXPECTED[fmt]
    for cut in range(len(text) + 1):
        assert _assemble(fmt, [text[:cut], text]) == (content or "", calls), cut
    # and fed one character at a time
    assert _assemble(fmt, [text[:i] for i in range(1, len(text) + 1)]) == (content or "", calls)


MALFORMED = [  # (format, what a model wrote): each is read the same streamed and not
    ("hermes", '<tool_call>\n{"temp": 22}'),  # no name: all of it is content
    ("hermes", 'Sure.\n<tool_call>\n{"name": "delete_all", "arguments": {"x": 1}}\n</tool_call>'),  # undeclared
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": "city=Rome"}</tool_call>'),  # arguments not an object
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "'),  # cut off: a call, incomplete
    ("hermes", '<tool_call>{"name": "get_weather"'),  # cut off before its arguments: not a call
    ("hermes", '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "nope", "arguments": {}}'),
    ("json_array", '[{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_time", "arguments": {"tz": "'),
    ("json_array", '[{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_time"'),
    ("mistral", 'ok [TOOL_CALLS] [{"name": "lookup", "arguments": {"ids": [1'),
    # a key written twice: the first counts (a stream has sent it by the time the second comes)
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}, "name": "get_weather"}]'),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}, "arguments": "Rome"}</tool_call>'),
    ("llama3_json", '{"name": "get_weather", "parameters": {"a": 1}, "arguments": {"city": "Rome"}}'),
    # a block that is no JSON object ends the calls
    ("hermes", '<tool_call>garbage</tool_call><tool_call>{"name": "get_time", "arguments": {}}</tool_call>'),
]


def _finished(fmt, text, tools=TOOLS, parallel=True):
    found = finished_calls(fmt, text, tools=tools, parallel=parallel)
    if found is None:
        return text, []
    return found[0] or "", [(c["function"]["name"], c["function"]["arguments"]) for c in found[1]]


@pytest.mark.parametrize("fmt,text", MALFORMED)
def test_malformed_and_cut_off_calls_read_the_same_streamed_and_not(fmt, text):
    """A call counts once it names a declared function and its arguments open an object; a call cut off is still a
    call (incomplete: finish_reason is then not "tool_calls"); anything else is content. Streamed deltas assemble
    to exactly the non-streamed message, at every split."""
    want = _finished(fmt, text)
    for cut in range(len(text) + 1):
        assert _assemble(fmt, [text[:cut], text]) == want, cut
    assert _assemble(fmt, [text[:i] for i in range(1, len(text) + 1)]) == want


def test_which_calls_count():
    assert _finished("hermes", MALFORMED[0][1]) == (MALFORMED[0][1], [])
    assert _finished("hermes", MALFORMED[1][1])[1] == []  # an undeclared function is no call
    assert _finished("hermes", MALFORMED[2][1])[1] == []  # nor are arguments that are not an object
    assert _finished("hermes", MALFORMED[3][1]) == ("", [("get_weather", '{"city": "')])
    assert finished_calls("hermes", MALFORMED[3][1], tools=TOOLS)[2] is False  # incomplete
    assert _finished("hermes", MALFORMED[5][1]) == ("", [("get_time", "{}")])  # the calls before the first that is not
    assert finished_calls("hermes", MALFORMED[5][1], tools=TOOLS)[2] is True
    assert [_finished(fmt, MALFORMED[i][1])[1] for i, fmt in ((9, "mistral"), (10, "hermes"), (11, "llama3_json"))] == [
        [("f", "{}")], [("get_weather", '{"city": "Rome"}')], [("get_weather", '{"a": 1}')]]
    assert _finished("hermes", MALFORMED[12][1])[1] == []
    two = TEXTS["hermes"]
    assert [c[0] for c in _finished("hermes", two)[1]] == ["get_weather", "get_time"]
    assert [c[0] for c in _finished("hermes", two, parallel=False)[1]] == ["get_weather"]  # one where parallel is off
    assert _assemble("hermes", [two[:60], two], parallel=False) == _finished("hermes", two, parallel=False)


def test_text_without_calls_is_content():
    for fmt in ("hermes", "mistral", "llama3_json", "glm45"):
        assert finished_calls(fmt, "Paris is the capital.") is None
        assert _assemble(fmt, ["Paris is", "Paris is the capital."]) == ("Paris is the capital.", [])
    # a marker cut off at the end of a delta is held back, not sent as content
    assert extract("hermes", "Sure <tool_", final=False)[0] == "Sure"
    assert extract("mistral", "ok [TOOL_C", final=False)[0] == "ok"
    assert extract("glm45", "ok <tool", final=False)[0] == "ok"
    # GLM-4.5 without the schema: JSON-looking values are JSON; a call with no name is no call
    assert finished_calls("glm45", "<tool_call>f\n<arg_key>zip</arg_key><arg_value>75001</arg_value></tool_call>")[1][0][
        "function"]["arguments"] == '{"zip": 75001}'
    assert finished_calls("glm45", "<tool_call>\n</tool_call>") is None
    # values by what the schema allows: a string kept as written (quotes too), JSON where its type is allowed, and
    # never a value that is not JSON (NaN)
    schema = [{"type": "function", "function": {"name": "f", "parameters": {"properties": {
        "s": {"type": "string"}, "o": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "n": {"type": "number"},
        "m": {"type": ["number", "string"]}, "big": {"type": "number"}}}}}]
    pairs = {"s": '"quoted"', "o": "null", "n": "NaN", "m": "5", "big": "1e400"}
    text = "<tool_call>f" + "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in pairs.items()) + "</tool_call>"
    args = json.loads(finished_calls("glm45", text, tools=schema)[1][0]["function"]["arguments"])
    assert args == {"s": '"quoted"', "o": None, "n": "NaN", "m": 5, "big": "1e400"}
    assert detect_format("{{ '<tool_call>' + name }}<arg_key>{{ k }}</arg_key>") == "glm45"


def test_templates_without_tools_get_them_in_a_system_message():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    out = render_messages(msgs, tools, renders_tools=False)
    assert out[0]["role"] == "system" and '"name": "f"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    assert out[3] == {"role": "tool", "content": "42"}
    kept = render_messages(msgs, tools, renders_tools=True)  # templates that know tools get the arguments as an object
    assert kept[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1} and kept[0] == msgs[0] and kept[2] == msgs[2]


def test_calls_without_arguments_and_broken_strings():
    content, calls, _ = finished_calls("hermes", '<tool_call>{"name": "now"}</tool_call>')
    assert calls[0]["function"] == {"name": "now", "arguments": "{}"}
    assert _assemble("hermes", ['<tool_call>{"name": "now"', '<tool_call>{"name": "now"}</tool_call>'], tools=None) == ("", [("now", "{}")])
    assert finished_calls("hermes", '<tool_call>{"name": "bad\\q", "arguments": {}}</tool_call>') is None  # invalid escape


def test_required_schema_keeps_each_tools_definitions():
    """Pydantic-style parameters ($defs + $ref) still resolve once nested under the required-call schema."""
    from pydantic import BaseModel

    from slipstream.grammar import grammar_of
    from slipstream.sampling_params import StructuredOutputs

    class Addr(BaseModel):
        city: str

    class Trip(BaseModel):
        start: Addr
        end: Addr | None = None

    tools = [{"type": "function", "function": {"name": n, "parameters": Trip.model_json_schema()}} for n in ("a", "b")]
    schema = required_schema(tools, parallel=True)
    assert set(schema["$defs"]) == {"tool0_Addr", "tool1_Addr"}
    assert schema["items"]["anyOf"][1]["properties"]["arguments"]["properties"]["start"] == {"$ref": "#/$defs/tool1_Addr"}
    grammar_of(StructuredOutputs(json=schema))  # xgrammar resolves every reference


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(gguf_path):
    llm = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=1024)
    with LiveServer(llm.engine, MODEL) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _streamed(client, **body):
    content, calls, reasons = "", {}, []
    for chunk in client.chat.completions.create(stream=True, **body):
        d = chunk.choices[0].delta
        content += d.content or ""
        for c in d.tool_calls or []:
            entry = calls.setdefault(c.index, {"id": None, "name": None, "arguments": ""})
            if c.id:
                entry["id"], entry["name"] = c.id, c.function.name
            entry["arguments"] += c.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    return content, list(calls.values()), reasons[-1]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_forced_calls_parse_streamed_and_not(client, choice):
    body = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, temperature=0, max_tokens=120)
    r = client.chat.completions.create(**body)
    msg = r.choices[0].message
    assert msg.tool_calls and msg.content is None
    for call in msg.tool_calls:
        assert call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    assert r.choices[0].finish_reason == ("tool_calls" if choice == "required" else "stop")
    content, calls, reason = _streamed(client, **body)
    assert not content and reason == r.choices[0].finish_reason
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.function.name, c.function.arguments) for c in msg.tool_calls]


def test_tool_round_trip(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=80,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], temperature=0, max_tokens=40)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    content, calls, _ = _streamed(client, model=MODEL, messages=history, tools=[WEATHER], temperature=0, max_tokens=40)
    assert content == answer.choices[0].message.content and not calls


def test_glm45_calls_through_the_server(gguf_path):
    """--tool-call-parser glm45: the output (held to GLM-4.5's call syntax by a regex, as the embedded model does not
    write it) comes back as OpenAI tool calls, typed by the tool's schema, streamed and not."""
    glm = ("Checking.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>1984</arg_value>\n"
           "<arg_key>unit</arg_key>\n<arg_value>celsius</arg_value>\n</tool_call>")
    llm = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=1024)
    with LiveServer(llm.engine, MODEL, tool_call_parser="glm45") as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        body = dict(model=MODEL, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=80,
                    extra_body={"structured_outputs": {"regex": re.escape(glm)}})
        r = c.chat.completions.create(**body)
        msg = r.choices[0].message
        assert msg.content == "Checking." and r.choices[0].finish_reason == "tool_calls"
        assert [(t.function.name, json.loads(t.function.arguments)) for t in msg.tool_calls] == [
            ("get_weather", {"city": "1984", "unit": "celsius"})]  # a string where the schema says string
        content, calls, reason = _streamed(c, **body)
        assert (content, reason) == ("Checking.", "tool_calls")
        assert [(x["name"], x["arguments"]) for x in calls] == [(t.function.name, t.function.arguments) for t in msg.tool_calls]


def test_bad_tool_requests_are_400(client):
    def fn(parameters):
        return {"type": "function", "function": {"name": "f", "parameters": parameters}}

    for body, param in ((dict(tool_choice="required"), "tool_choice"),
                        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
                        (dict(tools=[WEATHER, WEATHER]), "tools"),
                        (dict(tools=[fn({"type": "string"})]), "tools"),  # arguments are an object
                        (dict(tools=[fn({"type": "object", "properties": 5})]), "tools"),
                        (dict(tools=[fn({"type": "object", "required": "city"})]), "tools"),
                        (dict(tools=[WEATHER], stream=False, stream_options={"include_usage": True}), "stream_options"),
                        (dict(tools=[WEATHER], stream_options={"include_usage": True}), "stream_options")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **body)
        assert e.value.body["param"] == param, e.value.body
    # schemas clients generate: a type list holding "object", null properties and required
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, tools=[
        fn({"type": ["object", "null"], "properties": None, "required": None})])
    assert r.choices[0].finish_reason
    # a forced call is the output: response_format (for content) has nothing to shape, and is no conflict
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, tools=[WEATHER], tool_choice="required",
                                       response_format={"type": "json_object"}, temperature=0)
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_models_by_id(client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.BadRequestError) as e:  # (completions too)
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, stream_options={"include_usage": True})
    assert e.value.body["param"] == "stream_options"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found"


REASONED = {"qwen3": ("<think>\nThe user asks 2+2. That is 4.\n</think>\n\nThe answer is 4.",
                      ("\nThe user asks 2+2. That is 4.\n", "The answer is 4.")),
            "deepseek_r1": ("2+2 is 4, so answer 4.</think>\n\n4", ("2+2 is 4, so answer 4.", "4")),
            "glm45": ("<think>Paris, surely.</think>\n<tool_call>f</tool_call>", ("Paris, surely.", "<tool_call>f</tool_call>"))}


@pytest.mark.parametrize("parser", list(REASONED))
def test_reasoning_splits_the_same_streamed_at_every_split(parser):
    text, expected = REASONED[parser]
    assert split_reasoning(parser, text, True) == expected
    for cut in range(len(text) + 1):
        stream, reasoning = ReasoningStream(parser), ""
        for piece, final in ((text[:cut], False), (text, True)):
            delta, content = stream.feed(piece, final)
            reasoning += delta
        assert (reasoning, content) == expected, cut
    assert split_reasoning("qwen3", "No thinking here.", True) == ("", "No thinking here.")


def test_constraints_start_after_the_reasoning_unless_the_prompt_closed_it(gguf_path):
    tok = load_tokenizer(gguf_path)
    end = tuple(tok.encode("</think>", add_special_tokens=False))
    assert reasoning_end_ids(tok, tok.encode("<|im_start|>assistant\n")) == end
    assert reasoning_end_ids(tok, tok.encode("<|im_start|>assistant\n<think>\n")) == end  # deepseek_r1 opens it
    assert reasoning_end_ids(tok, tok.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n")) == ()  # thinking off


def test_reasoning_content_through_the_server(gguf_path):
    """A regex makes the embedded model write a <think> block; the server sends it as reasoning_content. (The user
    message ends in an empty block, as a template with thinking off would write it, so the constraint applies from
    the first token: the embedded model never writes </think> itself.)"""
    llm = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=512)
    with LiveServer(llm.engine, MODEL, reasoning_parser="qwen3") as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        body = dict(model=MODEL, messages=[{"role": "user", "content": "Hi <think></think>"}], temperature=0, max_tokens=40,
                    extra_body={"guided_regex": r"<think>[a-z ]{3,20}</think>[A-Z][a-z]{2,10}"})
        msg = c.chat.completions.create(**body).choices[0].message
        reasoning, content = msg.model_extra["reasoning_content"], msg.content
        assert re.fullmatch(r"[a-z ]{3,20}", reasoning) and re.fullmatch(r"[A-Z][a-z]{2,10}", content)
        r, t = "", ""
        for chunk in c.chat.completions.create(stream=True, **body):
            d = chunk.choices[0].delta
            r += (d.model_extra or {}).get("reasoning_content") or ""
            t += d.content or ""
        assert (r, t) == (reasoning, content)


QWEN3_LIKE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n"
              "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def test_chat_template_kwargs_reach_the_template(gguf_path):
    """Qwen3's switch: enable_thinking=False makes its template close an empty reasoning block in the prompt (after
    which a constraint starts at once); a variable the template does not read changes nothing; the template's own
    inputs cannot be replaced."""
    from slipstream.engine.input_processor import apply_chat_template

    tok = load_tokenizer(gguf_path)
    tok.chat_template = QWEN3_LIKE
    msgs = [{"role": "user", "content": "Hi"}]
    plain = apply_chat_template(tok, msgs)
    off = apply_chat_template(tok, msgs, template_kwargs={"enable_thinking": False})
    assert tok.decode(off).endswith("<think>\n\n</think>\n\n") and off[: len(plain)] == plain
    assert apply_chat_template(tok, msgs, template_kwargs={"enable_thinking": True}) == plain
    assert apply_chat_template(tok, msgs, template_kwargs={"unused_by_this_template": 1}) == plain
    assert reasoning_end_ids(tok, off) == ()
    with pytest.raises(ValueError, match="chat_template_kwargs may not set 'add_generation_prompt'"):
        apply_chat_template(tok, msgs, template_kwargs={"add_generation_prompt": False})
    with pytest.raises(ValueError, match="chat_template_kwargs may not set 'strftime_now'"):
        apply_chat_template(tok, msgs, template_kwargs={"strftime_now": 1})
    # a template that refuses the conversation (Jinja's error, not a ValueError) is the client's mistake
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(ValueError, match="^messages: the chat template could not render them: .*must alternate"):
        apply_chat_template(tok, msgs)


def test_chat_template_kwargs_through_llm_and_the_server(gguf_path):
    llm = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=512)
    llm.tokenizer.chat_template = QWEN3_LIKE
    msgs = [{"role": "user", "content": "Hi"}]
    params = SamplingParams(max_tokens=1, temperature=0)
    on, off = (llm.chat(msgs, params, chat_template_kwargs={"enable_thinking": t})[0] for t in (True, False))
    assert len(off.prompt_token_ids) > len(on.prompt_token_ids)
    with LiveServer(llm.engine, MODEL) as server:
        body = {"model": MODEL, "messages": msgs, "max_tokens": 1}
        usage = [httpx.post(server.url + "/v1/chat/completions", json={**body, "chat_template_kwargs": {"enable_thinking": t}},
                            timeout=60).json()["usage"]["prompt_tokens"] for t in (True, False)]
        assert usage == [len(on.prompt_token_ids), len(off.prompt_token_ids)]
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "chat_template_kwargs": {"tokenize": False}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", r.text
