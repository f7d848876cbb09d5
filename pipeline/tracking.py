"""MLflow tracking: the only module of the project that imports mlflow.

Store: `MLFLOW_TRACKING_URI` when set, else an embedded SQLite store at the workspace root
(`mlflow.db`, artifacts in `mlartifacts/`; `paths.workspace_root`: DVC's DVC_ROOT, else git's
common dir), so that stages run from `dvc exp run --temp/--queue` copies log to the same store. The
SQLite file is switched to WAL mode, so that readers (a serving process checking aliases) do not
block concurrent queued experiments, whose writers wait for each other. Every run is tagged with the DVC experiment name, the
stage, the git commit and the params hash.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

from service.contract import MODEL_FILE, run_logits

from . import atomic
from .paths import workspace_root
from .stage import StoreError


class TrackingError(StoreError):
    """The tracking store cannot be used; the message names the store (a stage exits 3)."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace_root() / 'mlflow.db'}"


def default_artifact_root() -> str | None:
    """Artifacts beside a SQLite store's file (absolute, whatever the working directory); a tracking
    server (team mode) decides for itself."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def client():
    import logging

    import mlflow
    from mlflow.tracking import MlflowClient

    for noisy in ("alembic", "mlflow.store.db.utils"):  # schema migrations chatter on first use
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keeps stage logs readable
    uri = tracking_uri()
    _use_wal(sqlite_file(uri))
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


_WAL_DONE: set[Path] = set()


def _use_wal(db: Path | None) -> None:
    """WAL journal (persistent, once per file): readers (the service's alias checks, `dvc exp show`
    users browsing the MLflow UI) never wait for the writers of parallel queued experiments, which
    wait for each other (MLflow's busy timeout) instead of failing with "database is locked". Copy
    the store with `sqlite3 mlflow.db ".backup copy.db"`: a plain copy may miss the journal."""
    if db is None or db in _WAL_DONE:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    if not db.exists():  # a deleted store's journal would be replayed into the new, empty file: disk I/O error
        for leftover in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            leftover.unlink(missing_ok=True)
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
        con.execute("PRAGMA journal_mode=WAL")
        _WAL_DONE.add(db)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path.cwd(), capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except OSError:
        return ""


def check_reachable(timeout_s: float = 5.0) -> None:
    """Fail fast when a tracking server is down (MLflow's own client retries for minutes)."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).read()
    except (urllib.error.URLError, OSError) as err:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({err}); start it, or unset "
                            f"MLFLOW_TRACKING_URI to use the embedded SQLite store") from err


def experiment_id(name: str) -> str:
    check_reachable()
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
        check_reachable()
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

    def log_datasets(self, card: dict, prepared_dir: str | Path, validation: dict | None = None) -> None:
        """The run's data as MLflow dataset inputs (the UI's Datasets column): see `log_datasets`."""
        log_datasets(self.run_id, card, prepared_dir, validation)

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
    base_tags = {"mlflow.runName": run_name, **context_tags()}
    run = c.create_run(eid, tags={**base_tags, **(tags or {})}, run_name=run_name)
    return Run(run.info.run_id)


def context_tags() -> dict[str, str]:
    """Where a run comes from: git commit, DVC experiment (DVC_EXP_NAME; 'workspace' for a plain
    `dvc repro`), params hash: the way from a `dvc exp show` row to its MLflow runs and back."""
    import hashlib

    params = Path("params.yaml")
    tags = {"mlflow.source.git.commit": git_commit(), "dvc.exp_name": os.environ.get("DVC_EXP_NAME") or "workspace"}
    if params.is_file():
        tags["params_sha256"] = hashlib.sha256(params.read_bytes()).hexdigest()[:16]
    if os.environ.get("DVC_STAGE"):
        tags["dvc.stage"] = os.environ["DVC_STAGE"]
    return tags


def open_run(run_id: str, *, experiment: str, run_name: str, stage: str, model_file: Path | None = None) -> Run:
    """The run a later stage (evaluate, export, promote) adds to: the training run named by the
    outputs. When that run is not in this store (outputs restored by DVC from its cache or a remote,
    made in another store), the stage logs into a new run recording where the outputs came from
    (tags restored_from.*; reused by the later stages of the same outputs) and says so in one line."""
    c = client()
    if run_exists(run_id):
        return Run(run_id)
    sha = atomic.sha256_file(model_file) if model_file is not None and model_file.is_file() else ""
    eid = experiment_id(experiment)
    query = f"tags.`restored_from.run_id` = '{run_id}' and tags.`restored_from.model_sha256` = '{sha}'"
    found = c.search_runs([eid], filter_string=query, max_results=1)
    if found:
        new = found[0].info.run_id
    else:
        new = start_run(experiment, run_name, tags={"stage": stage, "restored_from.run_id": run_id or "?",
                                                    "restored_from.model_sha256": sha,
                                                    "restored_from.dvc_stage": os.environ.get("DVC_STAGE", "")}).run_id
        c.set_terminated(new, "FINISHED")  # later stages add to it like to a finished training run
    print(f"{stage}: outputs restored from a cache name MLflow run {run_id or '?'}, which is not in {tracking_uri()}: "
          f"logging to new run {new} (tags restored_from.*)", file=sys.stderr)
    return Run(new)


def log_dataset_card(experiment: str, card: dict) -> str:
    """The download stage's own run: the dataset card as params and an artifact."""
    run = start_run(experiment, f"download-{card['dataset']}", tags={"stage": "download"})
    run.log_params({"dataset": card["dataset"], "source": card["source"], "num_classes": card["num_classes"],
                    "image_shape": f"{card['channels']}x{card['image_size']}x{card['image_size']}"})
    run.log_metrics({f"{split}_count": info["count"] for split, info in card["splits"].items()})
    run.log_dict(card, "dataset_card.json")
    run.finish()
    return run.run_id


DATASET_DIGEST_CHARS = 32  # MLflow's datasets.digest column is VARCHAR(36): PostgreSQL refuses a whole SHA-256


def dataset_inputs(card: dict, prepared_dir: str | Path, validation: dict | None = None) -> list:
    """`mlflow.entities.DatasetInput`s of the prepared splits, metadata only (no pixels are copied
    into MLflow): name = the dataset, digest = the split's SHA-256 from the dataset card (its first
    DATASET_DIGEST_CHARS hex digits; the whole one is in the profile), source = the split's file,
    schema = its arrays, profile = counts and where the data came from; context `training` (the
    train split, of which the validation images are carved out), `validation` (when its split card,
    `pipeline.download.split_card`, is given) and `test`."""
    import numpy as np
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    shape = (-1, int(card["channels"]), int(card["image_size"]), int(card["image_size"]))
    schema = TensorDatasetSchema(features=Schema([TensorSpec(np.dtype(np.uint8), shape, "images")]),
                                 targets=Schema([TensorSpec(np.dtype(np.int64), (-1,), "labels")]))
    splits = [("training", "train", card["splits"]["train"]), ("test", "test", card["splits"]["test"])]
    if validation is not None:
        splits.insert(1, ("validation", "train", validation))
    inputs = []
    for context, file_split, info in splits:
        profile = {"split": context if context == "validation" else file_split, "count": info["count"],
                   "per_class": info.get("per_class"), "sha256": info["sha256"], "downloaded_from": card["source"],
                   "input_transform": card.get("input_transform", "resize")}
        if context == "training" and validation is not None:
            profile["validation_carved_out"] = validation["count"]
        if context == "validation":
            profile["carved_from"] = "the train split (train.val_fraction of each class, train.seed)"
        source = LocalArtifactDatasetSource(str(Path(prepared_dir) / f"{file_split}.npz"))
        meta = MetaDataset(source, name=card["dataset"], digest=info["sha256"][:DATASET_DIGEST_CHARS]).to_dict()
        dataset = Dataset(name=meta["name"], digest=meta["digest"], source_type=meta["source_type"],
                          source=meta["source"], schema=json.dumps(schema.to_dict()), profile=json.dumps(profile))
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs


def log_datasets(run_id: str, card: dict, prepared_dir: str | Path, validation: dict | None = None) -> None:
    """Record the run's training, validation and test data (`dataset_inputs`) with
    `MlflowClient.log_inputs`; idempotent (the store reuses a dataset of the same name and digest,
    and a run's existing input), so a resumed training logs nothing twice."""
    client().log_inputs(run_id, datasets=dataset_inputs(card, prepared_dir, validation))


# --- model registry ---------------------------------------------------------------------------------

def log_onnx_model(run_id: str, onnx_path: str | Path, input_example, metadata: dict[str, str]) -> tuple[str, str]:
    """Log the ONNX file as an MLflow model of the training run (signature + input example).

    Returns (model URI, logged-model id): a tracking server wants both to register a version."""
    import mlflow
    import numpy as np
    import onnx
    import onnxruntime as ort
    from mlflow.models import infer_signature

    client()
    import logging

    ort.set_default_logger_severity(4)  # MLflow's input-example check tries CUDA first; the miss is not news
    logging.getLogger("mlflow.onnx").setLevel(logging.ERROR)
    output = run_logits(onnx_path, input_example)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="onnx-model",
                                     signature=infer_signature(input_example, np.asarray(output)),
                                     input_example=input_example, metadata=metadata, save_as_external_data=False)
    return info.model_uri, info.model_id


class _PyfuncWithOnnxFile:
    """The `flavor` given to `mlflow.models.Model.log` by `log_pyfunc_model`: a `python_function`
    model with a loader module (`mlflow.pyfunc.save_model(loader_module=..., data_path=...)`), its
    ONNX file then moved from `data/` to the folder's root, where every reader of a downloaded
    version finds it (`download_version(...) / MODEL_FILE`: the serving store sync, the champion's
    re-measure), and declared as the `onnx` flavor too, so `mlflow.onnx.load_model` still works."""

    @staticmethod
    def save_model(path, mlflow_model, onnx_path, pyfunc_model_config=None, validate_serving_input=True, **kwargs):
        import mlflow
        import onnx

        root = Path(path)
        mlflow.pyfunc.save_model(str(root), mlflow_model=mlflow_model, data_path=str(onnx_path),
                                 model_config=pyfunc_model_config, **kwargs)
        conf = mlflow_model.flavors["python_function"]
        (root / conf["data"]).replace(root / MODEL_FILE)
        (root / conf["data"]).parent.rmdir()
        conf["data"] = MODEL_FILE
        mlflow_model.add_flavor("onnx", onnx_version=onnx.__version__, data=MODEL_FILE,
                                providers=["CUDAExecutionProvider", "CPUExecutionProvider"], code=None)
        mlflow_model.save(str(root / "MLmodel"))
        # the folder as MLflow will load it (code path, loader module, signature) must answer its own
        # input example: Model.log's serving-input check only warns, this one fails the logging
        example = mlflow_model.load_input_example(str(root))
        if example is not None:
            mlflow.pyfunc.load_model(str(root)).predict(example, params=mlflow_model.load_input_example_params(str(root)))


def pinned_requirements(modules: Iterable[str]) -> list[str]:
    """`dist==version` of the installed distribution of each top-level module (`PIL` -> pillow,
    `onnxruntime` -> onnxruntime or onnxruntime-gpu, whichever provides it here)."""
    from importlib import metadata

    providers = metadata.packages_distributions()
    out = []
    for module in modules:
        for dist in providers.get(module, [module]):
            try:
                out.append(f"{dist}=={metadata.version(dist)}")
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            out.append(module)
    return out


def log_pyfunc_model(run_id: str, onnx_path: str | Path, *, loader_module: str, code_dir: str | Path,
                     signature: dict, input_example: dict[str, list], params_example: dict | None = None,
                     model_config: dict | None = None, requirements: Iterable[str] = (),
                     metadata: dict[str, str] | None = None) -> tuple[str, str]:
    """Log the ONNX file as an MLflow `python_function` model of run `run_id`, loadable and servable
    by MLflow itself (`mlflow.pyfunc.load_model`, `mlflow models serve`), offline.

    The model folder holds the ONNX file's exact bytes at its root (`MODEL_FILE`), the package
    `code_dir` (prepended to sys.path by MLflow at load) whose module `loader_module` defines
    `_load_pyfunc(data_path, model_config)`, `signature` (MLmodel's JSON form: `inputs`, `outputs`,
    `params`), the input example (columns -> values, with `params_example`), `model_config` (the
    settings a loader may override) and `requirements` (top-level modules, pinned to the installed
    versions; MLflow adds itself). Returns (model URI, logged-model id)."""
    import logging

    import mlflow
    import pandas as pd
    from mlflow.models import Model, ModelSignature

    client()
    for noisy in ("mlflow.pyfunc", "mlflow.models.model"):  # "Validating input example ...", env-var tips
        logging.getLogger(noisy).setLevel(logging.WARNING)
    example = pd.DataFrame(input_example)
    # the active run gives the logged model its experiment (Model.log's run_id alone leaves it in the default one)
    with mlflow.start_run(run_id=run_id):
        info = Model.log(None, name="classifier", flavor=_PyfuncWithOnnxFile, flavor_name="python_function",
                         run_id=run_id, metadata=metadata, onnx_path=str(onnx_path), loader_module=loader_module,
                         code_paths=[str(code_dir)],
                         signature=ModelSignature.from_dict({k: json.dumps(v) for k, v in signature.items()}),
                         input_example=(example, params_example) if params_example else example,
                         pip_requirements=pinned_requirements(requirements), pyfunc_model_config=model_config)
    return info.model_uri, info.model_id


def run_metrics(run_id: str) -> dict[str, float]:
    """The latest value of each metric of run `run_id` ({} when the run is not in this store)."""
    if not run_exists(run_id):
        return {}
    return dict(client().get_run(run_id).data.metrics)


def run_exists(run_id: str) -> bool:
    """The run is in this store and not deleted (MLflow refuses to log into a deleted run)."""
    if not run_id:
        return False
    try:
        return client().get_run(run_id).info.lifecycle_stage != "deleted"
    except Exception as err:  # noqa: BLE001
        if _is_missing(err):
            return False
        raise TrackingError(f"MLflow store {tracking_uri()} cannot read run {run_id}: {err}") from err


def _version_dict(v, aliases: dict[str, str]) -> dict:
    return {"version": str(v.version), "run_id": v.run_id, "source": v.source, "tags": dict(v.tags),
            "aliases": sorted(a for a, ver in aliases.items() if str(ver) == str(v.version)),
            "created": v.creation_timestamp, "description": v.description or ""}


def model_aliases(name: str) -> dict[str, str]:
    """alias -> version, read from the registered model (search results carry no aliases: mlflow#16734)."""
    try:
        return {alias: str(version) for alias, version in client().get_registered_model(name).aliases.items()}
    except Exception:  # noqa: BLE001  (no such registered model yet)
        return {}


def list_versions(name: str) -> list[dict]:
    c = client()
    aliases = model_aliases(name)
    versions = c.search_model_versions(f"name='{name}'")
    return sorted((_version_dict(v, aliases) for v in versions), key=lambda d: int(d["version"]))


def get_version(name: str, version: str) -> dict:
    return _version_dict(client().get_model_version(name, str(version)), model_aliases(name))


def version_exists(name: str, version: str) -> bool:
    """Whether registered model `name` has `version`; TrackingError when the store cannot answer."""
    try:
        client().get_model_version(name, str(version))
        return True
    except Exception as err:  # noqa: BLE001
        if _is_missing(err):
            return False
        raise TrackingError(f"MLflow store {tracking_uri()}: cannot read version {version} of {name!r}: "
                            f"{type(err).__name__}: {err}") from err


def _is_missing(err: Exception) -> bool:
    """An MLflow error that means "no such model / alias" rather than "the store failed"."""
    code = str(getattr(err, "error_code", ""))
    return "RESOURCE_DOES_NOT_EXIST" in code or ("INVALID_PARAMETER_VALUE" in code and "not found" in str(err))


def version_by_alias(name: str, alias: str) -> dict | None:
    """The version `alias` points to; None when the model or the alias does not exist; TrackingError
    when the store cannot answer (never mistaken for "no alias": reconcile and serving rely on it)."""
    try:
        return _version_dict(client().get_model_version_by_alias(name, alias), model_aliases(name))
    except Exception as err:  # noqa: BLE001
        if _is_missing(err):
            return None
        raise TrackingError(f"MLflow store {tracking_uri()}: cannot read alias {alias!r} of {name!r}: "
                            f"{type(err).__name__}: {err}") from err


MAX_DESCRIPTION_CHARS = 5000  # model_versions.description is VARCHAR(5000) (PostgreSQL enforces it)


def register_version(name: str, model_uri: str, run_id: str, tags: dict[str, str], model_id: str | None = None,
                     description: str | None = None) -> str:
    """A new version of registered model `name` (created on first use), `description` its model
    card (Markdown, at most MAX_DESCRIPTION_CHARS); returns its number."""
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        c.create_registered_model(name, description="Image classifiers exported to ONNX by the DVC pipeline.")
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    if description is not None and len(description) > MAX_DESCRIPTION_CHARS:
        raise TrackingError(f"a model version's description holds at most {MAX_DESCRIPTION_CHARS} characters, "
                            f"got {len(description)}")
    version = c.create_model_version(name, model_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()},
                                     model_id=model_id, description=description)
    return str(version.version)


def set_alias(name: str, alias: str, version: str) -> None:
    client().set_registered_model_alias(name, alias, str(version))


def set_version_tags(name: str, version: str, tags: dict[str, Any]) -> None:
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(name, str(version), key, str(value))


def model_tags(name: str) -> dict[str, str]:
    try:
        return dict(client().get_registered_model(name).tags)
    except Exception:  # noqa: BLE001
        return {}


def set_model_tag(name: str, key: str, value: str) -> None:
    client().set_registered_model_tag(name, key, value)


def download_version(name: str, version: str, dest: str | Path) -> Path:
    """The version's MLflow model folder (holding model.onnx) downloaded under `dest`."""
    import mlflow

    client()
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dest)))


# --- alias look-ups without mlflow, and the registry lock ---------------------------------------------

def sqlite_file(uri: str | None = None) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for a tracking server)."""
    uri = uri or tracking_uri()
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def require_store() -> tuple[int, int] | None:
    """For readers of the registry (serving): a SQLite store must exist already (MLflow would
    silently create an empty one, and a service would then see no alias at all). Returns the file's
    identity (device, inode) for ``check_same_store``; None for a tracking server."""
    db = sqlite_file()
    if db is None:
        return None
    try:
        st = db.stat()
    except OSError:
        raise TrackingError(f"MLflow store {tracking_uri()}: no such file") from None
    return st.st_dev, st.st_ino


def check_same_store(identity: tuple[int, int] | None) -> None:
    """TrackingError when the SQLite store was moved or replaced since ``require_store``: what was
    read may come from an empty store MLflow created in its place, not the registry."""
    if identity is not None and require_store() != identity:
        raise TrackingError(f"MLflow store {tracking_uri()} was replaced while it was being read")


def peek_alias(name: str, alias: str, timeout_s: float = 3.0) -> str | None:
    """The version `alias` points to, read without importing mlflow (~190 MB and ~3 s per process),
    for the service's frequent checks: SQLite read-only, or the tracking server's REST API
    (GET /api/2.0/mlflow/registered-models/alias). None when the alias is not set; TrackingError when
    the store cannot be read (a missing SQLite file is never created)."""
    uri = tracking_uri()
    db = sqlite_file(uri)
    if db is not None:
        require_store()
        try:
            row = _read_alias(db, name, alias, timeout_s)
        except sqlite3.Error as err:
            raise TrackingError(f"MLflow store {uri} cannot be read: {err}") from err
        return str(row[0]) if row else None
    if uri.startswith(("http://", "https://")):
        return _peek_alias_rest(uri, name, alias, timeout_s)
    return (version_by_alias(name, alias) or {}).get("version")  # other stores: through mlflow


def _read_alias(db: Path, name: str, alias: str, timeout_s: float) -> tuple | None:
    """Read-only first; a WAL database needs its -shm file writable even for readers, so a reader that
    cannot create it (another user's store) tries a plain connection, which only reads too."""
    for uri in (f"{db.resolve().as_uri()}?mode=ro", f"{db.resolve().as_uri()}"):
        try:
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=timeout_s)) as con:
                return con.execute(*_alias_query(con, name, alias)).fetchone()
        except sqlite3.OperationalError as err:
            if "readonly" not in str(err) or not uri.endswith("mode=ro"):
                raise
    return None


def _alias_query(con: sqlite3.Connection, name: str, alias: str) -> tuple[str, tuple]:
    """MLflow's alias table; since MLflow 3.x keyed by workspace too (MLFLOW_WORKSPACE, else "default")."""
    query, args = "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?", (name, alias)
    columns = {row[1] for row in con.execute("PRAGMA table_info(registered_model_aliases)")}
    if "workspace" in columns:
        query, args = query + " AND workspace = ?", (*args, os.environ.get("MLFLOW_WORKSPACE") or "default")
    return query, args


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's own client would send (token, else basic auth)."""
    import base64

    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _peek_alias_rest(uri: str, name: str, alias: str, timeout_s: float) -> str | None:
    import urllib.error
    import urllib.parse
    import urllib.request

    query = urllib.parse.urlencode({"name": name, "alias": alias})
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/registered-models/alias?{query}",
                                     headers=_auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return str(json.loads(resp.read())["model_version"]["version"])
    except urllib.error.HTTPError as err:
        if err.code == 404 or (err.code == 400 and b"not found" in err.read()):  # model / alias missing
            return None
        raise TrackingError(f"MLflow tracking server {uri} answered {err.code} for alias {alias!r}") from err
    except (urllib.error.URLError, OSError, KeyError, ValueError) as err:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({err})") from err


class RegistryBusy(TrackingError):
    """Another process is changing the registered model's aliases."""


LOCK_MODEL_EXPIRY_S = 300.0  # a lock left by a killed process on a tracking server is taken over after this


@contextlib.contextmanager
def registry_lock(name: str, timeout_s: float = 30.0) -> Iterator[None]:
    """Serialize alias changes of registered model `name` across processes (promote, rollback, the
    gate): a flock beside a SQLite store (released by the kernel when a holder is killed), else a
    lock model on the tracking server (`_acquire_lock_model`) that expires LOCK_MODEL_EXPIRY_S after a holder died.
    Raises RegistryBusy after `timeout_s`, naming the holder."""
    db = sqlite_file()
    if db is not None:
        def busy(path: Path) -> RegistryBusy:
            return RegistryBusy(f"another promote/rollback has held {path} for more than {timeout_s:.0f} s; "
                                f"retry when it has finished")

        with atomic.file_lock(db.with_name(f"{db.name}.{name}.lock"), timeout_s, busy):
            yield
        return
    lock = _acquire_lock_model(name, timeout_s)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            client().delete_registered_model(lock)


def _acquire_lock_model(name: str, timeout_s: float) -> str:
    """A tracking server has no shared file system: the lock is a registered model `<name>.lock`,
    whose creation the server's database makes atomic (RESOURCE_ALREADY_EXISTS for everyone else);
    its description names the holder and the expiry, after which a dead holder's lock is taken over."""
    from mlflow.exceptions import MlflowException

    lock, c = f"{name}.lock", client()
    deadline = time.monotonic() + timeout_s
    while True:
        holder = {"by": f"{socket.gethostname()}:{os.getpid()}", "expires": time.time() + LOCK_MODEL_EXPIRY_S}
        try:
            c.create_registered_model(lock, description=json.dumps(holder))
            return lock
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise TrackingError(f"cannot lock {name!r} on {tracking_uri()}: {err}") from err
        try:
            held = json.loads(c.get_registered_model(lock).description or "{}")
        except (MlflowException, ValueError):
            held = {}
        if held.get("expires", 0) < time.time():
            with contextlib.suppress(MlflowException):  # the holder died: take it over
                c.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise RegistryBusy(f"registered model {name!r} is being changed by {held.get('by', '?')} (registered model "
                               f"{lock!r}, held until {time.strftime('%H:%M:%S', time.localtime(held['expires']))}); "
                               f"retry later")
        time.sleep(0.2 + 0.3 * (uuid.uuid4().int % 100) / 100)
