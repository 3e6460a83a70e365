"""Triton kernels for flux (imported as ``flux_kernels``; the folder is ``kernels/``).

* ``streaming_attention_prefill``: sinks + window prefill attention, O(T * (sink + window)); optionally the last
  rows dense (the triangle pattern), computed by ``split_k_attention``.
* ``split_k_attention``: causal attention of a few last queries over many keys, split over key chunks.
* ``xattn_block_scores`` / ``block_sparse_attention``: XAttention's antidiagonal block scoring and block-sparse
  prefill attention over per-(head, query block) key-block lists (``block_select`` builds them, in torch).
* ``decode_attention`` / ``plan_decode``: split-KV one-token attention over a KV cache, CUDA-graph friendly.
* ``fused_ops``: add+RMSNorm, rotary+cache store, SiLU-mul for the fast decode step.
* ``reference``: the float64 torch definitions every kernel is tested against.
On machines without CUDA call ``flux_kernels.interpret.use_interpreter_without_cuda()`` before the first launch.
"""

from flux_kernels.block_select import block_lists, select_blocks
from flux_kernels.block_sparse_prefill import block_sparse_attention
from flux_kernels.decode import DecodePlan, decode_attention, plan_decode
from flux_kernels.reference import decode_attention_reference, streaming_attention_reference, streaming_mask
from flux_kernels.split_k_prefill import split_k_attention
from flux_kernels.streaming_prefill import streaming_attention_prefill
from flux_kernels.xattn_scores import xattn_block_scores

__all__ = [
    "DecodePlan",
    "block_lists",
    "block_sparse_attention",
    "decode_attention",
    "decode_attention_reference",
    "plan_decode",
    "select_blocks",
    "split_k_attention",
    "streaming_attention_prefill",
    "streaming_attention_reference",
    "streaming_mask",
    "xattn_block_scores",
]
