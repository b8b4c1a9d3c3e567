"""saguaro: exact speculative decoding and Speculative Speculative Decoding (SSD / Saguaro)."""

from saguaro.llm import LLM, CompletionOutput, RequestOutput
from saguaro.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
