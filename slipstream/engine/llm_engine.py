"""The in-process engine: input processor -> engine core -> output processor, stepped by the caller.

The offline `LLM` API drives this. The server runs the same three parts split across processes: the core in
its own process (engine/core_process.py), the input and output processors in the API front end.
"""
from __future__ import annotations

from slipstream.config import EngineConfig
from slipstream.engine.core import EngineCore, EngineOverloaded
from slipstream.engine.input_processor import InputProcessor
from slipstream.engine.output_processor import OutputProcessor
from slipstream.engine.outputs import RequestOutput
from slipstream.sampling_params import SamplingParams

__all__ = ["LLMEngine", "EngineOverloaded"]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.core = EngineCore(config)
        self.config = self.core.config
        self.tokenizer = self.core.tokenizer
        self.inputs = InputProcessor(self.tokenizer, self.core.limits)
        self.outputs = OutputProcessor(self.tokenizer)

    # What callers (tests, benchmarks, the CLI) read of the core.
    model_path = property(lambda self: self.core.model_path)
    model_config = property(lambda self: self.core.model_config)
    max_model_len = property(lambda self: self.core.max_model_len)
    runner = property(lambda self: self.core.runner)
    scheduler = property(lambda self: self.core.scheduler)
    block_manager = property(lambda self: self.core.block_manager)
    stats = property(lambda self: self.core.stats)
    requests = property(lambda self: self.core.requests)
    eos_ids = property(lambda self: self.core.eos_ids)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return self.inputs.tokenize(prompt)

    def check_request(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Tokenize and check a request against every limit; its prompt ids. Raises ValueError."""
        prompt_ids = self.tokenize(prompt)
        self.inputs.check(prompt_ids, params)
        return prompt_ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    priority: int = 0, stream: bool = True) -> None:
        """Validate and queue a request. Raises ValueError (bad input) or EngineOverloaded; queues nothing then."""
        params = params or SamplingParams()
        self.add_checked(request_id, prompt, self.check_request(prompt, params), params, priority, stream)

    def add_checked(self, request_id: str, prompt: str | list[int], prompt_ids: list[int], params: SamplingParams,
                    priority: int = 0, stream: bool = True) -> None:
        """Queue a request that `check_request` passed (its prompt ids)."""
        self.core.add_request(request_id, prompt_ids, params, priority)
        self.outputs.add(request_id, prompt if isinstance(prompt, str) else None, prompt_ids, params, stream)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self.core.abort_request(request_id)
        return self.outputs.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished() or bool(self.outputs.requests)

    def warm_up(self) -> None:
        self.core.warm_up()

    def step(self) -> list[RequestOutput]:
        outputs, to_stop = self.outputs.process(self.core.step())
        for rid, index in to_stop:
            self.core.finish_sequence(rid, index)
        return outputs
