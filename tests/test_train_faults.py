"""Training killed with SIGKILL at random points never leaves a corrupt checkpoint or output.

A short lenet5 run on a 2000-image MNIST subset (40 epochs, a checkpoint after each) is killed three
times at seeded random points (a random 0-0.3 s after a random epoch line 2-6 epochs into each run,
so the kill lands inside an epoch or its checkpoint write whatever the machine's speed), then once just
after its last epoch line (while model.pt, metrics.json, history.csv and curves.png are written).
After every kill each file under outputs/ and checkpoints/ must load (torch.load weights_only=True,
json.load, csv, PNG), a final name never holds an atomic writer's temporary file, and progress is
kept; finally a re-run completes. Data from DATA_MIRROR (default <repo>/../shared/data), MLflow in
the project's own SQLite file (tests/stages.py).
"""
from __future__ import annotations

import csv
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.harness import mirror_path
from tests.stages import run_stage, stage_env, write_params

MIRROR = mirror_path()

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ARCH = "lenet5"
EPOCHS = 40
SEED = 20261122
#: pipeline/atomic.py: tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp") beside the final file
TEMP_NAME = re.compile(r"^\..+\.[^.]+\.tmp$")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    if not (MIRROR / "mnist").is_dir():
        pytest.skip(f"no MNIST mirror in {MIRROR} (set DATA_MIRROR)")
    project = tmp_path_factory.mktemp("train_faults")
    write_params(project, {ARCH: {"epochs": EPOCHS}}, limit=2000)
    run_stage(project, "pipeline.download", timeout=300)
    return project


def check_files(project: Path) -> dict:
    """Every file under outputs/ and checkpoints/ is complete; returns what was found."""
    found: dict = {"files": [], "leftover_temps": []}
    for folder in (project / "outputs", project / "checkpoints"):
        if not folder.exists():
            continue
        for path in sorted(folder.rglob("*")):
            if TEMP_NAME.match(path.name):
                found["leftover_temps"].append(str(path.relative_to(project)))
                continue  # never read as an output: no stage looks for these names
            if not path.is_file():
                continue
            rel = str(path.relative_to(project))
            found["files"].append(rel)
            if path.suffix == ".pt":
                state = torch.load(path, map_location="cpu", weights_only=True)
                assert isinstance(state, dict) and state, rel
                if path.name == "last.pt":
                    assert set(state) >= {"model", "optimizer", "scheduler", "epoch", "fingerprint"}, rel
                    found["checkpoint_epoch"] = state["epoch"]
                else:
                    assert state["arch"] == ARCH and state["state_dict"], rel
            elif path.suffix == ".json":
                data = json.loads(path.read_text())
                if path.name == "metrics.json":
                    assert 0 <= data["val_acc"] <= 1, rel
            elif path.suffix == ".csv":
                rows = list(csv.DictReader(path.open()))
                assert rows and rows[-1]["epoch"] == str(len(rows)), rel
            elif path.suffix == ".png":
                with Image.open(path) as img:
                    img.verify()
    return found


def run_and_kill(project: Path, wait_for: str, delay: float, timeout: float = 120) -> dict:
    """Start training, wait for a stdout line containing `wait_for`, sleep `delay`, SIGKILL it."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-u", "-m", "pipeline.train", "--arch", ARCH], cwd=project,
                            env=stage_env(project), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    seen = threading.Event()

    def reader() -> None:  # keeps draining stdout so the child never blocks on a full pipe
        for line in proc.stdout:
            lines.append(line)
            if wait_for in line:
                seen.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not seen.is_set() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen.is_set(), "".join(lines)[-3000:]
        time.sleep(delay)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)  # the training process started above
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    thread.join(timeout=10)
    found_at = time.monotonic() - started
    epochs = [line for line in lines if "  loss " in line]
    return {"run_s": round(found_at, 1), "killed_alive": alive, "returncode": proc.returncode,
            "last_epoch_line": epochs[-1].split("  ")[0].strip() if epochs else None}


def test_sigkill_at_random_points_leaves_no_corrupt_file(project):
    rng = random.Random(SEED)
    report = []
    progress = 0
    for _ in range(3):  # during the epochs: a checkpoint is written after every one
        # counted in epochs, not seconds: a fast machine finished all 40 epochs within a fixed delay
        line = progress + rng.randint(2, 6)  # an epoch line of this run (it resumes after `progress`)
        delay = round(rng.uniform(0.0, 0.3), 3)
        outcome = run_and_kill(project, f"epoch {line}/{EPOCHS}  loss", delay)
        found = check_files(project)
        report.append({"after_epoch_line": line, "delay_s": delay, **outcome, **found})
        assert outcome["killed_alive"] and outcome["returncode"] == -signal.SIGKILL, report
        assert not (project / "outputs" / ARCH / "model.pt").exists(), report  # not finished yet
        epoch = found.get("checkpoint_epoch", 0)
        assert epoch >= progress, report  # resumed, never went back
        progress = epoch
    # once more while the outputs are being written (after the last epoch line)
    end_delay = round(rng.uniform(0.0, 0.5), 3)
    outcome = run_and_kill(project, f"epoch {EPOCHS}/{EPOCHS}", end_delay)
    found = check_files(project)
    report.append({"delay_s": end_delay, "phase": "writing outputs", **outcome, **found})

    started = time.perf_counter()
    out = run_stage(project, "pipeline.train", "--arch", ARCH, timeout=300)
    final = check_files(project)
    report.append({"rerun_s": round(time.perf_counter() - started, 1), **final})
    print("\ntrain kill figures:", json.dumps(report, indent=1))
    assert "resuming from checkpoint" in out.stdout  # the re-run continued, it did not start over
    arch = project / "outputs" / ARCH
    assert torch.load(arch / "model.pt", weights_only=True)["arch"] == ARCH
    assert json.loads((arch / "metrics.json").read_text())["val_acc"] > 0.5
    assert not (project / "checkpoints" / ARCH / "last.pt").exists()  # removed once complete
