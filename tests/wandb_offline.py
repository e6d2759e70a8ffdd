"""Read a W&B offline run (``offline-run-*/run-*.wandb``) for tests.

The file is a 7-byte header (``:W&B``, magic, version), then LevelDB-log
blocks of 32 KiB; each record has a 7-byte header (crc32 4, length 2, type 1:
full/first/middle/last) and its payload is a protobuf ``Record``. A block's
tail shorter than a record header is zero padding.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    pos, chunks = HEADER, []
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # padding at the end of a block
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            pos += room
            continue
        chunks.append(data[pos + HEADER:pos + HEADER + length])
        pos += HEADER + length
        if kind in (FULL, LAST):
            yield b"".join(chunks)
            chunks = []


def _value(item) -> object:
    oneof = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if oneof and oneof != "value_json":
        return getattr(item, oneof)
    return json.loads(item.value_json) if item.value_json else None


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _config(updates) -> dict:
    out = {}
    for i in updates:
        value = _value(i)
        # config records wrap each entry as {"value": ...}; the run record does not
        wrapped = isinstance(value, dict) and set(value) <= {"value", "desc"} and "value" in value
        out[_key(i)] = value["value"] if wrapped else value
    return out


def _records(path: Path, timeout: float) -> list:
    """Parsed records, once the run's exit record is on disk: wandb-core may
    still be writing the file for a moment after ``run.finish()`` returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for payload in _payloads(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(payload)
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout} s")
        time.sleep(0.1)


def read_run(run_dir: str | Path, timeout: float = 30.0) -> dict:
    """history (one dict per logged step), summary, config and run info
    (name, project, tags, exit_code) of a finished offline run."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    history, summary, config, info = [], {}, {}, {}
    for record in _records(path, timeout):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): _value(i) for i in record.history.item})
        elif kind == "summary":
            summary.update({_key(i): _value(i) for i in record.summary.update})
        elif kind == "config":
            config.update(_config(record.config.update))
        elif kind == "run":
            config.update(_config(record.run.config.update))
            info.update(name=record.run.display_name, project=record.run.project,
                        tags=list(record.run.tags))
        elif kind == "exit":
            info["exit_code"] = record.exit.exit_code
    config.pop("_wandb", None)
    return {"history": history, "summary": summary, "config": config, "run": info}
