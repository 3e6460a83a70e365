"""The model card (README.md) of an exported router: what a reader of its Hub page needs before using it.

It is rendered from router.json alone (the backbone and its fingerprint, the sparse pattern, the sparsity Ω reached per
task type against its target, and an evaluation summary when one was attached), so a card never says more than the
files it ships with.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from flux.hub import split_hub_id

PAPER = "https://arxiv.org/abs/2604.07394"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _front_matter(backbone: str) -> str:
    base = f"base_model:\n- {backbone}\n" if split_hub_id(backbone) is not None else ""  # the Hub wants a repo id
    return f"---\nlibrary_name: flux\ntags:\n- flux-attention\n- layer-router\n- sparse-attention\n{base}---"


def _sparsity_by_type(training: dict[str, Any]) -> list[list[str]]:
    """Rows (task type, tasks, mean Ω reached, mean target) from the training summary's per-task numbers."""
    reached, targets, types = training.get("sparsity") or {}, training.get("targets") or {}, training.get("task_types")
    groups: dict[str, list[str]] = defaultdict(list)
    for task in reached:
        groups[(types or {}).get(task, "all")].append(task)
    rows = []
    for kind, tasks in sorted(groups.items()):
        known = [targets[t] for t in tasks if t in targets]
        rows.append([kind, ", ".join(sorted(tasks)), f"{sum(reached[t] for t in tasks) / len(tasks):.2f}",
                     f"{sum(known) / len(known):.2f}" if known else "n/a"])
    return rows


def _training_section(training: dict[str, Any]) -> str:
    rows = _sparsity_by_type(training)
    if not rows:
        return "No per-task sparsity was recorded with this router."
    note = (f"Ω is the share of layers routed to SA, from the {training.get('sparsity_source', 'training')} "
            f"after {training.get('steps', '?')} steps.")
    return note + "\n\n" + _table(["task type", "tasks", "Ω reached", "Ω target"], rows)


def _evaluation_section(results: dict[str, Any] | None) -> str:
    if not results:
        return ("No evaluation was attached to this router; `python -m flux.evaluate routing.mode=router "
                "routing.checkpoint=...` writes one.")
    rows = [[r["task"], str(r["length"]), str(r["n"]), f"{r['score']:.3f}", f"{r['sparsity']:.2f}"]
            for r in results["results"]]
    s = results["summary"]
    rows.append(["**all**", "", str(sum(r["n"] for r in results["results"])), f"**{s['score']:.3f}**",
                 f"**{s['sparsity']:.2f}**"])
    return (f"Routing `{results['routing']}` with sparse attention `{json.dumps(results['sparse'])}`:\n\n"
            + _table(["task", "length", "n", "score", "Ω"], rows) + _provenance_note(results.get("provenance")))


def _provenance_note(provenance: dict[str, Any] | None) -> str:
    """Where the evaluation's numbers come from (results.json's provenance), so a card reader can rerun it."""
    if not provenance:
        return ""
    code = provenance["code"]
    commit = f"commit `{code['commit'][:12]}`" + (" (dirty tree)" if code["dirty"] else "") if code["commit"] else (
        "an unrecorded commit")
    lines = [f"Evaluated {provenance['date']} with flux {provenance['flux_version'] or '(not installed)'}, {commit}."]
    if provenance["task"]:
        lines.append(f"Split: `{json.dumps(provenance['task'])}`.")
    if provenance["overrides"]:
        lines.append(f"Run overrides: `{' '.join(provenance['overrides'])}`.")
    return "\n\n" + " ".join(lines)


def render_router_card(meta: dict[str, Any], repo_id: str | None = None) -> str:
    """README.md text for the router described by `meta` (router.json); `repo_id` fills the usage lines."""
    backbone, router = meta["backbone"], meta["router"]
    source = repo_id or "path/to/router"
    architecture = ", ".join(f"{k} {json.dumps(v)}" for k, v in (meta.get("backbone_architecture") or {}).items())
    backbone_table = _table(["", ""], [["model", f"`{backbone}`"],
                                       ["fingerprint", f"`{meta.get('backbone_fingerprint') or 'not recorded'}`"],
                                       ["architecture", architecture or "not recorded"],
                                       ["layers routed", str(meta["num_layers"])]])
    usage = "\n".join([
        "```python",
        "from flux.backbone import load_backbone",
        "from flux.model import FluxModel",
        "from flux.router import load_router",
        "",
        f"backbone = load_backbone({backbone!r})",
        f"router, meta = load_router({source!r}, backbone)  # refuses a backbone of another architecture",
        "fm = FluxModel(backbone, router=router)  # pass pattern=... to match meta['sparse']",
        "```",
        "",
        "```bash",
        f"python -m flux.evaluate routing.mode=router routing.checkpoint={source}",
        f"lm_eval --model flux --model_args backbone={backbone},router={source} --tasks <task>",
        "```"])
    sections = [
        _front_matter(backbone),
        f"# FluxAttention layer router for {backbone}",
        (f"A trained Layer Router ([FluxAttention]({PAPER})) for the frozen backbone `{backbone}`: for each input it "
        "sends every attention layer to full attention (FA) or sparse attention (SA). This repository holds only the "
        "router, its weights (`router.safetensors`) and settings (`router.json`), written and read by the flux "
        "framework (distribution `flux-attention`)."),
        "## Backbone", backbone_table,
        "## Router and sparse pattern",
        (f"- router: `{router.get('kind')}`, pooling `{router.get('pooling')}` over {router.get('pool_size')} tokens, "
        f"MLP hidden sizes {router.get('hidden')}\n"
        f"- sparse attention (SA layers): `{json.dumps(meta.get('sparse') or {})}`"),
        "## Sparsity reached in training", _training_section(meta.get("training") or {}),
        "## Evaluation", _evaluation_section(meta.get("evaluation")),
        "## Use", usage,
    ]
    return "\n\n".join(sections) + "\n"
