"""Sparse-attention patterns, one module each; a module that subclasses `SparsePattern` with a `name` registers it.

Every module of this package is imported here, so a new pattern is one file in this folder plus
`conf/sparse/<name>.yaml`, with nothing else to edit. See `base.py` for the contract.
"""

import importlib
import pkgutil

from flux.attention.patterns.base import (
    PATTERNS,
    PatternError,
    PositionalPattern,
    SparsePattern,
    get_pattern,
    pattern_for_router,
    pattern_from_description,
    sparse_overridden,
)
from flux.attention.patterns.streaming import StreamingPattern
from flux.attention.patterns.triangle import TrianglePattern
from flux.attention.patterns.xattn import XAttentionPattern

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "PATTERNS",
    "PatternError",
    "PositionalPattern",
    "SparsePattern",
    "StreamingPattern",
    "TrianglePattern",
    "XAttentionPattern",
    "get_pattern",
    "pattern_for_router",
    "pattern_from_description",
    "sparse_overridden",
]
