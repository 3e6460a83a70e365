"""Reading the run files offline W&B writes, so tests can check what a run logged (its config and summary) without
the W&B service."""

from __future__ import annotations

from pathlib import Path


def wandb_records(run_file: Path) -> list:
    """The records of an offline W&B run file (`run-<id>.wandb`): a LevelDB-style log of 32 KiB blocks, each record
    cut into chunks with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), after a 7-byte
    file header. Each record is a wandb_internal_pb2.Record."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, out = run_file.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def wandb_run_summary(run_dir: Path) -> tuple[dict, dict, dict]:
    """(run facts, config, summary) of one offline W&B run folder, read from its run file."""
    import json

    (run_file,) = run_dir.glob("run-*.wandb")
    facts, config, summary = {}, {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            facts = {"id": record.run.run_id, "group": record.run.run_group, "name": record.run.display_name}
            items = record.run.config.update
        elif kind in ("config", "summary"):
            items = getattr(record, kind).update
        else:
            continue
        target = summary if kind == "summary" else config
        for item in items:
            key = item.key or "/".join(item.nested_key)
            target[key] = json.loads(item.value_json)
    return facts, config, summary
