"""Requests in: tokenization and every check a request must pass before it is queued.

It runs where the API runs (the server's front-end process, or in-process for `LLM`), so that nothing a client
sends can raise inside the engine core. The core's limits arrive as `EngineLimits`, plain data it reports at
start.
"""
from __future__ import annotations

from typing import Any

import msgspec

from slipstream.sampling_params import SamplingParams


# What apply_chat_template and the templates themselves already bind: a template variable of these names from a
# request would replace the conversation, the tools or the call's own settings.
_TEMPLATE_OWN = frozenset({
    "messages", "conversation", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize",
    "padding", "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs", "chat_template", "bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token",
    "mask_token", "additional_special_tokens", "raise_exception", "strftime_now", "namespace",
})


def apply_chat_template(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True,
                        tools: list[dict] | None = None, template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """The prompt's token ids for a conversation, rendered by the model's chat template. `template_kwargs`: extra
    variables the template reads (Qwen3's `enable_thinking`, ...); a template ignores those it does not use."""
    if not messages:
        raise ValueError("messages must not be empty")
    messages = [_text_content(m) for m in messages]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("messages: this model's tokenizer has no chat template")
    extra = check_template_kwargs(template_kwargs)
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                            tokenize=True, **extra)
    except Exception as e:  # noqa: BLE001 - a template refusing a conversation (raise_exception), or failing on it
        # Jinja's errors are no ValueErrors: the server would have answered 500 for a client's mistake
        given = " with the chat_template_kwargs given" if extra else ""
        raise ValueError(f"messages: the chat template could not render them{given}: {e}") from e
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _text_content(message: Any) -> Any:
    """A message whose content is a list of OpenAI text parts, with that text as its content (as the server reads it).
    Only an assistant's message may come without content (OpenAI's rule, the server's too: it may hold tool calls)."""
    if not isinstance(message, dict):
        raise ValueError(f"messages: each message is a dict with role and content, got {type(message).__name__}")
    content = message.get("content")
    if content is None and message.get("role") != "assistant":
        raise ValueError(f"messages: a {message.get('role')} message needs content")
    if not isinstance(content, list):
        return message
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise ValueError('messages: a content list holds text parts, {"type": "text", "text": ...}')
    return {**message, "content": "".join(p["text"] for p in content)}


def check_template_kwargs(template_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    extra = dict(template_kwargs or {})
    clash = sorted(k for k in extra if k in _TEMPLATE_OWN or not k.isidentifier())
    if clash:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(map(repr, clash))}: the template's own inputs")
    return extra


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the caller should retry later."""


class EngineLimits(msgspec.Struct, frozen=True):
    model_path: str
    max_model_len: int
    vocab_size: int
    max_waiting: int  # sequences the core queues at most; a request with more samples can never be admitted
    eos_token_ids: tuple[int, ...] = ()


class InputProcessor:
    def __init__(self, tokenizer: Any, limits: EngineLimits) -> None:
        self.tokenizer, self.limits = tokenizer, limits
        # A token spells at most this many characters, so a longer text cannot fit max_model_len tokens: such a
        # prompt is refused before tokenizing it (which would take seconds for megabytes of text).
        self.max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1) + 1

    def tokenize(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        lim = self.limits
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if len(prompt) > lim.max_model_len * self.max_token_chars:
                raise ValueError(f"prompt has {len(prompt)} characters, more than max_model_len={lim.max_model_len} tokens can hold")
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt must not be empty")
        bad = [t for t in ids if type(t) is not int or not 0 <= t < lim.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {lim.vocab_size}), got {bad[:5]}")
        return ids

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (naming the field) unless the core can run this request to the end."""
        lim, n = self.limits, len(prompt_ids)
        if n >= lim.max_model_len:
            raise ValueError(f"prompt has {n} tokens; max_model_len is {lim.max_model_len}, leaving no room to generate")
        if params.max_tokens is not None and n + params.max_tokens > lim.max_model_len:
            raise ValueError(
                f"max_tokens={params.max_tokens} plus the prompt's {n} tokens exceeds max_model_len="
                f"{lim.max_model_len}; max_tokens must be <= {lim.max_model_len - n}"
            )
        if params.n > lim.max_waiting:
            raise ValueError(f"n must be <= {lim.max_waiting} (the engine's queue), got {params.n}")
        if params.top_k > lim.vocab_size:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or in [1, {lim.vocab_size}] (the vocabulary), got {params.top_k}")
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias))):
            bad = [t for t in ids if not 0 <= t < lim.vocab_size]
            if bad:
                raise ValueError(f"{name} must hold token ids in [0, {lim.vocab_size}), got {bad[:5]}")
        if params.structured_outputs is not None:  # a bad schema, regex or grammar is refused here, not in the core
            if params.min_tokens:
                raise ValueError("min_tokens cannot be combined with structured_outputs: the grammar decides where the output ends")
            bad = [t for t in params.structured_outputs.start_after_ids if t >= lim.vocab_size]
            if bad:
                raise ValueError(f"structured_outputs.start_after_ids must be token ids in [0, {lim.vocab_size}), got {bad[:5]}")
            from slipstream.grammar import grammar_of  # imports xgrammar: only for constrained requests

            grammar_of(params.structured_outputs)
