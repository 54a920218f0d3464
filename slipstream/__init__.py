"""slipstream: a small, fast LLM inference and serving engine."""
from slipstream.engine.llm import LLM
from slipstream.engine.llm_engine import EngineOverloaded, LLMEngine
from slipstream.engine.outputs import CompletionOutput, RequestOutput
from slipstream.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineOverloaded", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
