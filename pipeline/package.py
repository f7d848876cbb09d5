"""Package stage: the registry's `champion` ONNX model into the BentoML model store, then a Bento.

    python -m pipeline.package [--no-build]

Reads the champion from the MLflow Model Registry (so a hand promotion or rollback is packaged by
running this again), stores it with `pipeline.bento_store` (labels: registry version and alias,
MLflow run id) and runs `bentoml build` offline (bentofile.yaml sets lock_packages: false).
Output: release/bento.json.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import atomic, bento_store, tracking
from .params import ParamsError, load_params
from .paths import REPO_ROOT
from .promote import CHAMPION, RELEASE_DIR, PromotionError


def package_champion(name: str) -> dict:
    champion = tracking.version_by_alias(name, CHAMPION)
    if champion is None:
        raise PromotionError(f"registered model {name!r} has no {CHAMPION!r} alias: run `python -m pipeline.promote`")
    if champion["tags"].get("parity_passed") != "true":
        raise PromotionError(f"champion v{champion['version']} did not pass the parity gate; not packaging it")
    for tag in bento_store.list_model_tags(name):  # already stored: reuse (a re-run adds nothing)
        info = bento_store.bento_model_info(tag)
        if (info["metadata"].get("onnx_sha256") == champion["tags"].get("onnx_sha256")
                and str(info["labels"].get("registry_version")) == champion["version"]):
            return {"model_tag": tag, "registry_version": champion["version"], "reused": True}
    with tempfile.TemporaryDirectory() as tmp:
        folder = tracking.download_version(name, champion["version"], tmp)
        labels = {"registry_version": champion["version"], "registry_alias": CHAMPION,
                  "arch": champion["tags"].get("arch", ""), "dataset": champion["tags"].get("dataset", "")}
        metadata = {"registry_version": champion["version"], "registry_alias": CHAMPION,
                    "registered_model": name, "mlflow_run_id": champion["run_id"],
                    **{k: v for k, v in champion["tags"].items() if k.startswith("metric.")}}
        tag = bento_store.save_to_bento_store(folder / "model.onnx", name=name, labels=labels, metadata=metadata)
    return {"model_tag": tag, "registry_version": champion["version"], "reused": False}


def build_bento() -> str:
    """`bentoml build` from bentofile.yaml; the Bento's tag."""
    bentoml = Path(sys.executable).with_name("bentoml")
    cmd = [str(bentoml) if bentoml.exists() else "bentoml", "build", "-o", "tag", str(REPO_ROOT)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"})
    if out.returncode != 0:
        raise PromotionError(f"bentoml build failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1].replace("__tag__:", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-build", action="store_true", help="store the model but build no Bento")
    args = parser.parse_args(argv)
    try:
        name = load_params(args.params).promote.registered_model
        result = package_champion(name)
        result["bento_tag"] = None if args.no_build else build_bento()
    except (ParamsError, PromotionError, tracking.TrackingError) as err:
        print(f"package: error: {err}", file=sys.stderr)
        return 2
    atomic.write_json(RELEASE_DIR / "bento.json", result)
    print(f"package: champion v{result['registry_version']} -> BentoML model {result['model_tag']}"
          f"{' (already stored)' if result['reused'] else ''}; Bento {result['bento_tag']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
