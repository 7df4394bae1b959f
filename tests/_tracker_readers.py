"""Read experiment trackers back the way a user would, outside the process that logged (tests only).

``mlflow_runs`` asks :class:`mlflow.MlflowClient` in a fresh Python process; ``wandb_offline_runs``
parses W&B's offline run files (``wandb/offline-run-*/run-*.wandb``) record by record.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_MLFLOW_READER = r"""
import json, sys
from mlflow import MlflowClient
client = MlflowClient(tracking_uri=sys.argv[1])
out = {}
for exp in client.search_experiments():
    runs = []
    for run in client.search_runs([exp.experiment_id]):
        rid = run.info.run_id
        runs.append({
            "name": run.info.run_name, "status": run.info.status, "tags": dict(run.data.tags),
            "params": dict(run.data.params),
            "history": {key: sorted((m.step, m.value) for m in client.get_metric_history(rid, key))
                        for key in run.data.metrics},
            "artifacts": sorted(a.path for a in client.list_artifacts(rid))
                         + sorted(a.path for a in client.list_artifacts(rid, "figures")),
        })
    out[exp.name] = runs
print("JSON" + json.dumps(out))
"""


def mlflow_runs(tracking_uri: str) -> dict[str, list[dict[str, Any]]]:
    """``{experiment name: [run, ...]}`` of an MLflow store, read by ``MlflowClient`` in another process."""
    proc = subprocess.run([sys.executable, "-c", _MLFLOW_READER, tracking_uri], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("JSON"))
    return json.loads(line[4:])


def _records(path: Path) -> list[bytes]:
    """The records of a W&B ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks
    of chunks, each ``crc32 (4) | length (2, LE) | type (1: full, 2: first, 3: middle, 4: last)``."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            pos += left - 7
            continue
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def _key(item) -> str:
    return ".".join(item.nested_key) if len(item.nested_key) else item.key


def _finished_records(path: Path, wait: float = 60.0) -> list[bytes]:
    """The file's records once W&B's service has written the run's ``exit`` record (it writes the file
    behind ``run.finish()``; waits up to ``wait`` seconds, then returns what is there)."""
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + wait
    while True:
        records = _records(path)
        kinds = []
        for raw in records:
            record = pb.Record()
            record.ParseFromString(raw)
            kinds.append(record.WhichOneof("record_type"))
        if "exit" in kinds or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_offline_runs(folder: Path) -> list[dict[str, Any]]:
    """Every offline run under ``folder/wandb``: name, group, tags, config, history by step, summary, artifacts."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for path in sorted(Path(folder).glob("wandb/offline-run-*/run-*.wandb")):
        run: dict[str, Any] = {"config": {}, "history": {}, "summary": {}, "artifacts": [], "tags": [], "exit": None}
        for raw in _finished_records(path):
            record = pb.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(name=record.run.display_name, group=record.run.run_group, id=record.run.run_id)
                run["tags"] = list(record.run.tags)
                for item in record.run.config.update:
                    if item.key != "_wandb":
                        run["config"][item.key] = json.loads(item.value_json)
            elif kind == "config":
                for item in record.config.update:
                    if _key(item) != "_wandb":
                        run["config"][_key(item)] = json.loads(item.value_json)
            elif kind == "history":
                values = {_key(item): json.loads(item.value_json) for item in record.history.item}
                step = int(values.pop("_step"))
                run["history"][step] = {k: v for k, v in values.items() if not k.startswith("_")}
            elif kind == "summary":
                for item in record.summary.update:
                    run["summary"][_key(item)] = json.loads(item.value_json)
            elif kind == "artifact":
                run["artifacts"].append({"type": record.artifact.type,
                                         "files": sorted(e.path for e in record.artifact.manifest.contents)})
            elif kind == "exit":
                run["exit"] = record.exit.exit_code
        runs.append(run)
    return runs
