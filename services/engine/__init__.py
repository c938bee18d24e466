"""Continuous-batching inference engine shared by cpu_worker and gpu_worker."""

from services.engine.attention import paged_attention_reference
from services.engine.engine import LLMEngine
from services.engine.interface import (
    EngineConfig,
    EngineError,
    EngineRequest,
    EngineStats,
    LoraRequest,
    RequestOutput,
    ResumedOutput,
)

__all__ = [
    "EngineConfig",
    "EngineError",
    "EngineRequest",
    "EngineStats",
    "LLMEngine",
    "LoraRequest",
    "RequestOutput",
    "ResumedOutput",
    "paged_attention_reference",
]
