"""OpenAI request bodies (plus vLLM's common extras), validated over the whole range of every field.

Integers must fit the kernels' int64 / int32 arguments and floats must be finite, so that nothing a client sends
can raise inside the engine. Unknown fields are ignored, except those that would change the output if they were
ignored (`tools`, ...): those are refused with a 400 naming the field until implemented.

Structured output arrives as OpenAI's `response_format` (`json_object`, `json_schema`) or as vLLM's extras
(`structured_outputs` with one of json / regex / choice / grammar / json_object, or the older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar`); at most one of them per request.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, StrictStr,
                      ValidationError, model_validator)

from slipstream.engine.input_processor import check_template_kwargs
from slipstream.sampling_params import SamplingParams, StructuredOutputs


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("a boolean is not a number")
    return v


# JSON's true is not the number 1 (OpenAI refuses it; pydantic would take it), though 2.0 is 2 (as vLLM takes it)
NotBool = BeforeValidator(_not_bool)
Int64 = Annotated[int, NotBool, Field(ge=-(1 << 63), le=(1 << 63) - 1)]
Count = Annotated[int, NotBool, Field(ge=1, le=(1 << 31) - 1)]
TokenId = Annotated[int, Strict(), Field(ge=0, le=(1 << 31) - 1)]  # (strict: never a float either)


def _template_kwargs(v: dict[str, Any] | None) -> dict[str, Any] | None:
    check_template_kwargs(v)
    return v


TemplateKwargs = Annotated[dict[str, Any] | None, AfterValidator(_template_kwargs)]
_CONFIG = ConfigDict(extra="ignore", allow_inf_nan=False)

# Fields that change the output: accepted only with the value that means "off" (vLLM extras included).
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "functions": (None, []),
    "function_call": (None, "none"),
    "suffix": (None, ""),
    "logits_processors": (None,),
    "allowed_token_ids": (None, []),
    "bad_words": (None, []),
    "use_beam_search": (None, False),
    "truncate_prompt_tokens": (None,),
    "continue_final_message": (None, False),
    "guided_decoding_backend": (None, "xgrammar", "auto"),
}


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _CONFIG
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(BaseModel):
    model_config = _CONFIG
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = None
    grammar: StrictStr | None = None
    json_object: bool | None = None


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool = False
    continuous_usage_stats: bool = False  # usage (so far) in every chunk


class _Common(BaseModel):
    model_config = _CONFIG
    model: str | None = None
    max_tokens: Count | None = None
    temperature: Annotated[float, NotBool, Field(ge=0.0, le=100.0)] | None = None
    top_p: Annotated[float, NotBool, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, NotBool, Field(ge=-1, le=(1 << 31) - 1)] | None = None
    min_p: Annotated[float, NotBool, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, NotBool, Field(ge=1, le=1 << 16)] = 1
    best_of: Annotated[int, NotBool] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: Int64 | None = None
    presence_penalty: Annotated[float, NotBool, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, NotBool, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, NotBool, Field(gt=0.0, le=100.0)] | None = None
    logit_bias: dict[str, Annotated[float, NotBool, Field(ge=-100.0, le=100.0)]] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, NotBool, Field(ge=0, le=(1 << 31) - 1)] = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: Annotated[int, NotBool, Field(ge=-(1 << 31), le=(1 << 31) - 1)] = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    timeout: Annotated[float, NotBool, Field(gt=0.0)] | None = None  # seconds until the request is aborted (extension)
    # vLLM's extension: each prompt token's logprob and the k most likely there
    prompt_logprobs: Annotated[int, NotBool, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None

    @model_validator(mode="after")
    def _check_stream_options(self) -> "_Common":
        if self.stream_options is not None and not self.stream:
            raise _Unsupported("stream_options", "is only allowed with stream=true")
        return self

    @model_validator(mode="before")
    @classmethod
    def _refuse_ignored(cls, body: Any) -> Any:
        if isinstance(body, dict):
            # add_special_tokens: what the endpoint does anyway (a BOS before a completion's prompt; none added to a
            # rendered chat template) is accepted, the other is not done
            chat = "messages" in body
            off_values = {**_OFF_VALUES, "add_special_tokens": (None, not chat)}
            if not chat:  # a completion has no template to pass them to
                off_values["chat_template_kwargs"] = (None, {})
            else:  # vLLM's chat `echo` (the reply opens with the last message, of the same role) is not done
                off_values["echo"] = (None, False)
            for name, off in off_values.items():
                if name in body and body[name] not in off:
                    raise _Unsupported(name)
            best_of = body.get("best_of")
            if best_of is not None and best_of != body.get("n", 1):
                raise _Unsupported("best_of")
        return body

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Map onto SamplingParams; a ValueError names the offending field."""
        bias = {}
        for k, v in (self.logit_bias or {}).items():
            try:
                bias[int(k)] = v
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {k!r}") from None
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=bias,
            skip_special_tokens=self.skip_special_tokens,
            structured_outputs=self.structured(),
        )

    def structured(self) -> StructuredOutputs | None:
        """The request's output constraint, from whichever of the fields that carry one is set; a ValueError names
        that field if the constraint is not valid (a bad schema, regex or grammar)."""
        given = self._constraints()
        if not given:
            return None
        if len(given) > 1:
            first, *rest = sorted(given)
            raise ValueError(f"{first} conflicts with {', '.join(rest)}: set at most one constraint on the output")
        (name, fields), = given.items()
        from slipstream.grammar import grammar_of  # imports xgrammar: only for constrained requests

        try:
            constraint = StructuredOutputs(**fields)
            grammar_of(constraint)
        except ValueError as e:
            raise ValueError(f"{name} is invalid: {e}") from None
        return constraint

    def _constraints(self) -> dict[str, dict[str, Any]]:
        """Each field that constrains the output -> the StructuredOutputs fields it asks for."""
        given: dict[str, dict[str, Any]] = {}
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            given["response_format"] = {"json_object": True}
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.json_schema is None:
                raise ValueError("response_format needs json_schema.schema when its type is json_schema")
            given["response_format"] = {"json": rf.json_schema.json_schema}
        so = self.structured_outputs
        if so is not None:
            given["structured_outputs"] = {"json": so.json_, "json_object": bool(so.json_object), "regex": so.regex,
                                           "choice": so.choice, "grammar": so.grammar}
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                given[name] = {key: value}
        return given


class _Unsupported(ValueError):
    def __init__(self, field: str, why: str = "is not supported by this server") -> None:
        super().__init__(f"{field} {why}")
        self.field = field


# pydantic's error types that say only "not this type": for a field of several forms (a prompt: text, token ids, ...)
# each form reports one, and the form that got further into the value (a token id below 0) says more
_TYPE_ERRORS = frozenset({"string_type", "list_type", "int_type", "int_parsing", "dict_type", "model_type",
                          "bool_type", "float_type", "none_required"})


def _is_form(part: str | int) -> bool:
    """Whether a step of an error's location names one form of a union ('str', 'list[TextPart]', 'TextPart',
    'function-after[...]') rather than a field (our fields are lower-case names), a dict key or a list index."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or "-" in part
                                      or part[:1].isupper())


def _only_type(err: dict) -> bool:
    """Whether an error says only that the value is not of this form (a literal form among them: tool_choice "maybe")."""
    last = err["loc"][-1] if err["loc"] else None
    return err["type"] in _TYPE_ERRORS or (err["type"] == "literal_error" and last is not None and _is_form(last))


def _form_name(form: str) -> str:
    """A union form as a client reads it: list[int] for pydantic's list[constrained-int], the values of a literal,
    "an object" for a model."""
    if form.startswith("literal["):
        return form[len("literal["):-1].replace(",", ", ")
    return "an object" if form[:1].isupper() else form.replace("constrained-int", "int")


def _field(loc: tuple) -> list:
    return [p for p in loc if not _is_form(p)]


def describe(e: ValidationError) -> tuple[str, str | None]:
    """A 400's message and `param` for a body that failed validation: the most telling of pydantic's errors, its
    location written as the client wrote the body (`prompt.1`, `messages.0.content`), without union forms."""
    errors = e.errors()
    for err in errors:
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _Unsupported):
            return str(cause), cause.field
    if len(errors) > 1 and all(_only_type(err) and err["loc"] and _is_form(err["loc"][-1]) for err in errors) \
            and all(_field(err["loc"]) == _field(errors[0]["loc"]) for err in errors):
        # no form got past the value's type: name them all, as the client would write them
        where = _field(errors[0]["loc"])
        forms = ", ".join(_form_name(err["loc"][-1]) for err in errors)
        return f"{'.'.join(map(str, where))}: must be one of {forms}", str(where[0]) if where else None
    # (between forms that got as deep: the one that failed at a later element, [1, 2, 3, "x"] as token ids)
    best = max(errors, key=lambda err: (not _only_type(err), len(err["loc"]),
                                        [p for p in err["loc"] if isinstance(p, int)]))
    where = _field(best["loc"])
    return (f"{'.'.join(map(str, where))}: {best['msg']}" if where else best["msg"]), str(where[0]) if where else None


class CompletionRequest(_Common):
    tools: None = None  # only "off" is accepted (tools are a chat feature)
    tool_choice: Literal["none"] | None = None
    prompt: StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]]
    max_tokens: Count | None = 16
    logprobs: Annotated[int, NotBool, Field(ge=0, le=20)] | None = None
    echo: bool = False

    @model_validator(mode="after")
    def _check_prompt_scores(self) -> "CompletionRequest":
        # a stream sends the prompt's scores in a choice's first chunk, which must come after the one sample that
        # scores the prompt has its first token: only so with one sample
        scored = self.prompt_logprobs is not None or (self.echo and self.logprobs is not None)
        if scored and self.stream and self.n > 1:
            raise _Unsupported("prompt_logprobs" if self.prompt_logprobs is not None else "echo",
                               "with logprobs of the prompt needs n = 1 when streaming")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    arguments: StrictStr = "{}"


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: StrictStr | None = None  # a tool message: the call it answers
    name: StrictStr | None = None

    @model_validator(mode="after")
    def _check_content(self) -> "ChatMessage":
        """Only an assistant's message may come without content (OpenAI's rule: it may carry tool calls instead)."""
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def for_template(self) -> dict[str, Any]:
        m: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            m["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                m[key] = getattr(self, key)
        return m

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _check_parameters(self) -> "FunctionDef":
        """Arguments are a JSON object (OpenAI's rule): the schema describes one; its properties are schemas."""
        p = self.parameters
        if not p:
            return self
        props, required, kind = p.get("properties") or {}, p.get("required") or [], p.get("type", "object")
        if kind != "object" and not (isinstance(kind, list) and "object" in kind):
            raise ValueError(f"function {self.name!r}: parameters must be a JSON schema of type \"object\", got type "
                             f"{kind!r}")
        if not isinstance(props, dict) or not all(isinstance(v, (dict, bool)) for v in props.values()):
            raise ValueError(f"function {self.name!r}: parameters.properties must map names to JSON schemas")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError(f"function {self.name!r}: parameters.required must be a list of property names")
        return self


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


def tool_dicts(tools: list[Tool] | None, choice: Any) -> list[dict[str, Any]] | None:
    """The tools as the chat template takes them (none when tool_choice is "none")."""
    if not tools or choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in tools]


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(_Common):
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, NotBool, Field(ge=0, le=20)] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: TemplateKwargs = None  # extra template variables, e.g. Qwen3's enable_thinking

    @model_validator(mode="after")
    def _check_prompt_scores(self) -> "ChatCompletionRequest":
        if self.prompt_logprobs is not None and self.stream:
            raise _Unsupported("prompt_logprobs", "is not sent in chat streams (it is in the response without stream)")
        return self

    @model_validator(mode="after")
    def _check_tools(self) -> "ChatCompletionRequest":
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise _Unsupported("tools", "must have distinct function names")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not names:
            raise _Unsupported("tool_choice", f"{choice if isinstance(choice, str) else 'naming a function'} needs tools: "
                               "it asks for a call")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise _Unsupported("tool_choice", f"names {choice.function.name!r}, which is not among the tools")
        return self

    def tool_mode(self) -> tuple[str, str | None] | None:
        """How to read calls from the output: (format, function name) for the formats the request itself fixes
        (a named function, `required`), or None (the model's own format, or no tools)."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return "named", choice.function.name
        if choice == "required":
            return "json_array", None
        return None

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        return tool_dicts(self.tools, self.tool_choice)

    def _constraints(self) -> dict[str, dict[str, Any]]:
        given = super()._constraints()
        mode = self.tool_mode()
        if mode is not None:  # `required` and a named function: a grammar makes the call parse, every time
            # (the output is then the call: response_format, which shapes content, has nothing to apply to)
            given.pop("response_format", None)
            from slipstream.server.tools import required_schema

            fmt, name = mode
            tools = self.tool_dicts() or []
            if fmt == "named":
                params = next(t["function"].get("parameters") for t in tools if t["function"]["name"] == name)
                given["tool_choice"] = {"json": params or {"type": "object"}}
            else:
                given["tool_choice"] = {"json": required_schema(tools, self.parallel_tool_calls)}
        return given


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's shape): a completion's `prompt` or a chat's `messages` (with its template options and
    tools), tokenized exactly as the server tokenizes that request."""
    model_config = _CONFIG
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: TemplateKwargs = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None  # "none" leaves the tools out of the prompt, as a chat request does
    add_special_tokens: bool | None = None  # a prompt's BOS and the like (default: yes); a chat template writes its own
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise _Unsupported("prompt", "or messages: give exactly one")
        if self.messages is not None and self.add_special_tokens:
            raise _Unsupported("add_special_tokens", "with messages: the chat template writes the special tokens")
        if self.messages is None and (self.tools or self.chat_template_kwargs):
            raise _Unsupported("tools" if self.tools else "chat_template_kwargs", "needs messages, not a prompt")
        return self

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        return tool_dicts(self.tools, self.tool_choice)


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's shape): token ids back to text."""
    model_config = _CONFIG
    model: StrictStr | None = None
    tokens: list[TokenId]
