"""MLflow tracking: the only module of the project that imports mlflow.

Store: `MLFLOW_TRACKING_URI` when set, else an embedded SQLite store at the repository root
(`mlflow.db`, artifacts in `mlartifacts/`), resolved to absolute paths so that stages run from
`dvc exp run --temp/--queue` copies log to the same store.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

from .paths import REPO_ROOT


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the store."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def default_artifact_root() -> str | None:
    """Artifacts beside the embedded store; a server (team mode) decides for itself."""
    return None if os.environ.get("MLFLOW_TRACKING_URI") else (REPO_ROOT / "mlartifacts").as_uri()


def client():
    import logging

    import mlflow
    from mlflow.tracking import MlflowClient

    for noisy in ("alembic", "mlflow.store.db.utils"):  # schema migrations chatter on first use
        logging.getLogger(noisy).setLevel(logging.WARNING)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except OSError:
        return ""


def experiment_id(name: str) -> str:
    c = client()
    try:
        experiment = c.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return c.create_experiment(name, artifact_location=_artifact_location(name))
    except Exception as err:  # noqa: BLE001  (any store failure: say which store)
        raise TrackingError(f"MLflow store {tracking_uri()} is not usable: {type(err).__name__}: {err}") from err


def _artifact_location(experiment: str) -> str | None:
    root = default_artifact_root()
    return f"{root}/{experiment}" if root else None


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = str(value)[:6000]


class Run:
    """One MLflow run; every call goes to that run (no global active-run state)."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._client = client()

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat: dict[str, str] = {}
        _flatten("", params, flat)
        existing = self._client.get_run(self.run_id).data.params
        items = [Param(k, v) for k, v in flat.items() if k not in existing]  # params are write-once
        for start in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, obj: dict, artifact_file: str) -> None:
        self._client.log_dict(self.run_id, obj, artifact_file)

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if Path(path).exists():
                self._client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status)


class NullRun:
    """Stands in for a Run on DDP ranks other than 0: they log nothing."""

    run_id = ""

    def __getattr__(self, _name):
        return lambda *args, **kwargs: None


def start_run(experiment: str, run_name: str, tags: dict[str, Any] | None = None,
              resume_run_id: str | None = None) -> Run:
    """A new run, or `resume_run_id` reopened (a training resumed from its checkpoint)."""
    eid = experiment_id(experiment)
    c = client()
    if resume_run_id:
        try:
            c.update_run(resume_run_id, status="RUNNING")
            return Run(resume_run_id)
        except Exception:  # noqa: BLE001  (deleted or from another store: start afresh)
            pass
    base_tags = {"mlflow.source.git.commit": git_commit(), "mlflow.runName": run_name}
    run = c.create_run(eid, tags={**base_tags, **(tags or {})}, run_name=run_name)
    return Run(run.info.run_id)


def open_run(run_id: str) -> Run:
    """A finished run that a later stage (evaluate, export) adds to."""
    return Run(run_id)


def log_dataset_card(experiment: str, card: dict) -> str:
    """The download stage's own run: the dataset card as params and an artifact."""
    run = start_run(experiment, f"download-{card['dataset']}", tags={"stage": "download"})
    run.log_params({"dataset": card["dataset"], "source": card["source"], "num_classes": card["num_classes"],
                    "image_shape": f"{card['channels']}x{card['image_size']}x{card['image_size']}"})
    run.log_metrics({f"{split}_count": info["count"] for split, info in card["splits"].items()})
    run.log_dict(card, "dataset_card.json")
    run.finish()
    return run.run_id
