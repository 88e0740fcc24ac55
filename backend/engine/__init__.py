"""The serving engine (no Triton imports): nano-vllm's shape, with a slot allocator in place of a
paged block manager because DeepSeek-V4's per-sequence state is fixed-size."""
from .config import EngineConfig
from .llm_engine import LLMEngine, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]
