"""Registry -> BentoML store: make the store hold what a registry alias points to, and say so.

    python -m pipeline.serving [--model image-classifier] [--alias champion]

``sync_alias`` is the one path by which a registry version reaches the serving store: the package
stage calls it for ``champion``, and a running service that sees its alias move (service/follower.py)
runs this module. It reads the alias' version from the MLflow registry, refuses versions that
failed the parity gate, reuses the store entry that already holds that ONNX file (same SHA-256 and
registry version) or downloads it, checks that the service could serve it (ONNX Runtime opens it,
the graph matches the contract, a probe batch gives finite logits) before anything is stored, then
points the alias at the entry (``pipeline.bento_store.point_alias``). It holds the store lock
throughout, so concurrent runs neither store a version twice nor interleave pointer writes; a run
killed midway leaves the previous pointers (BentoML removes a half-written entry on error, and a
killed copy never gets a ``latest`` link or a pointer).

No torch here: the service runs this module in a subprocess.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from service.contract import MODEL_FILE

from . import bento_store, stage, tracking
from .stage import StageError

CHAMPION, CHALLENGER = "champion", "challenger"
#: exit codes of `python -m pipeline.serving`, which the service's follower tells apart: a version
#: that can never be served is refused; a store that did not answer is asked again at the next poll
EXIT_UNSERVABLE, EXIT_STORE = stage.EXIT_INPUT, stage.EXIT_STORE


class ServingError(StageError):
    """The alias' version cannot be put into service; the message says why."""


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_servable(onnx_file: Path) -> dict:
    """Open ``onnx_file`` as the service would and run a probe batch; its description, or ServingError."""
    from service.engine import OnnxClassifier

    try:
        engine = OnnxClassifier(onnx_file, providers="cpu", intra_op_threads=1)
        logits = engine.logits(np.zeros((2, *engine.spec.input_shape), np.float32))
    except Exception as err:  # noqa: BLE001  (protobuf, ONNX Runtime and contract errors alike)
        raise ServingError(f"cannot be served: {type(err).__name__}: {str(err)[:500]}") from err
    if not np.isfinite(logits).all():
        raise ServingError("cannot be served: a probe batch gave non-finite logits")
    return engine.describe()


def _registry_version(name: str, alias: str) -> dict:
    store = tracking.require_store()  # checked again after the read: a store moved meanwhile is an error, not "no alias"
    version = tracking.version_by_alias(name, alias)
    tracking.check_same_store(store)
    if version is None:
        raise ServingError(f"registered model {name!r} has no {alias!r} alias: run `python -m pipeline.promote`")
    if version["tags"].get("parity_passed") != "true":
        raise ServingError(f"{alias} v{version['version']} did not pass the parity gate; not serving it")
    return version


def _store_version(name: str, version: dict) -> str:
    """Download, check and store one registry version; its new store tag."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = tracking.download_version(name, version["version"], tmp)
        onnx_file = folder / MODEL_FILE
        expected = version["tags"].get("onnx_sha256")
        if expected and bento_store.sha256_file(onnx_file) != expected:
            raise ServingError(f"v{version['version']}'s model.onnx does not match its registered SHA-256 {expected}")
        check_servable(onnx_file)
        labels = {"registry_version": version["version"], "arch": version["tags"].get("arch", ""),
                  "dataset": version["tags"].get("dataset", ""), "mlflow_run_id": version["run_id"]}
        metadata = {"registry_version": version["version"], "registered_model": name,
                    **{k: v for k, v in version["tags"].items() if k.startswith("metric.")}}
        try:
            return bento_store.save_to_bento_store(onnx_file, name=name, labels=labels, metadata=metadata)
        except ValueError as err:
            raise ServingError(f"v{version['version']} cannot be stored: {err}") from err


def sync_alias(name: str, alias: str = CHAMPION) -> dict:
    """Make the store serve the registry's ``alias`` of ``name``; the pointer entry, plus ``reused``."""
    tracking.require_store()
    with bento_store.store_lock(name):
        removed = bento_store.remove_debris(name)  # entries a killed run left half-copied
        if removed:
            print(f"serving: removed {len(removed)} incomplete store entr{'y' if len(removed) == 1 else 'ies'} "
                  f"left by an interrupted run: {', '.join(removed)}", file=sys.stderr)
        version = _registry_version(name, alias)
        sha = version["tags"].get("onnx_sha256", "")
        tag = bento_store.find_stored(name, sha, version["version"]) if sha else None
        reused = tag is not None
        if tag is None:
            tag = _store_version(name, version)
        entry = {"tag": tag, "registry_version": version["version"], "registered_model": name,
                 "onnx_sha256": sha, "mlflow_run_id": version["run_id"], "arch": version["tags"].get("arch"),
                 "since": utc_now()}
        previous = bento_store.read_pointers(name).get(alias, {})
        if previous.get("tag") == tag:
            entry.update(since=previous.get("since", entry["since"]), previous=previous.get("previous"))
        elif previous.get("tag"):  # a worker that cannot load the new entry at start-up falls back to it
            entry["previous"] = {k: previous.get(k) for k in ("tag", "registry_version")}
        bento_store.point_alias(name, alias, entry)
    return {**entry, "alias": alias, "reused": reused}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=bento_store.DEFAULT_MODEL_NAME, help="registered model = store name")
    parser.add_argument("--alias", default=CHAMPION)
    args = parser.parse_args(argv)
    try:
        tracking.check_reachable()  # a server that is down: exit 3 now, not after MLflow's minutes of retries
        entry = sync_alias(args.model, args.alias)
    except ServingError as err:
        print(f"serving: error: {args.alias} of {args.model}: {err}", file=sys.stderr)
        return EXIT_UNSERVABLE
    except (tracking.TrackingError, OSError) as err:  # OSError: a lock timeout, an artifact moved, a full disk
        print(f"serving: error: {args.alias} of {args.model}: {err}", file=sys.stderr)
        return EXIT_STORE  # the follower asks again at its next poll; exit 2 would refuse the version for good
    print(f"serving: {args.alias} v{entry['registry_version']} -> BentoML model {entry['tag']}"
          f"{' (already stored)' if entry['reused'] else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(stage.run("serving", main))
