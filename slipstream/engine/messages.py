"""What the API front end and the engine-core process say to each other over ZeroMQ (msgpack via msgspec).

Front end -> core: add a checked request, abort requests, stop samples that hit a stop string, shut down.
Core -> front end: `Ready` once loaded and warmed up, then one `StepOut` per engine step carrying every
sequence's new tokens (not one message per token per request), or `Failed` with the traceback before it exits.
With several front ends, each has its own socket from the core and its step messages carry its requests only.
"""
from __future__ import annotations

import msgspec

from slipstream.engine.core_stats import CoreStats
from slipstream.engine.input_processor import EngineLimits
from slipstream.engine.outputs import SeqDelta
from slipstream.sampling_params import SamplingParams


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int = 0
    client: int = 0  # which front end sent it (`--api-server-count`): its outputs go back there only


class Abort(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]


class FinishSequences(msgspec.Struct, tag="stop", array_like=True):
    seqs: list[tuple[str, int]]  # (request_id, sample index)


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


class Ready(msgspec.Struct, tag="ready", array_like=True):
    limits: EngineLimits


class Rejected(msgspec.Struct, array_like=True):
    request_id: str
    message: str
    overloaded: bool  # True: the queue was full (retry later); False: the request itself was refused


class StepOut(msgspec.Struct, tag="step", array_like=True):
    deltas: list[SeqDelta]
    stats: CoreStats
    step_time: float  # seconds the step took on the core, 0 for a message that ran no step
    rejected: list[Rejected] = []


class Failed(msgspec.Struct, tag="failed", array_like=True):
    message: str  # the exception and its traceback


ToCore = AddRequest | Abort | FinishSequences | Shutdown
FromCore = Ready | StepOut | Failed
