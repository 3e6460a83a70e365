"""flux's one inference engine (see engine.py): routed prefill, per-sample KV, CUDA-graph decode, sampling."""

from flux.engine.engine import Engine, GenerationResult, batch_size, validate_inputs
from flux.engine.parts import EngineError, check_supported

__all__ = ["Engine", "EngineError", "GenerationResult", "batch_size", "check_supported", "validate_inputs"]
