"""`bentoml containerize` without Docker: the build context it would send to the builder, and the
image's server run from that context, in an environment that holds only what the image installs.

One real Bento per module: the tiny MNIST CNN (tests.harness.build_tiny_onnx_model) stored in a
throw-away BentoML home (tests.harness.store_in_bento_home), then ``pipeline.package.build_bento``
(the package stage's own `bentoml build`, pinned to that version and labelled), then
``bentoml._internal.container.construct_containerfile``, the function `bentoml containerize`
calls (``bentoml._internal.container.build``) to make its build context: the Bento, the models it
names copied into ``models/``, and the Dockerfile.

The container run is emulated as the image's entrypoint runs it: ``bentoml serve <context>`` in
the context, BENTOML_HOME its parent (no model store, no alias pointer, no MLflow registry),
BENTOML_CONTAINERIZED=true, the Dockerfile's ENV, and a Python path that holds only the
distributions of the context's ``env/python/requirements.txt`` and their dependencies (symlinks
into this venv's site-packages; the checkout's editable install and everything else is hidden).
A package the service imports but the image lacks fails here as it would in the image.

Where a Docker daemon answers, ``test_containerize_and_run_with_docker`` also builds the image
(network needed: the Dockerfile installs the requirements from PyPI) and runs it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.harness import (REPO, TEST_RUN_ID, build_tiny_onnx_model, free_port, run_in_bento_home, stop, store_in_bento_home, wait_ready)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BENTOFILE = yaml.safe_load((REPO / "bentofile.yaml").read_text())
REGISTRY_VERSION = "7"
#: what the image's entrypoint (env/docker/entrypoint.sh) serves and as whom
BENTO_HOME_IN_IMAGE, BENTO_PATH_IN_IMAGE = "/home/bentoml/", "/home/bentoml/bento"
#: packages of the image that this venv holds under another distribution name (same import package)
STAND_INS = {"onnxruntime": "onnxruntime-gpu"}
#: distributions of this venv the image does not have: the emulation must hide them
NOT_IN_IMAGE = ("pipeline", "tests", "mlflow", "torch", "onnx")

CONTEXT_SCRIPT = r'''
import json, shutil
import bentoml
from bentoml._internal.container import construct_containerfile
bento = bentoml.get({tag!r})
with construct_containerfile(bento, enable_buildkit=True) as (context, dockerfile):
    shutil.copytree(context, {target!r})
    dockerfile = dockerfile[len(context) + 1:]
print(json.dumps({{"bento_path": bento.path, "dockerfile": dockerfile}}))
'''

SITECUSTOMIZE = r'''"""The image's Python path (tests/test_bento_container.py): this venv's site-packages out, the
symlinks to the image's distributions in; the checkout's editable install gone."""
import sys
SITE_PACKAGES, IMAGE_SITE = {site_packages!r}, {image_site!r}
sys.path[:] = [p for p in sys.path if p not in SITE_PACKAGES and not p.startswith("__editable__")]
sys.path.append(IMAGE_SITE)
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "_Editable" not in getattr(h, "__qualname__", "")]
sys.path_importer_cache.clear()
'''


@dataclass(frozen=True)
class Built:
    home: Path  # the BentoML home the Bento was built in
    onnx: Path
    model_tag: str
    bento_tag: str
    bento_path: Path  # the Bento in the store
    context: Path  # what `bentoml containerize` sends to the builder
    dockerfile: str


@pytest.fixture(scope="module")
def built(mnist, tmp_path_factory) -> Built:
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from pipeline.package import build_bento

    folder = tmp_path_factory.mktemp("bento-container")
    onnx = build_tiny_onnx_model(mnist, folder / "tiny.onnx")
    home = folder / "bentoml"
    model_tag = store_in_bento_home(onnx, home, version=REGISTRY_VERSION, run_id=TEST_RUN_ID)
    with pytest.MonkeyPatch.context() as mp:  # build_bento runs `bentoml build` with os.environ
        mp.setenv("BENTOML_HOME", str(home))
        mp.setenv("BENTOML_DO_NOT_TRACK", "true")
        for name in [n for n in os.environ if n.startswith("CLASSIFIER_")]:
            mp.delenv(name)
        bento_tag = build_bento({"tag": model_tag, "registry_version": REGISTRY_VERSION}, "champion")
    # the image's layout: $BENTOML_HOME/bento is the build context, nothing else in that home
    context = folder / "image-home" / "bento"
    out = run_in_bento_home(home, CONTEXT_SCRIPT.format(tag=bento_tag, target=str(context)))
    info = json.loads(out.strip().splitlines()[-1])
    return Built(home, onnx, model_tag, bento_tag, Path(info["bento_path"]), context, info["dockerfile"])


def dockerfile_lines(built: Built) -> list[str]:
    return [line.strip() for line in (built.context / built.dockerfile).read_text().splitlines() if line.strip()]


def requirement_lines(built: Built) -> list[str]:
    text = (built.context / "env" / "python" / "requirements.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_dockerfile_installs_the_bentofile_packages_and_serves_on_3000(built):
    from packaging.requirements import Requirement

    import bentoml

    assert built.dockerfile == "env/docker/Dockerfile"
    lines = dockerfile_lines(built)
    docker = BENTOFILE["docker"]
    assert f"FROM python:{docker['python_version']}-slim AS base-container" in lines
    # the requirements: copied in, installed into the image's venv, which is first on PATH
    assert "COPY --chown=bentoml:bentoml ./env/python ./env/python/" in lines
    assert any(line.endswith("pip install -r $BENTO_PATH/env/python/requirements.txt") for line in lines), lines
    assert "ENV PATH=/app/.venv/bin:${PATH}" in lines
    # the Bento itself (src/, models/, env/) and its server: `bentoml serve $BENTO_PATH` on port 3000
    assert "COPY --chown=bentoml:bentoml . ./" in lines
    assert f"ENV BENTOML_HOME={BENTO_HOME_IN_IMAGE}" in lines and f"ARG BENTO_PATH={BENTO_PATH_IN_IMAGE}" in lines
    assert "WORKDIR $BENTO_PATH" in lines and "USER bentoml" in lines and "EXPOSE 3000" in lines
    assert f'ENTRYPOINT [ "{BENTO_PATH_IN_IMAGE}/env/docker/entrypoint.sh" ]' in lines
    entrypoint = (built.context / "env" / "docker" / "entrypoint.sh").read_text()
    assert 'set -- bentoml serve "$@" "$BENTO_PATH"' in entrypoint
    # bentofile.yaml's envs: defaults of the image, overridable with `docker run -e`
    for env in BENTOFILE.get("envs", []):
        assert f"ARG {env['name']}={env['value']}" in lines and f"ENV {env['name']}=${env['name']}" in lines

    wanted = [str(Requirement(p)) for p in BENTOFILE["python"]["packages"]]
    assert requirement_lines(built) == [*wanted, f"bentoml=={bentoml.__version__}"]
    # lock_packages: false -> the list as written (no network at build time), nothing resolved
    assert BENTOFILE["python"]["lock_packages"] is False


def test_the_context_holds_the_service_the_page_and_the_pinned_model(built):
    bento = yaml.safe_load((built.context / "bento.yaml").read_text())
    assert bento["service"] == BENTOFILE["service"] == "service.service:Classifier"
    assert bento["labels"]["model_tag"] == built.model_tag
    assert bento["labels"]["registry_version"] == REGISTRY_VERSION
    assert [m["tag"] for s in bento["services"] for m in s["models"]] == [built.model_tag]

    name, version = built.model_tag.split(":")
    model = built.context / "models" / name / version / "model.onnx"
    assert model.is_file(), sorted(str(p.relative_to(built.context)) for p in built.context.rglob("*"))
    assert hashlib.sha256(model.read_bytes()).digest() == hashlib.sha256(built.onnx.read_bytes()).digest()

    src = built.context / "src"
    shipped = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    wanted = {p.relative_to(REPO).as_posix() for p in (REPO / "service").glob("*.py")}
    assert wanted <= shipped, wanted - shipped
    assert "service/static/ui.html" in shipped
    assert not [p for p in shipped if "__pycache__" in p or p.startswith(("tests/", "pipeline/"))]
    # nothing of the build machine's registry or store: the image serves what it carries
    assert not list(built.context.rglob("mlflow.db")) and not (built.context.parent / "aliases").exists()


def test_the_bento_readme_shows_the_api(built):
    """bentofile.yaml `description: "file: ..."` -> the Bento's README.md (what `bentoml get -o path`
    /README.md, BentoCloud and the containerized Bento show)."""
    description = str(BENTOFILE.get("description"))
    assert description.startswith("file:"), f"bentofile.yaml's description is not a file: {description!r}"
    text = (REPO / description.removeprefix("file:").strip()).read_text()
    assert (built.bento_path / "README.md").read_text() == text == (built.context / "README.md").read_text()
    for needle in ("POST /classify", "POST /classify_base64", "GET /metadata", "/readyz", "curl -F images=@",
                   "bentoml.SyncHTTPClient", '"reason"', "model_tag", "registry_version",
                   "bentoml serve image-classifier:", "bentoml containerize image-classifier:",
                   "docker run --rm -p 3000:3000", "--gpus all", "CLASSIFIER_PROVIDERS=cuda"):
        assert needle in text, needle
    # every endpoint the README names is one the Bento serves (schema.json / the service's routes)
    schema = json.loads((built.context / "apis" / "schema.json").read_text())
    assert {"/classify", "/classify_base64", "/metadata", "/ui"} <= set(schema["paths"])


# --- the container, emulated ---------------------------------------------------------------------------------

def image_distributions(requirements: list[str]):
    """The installed distributions that `pip install -r requirements.txt` would give the image on this
    platform: the requirements and, recursively, their dependencies (markers and extras evaluated)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo = [r for r in map(Requirement, requirements) if r.marker is None or r.marker.evaluate({"extra": ""})]
    dists: dict[str, metadata.Distribution] = {}
    extras: dict[str, set[str]] = {}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in dists and set(req.extras) <= extras[name]:
            continue
        try:
            dist = metadata.distribution(STAND_INS.get(name, name))
        except metadata.PackageNotFoundError:
            pytest.fail(f"the image installs {req} but this venv lacks it: the emulation cannot run")
        dists[name] = dist
        extras.setdefault(name, set()).update(req.extras)
        for dep in map(Requirement, dist.requires or []):
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in ("", *extras[name])):
                todo.append(dep)
    return list(dists.values())


def image_python_path(built: Built, folder: Path) -> Path:
    """A folder for PYTHONPATH whose sitecustomize gives every Python process of the emulated container
    the image's packages only (symlinks to their top-level entries in this venv's site-packages)."""
    site_packages = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    image_site, boot = folder / "image-site-packages", folder / "boot"
    image_site.mkdir()
    boot.mkdir()
    for dist in image_distributions(requirement_lines(built)):
        root = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if not (image_site / top).exists() and (root / top).exists():
                (image_site / top).symlink_to(root / top)
    (boot / "sitecustomize.py").write_text(SITECUSTOMIZE.format(site_packages=sorted(site_packages),
                                                                image_site=str(image_site)))
    return boot


def image_env(built: Built, python_path: Path, **extra: str) -> dict[str, str]:
    """The emulated container's environment: the Dockerfile's ENV (with this machine's paths), no more."""
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin{os.pathsep}/bin",
           "HOME": str(built.context.parent), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "UTF-8",
           "PYTHONUNBUFFERED": "1", "BENTO_PATH": str(built.context), "BENTOML_HOME": str(built.context.parent) + "/",
           "BENTOML_CONTAINERIZED": "true", "BENTOML_DO_NOT_TRACK": "true", "PYTHONPATH": str(python_path)}
    for line in dockerfile_lines(built):  # ARG NAME=value / ENV NAME=$NAME pairs: bentofile.yaml's envs
        if line.startswith("ARG CLASSIFIER_") and "=" in line:
            name, value = line[4:].split("=", 1)
            env[name] = value
    return {**env, **extra}


def png(image) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_the_image_serves_its_model_without_registry_or_store(built, mnist, tmp_path):
    import httpx

    python_path = image_python_path(built, tmp_path)
    env = image_env(built, python_path, CLASSIFIER_WORKERS="1")
    assert {e["name"]: e["value"] for e in BENTOFILE["envs"]}.items() <= env.items()

    # the emulation holds: bentoml imports, the checkout and the training stack do not (whether the
    # service's own imports are there is for the server below to find out)
    probe = ("import importlib.util as u, json; "
             f"print(json.dumps({{m: u.find_spec(m) is not None for m in {['bentoml', *NOT_IN_IMAGE]!r}}}))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=built.context, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert [m for m, ok in found.items() if ok != (m not in NOT_IN_IMAGE)] == [], found

    port = free_port()
    bentoml_cli = Path(sys.executable).with_name("bentoml")
    cmd = [str(bentoml_cli) if bentoml_cli.exists() else "bentoml", "serve", str(built.context), "--port", str(port)]
    log = tmp_path / "image.log"
    started = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, cwd=built.context, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/readyz", proc, log, started, timeout=90)
        meta = httpx.get(f"{url}/metadata", timeout=30).json()
        digits = [(f"{i}.png", png(mnist.test_images[i])) for i in range(16)]
        resp = httpx.post(f"{url}/classify", files=[("images", (n, b, "image/png")) for n, b in digits],
                          data={"top_k": "2"}, timeout=30)
        bad = httpx.post(f"{url}/classify", files=[("images", ("notes.txt", b"not an image", "text/plain"))],
                         timeout=30)
        page = httpx.get(f"{url}/ui", timeout=30)
    finally:
        stop(proc)
    assert (meta["model_tag"], meta["registry_version"], meta["pinned_by"]) == (built.model_tag, REGISTRY_VERSION, "bento")
    assert meta["registry_alias"] is None and meta["workers"] == 1  # runtime settings, not the build machine's
    assert meta["execution_providers"] == ["CPUExecutionProvider"]
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-model-tag"] == built.model_tag and resp.headers["x-model-version"] == REGISTRY_VERSION
    answers = resp.json()
    assert len(answers) == 16 and all(len(a["top_k"]) == 2 for a in answers)
    right = sum(a["label"] == str(mnist.test_labels[i]) for i, a in enumerate(answers))
    assert right >= 13, [a["label"] for a in answers]  # the tiny CNN is > 90 % accurate: this model answered
    assert bad.status_code == 415 and bad.json()["reason"] == "not_an_image"
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "Traceback" not in log.read_text(errors="replace")


# --- the real thing, where Docker runs ---------------------------------------------------------------------

def docker_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "no docker on PATH"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"docker info: {err}"
    return None if info.returncode == 0 else f"no Docker daemon: {(info.stderr or info.stdout).strip()[-200:]}"


def test_containerize_and_run_with_docker(built, tmp_path):
    if reason := docker_unavailable():
        pytest.skip(reason)
    import httpx

    image = f"image-classifier:pytest-{built.bento_tag.split(':')[1]}"
    env = {**os.environ, "BENTOML_HOME": str(built.home), "BENTOML_DO_NOT_TRACK": "true"}
    bentoml_cli = Path(sys.executable).with_name("bentoml")
    build = subprocess.run([str(bentoml_cli) if bentoml_cli.exists() else "bentoml", "containerize", built.bento_tag,
                            "-t", image], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, (build.stdout + build.stderr)[-5000:]
    port = free_port()
    name = f"pytest-image-classifier-{port}"
    try:
        run = subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:3000",
                              "-e", "CLASSIFIER_WORKERS=1", image], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        deadline, ready = time.monotonic() + 180, None
        while time.monotonic() < deadline and ready != 200:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code
            except httpx.HTTPError:
                time.sleep(1)
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=60)
        assert ready == 200, (logs.stdout + logs.stderr)[-5000:]
        meta = httpx.get(f"http://127.0.0.1:{port}/metadata", timeout=30).json()
        assert (meta["model_tag"], meta["pinned_by"]) == (built.model_tag, "bento")
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)
        subprocess.run(["docker", "rmi", "-f", image], capture_output=True, timeout=120)
