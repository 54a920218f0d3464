"""Per-request sampling parameters, validated on construction."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

GREEDY_BELOW = 1e-5  # a temperature under this samples greedily (the torch and Triton samplers agree)
_INT32_MAX = (1 << 31) - 1


@dataclass(frozen=True)
class StructuredOutputs:
    """Constrain a request's output to a language: exactly one of a JSON schema (a dict or its JSON text), any JSON
    object, a regular expression, one of a list of strings, or an EBNF grammar (xgrammar's dialect, GBNF-like)."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    # The constraint starts once the output has produced these tokens (a reasoning model's end of thinking); before
    # that the output is free. Empty: from the first token.
    start_after_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "start_after_ids", tuple(self.start_after_ids))
        _check(all(isinstance(t, int) and 0 <= t <= _INT32_MAX for t in self.start_after_ids),
               "structured_outputs.start_after_ids", "must be token ids", self.start_after_ids)
        if self.choice is not None:
            _check(isinstance(self.choice, (list, tuple)), "structured_outputs.choice", "must be a list of strings", self.choice)
            object.__setattr__(self, "choice", tuple(self.choice))
            _check(bool(self.choice) and all(isinstance(c, str) and c for c in self.choice), "structured_outputs.choice",
                   "must be a non-empty list of non-empty strings", self.choice)
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            _check(isinstance(schema, dict), "structured_outputs.json", "must be a JSON object (a schema)", self.json)
        else:
            _check(self.json is None or isinstance(self.json, dict), "structured_outputs.json", "must be a schema object", self.json)
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, str) and v), f"structured_outputs.{name}", "must be a non-empty string", v)
        given = [n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        _check(len(given) == 1, "structured_outputs", "must set exactly one of json, json_object, regex, choice, grammar", given)

    @property
    def key(self) -> str:
        """A canonical text of the constraint: equal constraints share one compiled grammar. Key order is kept: a
        schema's property order is the order the output writes them in."""
        if self.json is not None:
            schema = json.loads(self.json) if isinstance(self.json, str) else self.json
            return "json:" + json.dumps(schema, separators=(",", ":"))
        if self.json_object:
            return "json_object"
        if self.choice is not None:
            return "choice:" + json.dumps(self.choice)
        return f"regex:{self.regex}" if self.regex is not None else f"grammar:{self.grammar}"


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob plus the k most likely
    # None: none; k >= 0: each prompt token's logprob given the tokens before it, plus the k most likely there (the
    # prompt is then computed whole: no cached prefix has these)
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):
            v = getattr(self, name)
            _check(v is None or isinstance(v, (list, tuple)), name, "must be a list", v)
            setattr(self, name, list(v or []))
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), name, "must be true or false", getattr(self, name))
        if self.top_k == 0:
            self.top_k = -1
        _check(_is_int(self.n) and self.n >= 1, "n", "must be an integer >= 1", self.n)
        if self.max_tokens is not None:
            _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1", self.max_tokens)
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "must be an integer >= 0", self.min_tokens)
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", "must be <= max_tokens", self.min_tokens)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), name, "must be a finite number", v)
        _check(0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100] (0 means greedy)", self.temperature)
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k", "must be -1 or 0 (disabled) or an integer >= 1", self.top_k)
        for name in ("n", "max_tokens", "min_tokens", "top_k"):  # they travel to the kernels as int32
            _check((getattr(self, name) or 0) <= _INT32_MAX, name, f"must be <= {_INT32_MAX}", getattr(self, name))
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]", self.min_p)
        _check(0.0 < self.repetition_penalty <= 100.0, "repetition_penalty", "must be in (0, 100]", self.repetition_penalty)
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]", self.presence_penalty)
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]", self.frequency_penalty)
        if self.logprobs is not None:
            _check(_is_int(self.logprobs) and 0 <= self.logprobs <= 20, "logprobs", "must be an integer in [0, 20]", self.logprobs)
        if self.prompt_logprobs is not None:
            _check(_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= 20, "prompt_logprobs",
                   "must be an integer in [0, 20]", self.prompt_logprobs)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings", self.stop)
        _check(all(_is_int(t) and 0 <= t <= _INT32_MAX for t in self.stop_token_ids), "stop_token_ids", "must be token ids >= 0", self.stop_token_ids)
        if self.seed is not None:
            _check(_is_int(self.seed) and -(1 << 63) <= self.seed < (1 << 63), "seed", "must be a 64-bit signed integer", self.seed)
        bias = {} if self.logit_bias is None else self.logit_bias
        _check(isinstance(bias, dict), "logit_bias", "must map token ids to biases", bias)
        _check(not any(isinstance(x, bool) for kv in bias.items() for x in kv), "logit_bias", "must map token ids to numbers", bias)
        try:  # (keys arrive as text from JSON)
            self.logit_bias = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias must map token ids to numbers, got {bias!r}") from None
        _check(len(self.logit_bias) == len(bias), "logit_bias", "names a token twice", bias)
        _check(all(0 <= k <= _INT32_MAX for k in self.logit_bias), "logit_bias", "keys must be token ids", self.logit_bias)
        _check(all(-100.0 <= v <= 100.0 for v in self.logit_bias.values()), "logit_bias", "values must be in [-100, 100]", self.logit_bias)
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputs),
               "structured_outputs", "must be a StructuredOutputs", self.structured_outputs)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # (True is an int to Python, not a count to a user)


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")
