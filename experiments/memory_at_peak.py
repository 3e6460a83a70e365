"""What holds GPU memory at the peak: replay the CUDA caching allocator's trace and list the live blocks at its maximum.

`torch.cuda.max_memory_allocated` says how high memory went, not what was there. This records the allocator's
history (with the Python stack of every allocation), finds the moment of the peak, and groups the blocks alive at
that moment by the flux source line that allocated them, so the largest holder can be named and fixed.

    python experiments/memory_at_peak.py --out DIR -m flux.train +experiment=qwen_32k ...   # any `python -m` run
    from memory_at_peak import start, report                                                 # around a call

Writes DIR/memory_at_peak.txt (and prints it). CUDA only; the trace costs a little time per allocation.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from collections import defaultdict
from pathlib import Path

import torch

GIB = 2 ** 30
# frames from these files name the site of an allocation (the first one, walking out from the allocation)
OWN_CODE = ("/flux/", "/kernels/", "flux_kernels", "/experiments/")


def start(max_entries: int = 2_000_000) -> float:
    """Begin (or restart) recording the allocator's history; returns the time stamp to analyse from."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python", max_entries=max_entries,
                                             clear_history=True)
    return torch.cuda.memory_allocated()


def _site(frames: list[dict]) -> str:
    for f in frames:
        if any(key in f["filename"] for key in OWN_CODE) and "memory_at_peak" not in f["filename"]:
            name = f["filename"].split("/flux/")[-1] if "/flux/" in f["filename"] else f["filename"].rsplit("/", 2)[-1]
            return f"{name}:{f['line']} {f['name']}"
    top = frames[0] if frames else {"filename": "?", "line": 0, "name": "?"}
    return f"{top['filename'].rsplit('/', 1)[-1]}:{top['line']} {top['name']} (outside flux)"


def live_at_peak(trace: list[dict]) -> tuple[int, list[tuple[int, list[dict]]]]:
    """(peak of the allocations made while recording, the blocks alive at that moment as (bytes, frames))."""
    level = peak = peak_at = 0
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            level += ev["size"]
            if level > peak:
                peak, peak_at = level, i
        elif ev["action"] == "free_completed":
            level -= ev["size"]
    live: dict[int, tuple[int, list[dict]]] = {}
    for ev in trace[:peak_at + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], ev.get("frames", []))
        elif ev["action"] == "free_completed":
            live.pop(ev["addr"], None)
    return peak, list(live.values())


def report(baseline: int, title: str, top: int = 20) -> str:
    """The live set at the peak since `start()`, grouped by allocation site, as text."""
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][torch.cuda.current_device()]
    peak, live = live_at_peak(trace)
    groups: dict[str, list[int]] = defaultdict(list)
    for size, frames in live:
        groups[_site(frames)].append(size)
    lines = [f"# {title}",
             f"max_memory_allocated {torch.cuda.max_memory_allocated() / GIB:.3f} GiB; allocated before recording "
             f"{baseline / GIB:.3f} GiB; peak of the recorded allocations {peak / GIB:.3f} GiB "
             f"({len(trace)} events{', TRACE FULL: early events lost' if len(trace) >= 2_000_000 else ''})",
             "", "| GiB at peak | blocks | allocated at |", "|---:|---:|---|"]
    for site, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"| {sum(sizes) / GIB:.3f} | {len(sizes)} | {site} |")
    lines += ["", "largest blocks (with their flux frames):"]
    for size, frames in sorted(live, key=lambda x: -x[0])[:top]:
        own = [f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in frames
               if any(k in f["filename"] for k in OWN_CODE) and "memory_at_peak" not in f["filename"]][:4]
        lines.append(f"  {size / GIB:.3f} GiB  " + " <- ".join(own or [_site(frames)]))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("-m", dest="module", required=True, help="module to run as `python -m` would")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    baseline = start()
    sys.argv = [a.module, *a.args]
    code = 0
    try:
        runpy.run_module(a.module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    text = report(baseline, f"python -m {a.module} {' '.join(a.args)}", a.top)
    (a.out / "memory_at_peak.txt").write_text(text)
    print(text)
    sys.exit(code)


if __name__ == "__main__":
    main()
