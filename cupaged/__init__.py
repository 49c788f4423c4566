"""cupaged: a small, fast LLM inference engine with a paged KV cache, in Python on CuPy."""

from cupaged.engine.llm import LLM
from cupaged.engine.llm_engine import CompletionOutput, LLMEngine, RequestOutput
from cupaged.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
