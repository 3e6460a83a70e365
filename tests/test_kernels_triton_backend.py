"""The engine on flux's Triton kernels (fused norm/rotary/SiLU, streaming prefill, split-KV decode) against the same
engine on the transformers modules: same logits and greedy tokens. Runs under TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from flux_kernels.interpret import use_interpreter_without_cuda

use_interpreter_without_cuda()

from flux.attention.patterns import StreamingPattern
from flux.backbone import load_backbone
from flux.model import FluxModel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(vocab: int, right: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 21), generator=g)
    mask = torch.ones_like(ids)
    if right:
        mask[1, 15:] = 0
    else:
        mask[1, :6] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("family,right", [("llama", False), ("qwen3", True), ("qwen2", False)])
def test_triton_engine_matches_torch_engine(family, right):
    bb = load_backbone("tiny_random", family=family, tiny={"num_layers": 3}, device=DEVICE, dtype="float32")
    pattern = StreamingPattern(sink=2, window=6)
    ids, mask = _batch(bb.config.vocab_size, right)
    plan = torch.tensor([[True, False, True], [False, False, True], [True, True, False]], device=DEVICE)
    results = {}
    for kernels in ("torch", "triton"):
        fm = FluxModel(bb, pattern=pattern, kernels=kernels)
        with torch.no_grad():
            logits = fm(ids, mask, plan=plan).logits
        res = fm.generate(ids, mask, plan=plan, max_new_tokens=9, eos_token_id=[], use_graph=False)
        results[kernels] = (logits, res.sequences)
    # exact fp32 under the CPU interpreter; on a GPU the kernels' fp32 dots run in tf32
    tolerance = 5e-3 if DEVICE == "cuda" else 1e-4
    assert (results["triton"][0] - results["torch"][0])[mask.bool()].abs().max() < tolerance
    assert torch.equal(results["triton"][1], results["torch"][1])


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager_decode():
    bb = load_backbone("tiny_random", family="llama", tiny={"num_layers": 3}, device="cuda", dtype="bfloat16")
    fm = FluxModel(bb, pattern=StreamingPattern(sink=2, window=6))
    ids, mask = _batch(bb.config.vocab_size, right=True)
    plan = torch.tensor([[True, False, True], [False, False, True], [True, True, False]], device="cuda")
    eager = fm.generate(ids, mask, plan=plan, max_new_tokens=20, eos_token_id=[], use_graph=False)
    graph = fm.generate(ids, mask, plan=plan, max_new_tokens=20, eos_token_id=[], use_graph=True)
    assert torch.equal(eager.sequences, graph.sequences)
