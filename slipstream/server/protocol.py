"""OpenAI request bodies (plus vLLM's common extras), validated over the whole range of every field.

Integers must fit the kernels' int64 / int32 arguments and floats must be finite, so that nothing a client sends
can raise inside the engine. Unknown fields are ignored, except those that would change the output if they were
ignored (`response_format`, `tools`, ...): those are refused with a 400 naming the field until implemented.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from slipstream.sampling_params import SamplingParams

Int64 = Annotated[int, Field(ge=-(1 << 63), le=(1 << 63) - 1)]
Count = Annotated[int, Field(ge=1, le=(1 << 31) - 1)]
TokenId = Annotated[int, Field(ge=0, le=(1 << 31) - 1)]
_CONFIG = ConfigDict(extra="ignore", allow_inf_nan=False)

# Fields that change the output: accepted only with the value that means "off" (vLLM extras included).
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "suffix": (None, ""),
    "prompt_logprobs": (None,),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "structured_outputs": (None,),
    "logits_processors": (None,),
}


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool = False
    continuous_usage_stats: bool = False  # usage (so far) in every chunk


class _Common(BaseModel):
    model_config = _CONFIG
    model: str | None = None
    max_tokens: Count | None = None
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=(1 << 31) - 1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=1 << 16)] = 1
    best_of: int | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: Int64 | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=100.0)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0, le=(1 << 31) - 1)] = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: Annotated[int, Field(ge=-(1 << 31), le=(1 << 31) - 1)] = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    timeout: Annotated[float, Field(gt=0.0)] | None = None  # seconds until the request is aborted (extension)

    @model_validator(mode="before")
    @classmethod
    def _refuse_ignored(cls, body: Any) -> Any:
        if isinstance(body, dict):
            for name, off in _OFF_VALUES.items():
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
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=bias,
            skip_special_tokens=self.skip_special_tokens,
        )


class _Unsupported(ValueError):
    def __init__(self, field: str) -> None:
        super().__init__(f"{field} is not supported by this server")
        self.field = field


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]]
    max_tokens: Count | None = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    add_generation_prompt: bool = True
