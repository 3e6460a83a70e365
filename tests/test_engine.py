"""flux's inference engine against independent references.

* dense: logits against transformers' own forward (SDPA) and greedy tokens against transformers' own `generate`,
  for every supported family (Llama, Qwen2 with q/k/v bias, Qwen3 with q/k norms, Mistral);
* routed: greedy tokens against a no-cache recomputation through the training path (the transformers modules with
  flux's masked attention), for plans whose sparse layers' rings wrap several times;
* per-sample KV: a batch gives exactly what each sample gives alone, left or right padded, and the KV accounting
  is exact.
"""

from __future__ import annotations

import copy

import pytest
import torch

from flux.attention.patterns import StreamingPattern
from flux.backbone import load_backbone
from flux.engine import EngineError
from flux.engine import prefill as engine_prefill
from flux.model import FluxModel
from flux.router import LayerRouter

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
VOCAB = 300


def _backbone(family: str, layers: int = 3, seed: int = 1):
    return load_backbone("tiny_random", family=family, tiny={"vocab_size": VOCAB, "num_layers": layers}, seed=seed)


def _batch(batch: int = 3, length: int = 23, pads=(0, 5, 9), right: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads[:batch]):
        if p:
            if right:
                mask[b, length - p:] = 0
            else:
                mask[b, :p] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _to_left(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same samples, left-padded."""
    out_ids, out_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for b in range(ids.shape[0]):
        real = ids[b][mask[b].bool()]
        out_ids[b, ids.shape[1] - real.numel():] = real
        out_mask[b, ids.shape[1] - real.numel():] = 1
    return out_ids, out_mask


@pytest.fixture(params=[None, 7], ids=["one_query_chunk", "query_chunks_of_7"])
def query_chunks(request, monkeypatch):
    """Prefill attends in query chunks (7 rows: several chunks, ends mid-sample) and projects in steps of 5 tokens
    (several per query chunk, not aligned with them) or, at these sizes, does each in one."""
    if request.param:
        monkeypatch.setattr(engine_prefill, "query_chunk_tokens", lambda parts, batch, dtype: request.param)
        monkeypatch.setattr(engine_prefill, "project_chunk_tokens", lambda parts, batch, dtype: 5)
    return request.param


def _recompute(fm: FluxModel, ids, mask, plan, n: int) -> torch.Tensor:
    """Greedy decoding by re-running the whole sequence through the training path every step: no cache at all."""
    tokens = []
    for _ in range(n):
        with torch.enable_grad():
            logits = fm(ids, mask, plan=plan, logits_to_keep=1).logits[:, -1].detach()
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(nxt)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return torch.cat(tokens, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_logits_and_greedy_tokens_equal_transformers(family, query_chunks):
    bb = _backbone(family)
    hf = copy.deepcopy(bb.model)
    hf.set_attn_implementation("sdpa")
    fm = FluxModel(bb)
    ids, mask = _batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = fm(ids, mask).logits
    assert (got - want)[mask.bool()].abs().max() < 1e-5
    tokens = fm.generate(ids, mask, max_new_tokens=12, eos_token_id=[]).sequences
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
    assert torch.equal(tokens, ref[:, ids.shape[1]:])


@pytest.mark.parametrize("family", ("llama", "qwen3"))
@pytest.mark.parametrize("plan_name", ("sparse", "alternate", "per_sample"))
def test_routed_greedy_equals_no_cache_recompute(family, plan_name, query_chunks):
    """Window 6 and 14 new tokens: every SA layer's ring wraps; per-sample plans put FA and SA rows in one layer."""
    bb = _backbone(family, layers=4)
    fm = FluxModel(bb, pattern=StreamingPattern(sink=2, window=6))
    ids, mask = _batch(length=19)
    plans = {"sparse": "sparse", "alternate": [False, True, False, True],
             "per_sample": torch.tensor([[True, False, True, True], [False, False, True, False],
                                         [True, True, False, True]])}
    plan = plans[plan_name]
    got = fm.generate(ids, mask, plan=plan, max_new_tokens=14, eos_token_id=[]).sequences
    assert torch.equal(got, _recompute(fm, ids, mask, plan, 14))


@pytest.mark.parametrize("right", (False, True))
def test_batch_equals_each_sample_alone(right, query_chunks):
    bb = _backbone("qwen2", layers=4)
    fm = FluxModel(bb, pattern=StreamingPattern(sink=2, window=5))
    ids, mask = _batch(length=21, right=right)
    plan = torch.tensor([[True, False, True, True], [False, True, True, False], [True, True, True, True]])
    together = fm.generate(ids, mask, plan=plan, max_new_tokens=9, eos_token_id=[])
    for b in range(3):
        real = ids[b][mask[b].bool()][None]
        alone = fm.generate(real, plan=plan[b:b + 1], max_new_tokens=9, eos_token_id=[])
        assert torch.equal(together.sequences[b], alone.sequences[0])
        assert together.kv_bytes_per_sample[b] <= alone.kv_bytes_per_sample[0] * 2
    left = fm.generate(*_to_left(ids, mask), plan=plan, max_new_tokens=9, eos_token_id=[])
    assert torch.equal(left.sequences, together.sequences)


def test_sa_sample_keeps_only_sink_and_window_in_a_mixed_layer():
    bb = _backbone("llama", layers=2)
    sink, window = 2, 5
    fm = FluxModel(bb, pattern=StreamingPattern(sink=sink, window=window))
    ids, mask = _batch(batch=2, length=30, pads=(0, 0))
    plan = torch.tensor([[True, False], [False, False]])
    res = fm.generate(ids, mask, plan=plan, max_new_tokens=10, eos_token_id=[])
    token = 2 * bb.num_kv_heads * bb.head_dim * 4  # K and V, fp32
    capacity = 30 + 10
    assert res.kv_bytes_per_sample == [(capacity + sink + window) * token, 2 * capacity * token]
    assert res.kv_bytes == sum(res.kv_bytes_per_sample)
    assert res.kv_bytes_dense == 2 * 2 * capacity * token
    assert torch.equal(res.decisions, plan)


def test_forward_keeps_only_requested_logits_in_the_callers_layout():
    bb = _backbone("llama")
    fm = FluxModel(bb)
    ids, mask = _batch(right=True)
    with torch.no_grad():
        full = fm(ids, mask).logits
        last = fm(ids, mask, logits_to_keep=4).logits
    assert last.shape == (3, 4, VOCAB)
    assert torch.allclose(last, full[:, -4:], atol=1e-6)
    assert (full[~mask.bool()] == 0).all()


@pytest.mark.parametrize("pooling", ("first_last", "question", "mean"))
def test_router_decides_in_the_loop_like_the_training_path(pooling, query_chunks):
    """Span pooling: the engine computes only the spans' queries before deciding; mean pooling reads them all."""
    bb = _backbone("qwen3", layers=4)
    router = LayerRouter(4, bb.head_dim, init_fa_bias=0.0, pooling=pooling)
    torch.manual_seed(0)
    for p in router.parameters():
        torch.nn.init.normal_(p, std=2.0)
    fm = FluxModel(bb, pattern=StreamingPattern(sink=2, window=4), router=router.eval())
    ids, mask = _batch(batch=3, length=25)
    with torch.enable_grad():
        training = fm(ids, mask, plan="router")
    res = fm.generate(ids, mask, plan="router", max_new_tokens=5, eos_token_id=[])
    assert torch.equal(res.decisions, training.decisions)
    assert 0 < res.decisions.sum() < res.decisions.numel()  # mixed decisions, so both caches are exercised
    assert torch.equal(res.sequences, _recompute(fm, ids, mask, res.decisions, 5))


def test_eos_and_stop_strings_end_each_sample_where_it_would_end_alone():
    bb = _backbone("llama", layers=2)
    fm = FluxModel(bb)
    ids, mask = _batch(batch=2, pads=(0, 4))
    free = fm.generate(ids, mask, max_new_tokens=16, eos_token_id=[])
    eos = int(free.sequences[0, 3])
    res = fm.generate(ids, mask, max_new_tokens=16, eos_token_id=eos)
    first = int((free.sequences[0] == eos).nonzero()[0])
    assert int(res.num_generated[0]) == first + 1 and res.finish_reasons[0] == "eos"
    assert (res.sequences[0, first + 1:] == eos).all()
    tok = bb.tokenizer
    text = tok.decode(free.sequences[1], skip_special_tokens=True)
    stop = text[4:6]
    res = fm.generate(ids, mask, max_new_tokens=16, eos_token_id=[], stop=[stop])
    n = int(res.num_generated[1])
    assert stop in tok.decode(res.sequences[1, :n]) and stop not in tok.decode(res.sequences[1, :n - 1])
    assert res.finish_reasons[1] == "stop"
    assert torch.equal(res.sequences[1, :n], free.sequences[1, :n])


def test_seeded_sampling_is_reproducible_and_batch_invariant():
    bb = _backbone("qwen2", layers=2)
    fm = FluxModel(bb)
    ids, mask = _batch()
    kw = {"max_new_tokens": 10, "eos_token_id": [], "do_sample": True, "temperature": 1.5, "top_k": 50, "top_p": 0.9}
    a = fm.generate(ids, mask, seed=7, **kw).sequences
    assert torch.equal(a, fm.generate(ids, mask, seed=7, **kw).sequences)
    assert not torch.equal(a, fm.generate(ids, mask, seed=8, **kw).sequences)
    alone = fm.generate(ids[2:3, 9:], seed=7, **kw).sequences
    assert torch.equal(a[2], alone[0])
    greedy = fm.generate(ids, mask, max_new_tokens=10, eos_token_id=[]).sequences
    assert torch.equal(fm.generate(ids, mask, max_new_tokens=10, eos_token_id=[], do_sample=True, top_k=1,
                                   seed=3).sequences, greedy)


def test_sampling_follows_the_distribution():
    """Gumbel-max with hashed noise: the empirical token frequencies match softmax(logits / T) on a fixed row."""
    from flux.engine.sampling import Sampler

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    counts = torch.zeros(5)
    sampler = Sampler(1, 5, torch.device("cpu"), do_sample=True, temperature=1.0, seed=11)
    for step in range(4000):
        counts[sampler(logits, torch.tensor([step]))] += 1
    assert torch.allclose(counts / counts.sum(), logits.softmax(-1)[0], atol=0.025)
    nucleus = Sampler(1, 5, torch.device("cpu"), do_sample=True, top_p=0.5, seed=1)
    assert all(int(nucleus(logits, torch.tensor([s]))) == 0 for s in range(50))  # p(top token) = 0.64 >= 0.5


@pytest.mark.parametrize("kwargs,match", [
    ({"do_sample": True, "temperature": 0.0}, "temperature must be > 0"),
    ({"do_sample": True, "top_p": 1.5}, "top_p must lie in"),
    ({"do_sample": True, "top_k": 0}, "top_k must be an integer >= 1"),
    ({"temperature": 0.7}, "only apply with do_sample=True"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": 5000}, "exceed the backbone's"),
    ({"plan": torch.full((1, 2), 0.5)}, "hard decisions"),
    ({"stop": [""]}, "non-empty strings"),
])
def test_bad_generation_arguments_fail_with_one_clear_error(kwargs, match):
    fm = FluxModel(_backbone("llama", layers=2))
    args = {"max_new_tokens": 4}
    args.update(kwargs)
    with pytest.raises(EngineError, match=match):
        fm.generate(torch.randint(3, VOCAB, (1, 10)), **args)


@pytest.mark.parametrize("ids,mask,match", [
    (torch.rand(1, 5), None, "integer token ids"),
    (torch.tensor([[3, 4, VOCAB]]), None, f"token id {VOCAB} is outside"),
    (torch.tensor([[3, 4, 5]]), torch.tensor([[1, 2, 1]]), "only 0"),
    (torch.tensor([[3, 4, 5]]), torch.tensor([[1, 0, 1]]), "contiguous"),
    (torch.tensor([[3, 4, 5]]), torch.tensor([[0, 0, 0]]), "no real tokens"),
])
def test_bad_inputs_fail_with_one_clear_error(ids, mask, match):
    fm = FluxModel(_backbone("llama", layers=2))
    with pytest.raises(EngineError, match=match):
        fm.generate(ids, mask, max_new_tokens=2)
    with pytest.raises(EngineError, match=match), torch.no_grad():
        fm(ids, mask)


def test_wrapped_transformers_model_refuses_to_run_unrouted():
    fm = FluxModel(_backbone("llama", layers=2))
    with pytest.raises(RuntimeError, match="FluxModel.generate"):
        fm.model.generate(torch.randint(3, VOCAB, (1, 6)), max_new_tokens=3)


def test_unsupported_architectures_are_refused():
    from flux.engine.parts import check_supported

    bb = _backbone("mistral", layers=2)
    cfg = copy.deepcopy(bb.config)
    cfg.sliding_window = 16
    with pytest.raises(EngineError, match="sliding window"):
        check_supported(cfg)
    cfg.sliding_window, cfg.model_type = None, "gemma"
    with pytest.raises(EngineError, match="not supported"):
        check_supported(cfg)


def test_several_continuations_share_one_prefill():
    bb = _backbone("llama", layers=2)
    fm = FluxModel(bb, pattern=StreamingPattern(sink=2, window=5))
    ids, mask = _batch(batch=2, pads=(0, 3))
    kw = {"max_new_tokens": 8, "eos_token_id": [], "do_sample": True, "seed": [5, 9]}
    many = fm.generate(ids, mask, plan=[True, False], num_return_sequences=3, **kw)
    assert many.sequences.shape == (6, 8) and many.decisions.shape == (6, 2)
    for b in range(2):
        for i in range(3):
            alone = fm.generate(ids[b:b + 1], mask[b:b + 1], plan=[True, False], max_new_tokens=8,
                                eos_token_id=[], do_sample=True, seed=kw["seed"][b] + i)
            assert torch.equal(many.sequences[3 * b + i], alone.sequences[0])
    with pytest.raises(EngineError, match="identical"):
        fm.generate(ids, mask, num_return_sequences=2)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", (None, 512), ids=("one_query_chunk", "query_chunks_of_512"))
def test_cuda_engine_matches_transformers_in_bf16(chunk, monkeypatch):
    """On the GPU (Triton kernels, bf16, prompts long enough for many kernel blocks and the head-by-head dense path;
    with query chunks for all-SA layers): dense logits against transformers' SDPA forward, routed logits against the
    training path's masked attention."""
    from flux import engine as engine_module

    if chunk:
        monkeypatch.setattr(engine_prefill, "query_chunk_tokens", lambda parts, batch, dtype: chunk)
        monkeypatch.setattr(engine_prefill, "project_chunk_tokens", lambda parts, batch, dtype: chunk // 2 + 3)

    bb = load_backbone("tiny_random", family="qwen2", device="cuda", dtype="bfloat16", seed=2,
                       tiny={"num_layers": 3, "hidden_size": 512, "num_heads": 8, "num_kv_heads": 2,
                             "intermediate_size": 1024, "vocab_size": 1000, "max_positions": 8192})
    hf = copy.deepcopy(bb.model)
    hf.set_attn_implementation("sdpa")
    fm = FluxModel(bb, pattern=StreamingPattern(sink=64, window=512))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (2, 3001), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[1, :700] = 0

    def rel(a, b):
        a, b = a[mask.bool()].double(), b[mask.bool()].double()
        return float((a - b).norm() / b.norm())

    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    old = engine_module.prefill.HEADWISE_FA_TOKENS
    engine_module.prefill.HEADWISE_FA_TOKENS = 1024  # exercise the head-by-head path at this size
    try:
        with torch.no_grad():
            assert rel(fm(ids, mask).logits, hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits) < 2e-2
            plan = [True, False, True]
            routed = fm(ids, mask, plan=plan).logits
        with torch.enable_grad():
            reference = fm(ids, mask, plan=plan).logits.detach()
        assert rel(routed, reference) < 2e-2
    finally:
        engine_module.prefill.HEADWISE_FA_TOKENS = old


def _patterns():
    from flux.attention.patterns import TrianglePattern, XAttentionPattern

    return {"triangle": TrianglePattern(sink=2, window=5, last_q=3),
            "xattn": XAttentionPattern(block_size=16, stride=4, threshold=0.3)}


@pytest.mark.parametrize("name", ("triangle", "xattn"))
@pytest.mark.parametrize("right", (False, True))
def test_whole_prompt_patterns_score_and_generate_like_each_sample_alone(name, right):
    """Patterns that read the whole prompt: each sample's engine logits equal the training path's on that sample
    alone (triangle's last queries sit at each prompt's own end; xattn's blocks start at each prompt's first
    token), and a padded batch generates exactly what each sample generates alone."""
    pattern = _patterns()[name]
    fm = FluxModel(_backbone("qwen2", layers=3), pattern=pattern)
    ids, mask = _batch(batch=3, length=45, pads=(0, 7, 19), right=right)
    plan = torch.tensor([[True, False, True], [True, True, False], [False, True, True]])
    with torch.no_grad():
        batched = fm(ids, mask, plan=plan).logits
    together = fm.generate(ids, mask, plan=plan, max_new_tokens=7, eos_token_id=[])
    for b in range(3):
        real = ids[b][mask[b].bool()][None]
        with torch.enable_grad():
            alone = fm(real, plan=plan[b:b + 1]).logits.detach()
        assert (batched[b][mask[b].bool()] - alone[0]).abs().max() < 1e-5
        single = fm.generate(real, plan=plan[b:b + 1], max_new_tokens=7, eos_token_id=[])
        assert torch.equal(together.sequences[b], single.sequences[0])
    with torch.no_grad():
        dense = fm(ids, mask).logits
    assert (dense - batched)[mask.bool()].abs().max() > 1e-3  # the pattern changes the logits


def test_full_kv_pattern_keeps_full_rows_and_ring_pattern_keeps_rings():
    pats = _patterns()
    ids, mask = _batch(batch=1, length=40, pads=(0,))
    token = None
    for name, full in (("xattn", True), ("triangle", False)):
        fm = FluxModel(_backbone("llama", layers=2), pattern=pats[name])
        res = fm.generate(ids, mask, plan="sparse", max_new_tokens=4, eos_token_id=[])
        token = res.kv_bytes_dense // (2 * 44)
        assert res.kv_bytes == (res.kv_bytes_dense if full else 2 * (2 + 5) * token)


@pytest.mark.parametrize("family", ("llama", "qwen2", "qwen3"))
def test_probed_queries_equal_the_full_layers_queries_at_their_positions(family):
    """The router decides from queries computed at its spans alone: they must be the layer's queries there."""
    from flux.engine.ops import TorchOps
    from flux.engine.parts import model_parts

    parts = model_parts(_backbone(family).model)
    ops, blk = TorchOps(), parts.blocks[1]
    g = torch.Generator().manual_seed(3)
    r = torch.randn(2, 29, parts.hidden, generator=g)
    cos, sin = parts.rotary(r[:1, :1], torch.arange(29)[None])
    full = engine_prefill.new_queries(2, 29, parts, r.dtype, r.device)
    engine_prefill.project_in_chunks(parts, ops, blk, r, cos, sin, 5, full, None, None)
    index = torch.tensor([[0, 3, 28, 28, 11], [27, 1, 2, 16, 9]])
    probed = engine_prefill.probe_queries(parts, ops, blk, r, cos, sin, index)
    want = full.gather(2, index[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[-1]))
    torch.testing.assert_close(probed, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ("llama", "qwen3"))
def test_triton_kernels_give_the_torch_paths_tokens_under_the_interpreter(family, query_chunks):
    """The CUDA path's fused kernels (norms, rotary + cache store, SiLU-mul, split-KV decode, streaming prefill),
    run on CPU by Triton's interpreter, against the transformers modules + SDPA, on a mixed per-sample plan."""
    bb = _backbone(family, layers=3)
    pattern = StreamingPattern(sink=2, window=6)
    ids, mask = _batch(length=19)
    plan = torch.tensor([[True, False, True], [False, False, True], [True, True, False]])
    want = FluxModel(bb, pattern=pattern, kernels="torch").generate(ids, mask, plan=plan, max_new_tokens=6,
                                                                    eos_token_id=[])
    got = FluxModel(bb, pattern=pattern, kernels="triton").generate(ids, mask, plan=plan, max_new_tokens=6,
                                                                    eos_token_id=[])
    assert torch.equal(got.sequences, want.sequences)
    assert torch.equal(got.decisions, want.decisions)
