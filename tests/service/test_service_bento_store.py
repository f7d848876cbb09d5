"""pipeline/bento_store.py against a throw-away BentoML home (run in subprocesses: BENTOML_HOME is per process)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.harness import run_in_bento_home

pytestmark = pytest.mark.slow

SCRIPT = r'''
import json, onnx
from pipeline import bento_store as bs
src = {src!r}
out = {{}}
t1 = bs.save_to_bento_store(src, name="digits", labels={{"registry_alias": "champion", "registry_version": 3}},
                            metadata={{"registry_version": "3", "mlflow_run_id": "test-run-0000", "accuracy": 0.93}})
t2 = bs.save_to_bento_store(src, name="digits")
out["tags"] = [t1, t2]
out["list"] = bs.list_model_tags("digits")
out["info1"] = bs.bento_model_info(t1)
out["latest"] = bs.bento_model_info("digits:latest")["tag"]
out["path"] = bs.onnx_path(t1)
errors = {{}}
def expect(name, fn):
    try:
        fn()
    except Exception as e:
        errors[name] = type(e).__name__ + ": " + str(e)
expect("conflict", lambda: bs.save_to_bento_store(src, name="digits", metadata={{"mlflow_run_id": "other"}}))
expect("missing_file", lambda: bs.save_to_bento_store(src + ".nope", name="digits"))
m = onnx.load(src)
kept = [p for p in m.metadata_props if p.key != "classes"]
del m.metadata_props[:]
m.metadata_props.extend(kept)
onnx.save(m, {bad!r})
expect("missing_meta", lambda: bs.save_to_bento_store({bad!r}, name="digits"))
out["errors"] = errors
out["count_after_errors"] = len(bs.list_model_tags("digits"))
print(json.dumps(out, default=str))
'''


def test_round_trip(tiny_onnx_model, tmp_path):
    home = tmp_path / "home"
    code = SCRIPT.format(src=str(tiny_onnx_model), bad=str(tmp_path / "bad.onnx"))
    out = json.loads(run_in_bento_home(home, code).strip().splitlines()[-1])
    t1, t2 = out["tags"]
    assert out["list"] == [t2, t1] and out["latest"] == t2
    info = out["info1"]
    assert info["labels"] == {"registry_alias": "champion", "registry_version": "3"}
    meta = info["metadata"]
    assert meta["classes"] == [str(i) for i in range(10)]
    assert (meta["in_channels"], meta["image_size"], meta["mean"], meta["std"]) == (1, 28, [0.1307], [0.3081])
    assert (meta["resize"], meta["arch"], meta["mlflow_run_id"], meta["accuracy"]) == ("bilinear", "tinycnn", "test-run-0000", 0.93)
    assert isinstance(meta["num_params"], int)
    assert info["registry"] == {"registry_version": "3", "mlflow_run_id": "test-run-0000"}  # never an alias
    path = Path(out["path"])
    assert path.name == "model.onnx" and str(path).startswith(str(home))
    assert meta["onnx_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(tiny_onnx_model.read_bytes()).hexdigest()
    errors = out["errors"]
    assert errors["conflict"].startswith("ValueError") and "mlflow_run_id" in errors["conflict"]
    assert errors["missing_file"].startswith("FileNotFoundError")
    assert errors["missing_meta"].startswith("ValueError") and "classes" in errors["missing_meta"]
    assert out["count_after_errors"] == 2  # failures write nothing
    assert not os.environ.get("BENTOML_HOME") or os.environ["BENTOML_HOME"] != str(home)


def test_the_built_bento_serves_the_stored_model(bento_home, tmp_path):
    """A plain `bentoml build` of bentofile.yaml (offline: lock_packages false), then `bentoml serve
    <bento tag>`: pinned to the model the store's champion pointer named at build time."""
    import shutil
    import subprocess
    import sys

    import httpx

    import svc_images
    from svc_support import serve
    from tests.harness import REPO

    source_home, model_tag = bento_home
    home = tmp_path / "bentoml_home"
    shutil.copytree(source_home, home)  # the session's store stays as it was
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "PYTHONPATH": str(REPO)}
    build = subprocess.run([sys.executable, "-m", "bentoml", "build", "-o", "tag", str(REPO)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    bento_tag = build.stdout.strip().splitlines()[-1].replace("__tag__:", "")
    assert bento_tag.startswith("image-classifier:")

    png = svc_images.stroke_png()
    with serve(home, tmp_path / "bento.log", model_tag, target=bento_tag) as srv:
        meta = httpx.get(f"{srv.url}/metadata", timeout=30).json()
        resp = httpx.post(f"{srv.url}/classify", files=[("images", ("a.png", png, "image/png"))], timeout=30)
    assert meta["model_tag"] == model_tag and meta["pinned_by"] == "bento" and meta["registry_alias"] is None
    assert resp.status_code == 200 and len(resp.json()) == 1 and len(resp.json()[0]["top_k"]) == 3
