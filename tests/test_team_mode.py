"""Team mode: the pipeline against a central `mlflow server` backed by a real PostgreSQL.

The test starts a throwaway PostgreSQL cluster (Debian's postgresql, in a temp dir, on loopback)
and an MLflow server on it with a file artifact root, runs the stages on a tiny MNIST subset, checks
that runs, the registered model, its version and the champion alias landed in the database, then
stops both. Also: an unreachable tracking server makes training fail fast with a clear message.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.harness import free_port
from tests.stages import run_stage, stage_env, write_params

PG_BIN = Path("/usr/lib/postgresql")


def pg_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(PG_BIN.glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


def as_postgres(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: drop to the `postgres` user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def wait_for(url: str, seconds: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} not ready after {seconds}s")


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    initdb, pg_ctl = pg_tool("initdb"), pg_tool("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (Debian's postgresql) are not installed; .ci/run installs them")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
    root = Path(tempfile.mkdtemp(prefix="pg-team-mode-"))  # not under pytest's 0700 root: postgres must reach it
    root.chmod(0o777)
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    sock.chmod(0o777)
    port = free_port()
    init = subprocess.run(as_postgres([initdb, "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8"]),
                          capture_output=True, text=True)
    assert init.returncode == 0, init.stderr
    subprocess.run(as_postgres([pg_ctl, "-D", str(data), "-l", str(root / "pg.log"), "-w", "-o",
                                f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"]),
                   check=True, capture_output=True)
    try:
        subprocess.run(as_postgres([pg_tool("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port),
                                    "-U", "mlflow", "mlflow"]), check=True, capture_output=True)
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(as_postgres([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("artifacts")
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", postgres,
                             "--artifacts-destination", artifacts.as_uri(), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", 120, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def stage(project: Path, uri: str, *args: str) -> subprocess.CompletedProcess:
    return run_stage(project, *args, env=stage_env(project, MLFLOW_TRACKING_URI=uri))


def psql(postgres_url: str, query: str) -> list[str]:
    url = postgres_url.replace("postgresql+psycopg2://", "postgresql://")
    out = subprocess.run(["psql", url, "-At", "-c", query], capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_against_mlflow_server_on_postgresql(postgres, mlflow_server, tmp_path, monkeypatch):
    write_params(tmp_path, {"cnn": {"epochs": 1}})
    stage(tmp_path, mlflow_server, "pipeline.download")
    for name in ("pipeline.train", "pipeline.evaluate", "pipeline.export"):
        stage(tmp_path, mlflow_server, name, "--arch", "cnn")
    out = stage(tmp_path, mlflow_server, "pipeline.promote")
    assert "champion" in out.stdout

    # everything landed in PostgreSQL, not in a local file store
    assert not (tmp_path / "mlflow.db").exists()
    run_names = psql(postgres, "select name from runs")
    assert "cnn" in run_names and "download-mnist" in run_names
    assert psql(postgres, "select name from registered_models") == ["image-classifier"]
    assert psql(postgres, "select alias from registered_model_aliases") == ["champion"]
    assert len(psql(postgres, "select version from model_versions")) == 1
    metric_keys = set(psql(postgres, "select distinct key from metrics"))
    assert {"val_acc", "train_loss", "test_acc", "parity_max_abs_logit_diff"} <= metric_keys

    # and the champion can be fetched back through the server (what the package stage does)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    from pipeline import tracking

    champion = tracking.version_by_alias("image-classifier", "champion")
    folder = tracking.download_version("image-classifier", champion["version"], tmp_path / "dl")
    assert (folder / "model.onnx").stat().st_size > 1000


def test_unreachable_tracking_server_fails_fast(tmp_path):
    write_params(tmp_path, {"cnn": {"epochs": 1}})
    run_stage(tmp_path, "pipeline.download")
    unreachable = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.time()
    out = run_stage(tmp_path, "pipeline.train", "--arch", "cnn", check=False,
                    env=stage_env(tmp_path, MLFLOW_TRACKING_URI=unreachable))
    assert out.returncode == 3
    assert "unreachable" in out.stderr and unreachable in out.stderr
    assert time.time() - start < 60
    assert not (tmp_path / "outputs" / "cnn" / "model.pt").exists()
