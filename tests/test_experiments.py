"""DVC experiments for real: a git + DVC repo made by the test, `dvc repro`, `dvc exp run` in the
workspace, `--temp`, two `--queue`d runs with `dvc queue start -j 2`, `dvc exp apply` + `dvc repro`,
and run-cache restores into a store that lost their runs.

The repo holds a copy of the project's code, dvc.yaml and a tiny params.yaml (one `mlp`, 400 MNIST
images per split); nothing sets MLFLOW_TRACKING_URI, so the stages find the embedded store
themselves: every run, from every execution mode, must land in the repo's own mlflow.db.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, repo_params
from tests.harness import mirror_path

pytestmark = [pytest.mark.slow, pytest.mark.integration]
CODE = ("pipeline", "models", "service", "data/images", "dvc.yaml", "bentofile.yaml", "pyproject.toml", ".dvcignore")


class Repo:
    def __init__(self, path: Path, home: Path) -> None:
        self.path, self.home = path, home

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
        env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", DATA_MIRROR=str(mirror_path()),
                   BENTOML_HOME=str(self.home), BENTOML_DO_NOT_TRACK="true", PYTHONUNBUFFERED="1",
                   MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                   GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
        env.pop("PYTHONPATH", None)  # the stages import the repo's own copy, as in a user's checkout
        return env

    def run(self, *cmd: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(list(cmd), cwd=self.path, env=self.env(), capture_output=True, text=True, timeout=timeout)
        text = out.stdout + out.stderr
        if check:
            assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{text[-6000:]}"
            assert "Traceback" not in text, f"{' '.join(cmd)} printed a traceback:\n{text[-6000:]}"
        return out

    def dvc(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(str(Path(sys.executable).with_name("dvc")), *args, **kwargs)

    def start_queue(self, jobs: int) -> str:
        """`dvc queue start` returns at once, but its detached workers inherit its stdout and stderr:
        read through pipes, the call lasts until every worker exits (all tasks done, or never for a
        worker that hangs on shutdown: the 900 s timeout of a CI run on 2026-12-01). A file instead."""
        log = self.path.parent / "queue-start.log"
        with log.open("w") as out:
            done = subprocess.run([str(Path(sys.executable).with_name("dvc")), "queue", "start", "-j", str(jobs)],
                                  cwd=self.path, env=self.env(), stdout=out, stderr=subprocess.STDOUT, timeout=120)
        text = log.read_text()
        assert done.returncode == 0 and "Traceback" not in text, text[-4000:]
        return text

    def wait_for_queue(self, timeout_s: float = 900) -> str:
        """`dvc queue status` once nothing is queued or running; on timeout, the status and the logs of
        the experiments still running."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.dvc("queue", "status").stdout
            if "Queued" not in status and "Running" not in status:
                return status
            if time.monotonic() > deadline:
                running = [line.split()[1] for line in status.splitlines() if "Running" in line and len(line.split()) > 1]
                logs = {name: self.dvc("queue", "logs", name, check=False).stdout[-2000:] for name in running}
                raise AssertionError(f"queue still busy after {timeout_s:.0f} s:\n{status}\n{logs}")
            time.sleep(3)

    def stop_queue(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.dvc("queue", "stop", "--kill", check=False, timeout=120)

    def init_and_commit(self) -> None:
        """git init + dvc init, everything committed as the first commit."""
        self.git("init", "-q")
        self.dvc("init", "-q")
        self.git("add", "-A")
        self.git("commit", "-qm", "project")

    def git(self, *args: str) -> str:
        return self.run("git", *args).stdout

    def query(self, sql: str, *args) -> list[tuple]:
        with sqlite3.connect(self.path / "mlflow.db") as con:
            return con.execute(sql, args).fetchall()

    def champion(self) -> str | None:
        rows = self.query("SELECT version FROM registered_model_aliases WHERE alias = 'champion'")
        return str(rows[0][0]) if rows else None

    def runs_by_experiment_tag(self) -> dict[str, int]:
        rows = self.query("SELECT value, COUNT(*) FROM tags WHERE key = 'dvc.exp_name' GROUP BY value")
        return dict(rows)


def copy_code(path: Path) -> None:
    """The project's code (CODE, no bytecode) and its .gitignore into `path`, as a user's checkout has them."""
    for name in (*CODE, ".gitignore"):
        src = REPO_ROOT / name
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy2(src, path / name))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Iterator[Repo]:
    path = tmp_path_factory.mktemp("exp-repo")
    copy_code(path)
    params = repo_params()
    params["data"].update(dataset="mnist", limit=400)
    params["train"].update(experiment="exp-tests", batch_size=64, device="cpu")
    params["models"] = {"mlp": {"epochs": 1, "lr": 0.01}}
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    repo = Repo(path, tmp_path_factory.mktemp("exp-bentoml"))
    repo.init_and_commit()
    repo.dvc("repro")
    repo.git("add", "-A")
    repo.git("commit", "-qm", "baseline")
    yield repo
    repo.stop_queue()  # no worker outlives the tests, whatever failed


def test_experiments_in_every_mode_share_one_store_and_only_the_workspace_promotes(repo):
    baseline_champion = repo.champion()
    assert baseline_champion == "1"

    repo.dvc("exp", "run", "--temp", "-n", "temp-lr", "-S", "models.mlp.lr=0.02")
    assert repo.champion() == baseline_champion, "a --temp experiment moved the champion"
    assert not list((repo.path / ".dvc" / "tmp" / "exps").rglob("mlflow.db")), "a throwaway store was written"

    repo.dvc("exp", "run", "--queue", "-n", "queued-a", "-S", "models.mlp.lr=0.03")
    repo.dvc("exp", "run", "--queue", "-n", "queued-b", "-S", "models.mlp.lr=0.04")
    repo.start_queue(2)
    status = repo.wait_for_queue()
    assert "Failed" not in status, (status, repo.dvc("queue", "logs", "queued-a", check=False).stdout[-4000:])
    repo.stop_queue()
    assert repo.champion() == baseline_champion, "a queued experiment moved the champion"

    tags = repo.runs_by_experiment_tag()
    for name in ("temp-lr", "queued-a", "queued-b"):
        assert tags.get(name, 0) >= 1, tags  # their runs are in the workspace store, tagged

    shown = repo.dvc("exp", "show", "--no-pager", "--csv").stdout.splitlines()
    header = shown[0].split(",")
    rows = {cells[0] or cells[1]: dict(zip(header, cells)) for cells in (row.split(",") for row in shown[1:])}
    for name in ("queued-a", "queued-b", "temp-lr"):
        assert float(rows[name]["test_acc"]) > 0, rows.get(name)  # each experiment's metrics, not "!"

    repo.dvc("exp", "apply", "queued-b")
    applied = repo.dvc("repro").stdout  # the rest comes from the run cache; promote always runs
    assert "Running stage 'promote'" in applied, applied[-3000:]
    champion = repo.champion()
    tags = dict(repo.query("SELECT key, value FROM model_version_tags WHERE version = ?", int(champion)))
    assert tags.get("dvc.exp_name") == "queued-b", (champion, tags)  # applied + repro: its candidate won the gate
    out = repo.dvc("exp", "run", "-n", "workspace-run", "-S", "models.mlp.epochs=2")
    assert repo.runs_by_experiment_tag().get("workspace-run", 0) >= 1, out.stdout[-3000:]
    assert "aliases left alone" not in out.stdout  # a workspace experiment is not isolated


def test_outputs_restored_from_the_run_cache_into_a_fresh_store_get_new_runs_that_say_so(repo):
    repo.git("checkout", "-q", "--", ".")
    repo.dvc("checkout", "-q", check=False)
    (repo.path / "mlflow.db").unlink()
    shutil.rmtree(repo.path / "mlartifacts", ignore_errors=True)
    params = yaml.safe_load((repo.path / "params.yaml").read_text())
    params["evaluate"]["top_k"] = 3  # evaluate and later stages re-run; train's outputs come from the cache
    (repo.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = repo.dvc("repro")
    text = out.stdout + out.stderr
    assert "restored" in text.lower() and "new run" in text.lower(), text[-4000:]
    provenance = repo.query("SELECT key, value FROM tags WHERE key LIKE 'restored_from.%'")
    assert {"restored_from.run_id", "restored_from.model_sha256"} <= {k for k, _ in provenance}, provenance
    assert repo.champion() is not None


def test_the_image_folder_is_a_dependency_of_the_download_stage(repo):
    """data.source (default data/images) is a DVC dependency: a new image makes `download` (and so
    everything after it) out of date."""
    (repo.path / "data" / "images" / "cat").mkdir(parents=True, exist_ok=True)
    (repo.path / "data" / "images" / "cat" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    status = repo.dvc("status").stdout
    assert "download:" in status and "data/images" in status, status
