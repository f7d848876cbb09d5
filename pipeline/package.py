"""Package stage: the registry's `champion` into the BentoML model store, then a Bento pinned to it.

    python -m pipeline.package [--no-build] [--alias champion]

Stores the alias' current registry version (``pipeline.serving.sync_alias``: reused when already
stored, checked before it is stored) and points the store's alias at it, so that `bentoml serve
service.service:Classifier` serves it, and a running service moves to it. Then `bentoml build`
(offline: bentofile.yaml sets lock_packages: false) with the model version pinned: the Bento serves
the version it was built with whatever the store or the registry say later, and its labels name it
(``model_tag``, ``registry_version``). Output: release/bento.json.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from . import atomic, stage, tracking
from .bento_store import bentoml_executable
from .params import load_params
from .paths import RELEASE_DIR, REPO_ROOT, experiments_may_promote, isolated_experiment
from .serving import CHAMPION, ServingError, sync_alias


def build_bento(entry: dict, alias: str) -> str:
    """`bentoml build` pinned to the store entry ``entry["tag"]`` (the build imports the service with
    CLASSIFIER_MODEL_NAME and CLASSIFIER_MODEL_VERSION set, so its model reference is that model, e.g.
    CIFAR-10's); the Bento's tag."""
    name, version = entry["tag"].split(":", 1)
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "CLASSIFIER_MODEL_NAME": name, "CLASSIFIER_MODEL_VERSION": version}
    labels = {"model_tag": entry["tag"], "registry_version": entry["registry_version"], "built_from_alias": alias}
    cmd = [bentoml_executable() or "bentoml", "build", "-o", "tag",
           *[arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")], str(REPO_ROOT)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    if out.returncode != 0:
        raise ServingError(f"bentoml build failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1].replace("__tag__:", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--alias", default=CHAMPION, help="registry alias to package (default champion)")
    parser.add_argument("--no-build", action="store_true", help="store the model but build no Bento")
    args = parser.parse_args(argv)
    experiment = None if experiments_may_promote() else isolated_experiment()
    if experiment:
        atomic.write_json(RELEASE_DIR / "bento.json", {"skipped": f"experiment {experiment!r}", "bento_tag": None})
        print(f"package: inside experiment {experiment!r} (dvc exp run --temp/--queue): the serving store is left "
              f"alone; `dvc exp apply` it and `dvc repro` in the workspace, or set PROMOTE_IN_EXPERIMENTS=1")
        return 0
    name = load_params(args.params).promote.registered_model
    tracking.check_reachable()  # a server that is down: fail now, not after MLflow's minutes of retries
    result = sync_alias(name, args.alias)
    result["bento_tag"] = None if args.no_build else build_bento(result, args.alias)
    result["model_tag"] = result["tag"]
    atomic.write_json(RELEASE_DIR / "bento.json", result)
    print(f"package: {args.alias} v{result['registry_version']} -> BentoML model {result['tag']}"
          f"{' (already stored)' if result['reused'] else ''}; the store's {args.alias!r} now points to it; "
          f"Bento {result['bento_tag'] or '(not built)'}")
    return 0


if __name__ == "__main__":
    sys.exit(stage.run("package", main))
