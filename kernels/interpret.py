"""Run the kernels on CPU tensors through Triton's interpreter when there is no GPU (tests, CI).

Triton decides at decoration time (module import) whether a ``@triton.jit`` function is compiled or interpreted, so
TRITON_INTERPRET must be set before the kernel modules are imported. When something imported them earlier without
it, the modules (and the flux modules that bound their functions) are reloaded in dependency order.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

KERNEL_MODULES = ("flux_kernels.online_softmax", "flux_kernels.split_merge", "flux_kernels.split_k_prefill",
                  "flux_kernels.streaming_prefill", "flux_kernels.decode", "flux_kernels.fused_ops",
                  "flux_kernels.router_pool", "flux_kernels.xattn_scores", "flux_kernels.block_sparse_prefill")
DEPENDENT_MODULES = ("flux_kernels", "flux.attention.triton_backend")


def _compiled_mode(module: object) -> bool:
    from triton.runtime.jit import JITFunction

    return any(isinstance(obj, JITFunction) for obj in vars(module).values())


def use_interpreter_without_cuda() -> bool:
    """Without CUDA, switch every flux kernel to the interpreter; returns True when the interpreter is in use."""
    if torch.cuda.is_available():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    stale = [name for name in KERNEL_MODULES if name in sys.modules and _compiled_mode(sys.modules[name])]
    if stale:
        for name in KERNEL_MODULES + DEPENDENT_MODULES:
            if name in sys.modules:
                importlib.reload(sys.modules[name])
    return True
