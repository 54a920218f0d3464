"""OpenAI tool calling: tools rendered into the prompt, tool calls found in the model's text, streamed as deltas.

Each model family writes calls its own way; an extractor per format finds them in the text generated so far:
  - hermes (Qwen, Hermes, and any ChatML model whose template does not render tools: we render them so):
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of them;
  - llama3_json: the whole output is `{"name": ..., "parameters": {...}}` (several joined by `;`), maybe after
    `<|python_tag|>`;
  - mistral: `[TOOL_CALLS]` and then a JSON array of `{"name": ..., "arguments": {...}}`;
  - glm45 (GLM-4.5 and later): `<tool_call>NAME` and then `<arg_key>K</arg_key><arg_value>V</arg_value>` pairs,
    `</tool_call>`, any number of them; a value is raw text where the tool's schema says string, else JSON (the
    template writes other values so), and the arguments are the JSON object of the pairs;
  - json_array: what `tool_choice="required"` constrains the output to (any model): `[{"name": ..., "arguments": ...}]`;
  - named: `tool_choice` names a function: the whole output is its arguments.
The extractor reads the JSON with a small scanner that tolerates a cut-off end, so the same code serves a finished
output and a stream: a stream re-reads the text so far at every delta and sends what grew since (a call once its
arguments have begun, then its arguments text piece by piece), and the deltas concatenate to exactly the message a
non-streamed response holds, whatever the model wrote. A response's calls (`accepted`) are, in order, those that name
one of the request's functions with arguments that open a JSON object (one call where parallel calls are off); the
first that does not ends them, and an output with none is all content. A call cut off (by max_tokens, a stop string,
the end of the output) is still a call, streamed or not, and the response's finish_reason is then not "tool_calls".
`required` and named choices are enforced by a grammar (`constraint`): those calls always parse once complete.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("auto", "hermes", "llama3_json", "mistral", "glm45")


@dataclass
class Call:
    name: str | None  # None until the name's string is complete
    arguments: str  # the arguments' JSON text as written so far
    done: bool = False


def _skip_string(text: str, i: int) -> int:
    """Index after the string starting at text[i] == '"', or -1 if it is cut off."""
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return -1


def _skip_value(text: str, i: int) -> int:
    """Index after the JSON value starting at text[i], or -1 if it is cut off."""
    if i >= len(text):
        return -1
    if text[i] == '"':
        return _skip_string(text, i)
    if text[i] not in "{[":
        j = i
        while j < len(text) and text[j] not in ",}] \n\r\t":
            j += 1
        return j if j < len(text) else -1
    depth = 0
    while i < len(text):
        c = text[i]
        if c == '"':
            i = _skip_string(text, i)
            if i < 0:
                return -1
            continue
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _ws(text: str, i: int, extra: str = "") -> int:
    while i < len(text) and (text[i].isspace() or text[i] in extra):
        i += 1
    return i


def _object(text: str, i: int, args_keys: tuple[str, ...]) -> tuple[Call, int]:
    """Read the call object starting at text[i] == '{': (the call as far as the text goes, index after it or -1).
    The first name and the first arguments count (a stream sends them as they come; a key written again is not
    read)."""
    name, args, args_seen, name_seen = None, "", False, False
    i = _ws(text, i + 1)
    while i < len(text) and text[i] == '"':
        end = _skip_string(text, i)
        if end < 0:
            break
        key = _string(text[i:end])
        i = _ws(text, end)
        if i >= len(text) or text[i] != ":":
            break
        i = _ws(text, i + 1)
        stop = _skip_value(text, i)
        if key == "name" and not name_seen:
            if stop > 0:
                name, name_seen = (_string(text[i:stop]) if text[i] == '"' else None), True
        elif key in args_keys and not args_seen:
            args, args_seen = text[i : stop if stop > 0 else len(text)], True
        if stop < 0:
            return Call(name, args), -1
        i = _ws(text, stop)
        if i < len(text) and text[i] == ",":
            i = _ws(text, i + 1)
    if i < len(text) and text[i] == "}":  # closed: a call without arguments takes none
        return Call(name, args if args_seen else "{}", done=name is not None), i + 1
    return Call(name, args), -1


def _string(literal: str) -> str | None:
    """A JSON string literal's value; None if the model wrote an invalid one (the call then never completes)."""
    try:
        return json.loads(literal)
    except json.JSONDecodeError:
        return None


def _objects(text: str, i: int, args_keys: tuple[str, ...], separators: str) -> list[Call]:
    calls = []
    while True:
        i = _ws(text, i, separators)
        if i >= len(text) or text[i] != "{":
            return calls
        call, i = _object(text, i, args_keys)
        calls.append(call)
        if i < 0:
            return calls


def _held(text: str, marker: str) -> int:
    """Length of the end of `text` that could be the start of `marker` (held back from streamed content)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def extract(fmt: str, text: str, final: bool, name: str | None = None, tools: list[dict] | None = None,
            parallel: bool = True) -> tuple[str, list[Call]]:
    """(content, accepted calls) in `text`. Not `final`: content leaves out an end that may open a call, and trailing
    whitespace (a finished output with calls drops the whitespace before them); `final` with no call: all of it.
    `tools`: the request's (the functions a call may name; glm45 reads their schemas to tell string arguments from
    JSON ones)."""
    content, calls = _extract(fmt, text, final, name, tools)
    calls = accepted(calls, tools, parallel)
    if final and not calls:
        return text, []
    return (content if final else content.rstrip()), calls


def accepted(calls: list[Call], tools: list[dict] | None, parallel: bool = True) -> list[Call]:
    """The calls a response holds: in order, each once its name is complete, is one of `tools`' functions (any name
    without `tools`) and its arguments have begun as a JSON object; the first that does not ends them (an undeclared
    function or arguments that are not an object are text, not a call: an agent would fail on them). Only the first
    where parallel calls are off."""
    names = {(t.get("function") or {}).get("name") for t in tools or ()}
    out = []
    for c in calls:
        args = c.arguments.lstrip()
        if c.name is None or (tools and c.name not in names) or not args.startswith("{"):
            break
        out.append(c)
        if not parallel:
            break
    return out


_GLM_PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


def _schema_types(schema: Any) -> set[str]:
    """The JSON types a schema allows (its `type`, or its anyOf / oneOf branches' types); empty: not said."""
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    types = set(kind) if isinstance(kind, list) else {kind} if isinstance(kind, str) else set()
    for branch in (schema.get("anyOf") or []) + (schema.get("oneOf") or []):
        types |= _schema_types(branch)
    return types


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}[type(value)]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _glm45_value(text: str, schema: Any) -> Any:
    """A GLM-4.5 argument's value: GLM writes strings as they are and other values as JSON. The JSON reading where
    its type is one the schema allows (or the schema says nothing); the text itself where the schema allows a string;
    else the JSON reading, or the text where it is not JSON."""
    types = _schema_types(schema)
    try:
        value = json.loads(text, parse_constant=_no_constant)
        json.dumps(value, allow_nan=False)  # (1e400 reads as inf, which JSON cannot write)
    except ValueError:
        return text
    kind = _json_type(value)
    allowed = kind in types or (kind == "integer" and "number" in types)
    if "string" in types and (kind == "string" or not allowed):
        return text
    return value


def _glm45_call(body: str, done: bool, tools: list[dict] | None) -> Call | None:
    """One GLM-4.5 call from the text after its `<tool_call>` (up to `</tool_call>` where `done`): its name once
    a newline, a key or the end follows it; its arguments' JSON, a pair at a time as each completes. None: a
    finished call without a name (not a call)."""
    lead = len(body) - len(body.lstrip())
    stops = [i for i in (body.find("<arg_key>"), body.find("\n", lead)) if i >= 0]
    name = body[: min(stops)].strip() if stops else body.strip() if done else None
    if done and not name:
        return None
    props = next((((t.get("function") or {}).get("parameters") or {}).get("properties") or {}
                  for t in tools or () if (t.get("function") or {}).get("name") == name), {})
    pairs = [f"{json.dumps(key.strip())}: {json.dumps(_glm45_value(value.strip(), props.get(key.strip())))}"
             for key, value in _GLM_PAIR.findall(body)]
    return Call(name or None, "{" + ", ".join(pairs) + ("}" if done else ""), done)


def _extract(fmt: str, text: str, final: bool, name: str | None, tools: list[dict] | None) -> tuple[str, list[Call]]:
    if fmt == "text":  # no tools: all of it is content
        return text, []
    if fmt == "named":
        return "", [Call(name, text, final)]
    if fmt == "json_array":
        return "", _objects(text, _ws(text, 0, "["), ("arguments", "parameters"), ",")
    if fmt in ("hermes", "glm45"):  # <tool_call> blocks: a JSON object each, or GLM-4.5's name and pairs
        start = text.find("<tool_call>")
        if start < 0:
            return text if final else text[: len(text) - _held(text, "<tool_call>")], []
        calls, i = [], start
        while i >= 0:
            body = i + len("<tool_call>")
            if fmt == "hermes":  # (a block that is no JSON object ends the calls, as an invalid one does)
                calls += _objects(text, body, ("arguments", "parameters"), "")[:1] or [Call(None, "")]
            else:
                end = text.find("</tool_call>", body)
                call = _glm45_call(text[body : end if end >= 0 else len(text)], end >= 0, tools)
                calls.append(call or Call(None, ""))
            i = text.find("<tool_call>", i + 1)
        return text[:start].rstrip(), calls
    if fmt == "mistral":
        start = text.find("[TOOL_CALLS]")
        if start < 0:
            return text if final else text[: len(text) - _held(text, "[TOOL_CALLS]")], []
        i = _ws(text, start + len("[TOOL_CALLS]"), "[")
        return text[:start].rstrip(), _objects(text, i, ("arguments", "parameters"), ",")
    if fmt == "llama3_json":
        body = text.removeprefix("<|python_tag|>")
        i = _ws(body, 0)
        if i < len(body) and body[i] == "{":
            return "", _objects(body, i, ("parameters", "arguments"), ";")
        if not final and "<|python_tag|>".startswith(text.strip()):
            return "", []  # nothing yet, or the start of the tag
        return text, []
    raise ValueError(f"unknown tool call format {fmt!r}")


def finished_calls(fmt: str, text: str, name: str | None = None, tools: list[dict] | None = None,
                   parallel: bool = True) -> tuple[str | None, list[dict], bool] | None:
    """The OpenAI message parts of a finished output: (content, tool_calls, whether every call is complete), or None
    if it holds no call (then the whole text is the content)."""
    content, calls = extract(fmt, text, True, name, tools, parallel)
    if not calls:
        return None
    return (content or None, [{"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                              for c in calls], all(c.done for c in calls))


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolStream:
    """One choice's stream: feed the text so far, get (content delta, tool call deltas) since the last feed."""

    fmt: str
    name: str | None = None
    tools: list[dict] | None = None
    parallel: bool = True
    content_sent: int = 0
    ids: list[str] = field(default_factory=list)
    args_sent: list[int] = field(default_factory=list)
    complete: bool = True  # every call sent so far is complete

    def feed(self, text: str, final: bool) -> tuple[str, list[dict]]:
        content, calls = extract(self.fmt, text, final, self.name, self.tools, self.parallel)
        delta_content = content[self.content_sent :] if len(content) > self.content_sent else ""
        self.content_sent = max(self.content_sent, len(content))
        self.complete = all(c.done for c in calls)
        deltas = []
        for i, c in enumerate(calls):  # in order, each once accepted
            if i == len(self.ids):
                self.ids.append(new_call_id())
                self.args_sent.append(0)
                deltas.append({"index": i, "id": self.ids[i], "type": "function",
                               "function": {"name": c.name, "arguments": ""}})
            piece = c.arguments[self.args_sent[i] :]
            if piece:
                self.args_sent[i] = len(c.arguments)
                if deltas and deltas[-1]["index"] == i:
                    deltas[-1]["function"]["arguments"] += piece
                else:
                    deltas.append({"index": i, "function": {"arguments": piece}})
        return delta_content, deltas

    @property
    def called(self) -> bool:
        return bool(self.ids)


def detect_format(chat_template: str | None) -> str:
    """The call format a chat template teaches its model; hermes for templates that do not render tools (we do)."""
    t = chat_template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<arg_key>" in t:
        return "glm45"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3_json"
    return "hermes"


def template_renders_tools(chat_template: str | None) -> bool:
    return "tools" in (chat_template or "")


def render_messages(messages: list[dict], tools: list[dict] | None, renders_tools: bool) -> list[dict]:
    """Messages for a template. A template that knows tools gets OpenAI's shapes; one that does not gets the tools
    described in a system message and calls written in the hermes format, so any chat model can call tools."""
    if renders_tools:  # templates take a call's arguments as an object (they write it with tojson)
        return [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": _args(c)}} for c in m["tool_calls"]]}
                if m.get("tool_calls") else m for m in messages]
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": _args(c)})
                              + "\n</tool_call>" for c in m["tool_calls"])
            out.append({"role": "assistant", "content": ((m.get("content") or "") + "\n" + calls).strip()})
        elif m["role"] == "tool":
            out.append({"role": "tool", "content": m.get("content") or ""})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        spec = "\n".join(json.dumps(t) for t in tools)
        system = ("You can call functions. Their signatures, one JSON object per line, are between <tools></tools>:\n"
                  f"<tools>\n{spec}\n</tools>\nTo call one, answer with\n<tool_call>\n"
                  '{"name": <function-name>, "arguments": <arguments-json-object>}\n</tool_call>')
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _rerooted(node: Any, rename: dict[str, str]) -> Any:
    """`node` with its local $refs ("#/$defs/X", "#/definitions/X") pointing at the renamed root definitions."""
    if isinstance(node, list):
        return [_rerooted(x, rename) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _rerooted(v, rename) for k, v in node.items()}
    ref = node.get("$ref")
    if isinstance(ref, str):
        for prefix in ("#/$defs/", "#/definitions/"):
            if ref.startswith(prefix) and ref[len(prefix):] in rename:
                out["$ref"] = "#/$defs/" + rename[ref[len(prefix):]]
    return out


def _args(call: dict) -> Any:
    raw = call["function"].get("arguments") or "{}"
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def required_schema(tools: list[dict], parallel: bool) -> dict:
    """The JSON schema `tool_choice="required"` holds the output to: a list of calls of the given functions. Each
    tool's definitions ($defs) move to the root, renamed per tool, so that its $refs still resolve there."""
    defs: dict[str, Any] = {}
    one = []
    for i, t in enumerate(tools):
        params = dict(t["function"].get("parameters") or {"type": "object"})
        local = {**params.pop("$defs", {}), **params.pop("definitions", {})}
        rename = {name: f"tool{i}_{name}" for name in local}
        defs.update({rename[name]: _rerooted(d, rename) for name, d in local.items()})
        one.append({"type": "object", "properties": {"name": {"const": t["function"]["name"]}, "arguments": _rerooted(params, rename)},
                    "required": ["name", "arguments"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": one}}
    if defs:
        schema["$defs"] = defs
    if not parallel:
        schema["maxItems"] = 1
    return schema


REASONING = ("none", "qwen3", "deepseek_r1", "glm45")


def split_reasoning(parser: str, text: str, final: bool) -> tuple[str, str]:
    """(reasoning, content) of a reasoning model's output: the text inside `<think>...</think>` and what follows.
    qwen3 and glm45 open the block in their output (or never, with thinking off); deepseek_r1's template opens it in
    the prompt, so the output starts inside it. Not `final`: an end that may be the start of a tag is held back."""
    start = 0
    if parser in ("qwen3", "glm45"):
        lead = len(text) - len(text.lstrip())
        if text.startswith("<think>", lead):
            start = lead + len("<think>")
        elif not final and "<think>".startswith(text.strip()):
            return "", ""  # the output may be opening the block
        else:
            return "", text
    end = text.find("</think>", start)
    if end < 0:
        reasoning = text[start:]
        return (reasoning if final else reasoning[: len(reasoning) - _held(reasoning, "</think>")]), ""
    return text[start:end], text[end + len("</think>") :].lstrip()


@dataclass
class ReasoningStream:
    """One choice's stream for a reasoning model: feed the text so far, get (reasoning delta, content so far)."""

    parser: str
    sent: int = 0

    def feed(self, text: str, final: bool) -> tuple[str, str]:
        reasoning, content = split_reasoning(self.parser, text, final)
        delta = reasoning[self.sent :]
        self.sent = max(self.sent, len(reasoning))
        return delta, content


def reasoning_end_ids(tokenizer: Any, prompt_ids: list[int]) -> tuple[int, ...]:
    """The tokens that end a reasoning block, after which an output constraint starts; none when the prompt has
    closed the block already (a template with thinking turned off writes an empty one into the prompt)."""
    tail = tokenizer.decode(prompt_ids[-16:])
    if tail.rfind("</think>") > tail.rfind("<think>"):
        return ()
    return tuple(tokenizer.encode("</think>", add_special_tokens=False))
