"""Routers as Hugging Face Hub artifacts: save_pretrained / from_pretrained / push_to_hub in the ModelHubMixin
conventions, the generated model card, and Hub ids wherever a router path is taken. No network: uploads go to a
patched HfApi, and Hub ids are served from a Hub cache laid out on disk, as huggingface_hub leaves it after a
download, with the Hub switched offline."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

from flux.attention.patterns import StreamingPattern
from flux.backbone import load_backbone
from flux.conf import CONFIG_MODULE
from flux.evals.results import ResultsFormatError, build_results
from flux.model import FluxModel
from flux.router import LayerRouter, RouterCheckpointError, RouterConfig, export_router, load_router

PATTERN = StreamingPattern(sink=2, window=8)
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TRAINING = {"steps": 12, "sparsity": {"niah_single": 0.25, "fwe": 0.75}, "targets": {"niah_single": 0.5, "fwe": 0.5},
            "task_types": {"niah_single": "retrieval", "fwe": "holistic"}, "sparsity_source": "last validation pass"}


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny_random")


@pytest.fixture()
def router(tiny):
    gen = torch.Generator().manual_seed(3)
    r = LayerRouter(tiny.num_layers, tiny.head_dim, RouterConfig(hidden=[16]))
    with torch.no_grad():
        for p in r.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return r.eval()


def evaluation() -> dict:
    rows = [{"task": "ruler/niah_single", "length": 256, "n": 2, "score": 0.5, "sparsity": 0.25},
            {"task": "ruler/fwe", "length": 256, "n": 2, "score": 1.0, "sparsity": 0.75}]
    return build_results("tiny_random-llama", "router", PATTERN.describe(), rows)


def decisions(tiny, router) -> torch.Tensor:
    ids = torch.randint(3, 250, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return FluxModel(tiny, pattern=PATTERN)(ids, plan=router.as_plan()).decisions


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """An empty Hub cache and the Hub switched off (HF_HUB_OFFLINE=1, read by huggingface_hub at request time)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> None:
    """Lay `folder` out as huggingface_hub caches a downloaded model repo: snapshots/<commit>/ and refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_save_pretrained_writes_the_layout_load_router_reads(tiny, router, tmp_path):
    export_router(router, tmp_path / "out", tiny, PATTERN.describe(), TRAINING, evaluation())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "router.json", "router.safetensors"]
    again = tmp_path / "again"
    router.save_pretrained(again)  # the card stays on the router, so the mixin's method saves the same files
    assert json.loads((again / "router.json").read_text()) == json.loads((tmp_path / "out" / "router.json").read_text())
    loaded = LayerRouter.from_pretrained(again, backbone=tiny)
    assert loaded.card.training == TRAINING and loaded.card.evaluation == evaluation()
    assert torch.equal(decisions(tiny, loaded), decisions(tiny, router))


def test_model_card_shows_backbone_fingerprint_pattern_sparsity_and_evaluation(tiny, router, tmp_path):
    export_router(router, tmp_path, tiny, PATTERN.describe(), TRAINING, evaluation())
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: flux\n")
    assert f"| fingerprint | `{tiny.fingerprint}` |" in card
    assert "num_hidden_layers 4, hidden_size 64" in card
    assert '`{"pattern": "streaming", "sink": 2, "window": 8}`' in card
    assert "| holistic | fwe | 0.75 | 0.50 |" in card and "| retrieval | niah_single | 0.25 | 0.50 |" in card
    assert "from the last validation pass after 12 steps" in card
    assert "| ruler/fwe | 256 | 2 | 1.000 | 0.75 |" in card and "| **all** |  | 4 | **0.750** | **0.50** |" in card
    provenance = {"overrides": ["objective.target=0.3"], "checkpoint": None, "seeds": {"eval": 7},
                  "task": {"name": "ruler", "n": 2}, "code": {"commit": "0123456789abcdef", "dirty": False},
                  "flux_version": "0.1.0", "date": "2026-12-01T09:30:00Z"}
    export_router(router, tmp_path / "prov", tiny, PATTERN.describe(), TRAINING, evaluation() | {"provenance": provenance})
    assert ("Evaluated 2026-12-01T09:30:00Z with flux 0.1.0, commit `0123456789ab`. Split: "
            '`{"name": "ruler", "n": 2}`. Run overrides: `objective.target=0.3`.') in (tmp_path / "prov" / "README.md"
                                                                                      ).read_text()
    export_router(router, tmp_path / "bare", tiny, PATTERN.describe())
    bare = (tmp_path / "bare" / "README.md").read_text()
    assert "No per-task sparsity was recorded" in bare and "No evaluation was attached" in bare


def test_a_malformed_evaluation_is_refused_before_anything_is_written(tiny, router, tmp_path):
    with pytest.raises(ResultsFormatError, match="router evaluation: keys must be exactly"):
        export_router(router, tmp_path, tiny, PATTERN.describe(), TRAINING, {"summary": {"score": 2.0}})
    assert list(tmp_path.iterdir()) == []


def test_push_to_hub_uploads_the_saved_folder_in_one_commit(tiny, router, tmp_path, monkeypatch):
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, tmp_path / "uploaded")  # the mixin deletes its temp folder afterwards
        uploads.append({"repo_id": repo_id, **kwargs})
        return f"https://huggingface.co/{repo_id}/commit/{COMMIT}"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    export_router(router, tmp_path / "local", tiny, PATTERN.describe(), TRAINING)
    url = router.push_to_hub("flux-test/tiny-router", commit_message="router after 12 steps")
    assert url.endswith(COMMIT) and len(uploads) == 1
    assert uploads[0]["repo_id"] == "flux-test/tiny-router" and uploads[0]["commit_message"] == "router after 12 steps"
    uploaded = tmp_path / "uploaded"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "router.json", "router.safetensors"]
    assert (uploaded / "router.safetensors").read_bytes() == (tmp_path / "local" / "router.safetensors").read_bytes()
    card = (uploaded / "README.md").read_text()
    assert "load_router('flux-test/tiny-router', backbone)" in card
    assert "routing.checkpoint=flux-test/tiny-router" in card
    assert torch.equal(decisions(tiny, load_router(uploaded, tiny)[0]), decisions(tiny, router))


def test_a_hub_id_loads_from_the_hub_cache_offline(tiny, router, tmp_path, offline_hub):
    export_router(router, tmp_path / "router", tiny, PATTERN.describe(), TRAINING)
    put_in_hub_cache(offline_hub, "flux-test/tiny-router", tmp_path / "router")
    for source in ("flux-test/tiny-router", f"flux-test/tiny-router@{COMMIT}"):
        loaded, meta = load_router(source, tiny)
        assert meta["training"] == TRAINING
        assert torch.equal(decisions(tiny, loaded), decisions(tiny, router))
    assert LayerRouter.from_pretrained("flux-test/tiny-router", revision=COMMIT).card.backbone == tiny.name


def test_flux_evaluate_takes_a_hub_id_as_routing_checkpoint(tiny, tmp_path, offline_hub):
    from hydra import compose, initialize_config_module

    from flux.evaluate import evaluate

    sa_router = LayerRouter(3, 16, init_fa_bias=-6.0)  # every layer to SA, so the result shows the router ran
    export_router(sa_router, tmp_path / "router", load_backbone("tiny_random", tiny={"num_layers": 3}), {})
    put_in_hub_cache(offline_hub, "flux-test/sa-router", tmp_path / "router")
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose("evaluate", ["backbone=tiny_random", "backbone.tiny.num_layers=3", "sparse.sink=4",
                                   "sparse.window=32", "eval.task.tasks=[fwe]", "eval.task.lengths=[256]",
                                   "eval.task.n=1", "eval.task.max_new_tokens=2", f"output_dir={tmp_path / 'run'}",
                                   "routing.mode=router", "routing.checkpoint=flux-test/sa-router"])
    assert evaluate(cfg)["summary"]["sparsity"] == 1.0


def test_an_uncached_hub_id_fails_at_once_offline(tiny, offline_hub):
    start = time.perf_counter()
    with pytest.raises(RouterCheckpointError, match=r"router 'flux-test/missing' is not a local folder, and Hub repo "
                                                    r"flux-test/missing is not in the local Hub cache while "
                                                    r"HF_HUB_OFFLINE=1 is set .*download it elsewhere"):
        load_router("flux-test/missing", tiny)
    assert time.perf_counter() - start < 5
    with pytest.raises(RouterCheckpointError, match="router 'outputs/router' is not a local folder, and Hub repo"):
        load_router("outputs/router")  # a missing relative path that reads as a Hub id: the message names both
    with pytest.raises(RouterCheckpointError, match="'outputs/run/router' needs router.safetensors and router.json"):
        load_router("outputs/run/router")  # cannot be a Hub id


def test_a_hub_router_for_another_backbone_is_refused(tiny, router, tmp_path, offline_hub):
    export_router(router, tmp_path / "router", tiny, PATTERN.describe())
    put_in_hub_cache(offline_hub, "flux-test/tiny-router", tmp_path / "router")
    qwen = load_backbone("tiny_random", family="qwen2")
    with pytest.raises(RouterCheckpointError, match=r"router 'flux-test/tiny-router' was trained for backbone "
                                                    r"'tiny_random-llama' .*model_type 'llama' vs 'qwen2'"):
        load_router("flux-test/tiny-router", qwen)


def test_a_hub_repo_without_router_files_is_named(tmp_path, offline_hub):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    put_in_hub_cache(offline_hub, "flux-test/not-a-router", tmp_path / "model")
    with pytest.raises(RouterCheckpointError, match="Hub repo flux-test/not-a-router has no router.safetensors, "
                                                    "router.json; it does not hold a flux router"):
        load_router("flux-test/not-a-router")
