"""Reads the records of an offline W&B run file (`run-<id>.wandb`), to check what was logged.

wandb (0.18+) no longer ships a Python reader for its run files; the format is small and
stable: a 7-byte header (`:W&B`, magic 0xBEE1, version 0), then LevelDB-log records in
32 KiB blocks (4-byte CRC, 2-byte little-endian length, 1-byte type: 1 full, 2 first,
3 middle, 4 last), each payload a `wandb_internal_pb2.Record` protobuf (wandb's public
message definitions).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_HEADER = b":W&B\xe1\xbe\x00"
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    data = path.read_bytes()
    assert data.startswith(_HEADER), f"{path} is not a W&B run file"
    records, pending, offset = [], b"", len(_HEADER)
    while offset + 7 <= len(data):
        left_in_block = _BLOCK - offset % _BLOCK
        if left_in_block < 7:  # the block's tail is padding
            offset += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        payload = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (_FULL, _FIRST) else pending + payload
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def logged_history(path: Path) -> list[dict[str, Any]]:
    """The `history` rows (what `run.log` logged), keys as logged."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def run_record(path: Path) -> Any:
    """The run's own record: its id (`run_id`) and the config it started with (`config`)."""
    (run,) = [r.run for r in read_records(path) if r.WhichOneof("record_type") == "run"]
    return run


def logged_config(path: Path) -> dict[str, Any]:
    """The config the run was started with, top-level keys to their decoded values."""
    return {item.key: json.loads(item.value_json) for item in run_record(path).config.update}


def logged_summary(path: Path) -> dict[str, Any]:
    """The run's summary as updated through the file (`run.summary`), latest values."""
    summary = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary
