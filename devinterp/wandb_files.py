"""Read the history rows W&B wrote to disk (``<run folder>/wandb/*/run-<id>.wandb``).

A resumed run needs the last step that earlier segments of the run really hold: a killed
process's W&B writer loses what it had not yet written, and the resumed segment fills that gap
from the timeline. The file is a LevelDB-style log (a 7-byte ``:W&B`` header, then 32 KiB blocks
of records with a 7-byte header: crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last)); each
record is a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        if len(chunk) < length:  # the writer was killed mid-record
            break
        pos += HEADER + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
    parsed = []
    for raw in out:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def history(path: Path) -> list[dict]:
    """Every history row: {key: value} with ``trainer/global_step`` among them."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def run_group(path: Path) -> str | None:
    return next((r.run.run_group for r in records(path) if r.WhichOneof("record_type") == "run"), None)


def last_logged_step(wandb_dir: Path) -> int | None:
    """The highest ``trainer/global_step`` in the W&B files under ``wandb_dir`` (None: no files);
    -1 when the files hold no history row."""
    files = sorted(Path(wandb_dir).glob("*/run-*.wandb"))
    if not files:
        return None
    last = -1
    for path in files:
        for row in history(path):
            step = row.get("trainer/global_step")
            if isinstance(step, (int, float)):
                last = max(last, int(step))
    return last
