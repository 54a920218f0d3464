"""The public offline API: `LLM(model).generate(...)`, `.stream(...)`, `.chat(...)`."""
from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Iterator, Sequence

from slipstream.config import EngineConfig
from slipstream.engine.input_processor import EngineOverloaded, apply_chat_template
from slipstream.engine.llm_engine import LLMEngine
from slipstream.engine.outputs import RequestOutput
from slipstream.sampling_params import SamplingParams

# Text, token ids, or vLLM's prompt dicts: {"prompt": text} or {"prompt_token_ids": ids}
Prompt = str | list[int] | dict[str, Any]
Message = dict[str, str]


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        """`model`: an HF model directory, a .gguf file, or None for the embedded SmolLM2-135M-Instruct.
        Keyword options are the engine options (config.ENGINE_OPTIONS: the fields of EngineConfig, CacheConfig
        and SchedulerConfig)."""
        self.engine = LLMEngine(EngineConfig.from_options(model, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()
        # Each open call's outputs, by request id: a stream may be read while `generate` steps the engine, and
        # neither may take the other's outputs.
        self._inbox: dict[str, deque[RequestOutput]] = {}

    def close(self) -> None:
        """Stop the engine's other ranks (tensor parallelism; they also stop with this process)."""
        self.engine.core.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _normalize(prompts: Prompt | Sequence[Prompt]) -> list[str | list[int]]:
        """One prompt or a list of them -> a list of text and token-id prompts."""
        one = isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int))
        if not one:
            try:
                prompts = list(prompts)  # (any iterable of prompts: a generator, a dataset's column)
            except TypeError:
                raise ValueError(f"prompts must be text, token ids, a prompt dict or a list of them, got "
                                 f"{type(prompts).__name__}") from None
        out = []
        for i, p in enumerate([prompts] if one else prompts):
            if isinstance(p, dict):
                if set(p) == {"prompt"}:
                    p = p["prompt"]
                elif set(p) == {"prompt_token_ids"}:
                    p = p["prompt_token_ids"]
                else:
                    raise ValueError(f"prompts[{i}]: a prompt dict holds `prompt` (text) or `prompt_token_ids` (token "
                                     f"ids) alone, got keys {sorted(p)}")
            if isinstance(p, tuple):
                p = list(p)
            if not (isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p))):
                raise ValueError(f"prompts[{i}] must be text or a list of token ids, got {type(p).__name__}")
            out.append(p)
        return out

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts concurrently to completion; outputs come back in prompt order."""
        plist = self._normalize(prompts)
        params = self._params_for(plist, sampling_params)
        requests = self._check(plist, params)
        ids = [rid for rid, *_ in requests]
        todo = deque(requests)
        try:
            waiting = set(ids)
            while waiting:
                # as many as the engine's queue takes (more prompts than max_waiting go in as it drains)
                while todo and self._add(*todo[0], stream=False):
                    todo.popleft()
                for out in self._step():
                    if out.finished:
                        waiting.discard(out.request_id)
            return [self._inbox[i][-1] for i in ids]
        finally:  # also when interrupted (Ctrl-C in a notebook): nothing of this call is left running
            for i in ids[: len(ids) - len(todo)]:
                if not self._inbox.pop(i):
                    self.engine.abort_request(i)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield a RequestOutput each time the request makes progress; read `delta_text` for the new text."""
        plist = self._normalize(prompt)
        if len(plist) != 1:
            raise ValueError(f"stream takes one prompt, got {len(plist)}")
        ((rid, *request),) = self._check(plist, self._params_for(plist, sampling_params))
        if not self._add(rid, *request, stream=True):
            raise EngineOverloaded("the engine's queue is full (max_waiting sequences wait already)")
        inbox = self._inbox[rid]
        try:
            while True:
                while not inbox:
                    if not self.engine.has_unfinished():
                        return  # (aborted through the engine)
                    self._step()
                out = inbox.popleft()
                yield out
                if out.finished:
                    return
        finally:
            del self._inbox[rid]
            self.engine.abort_request(rid)  # the consumer stopped early: free its pages (no-op once finished)

    def _step(self) -> list[RequestOutput]:
        outputs = self.engine.step()
        for out in outputs:
            inbox = self._inbox.get(out.request_id)
            if inbox is not None:
                inbox.append(out)
        return outputs

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """`chat_template_kwargs`: extra variables for the chat template, e.g. {"enable_thinking": False} (Qwen3);
        `tools`: OpenAI-style tool definitions, rendered by the template (the calls come back as text)."""
        conversations = [messages] if not messages or isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, chat_template_kwargs, add_generation_prompt, tools) for c in conversations]
        return self.generate(prompts, sampling_params)

    def apply_chat_template(self, messages: list[Message], chat_template_kwargs: dict[str, Any] | None = None,
                            add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
        return apply_chat_template(self.tokenizer, messages, add_generation_prompt, tools, chat_template_kwargs)

    def reset_prefix_cache(self) -> int:
        cache = self.engine.core.prefix_cache
        return cache.clear() if cache is not None else 0

    @staticmethod
    def _params_for(
        prompts: list[Prompt], sp: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[SamplingParams]:
        if sp is None or isinstance(sp, SamplingParams):
            return [sp or SamplingParams()] * len(prompts)
        if not isinstance(sp, (list, tuple)) or not all(isinstance(x, SamplingParams) for x in sp):
            raise ValueError(f"sampling_params must be a SamplingParams or a list of them, got {type(sp).__name__}")
        if len(sp) != len(prompts):
            raise ValueError(f"got {len(sp)} SamplingParams for {len(prompts)} prompts")
        return list(sp)

    def _check(self, prompts: list[str | list[int]], params: list[SamplingParams]) -> list[tuple]:
        """(request id, prompt, its token ids, params) for each, all checked before any is added: a bad prompt leaves
        nothing half-submitted."""
        checked = [self.engine.check_request(p, sp) for p, sp in zip(prompts, params)]
        return [(f"llm-{next(self._ids)}", p, ids, sp) for p, ids, sp in zip(prompts, checked, params)]

    def _add(self, rid: str, prompt: str | list[int], ids: list[int], params: SamplingParams, stream: bool) -> bool:
        """Queue a checked request; False if the engine's queue is full."""
        try:
            self.engine.add_checked(rid, prompt, ids, params, stream=stream)
        except EngineOverloaded:
            return False
        self._inbox[rid] = deque()
        return True
