"""`flux.evaluate`: end-to-end runs per routing mode, batch/padding invariance, and errors before model work."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_module

from flux.backbone import load_backbone
from flux.conf import CONFIG_MODULE
from flux.data.prompting import build_prompt, collate_left_padded
from flux.evaluate import EvalConfigError, RandomPlan, evaluate, layer_plan
from flux.model import FluxModel
from flux.router import LayerRouter, RouterCheckpointError, export_router

TINY = ["backbone=tiny_random", "backbone.tiny.num_layers=3", "sparse.sink=4", "sparse.window=32"]
RULER = ["eval.task.tasks=[niah_single,fwe]", "eval.task.lengths=[256]", "eval.task.n=2",
         "eval.task.max_new_tokens=4", "eval.batch_size=3"]


def _cfg(tmp_path, *overrides, task=RULER):
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return compose("evaluate", [*TINY, *task, f"output_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("mode,extra", [("dense", []), ("sparse", []), ("static", ["routing.sa_layers=[0,2]"]),
                                        ("first_dense", ["routing.k=1"]), ("random", ["routing.sparsity=0.34"])])
def test_modes_write_results_and_routing(tmp_path, mode, extra):
    results = evaluate(_cfg(tmp_path, f"routing.mode={mode}", *extra))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == results
    assert set(results) == {"backbone", "routing", "sparse", "results", "summary"}
    assert {r["task"] for r in results["results"]} == {"ruler/niah_single", "ruler/fwe"}
    assert all(r["n"] == 2 and 0 <= r["score"] <= 1 for r in results["results"])
    lines = [json.loads(x) for x in (tmp_path / "routing.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(len(x["decisions"]) == 3 for x in lines)
    expected = {"dense": 0.0, "sparse": 1.0, "static": 2 / 3, "first_dense": 2 / 3, "random": 1 / 3}[mode]
    assert results["summary"]["sparsity"] == pytest.approx(expected)


def test_router_mode_and_checkpoint_checks(tmp_path):
    evaluated = load_backbone("tiny_random", tiny={"num_layers": 3})  # the backbone TINY composes
    router = LayerRouter(3, 16, kind="per_layer", init_fa_bias=-6.0)  # biased to SA: all-sparse decisions
    export_router(router, tmp_path / "router", evaluated, {"pattern": "streaming", "sink": 4, "window": 32})
    results = evaluate(_cfg(tmp_path / "run", "routing.mode=router", f"routing.checkpoint={tmp_path / 'router'}"))
    assert results["routing"] == "router" and results["summary"]["sparsity"] == pytest.approx(1.0)
    export_router(router, tmp_path / "other", load_backbone("tiny_random", family="qwen2", tiny={"num_layers": 3}), {})
    with pytest.raises(RouterCheckpointError, match=r"trained for backbone 'tiny_random-qwen2' \(fingerprint \w+\), "
                                                    r"not for 'tiny_random-llama' .*: model_type 'qwen2' vs 'llama'"):
        evaluate(_cfg(tmp_path / "run2", "routing.mode=router", f"routing.checkpoint={tmp_path / 'other'}"))
    export_router(LayerRouter(5, 16), tmp_path / "five", load_backbone("tiny_random", tiny={"num_layers": 5}), {})
    with pytest.raises(RouterCheckpointError, match="num_hidden_layers 5 vs 3"):
        evaluate(_cfg(tmp_path / "run3", "routing.mode=router", f"routing.checkpoint={tmp_path / 'five'}"))
    with pytest.raises(RouterCheckpointError, match="needs router.safetensors and router.json"):
        evaluate(_cfg(tmp_path / "run4", "routing.mode=router", f"routing.checkpoint={tmp_path / 'missing'}"))


def test_bad_config_fails_before_model_work(tmp_path):
    with pytest.raises(EvalConfigError, match="unknown routing mode 'fancy'"):
        evaluate(_cfg(tmp_path, "routing.mode=fancy"))
    with pytest.raises(EvalConfigError, match="needs 4096 positions but backbone 'tiny_random' has 2048"):
        evaluate(_cfg(tmp_path, "eval.task.lengths=[4096]"))
    with pytest.raises(EvalConfigError, match="routing.k=9"):
        layer_plan("first_dense", 3, {"k": 9})
    with pytest.raises(EvalConfigError, match="outside"):
        layer_plan("static", 3, {"sa_layers": [3]})
    with pytest.raises(EvalConfigError, match="sparsity=1.5"):
        RandomPlan(3, 1.5, 0)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        evaluate(_cfg(tmp_path, "eval=jsonl", f"eval.task.path={tmp_path / 'nope.jsonl'}", task=[]))


def test_random_plan_is_seeded_and_exact():
    a, b = RandomPlan(30, 0.5, 3).draw(4), RandomPlan(30, 0.5, 3).draw(4)
    assert torch.equal(a, b) and (a.sum(dim=1) == 15).all()


@pytest.mark.slow
def test_batched_padded_generation_equals_batch_of_one(smollm2):
    """Left padding and batching must not change a single generated token (dense and routed plans)."""
    fm = FluxModel(smollm2)
    tok = smollm2.tokenizer
    texts = [("The code word is ruby. " * 3, "What is the code word?"),
             ("Numbers: 4, 8, 15, 16, 23. " * 9, "Which number comes after 15?"),
             ("Paris is the capital of France. " * 2, "Name the capital of France.")]
    prompts = [build_prompt(tok, c, q) for c, q in texts]
    batch = collate_left_padded(prompts, tok.pad_token_id)
    assert batch["attention_mask"].sum(dim=1).unique().numel() == 3
    for plan in ("dense", [i % 3 == 2 for i in range(smollm2.num_layers)]):
        together = fm.generate(batch["input_ids"], batch["attention_mask"], plan=plan, max_new_tokens=10,
                               segments=batch["segments"])
        for i, p in enumerate(prompts):
            alone = fm.generate(torch.tensor([list(p.input_ids)]), plan=plan, max_new_tokens=10)
            n = alone.sequences.shape[1]
            assert torch.equal(together.sequences[i, :n], alone.sequences[0]), (plan, i)
