"""Per-layer attention dispatch: FA/SA backends, sparse patterns, and the registered 'flux' implementation."""

from flux.attention.dispatch import ATTENTION_NAME, RoutingState, attach, register
from flux.attention.patterns import (
    PATTERNS,
    PatternError,
    SparsePattern,
    StreamingPattern,
    TrianglePattern,
    XAttentionPattern,
    get_pattern,
)

__all__ = [
           "ATTENTION_NAME",
           "PATTERNS",
           "PatternError",
           "RoutingState",
           "SparsePattern",
           "StreamingPattern",
           "TrianglePattern",
           "XAttentionPattern",
           "attach",
           "get_pattern",
           "register",
]
