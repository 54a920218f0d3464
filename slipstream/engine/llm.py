"""The public offline API: `LLM(model).generate(...)`, `.stream(...)`, `.chat(...)`."""
from __future__ import annotations

import itertools
from typing import Any, Iterator, Sequence

from slipstream.config import EngineConfig
from slipstream.engine.input_processor import apply_chat_template
from slipstream.engine.llm_engine import LLMEngine
from slipstream.engine.outputs import RequestOutput
from slipstream.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        """`model`: an HF model directory, a .gguf file, or None for the embedded SmolLM2-135M-Instruct.
        Keyword options are the engine options (config.ENGINE_OPTIONS: the fields of EngineConfig, CacheConfig
        and SchedulerConfig)."""
        self.engine = LLMEngine(EngineConfig.from_options(model, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the engine's other ranks (tensor parallelism; they also stop with this process)."""
        self.engine.core.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _normalize(self, prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            return [prompts]  # one prompt: text or token ids
        return list(prompts)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts concurrently to completion; outputs come back in prompt order."""
        plist = self._normalize(prompts)
        params = self._params_for(plist, sampling_params)
        ids = self._submit(plist, params, stream=False)
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield a RequestOutput each time the request makes progress; read `delta_text` for the new text."""
        (rid,) = self._submit([prompt], [sampling_params or SamplingParams()])
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)  # the consumer stopped early: free its pages (no-op once finished)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """`chat_template_kwargs`: extra variables for the chat template, e.g. {"enable_thinking": False} (Qwen3)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.apply_chat_template(c, chat_template_kwargs) for c in conversations], sampling_params)

    def apply_chat_template(self, messages: list[Message], chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
        return apply_chat_template(self.tokenizer, messages, template_kwargs=chat_template_kwargs)

    def reset_prefix_cache(self) -> int:
        cache = self.engine.core.prefix_cache
        return cache.clear() if cache is not None else 0

    @staticmethod
    def _params_for(
        prompts: list[Prompt], sp: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[SamplingParams]:
        if sp is None or isinstance(sp, SamplingParams):
            return [sp or SamplingParams()] * len(prompts)
        if len(sp) != len(prompts):
            raise ValueError(f"got {len(sp)} SamplingParams for {len(prompts)} prompts")
        return list(sp)

    def _submit(self, prompts: list[Prompt], params: list[SamplingParams], stream: bool = True) -> list[str]:
        # Validate everything first so that a bad prompt leaves nothing half-submitted.
        checked = [self.engine.check_request(p, sp) for p, sp in zip(prompts, params)]
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        for rid, p, ids_, sp in zip(ids, prompts, checked, params):
            self.engine.add_checked(rid, p, ids_, sp, stream=stream)
        return ids
