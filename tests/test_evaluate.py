"""`flux.evaluate`: end-to-end runs per routing mode, batch/padding invariance, and errors before model work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from flux.attention.patterns import PatternError
from flux.backbone import load_backbone
from flux.conf import CONFIG_MODULE
from flux.data.prompting import build_prompt, collate_left_padded
from flux.errors import ConfigError, FluxUserError
from flux.evals import read_results
from flux.evaluate import EvalConfigError, RandomPlan, evaluate, layer_plan
from flux.model import FluxModel
from flux.router import LayerRouter, RouterCheckpointError, export_router

TINY = ["backbone=tiny_random", "backbone.tiny.num_layers=3", "sparse.sink=4", "sparse.window=32"]
RULER = ["eval.task.tasks=[niah_single,fwe]", "eval.task.lengths=[256]", "eval.task.n=2",
         "eval.task.max_new_tokens=4", "eval.batch_size=3"]


def _tiny_backbone():
    """The backbone TINY's evaluations load (a router's files record its architecture)."""
    return load_backbone("tiny_random", tiny={"num_layers": 3})


def _cfg(tmp_path, *overrides, task=RULER, tiny=TINY):
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return compose("evaluate", [*tiny, *task, f"output_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("mode,extra", [("dense", []), ("sparse", []), ("static", ["routing.sa_layers=[0,2]"]),
                                        ("first_dense", ["routing.k=1"]), ("random", ["routing.sparsity=0.34"])])
def test_modes_write_results_and_routing(tmp_path, mode, extra):
    results = evaluate(_cfg(tmp_path, f"routing.mode={mode}", *extra))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == results
    assert set(results) == {"backbone", "routing", "sparse", "results", "summary", "provenance"}
    assert {r["task"] for r in results["results"]} == {"ruler/niah_single", "ruler/fwe"}
    assert all(r["n"] == 2 and 0 <= r["score"] <= 1 for r in results["results"])
    lines = [json.loads(x) for x in (tmp_path / "routing.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(len(x["decisions"]) == 3 for x in lines)
    # retrieval samples say where their answer sits (per-input properties), holistic ones do not
    assert all(set(x["meta"]) == {"needle_depth", "needle_distance_tokens"} for x in lines
               if x["task"] == "ruler/niah_single")
    assert all("meta" not in x for x in lines if x["task"] == "ruler/fwe")
    expected = {"dense": 0.0, "sparse": 1.0, "static": 2 / 3, "first_dense": 2 / 3, "random": 1 / 3}[mode]
    assert results["summary"]["sparsity"] == pytest.approx(expected)


def test_results_record_their_provenance(tmp_path):
    """results.json says which run it is: overrides (the caller's outside Hydra), seeds, split, code and date."""
    from flux.evals.provenance import code_state, flux_version

    results = evaluate(_cfg(tmp_path / "random", "routing.mode=random", "routing.sparsity=0.34", "routing.seed=5"),
                       overrides=["routing.mode=random", "routing.sparsity=0.34"], seeds={"train": 3})
    prov = results["provenance"]
    assert prov["overrides"] == ["routing.mode=random", "routing.sparsity=0.34"]
    assert prov["checkpoint"] is None and prov["seeds"] == {"eval": 0, "routing": 5, "train": 3}
    assert prov["task"] == {"name": "ruler", "tasks": ["niah_single", "fwe"], "lengths": [256], "n": 2, "seed": 0,
                            "haystack": "noise", "max_new_tokens": 4}
    assert all(r["n"] == 2 for r in results["results"])  # n per cell is in every row
    assert prov["code"] == code_state() and prov["code"]["commit"]  # this checkout's git commit
    assert len(prov["code"]["commit"]) == 40 and isinstance(prov["code"]["dirty"], bool)
    assert prov["flux_version"] == flux_version() == "0.1.0"
    saved = json.loads((tmp_path / "random" / "eval_config.json").read_text())
    assert prov["date"] == saved["started"] and prov["date"].endswith("Z")
    dense = evaluate(_cfg(tmp_path / "dense", "routing.mode=dense"))
    assert dense["provenance"]["overrides"] == [] and dense["provenance"]["seeds"] == {"eval": 0}


def test_router_mode_and_checkpoint_checks(tmp_path):
    from flux.router import file_sha256

    evaluated = load_backbone("tiny_random", tiny={"num_layers": 3})  # the backbone TINY composes
    router = LayerRouter(3, 16, kind="per_layer", init_fa_bias=-6.0)  # biased to SA: all-sparse decisions
    export_router(router, tmp_path / "router", evaluated, {"pattern": "streaming", "sink": 4, "window": 32})
    results = evaluate(_cfg(tmp_path / "run", "routing.mode=router", f"routing.checkpoint={tmp_path / 'router'}"))
    assert results["routing"] == "router" and results["summary"]["sparsity"] == pytest.approx(1.0)
    assert results["provenance"]["checkpoint"] == {
        "source": str(tmp_path / "router"), "weights_sha256": file_sha256(tmp_path / "router" / "router.safetensors")}
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


def test_bad_pattern_fails_before_the_model_loads(tmp_path):
    with pytest.raises(PatternError, match=r"xattn threshold must lie in \(0, 1\], got 0;"):
        evaluate(_cfg(tmp_path, "sparse=xattn", "sparse.threshold=0", "backbone.source=/nonexistent/model",
                      tiny=TINY[:2]))


@pytest.mark.slow
def test_multirun_over_patterns_records_each_pattern(tmp_path):
    """`python -m flux.evaluate -m sparse=streaming,triangle,xattn` runs every layer on each pattern in turn and
    records the pattern with its parameters in each results.json."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "flux.evaluate", "-m", *TINY[:2], *RULER, "routing.mode=sparse",
           "sparse=streaming,triangle,xattn", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = {}
    for job in ("0", "1", "2"):
        results = json.loads((sweep / job / "results.json").read_text())
        recorded[results["sparse"]["pattern"]] = results["sparse"]
        assert results["summary"]["sparsity"] == pytest.approx(1.0)
    # evaluation runs each pattern's own defaults (the one documented default; conf/sparse/*.yaml leave them null)
    assert recorded == {"streaming": {"pattern": "streaming", "sink": 128, "window": 2048},
                        "triangle": {"pattern": "triangle", "sink": 128, "window": 2048, "last_q": 64},
                        "xattn": {"pattern": "xattn", "block_size": 128, "stride": 8, "threshold": 0.9,
                                  "density": None}}


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


# -- nothing lost: incremental routing.jsonl and resume ------------------------------------------------------------

RESUMABLE = ["routing.mode=random", "routing.sparsity=0.34", "eval.task.n=3", "eval.batch_size=2"]


def _files(folder: Path) -> dict[str, bytes]:
    """The evaluation's files, without when it started (eval_config's `started`, results' provenance date): two
    evaluations started at different times differ only there."""
    files = {name: (folder / name).read_bytes() for name in ("routing.jsonl", "results.json", "eval_config.json")}
    config, results = json.loads(files["eval_config.json"]), json.loads(files["results.json"])
    assert results["provenance"]["date"] == config.pop("started")
    results["provenance"].pop("date")
    return {**files, "eval_config.json": json.dumps(config).encode(), "results.json": json.dumps(results).encode()}


class Interrupt(RuntimeError):
    """Raised from inside the model call to stop an evaluation part-way, as a crash would."""


def _interrupt_after(monkeypatch, method: str, calls: int) -> None:
    """Let `calls` calls of FluxModel.<method> through, then raise Interrupt (the real method runs before that)."""
    real = getattr(FluxModel, method)
    seen = {"n": 0}

    def wrapped(self, *args, **kwargs):
        if seen["n"] == calls:
            raise Interrupt("stopped on purpose")
        seen["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FluxModel, method, wrapped)


def test_an_interrupted_evaluation_resumes_to_the_same_files(tmp_path, capsys):
    evaluate(_cfg(tmp_path / "whole", *RESUMABLE))
    whole = _files(tmp_path / "whole")
    lines = whole["routing.jsonl"].decode().splitlines()
    assert len(lines) == 6
    first = json.loads(lines[0])
    assert {"prediction", "answers"} <= set(first) and first["answers"] and isinstance(first["prediction"], str)

    part = tmp_path / "part"
    with pytest.MonkeyPatch.context() as mp:
        _interrupt_after(mp, "generate", 2)  # 2 of the 3 batches finish
        with pytest.raises(Interrupt):
            evaluate(_cfg(part, *RESUMABLE))
    written = (part / "routing.jsonl").read_bytes()
    assert written == b"".join(line.encode() + b"\n" for line in lines[:4])  # the finished samples are on disk
    assert not (part / "results.json").exists()
    started = json.loads((part / "eval_config.json").read_text())["started"]
    with (part / "routing.jsonl").open("ab") as f:  # and a kill in the middle of the next write tears a line
        f.write(lines[4].encode()[:25])
    capsys.readouterr()
    evaluate(_cfg(part, *RESUMABLE))
    err = capsys.readouterr().err
    assert "dropped a partly written last line" in err and "resuming: 4 of 6 samples" in err
    assert _files(part) == whole
    assert json.loads((part / "results.json").read_text())["provenance"]["date"] == started  # kept from the start

    again = evaluate(_cfg(part, *RESUMABLE))  # a finished folder: results rebuilt from routing.jsonl, no new lines
    assert _files(part) == whole and again["provenance"]["date"] == started
    again["provenance"].pop("date")
    assert again == json.loads(whole["results.json"])


def test_an_interrupted_perplexity_run_resumes_to_the_same_files(tmp_path):
    text = tmp_path / "wiki.txt"
    text.write_text("The archive keeps old maps, letters and ledgers of the harbour town. " * 8)
    ppl = ["eval=ppl", f"eval.task.path={text}", "eval.task.window=64", "routing.mode=random"]
    evaluate(_cfg(tmp_path / "whole", *ppl, task=[]))
    whole = _files(tmp_path / "whole")
    with pytest.MonkeyPatch.context() as mp:
        _interrupt_after(mp, "forward", 3)
        with pytest.raises(Interrupt):
            evaluate(_cfg(tmp_path / "part", *ppl, task=[]))
    assert len((tmp_path / "part" / "routing.jsonl").read_text().splitlines()) == 3
    evaluate(_cfg(tmp_path / "part", *ppl, task=[]))
    assert _files(tmp_path / "part") == whole and len(whole["routing.jsonl"].splitlines()) > 3


def test_a_folder_holding_another_evaluation_is_refused(tmp_path):
    from flux.evals.progress import EvalResumeError

    evaluate(_cfg(tmp_path, "routing.mode=dense"))
    before = _files(tmp_path)
    with pytest.raises(EvalResumeError, match=r"holds an evaluation with another config \(config.routing.mode: "
                                              r"'dense' there, 'sparse' now\); use another output_dir, or delete"):
        evaluate(_cfg(tmp_path, "routing.mode=sparse"))
    assert _files(tmp_path) == before  # nothing was mixed in

    router = LayerRouter(3, 16, kind="per_layer")
    pattern = {"pattern": "streaming", "sink": 4, "window": 32}
    export_router(router, tmp_path / "router", _tiny_backbone(), pattern)
    routed = ["routing.mode=router", f"routing.checkpoint={tmp_path / 'router'}"]
    evaluate(_cfg(tmp_path / "routed", *routed))
    # attaching the evaluation to the router's card rewrites router.json, not the router: the folder still resumes
    export_router(router, tmp_path / "router", _tiny_backbone(), pattern, evaluation=read_results(tmp_path / "routed"))
    evaluate(_cfg(tmp_path / "routed", *routed))
    torch.nn.init.normal_(router.mlps[0][0].weight)  # retrained in place: same path, other weights
    export_router(router, tmp_path / "router", _tiny_backbone(), pattern)
    with pytest.raises(EvalResumeError, match="router_sha256"):
        evaluate(_cfg(tmp_path / "routed", *routed))


def test_unwritable_output_fails_before_any_model_work(tmp_path, monkeypatch):
    import flux.evaluate

    def no_model(**_):
        raise AssertionError("the backbone loaded before the output path was checked")

    monkeypatch.setattr(flux.evaluate, "load_backbone", no_model)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"output_dir=.*a_file/out is not a writable folder \(.*\); set output_dir"):
        evaluate(_cfg(blocker / "out"))
    with pytest.raises(ConfigError, match=r"output=.*a_file is not a writable folder"):
        evaluate(_cfg(tmp_path / "ok", f"output={blocker / 'results.json'}"))


@pytest.mark.parametrize(("overrides", "message"), [
    (["routing.mode=static"], r"routing.mode=static needs routing.sa_layers=\[...\]"),
    (["routing.mode=static", "routing.sa_layers=[-1]"], r"routing.sa_layers has entries \[-1\]"),
    (["eval.batch_size=0"], r"eval.batch_size=0 must be a positive integer"),
    (["routing.mode=random", "routing.sparsity=2"], r"routing.sparsity=2 must lie in \[0, 1\]"),
    (["device=gpu"], r"device='gpu' is not a device; use cpu, cuda or cuda:N"),
    (["backbone.source=foo"], r"unknown backbone 'foo': not a preset"),
    (["backbone.source=''"], r"backbone.source='' is empty"),
    (["attention.sa_backend=triton"], r"attention.sa_backend=triton runs Triton kernels, which need a CUDA device"),
])
def test_settings_are_checked_before_the_model_loads(tmp_path, monkeypatch, overrides, message):
    import flux.evaluate

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(flux.evaluate, "load_backbone", lambda **_: pytest.fail("the backbone loaded"))
    with pytest.raises(FluxUserError, match=message):
        evaluate(_cfg(tmp_path, *overrides))
    assert not (tmp_path / "routing.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path):
    with pytest.raises(ConfigError, match=r"device='cuda' but no CUDA device is visible; use device=cpu"):
        evaluate(_cfg(tmp_path, "device=cuda"))


def test_hub_ids_fail_at_once_when_the_hub_is_off(tmp_path, monkeypatch):
    import time

    from flux.backbone import BackboneError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(BackboneError, match=r"'nobody/no-such-model' is not in the local model cache and the model "
                                            r"hub is switched off \(HF_HUB_OFFLINE\)"):
        evaluate(_cfg(tmp_path, "backbone.source=nobody/no-such-model"))
    assert time.monotonic() - start < 5  # no hub retries


# -- one sparse default; a router runs its own pattern -------------------------------------------------------------

def test_one_documented_sparse_default(tmp_path):
    from flux.attention.patterns import StreamingPattern
    from flux.passkey import build_pattern as passkey_pattern
    from flux.train import build_pattern

    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose("evaluate", [f"output_dir={tmp_path}"])
    assert build_pattern(cfg) == StreamingPattern() == passkey_pattern(None, None)
    assert StreamingPattern().describe() == {"pattern": "streaming", "sink": 128, "window": 2048}  # the paper's
    assert passkey_pattern(None, 512) == StreamingPattern(sink=128, window=512)


def test_a_router_runs_its_own_pattern_unless_sparse_is_set(tmp_path, capsys):
    from hydra.core.hydra_config import HydraConfig

    from flux.evaluate import explicit_sparse_overrides

    router = LayerRouter(3, 16, kind="per_layer", init_fa_bias=-6.0)
    own = {"pattern": "streaming", "sink": 2, "window": 8}
    export_router(router, tmp_path / "router", _tiny_backbone(), own)
    routed = ["routing.mode=router", f"routing.checkpoint={tmp_path / 'router'}"]
    assert evaluate(_cfg(tmp_path / "own", *routed), sparse_overrides=[])["sparse"] == own
    assert "notice" not in capsys.readouterr().err
    explicit = ["sparse.sink=4", "sparse.window=32"]  # also in TINY, so _cfg's config has them
    results = evaluate(_cfg(tmp_path / "explicit", *routed), sparse_overrides=explicit)
    assert results["sparse"] == {"pattern": "streaming", "sink": 4, "window": 32}
    notice = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("notice:")]
    assert notice == [("notice: running sparse attention {'pattern': 'streaming', 'sink': 4, 'window': 32} from the "
                       "command line (sparse.sink=4 sparse.window=32) instead of the router's own "
                       "{'pattern': 'streaming', 'sink': 2, 'window': 8}")]

    # on a Hydra command line, the overrides the user typed are what counts as explicit
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        hydra_cfg = compose("evaluate", ["sparse.window=64", "eval.task.n=2", "routing.mode=router",
                                         "output_dir=unused"], return_hydra_config=True)
    HydraConfig.instance().set_config(hydra_cfg)
    try:
        assert explicit_sparse_overrides() == ["sparse.window=64"]
    finally:
        HydraConfig.instance().cfg = None
    assert explicit_sparse_overrides() == []


def test_a_window_covering_every_prompt_warns(tmp_path):
    from flux.errors import FluxWarning

    with pytest.warns(FluxWarning, match=r"evaluation: the sparse pattern's sink 4 \+ window 4096 covers every "
                                         r"prompt .* saves no KV memory"):
        evaluate(_cfg(tmp_path, "routing.mode=sparse", "sparse.window=4096"))
