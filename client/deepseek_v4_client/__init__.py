"""Client for the DeepSeek-V4 Triton model (gRPC and HTTP, blocking, streaming, asyncio)."""
from .client import AsyncClient, Client
from .perf_data import input_data, write_input_data
from .types import Chunk, Result, SamplingParams, ServerError

__all__ = ["AsyncClient", "Client", "Chunk", "Result", "SamplingParams", "ServerError", "input_data", "write_input_data"]
