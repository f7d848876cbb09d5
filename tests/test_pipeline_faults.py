"""Faults in the pipeline's outputs (issue 13): kill -9 anywhere leaves the old output or the new one,
whole, and nothing that the next run trusts or trips over.

- pipeline/atomic.py: outputs get the modes open() and mkdir() give (not mkstemp's 0o600); a writer
  SIGKILLed before each of its file-system calls (a forked child, killed by a profile hook: every
  state a kill can leave, deterministically) leaves the target old or new, and the next write
  removes the dead writer's temporaries, but never a live writer's.
- pipeline/download.py: the CIFAR-10 JPEG extraction, from a tarball the test builds; a partial
  folder left by an interrupted extraction, and an extraction SIGKILLed midway, are redone.
- the evaluate, export, promote and package stages, run for real (`python -m pipeline.<stage>` in a
  clone of the session's `exported_models` project), SIGKILLed at several points: each declared
  output (dvc.yaml outs/metrics) is absent or old as before, or complete and new; then a re-run
  succeeds and leaves no temporary behind.
- a full disk (RLIMIT_FSIZE: writes fail with EFBIG) during evaluate keeps the old eval folder; an
  unreachable tracking server fails evaluate, export, promote and package within seconds, outputs
  untouched.

The kill-point tests need RENAME_EXCHANGE (Linux >= 3.15 on ext4, xfs, btrfs, tmpfs) under tmp_path.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from pipeline import atomic, download
from tests.conftest import REPO_ROOT, Project, clone_project

NAME = "image-classifier"  # promote.registered_model in params.yaml


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """{relative path: bytes} of every file under `folder` (None when it does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    """Names an atomic writer's temporary can have (``.<target>.<pid>.<word>.tmp``, or the older
    ``.<target>.<random>.tmp``), anywhere under `folder`."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp"))


# --- atomic.py: modes ---------------------------------------------------------------------------------

@pytest.fixture
def umask_set():
    """Set the process umask for a test, restoring it after (the test is single-threaded)."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda value: os.umask(value)
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077], ids=oct)
def test_atomic_outputs_get_the_modes_open_and_mkdir_give(tmp_path, umask_set, mask):
    umask_set(mask)
    file = atomic.write_text(tmp_path / "out.json", "{}\n")
    with atomic.atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "inside.txt").write_text("x")
        atomic.write_text(tmp / "written.txt", "y")
    (tmp_path / "plain.txt").write_text("z")
    (tmp_path / "plain-folder").mkdir()
    mode = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    shown = {name: oct(m) for name, m in mode.items()}
    assert mode["out.json"] == mode["written.txt"] == mode["plain.txt"] == 0o666 & ~mask, shown
    assert mode["folder"] == mode["plain-folder"] == 0o777 & ~mask, shown
    assert file.read_text() == "{}\n"


def test_umask_is_read_without_changing_it(umask_set, monkeypatch):
    umask_set(0o027)
    assert atomic.umask() == 0o027
    real_open = open

    def no_proc(path, *args, **kwargs):  # not Linux: the probe-file fallback
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    assert atomic.umask() == 0o027
    monkeypatch.undo()
    assert os.umask(0o022) == 0o027  # still what the test set: never changed, not even for a moment


# --- atomic.py: SIGKILL before every file-system call --------------------------------------------------

def _touches_files(function) -> bool:
    """Is this C function one that can change the file system (posix.*, io.open, a file's methods)?"""
    owner = getattr(function, "__self__", None)
    return (getattr(function, "__module__", None) in ("posix", "io", "_io")
            or type(owner).__module__ in ("_io", "io"))


def run_killed_at(action: Callable[[], None], step: int) -> bool:
    """Run `action` in a forked child that SIGKILLs itself just before its `step`-th file-system
    call (1-based); True when it was killed, False when `action` made fewer calls and finished."""
    pid = os.fork()
    if pid == 0:  # the child: no cleanup of any kind runs after the kill, as with kill -9
        calls, code = 0, 1

        def hook(frame, event, function):
            nonlocal calls
            if event == "c_call" and _touches_files(function):
                calls += 1
                if calls == step:
                    os.kill(os.getpid(), signal.SIGKILL)

        sys.setprofile(hook)
        try:
            action()
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.setprofile(None)
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, -signal.SIGKILL), f"the action failed in the child (exit {code}) before call {step}"
    return code == -signal.SIGKILL


def every_kill(setup: Callable[[], None], action: Callable[[], None], check: Callable[[int], None]) -> int:
    """For step = 1, 2, ...: `setup()`, run `action` killed before its step-th call, `check(step)`;
    until `action` runs to the end. Returns how many kill points were tried."""
    for step in range(1, 10_000):
        setup()
        if not run_killed_at(action, step):
            return step - 1
        check(step)
    raise AssertionError("the action never finished")


@dataclass
class Outcomes:
    """What the kills left: the target's state after each, and what the next write did not clean up."""
    states: dict[int, str] = field(default_factory=dict)
    debris: dict[int, list[str]] = field(default_factory=dict)

    def assert_safe(self, points: int) -> None:
        torn = {step: state for step, state in self.states.items() if state not in ("old", "new")}
        assert not torn, f"kills that left the target torn or missing: {torn}"
        assert not self.debris, f"temporaries the next write left behind, per kill: {self.debris}"
        assert set(self.states.values()) == {"old", "new"} and points == len(self.states), (points, self.states)


def test_atomic_write_killed_at_any_step_leaves_old_or_new_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    old, new = b'{"old": 1}\n', b'{"new": 2, "padding": "' + b"x" * 100_000 + b'"}\n'
    seen = Outcomes()

    def check(step):
        data = target.read_bytes() if target.exists() else None
        seen.states[step] = {old: "old", new: "new"}.get(data, f"torn ({None if data is None else len(data)} bytes)")
        atomic.write_bytes(target, new)  # the next run
        assert target.read_bytes() == new
        if temporaries(target.parent):
            seen.debris[step] = temporaries(target.parent)
            for name in seen.debris[step]:  # so that the next kill point is judged on its own
                (target.parent / name).unlink()

    points = every_kill(lambda: atomic.write_bytes(target, old), lambda: atomic.write_bytes(target, new), check)
    assert points >= 5
    seen.assert_safe(points)


def test_atomic_dir_killed_at_any_step_leaves_old_or_new_whole_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "outputs" / "cnn" / "eval"
    old = {"metrics.json": b'{"test_acc": 0.1}\n', "stale.png": b"old picture"}
    new = {"metrics.json": b'{"test_acc": 0.9}\n', "per_class.json": b"{}\n", "sub/confusion.csv": b"a,b\n"}

    def write(files):
        with atomic.atomic_dir(target) as tmp:
            for name, data in files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)

    seen = Outcomes()

    def check(step):
        state = snapshot(target)
        seen.states[step] = "old" if state == old else "new" if state == new else f"{state and sorted(state)}"
        write(new)  # the next run
        assert snapshot(target) == new
        if temporaries(target.parent):
            seen.debris[step] = temporaries(target.parent)
            for name in seen.debris[step]:
                shutil.rmtree(target.parent / name)

    points = every_kill(lambda: write(old), lambda: write(new), check)
    assert points >= 10
    seen.assert_safe(points)


def test_remove_tree_killed_at_any_step_leaves_all_or_nothing(tmp_path):
    """export's parity-gate failure removes exports/<arch>/: never a model.onnx without export.json."""
    target = tmp_path / "exports" / "cnn"
    whole = {"model.onnx": b"onnx" * 1000, "export.json": b"{}\n", "parity.json": b"{}\n"}

    def setup():
        with atomic.atomic_dir(target) as tmp:
            for name, data in whole.items():
                (tmp / name).write_bytes(data)

    def check(step):
        assert snapshot(target) in (whole, None), f"killed before call {step}: {sorted(snapshot(target))}"
        setup()  # the next write of that folder removes what the dead remover left
        assert temporaries(target.parent) == [], step

    assert every_kill(setup, lambda: atomic.remove_tree(target), check) >= 3
    atomic.remove_tree(target)
    assert not target.exists() and temporaries(target.parent) == []


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    """Two writers of one target (a concurrent run): cleaning up never takes the other's temporary."""
    target = tmp_path / "promotion.json"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".{target.name}.{sleeper.pid}.abc123.tmp"
        live.write_text("being written")
        other_target = tmp_path / f".{target.name}.v2.1.abc.tmp"  # a temporary of `promotion.json.v2`
        other_target.write_text("not ours")
        atomic.write_json(target, {"ok": True})
        assert live.exists() and other_target.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    atomic.write_json(target, {"ok": True})  # now its writer is gone
    assert not live.exists() and other_target.exists()


# --- download.py: the CIFAR-10 JPEG extraction ---------------------------------------------------------

CLASSES = ("airplane", "cat")


def cifar_mirror(folder: Path, per_class: int) -> Path:
    """A mirror holding cifar10/cifar10-train-jpg.tar.gz: train/<class>/NNNN.jpg, 32x32 JPEGs."""
    rng = np.random.default_rng(0)
    tar_path = folder / "mirror" / "cifar10" / "cifar10-train-jpg.tar.gz"
    tar_path.parent.mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    jpeg = buf.getvalue()  # one picture under every name: building the tarball stays fast
    with tarfile.open(tar_path, "w:gz", compresslevel=1) as tar:
        for cls in CLASSES:
            for i in range(per_class):
                info = tarfile.TarInfo(f"train/{cls}/{i:04d}.jpg")
                info.size = len(jpeg)
                tar.addfile(info, io.BytesIO(jpeg))
    return tar_path.parent.parent


def cifar_params():
    from pipeline.params import DataParams

    return DataParams(dataset="cifar10", image_size=32, channels=3, test_fraction=0.2, seed=0)


def test_a_partial_extraction_left_by_a_killed_run_is_not_trusted(tmp_path):
    mirror = cifar_mirror(tmp_path, per_class=20)
    raw = tmp_path / "raw"
    for cls in CLASSES:  # what `tar.extractall` straight into place left when it was killed
        (raw / "cifar10-jpg" / "train" / cls).mkdir(parents=True)
        (raw / "cifar10-jpg" / "train" / cls / "0000.jpg").write_bytes(b"\xff\xd8 half a file")
    ds = download.load_cifar10(cifar_params(), raw, mirror)
    assert len(ds.train.labels) + len(ds.test.labels) == 40 and ds.classes == list(CLASSES)
    again = download.load_cifar10(cifar_params(), raw, mirror)  # a complete extraction is reused
    assert np.array_equal(again.train.images, ds.train.images)
    assert [p.name for p in raw.iterdir()] == ["cifar10-jpg"]


@pytest.mark.integration
def test_an_extraction_killed_midway_is_redone_by_the_next_run(tmp_path):
    per_class = 800
    mirror = cifar_mirror(tmp_path, per_class=per_class)
    raw = tmp_path / "raw"
    raw.mkdir()
    code = ("import sys; from pathlib import Path; from pipeline import download; "
            "from tests.test_pipeline_faults import cifar_params; "
            "download.load_cifar10(cifar_params(), Path(sys.argv[1]), Path(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(raw), str(mirror)], cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stderr=subprocess.PIPE, text=True)
    try:  # kill -9 once a few hundred files are out, wherever the extraction writes them
        deadline = time.monotonic() + 120
        while sum(1 for _ in raw.rglob("*.jpg")) < 200:
            assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    extracted = sum(1 for _ in raw.rglob("*.jpg"))
    assert proc.returncode == -signal.SIGKILL and extracted < 2 * per_class, extracted  # killed midway
    assert not (raw / "cifar10-jpg").exists()  # only a temporary holds the part: nothing to trust

    ds = download.load_cifar10(cifar_params(), raw, mirror)
    assert len(ds.train.labels) + len(ds.test.labels) == 2 * per_class
    assert [p.name for p in raw.iterdir()] == ["cifar10-jpg"]  # the dead run's temporary is gone


# --- the stages, SIGKILLed for real ---------------------------------------------------------------------

#: a kill trigger: made when the stage starts, then asked (with the stage's stdout lines so far)
#: every millisecond whether to kill now
Trigger = Callable[[], Callable[[list[str]], bool]]


@dataclass
class Kill:
    """What one kill hit: whether its trigger fired and the stage was still running."""
    trigger: str
    fired: bool
    alive: bool
    after_s: float
    output: list[str] = field(default_factory=list)


def kill_stage(project: Project, env: dict, args: list[str], trigger: Trigger, name: str,
               delay: float = 0.0, timeout: float = 180) -> Kill:
    """Start `python -m <args>`, wait for `trigger`, sleep `delay`, SIGKILL it."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-u", "-m", *args], cwd=project.path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready = trigger()
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # drains the pipe
    reader.start()
    try:
        deadline = started + timeout
        while not (fired := ready(lines)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(delay)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)  # the stage started above
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    reader.join(10)
    return Kill(name, fired, alive, round(time.monotonic() - started, 2), lines)


def appears(folder: Path, pattern: str) -> Trigger:
    """An entry matching `pattern` appears in `folder` that was not there when the stage started
    (a dead run's leftovers do not count)."""
    def make():
        existing = set(folder.glob(pattern)) if folder.is_dir() else set()
        return lambda _lines: folder.is_dir() and bool(set(folder.glob(pattern)) - existing)
    return make


def changes(file: Path) -> Trigger:
    """`file` is created, or replaced with other bytes."""
    def make():
        before = file.read_bytes() if file.exists() else None
        return lambda _lines: file.exists() and file.read_bytes() != before
    return make


def after(seconds: float) -> Trigger:
    def make():
        start = time.monotonic()
        return lambda _lines: time.monotonic() - start > seconds
    return make


def printed(text: str) -> Trigger:
    return lambda: lambda lines: any(text in line for line in list(lines))


@pytest.fixture
def clone(exported_models, tmp_path) -> Project:
    """A private copy of the session's project where train, evaluate and export ran for cnn and mlp."""
    return clone_project(exported_models, tmp_path / "project")


def stage_env(project: Project, home: Path) -> dict[str, str]:
    return project.env(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true")


def report(stage: str, kills: list[Kill], states: list) -> None:
    print(f"\n{stage} kills:", json.dumps([(k.trigger, k.fired, k.alive, k.after_s, s) for k, s in zip(kills, states)]))
    assert all(k.fired and k.alive for k in kills), [(k.trigger, k.fired, k.alive, "".join(k.output)[-2000:])
                                                     for k in kills]


def check_png(path: Path) -> None:
    with Image.open(path) as img:
        img.verify()


EVAL_FILES = ["confusion.csv", "confusion.png", "feature_maps.png", "metrics.json", "misclassified.png",
              "per_class.json"]


def check_eval(folder: Path, before: dict) -> str:
    """outputs/<arch>/eval/ (every evaluate out, metric and plot) is the old folder or a complete new one."""
    state = snapshot(folder)
    if state == before:
        return "old"
    assert state is not None and sorted(state) == EVAL_FILES, state and sorted(state)
    metrics = json.loads(state["metrics.json"])
    assert 0 <= metrics["test_acc"] <= 1 and metrics["test_count"] > 0
    assert len(json.loads(state["per_class.json"])) == 10
    rows = state["confusion.csv"].decode().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == metrics["test_count"] + 1
    for name in ("confusion.png", "feature_maps.png", "misclassified.png"):
        check_png(folder / name)
    return "new"


@pytest.mark.slow
@pytest.mark.integration
def test_kill_9_during_evaluate_leaves_the_old_or_new_eval_folder_and_rerun_cleans_up(clone, tmp_path):
    arch_dir = clone.path / "outputs" / "mlp"
    folder = arch_dir / "eval"
    before = snapshot(folder)
    env = stage_env(clone, tmp_path / "bentoml")
    args = ["pipeline.evaluate", "--arch", "mlp"]
    plan = [(after(1.0), "1 s in (loading, evaluating)", 0.0),
            (appears(arch_dir, ".eval.*.tmp"), "its temporary folder appeared (writing)", 0.0),
            (appears(arch_dir, ".eval.*.tmp"), "its temporary folder appeared, 0.3 s on", 0.3),
            (printed("evaluate: mlp:"), "outputs written (logging to MLflow)", 0.0)]
    kills, states = [], []
    for trigger, name, delay in plan:
        kills.append(kill_stage(clone, env, args, trigger, name, delay))
        states.append((check_eval(folder, before), temporaries(arch_dir)))
    report("evaluate", kills, states)
    assert states[1][0] == "old" and states[1][1], states  # killed mid-write: the old folder, a dead temporary
    assert states[-1][0] == "new", states
    clone.run(*args, env=env)
    assert check_eval(folder, before) == "new"
    assert temporaries(clone.path / "outputs") == []  # the dead runs' temporaries were removed


def check_export(folder: Path, before: dict) -> str:
    """exports/<arch>/ (model.onnx, export.json, parity.json) is the old folder or a complete new
    one whose files agree with each other."""
    import onnx

    state = snapshot(folder)
    assert state is not None and sorted(state) == ["export.json", "model.onnx", "parity.json"], state and sorted(state)
    summary = json.loads(state["export.json"])
    assert summary["passed"] and summary["onnx_sha256"] == hashlib.sha256(state["model.onnx"]).hexdigest()
    assert json.loads(state["parity.json"])["onnx_test_acc"] == summary["onnx_test_acc"]
    onnx.checker.check_model(onnx.load_from_string(state["model.onnx"]))
    return "old" if state == before else "new"


@pytest.mark.slow
@pytest.mark.integration
def test_kill_9_during_export_leaves_the_old_or_new_export_and_rerun_cleans_up(clone, tmp_path):
    folder = clone.path / "exports" / "mlp"
    marked = (folder / "export.json").read_text().replace('"arch"', '"old": true, "arch"', 1)
    (folder / "export.json").write_text(marked)  # so that a rewrite with the same bytes shows as new
    before = snapshot(folder)
    env = stage_env(clone, tmp_path / "bentoml")
    args = ["pipeline.export", "--arch", "mlp"]
    plan = [(after(2.0), "2 s in (loading, tracing)", 0.0),
            (appears(folder.parent, ".mlp.*.tmp"), "its temporary folder appeared (writing)", 0.0),
            (changes(folder / "export.json"), "the new folder is in place (logging to MLflow)", 0.0)]
    kills, states = [], []
    for trigger, name, delay in plan:
        kills.append(kill_stage(clone, env, args, trigger, name, delay))
        states.append(check_export(folder, before))
    report("export", kills, states)
    assert states == ["old", "old", "new"], states
    clone.run(*args, env=env)
    assert check_export(folder, before) == "new"
    assert temporaries(clone.path / "exports") == []


def registry_rows(project: Project, sql: str) -> list[tuple]:
    with sqlite3.connect(project.path / "mlflow.db") as con:
        return con.execute(sql).fetchall()


def check_registry(project: Project) -> list[dict]:
    """Each export registered at most once; the audit trail's entries."""
    shas = [v for (v,) in registry_rows(project, "SELECT value FROM model_version_tags WHERE key = 'onnx_sha256'")]
    assert len(shas) == len(set(shas)), shas
    return [json.loads(v) for (v,) in registry_rows(project, "SELECT value FROM registered_model_tags "
                                                            "WHERE key LIKE 'audit.%'")]


def check_json(path: Path, before: bytes | None, required: tuple[str, ...]) -> str:
    """A JSON output is absent or old as before, or complete and new."""
    if not path.exists():
        assert before is None, f"{path.name} disappeared"
        return "absent"
    data = path.read_bytes()
    assert set(required) <= set(json.loads(data)), data[:500]
    return "old" if data == before else "new"


@pytest.mark.slow
@pytest.mark.integration
def test_kill_9_during_promote_leaves_the_old_or_new_promotion_and_rerun_cleans_up(clone, tmp_path):
    out = clone.path / "release" / "promotion.json"
    env = stage_env(clone, tmp_path / "bentoml")
    keys = ("champion", "decision")
    # the registry lock's file appears when registration starts (and stays)
    first = kill_stage(clone, env, ["pipeline.promote"], appears(clone.path, f"mlflow.db.{NAME}.lock"),
                       "the registry lock was taken (registering)")
    kills, states = [first], [check_json(out, None, keys)]
    check_registry(clone)
    kills.append(kill_stage(clone, env, ["pipeline.promote"], after(first.after_s + 0.7), "0.7 s into registering"))
    states.append(check_json(out, None, keys))
    check_registry(clone)
    clone.run("pipeline.promote", env=env)  # the first complete run: cnn is champion
    old = out.read_bytes()
    assert json.loads(old)["champion"]["arch"] == "cnn"
    # a later run (DVC runs promote on every repro), killed while promotion.json exists
    kills.append(kill_stage(clone, env, ["pipeline.promote"], changes(out), "promotion.json replaced"))
    states.append(check_json(out, old, keys))
    report("promote", kills, states)
    assert states[-1] == "new", states
    clone.run("pipeline.promote", env=env)
    assert json.loads(out.read_text())["champion"]["arch"] == "cnn"
    audit = check_registry(clone)
    assert all(entry["state"] in ("done", "aborted") for entry in audit), audit  # a kill's pending change settled
    assert temporaries(clone.path / "release") == [] and temporaries(clone.path) == []


@pytest.mark.slow
@pytest.mark.integration
def test_kill_9_during_package_leaves_the_old_or_new_bento_json_and_rerun_cleans_up(clone, tmp_path):
    home = tmp_path / "bentoml"
    env = stage_env(clone, home)
    clone.run("pipeline.promote", env=env)
    out = clone.path / "release" / "bento.json"
    pointers = home / "aliases" / f"{NAME}.json"
    args = ["pipeline.package", "--no-build"]
    entries = home / "models" / NAME
    plan = [(after(2.0), "2 s in (loading)", 0.0),
            (appears(entries, "*"), "a store entry appeared (storing)", 0.0),
            (changes(pointers), "the alias pointer was written", 0.0)]
    kills, states = [], []
    for trigger, name, delay in plan:
        kills.append(kill_stage(clone, env, args, trigger, name, delay))
        states.append((check_json(out, None, ("tag", "registry_version")), check_json(pointers, None, ("champion",))))
    report("package", kills, states)
    assert states[-1][1] == "new", states
    rerun = clone.run(*args, env=env)
    assert "champion v1" in rerun.stdout, rerun.stdout
    bento = json.loads(out.read_text())
    assert json.loads(pointers.read_text())["champion"]["tag"] == bento["tag"]
    stored = [p.name for p in entries.iterdir() if p.is_dir()]
    assert len(stored) == 1, stored  # what a kill left half-copied was removed, v1 stored once
    assert temporaries(clone.path / "release") == [] and temporaries(home / "aliases") == []


# --- the stages against a full disk and an unreachable tracking server ------------------------------------

def file_size_limit(limit: int) -> Callable[[], None]:
    """preexec_fn: writes past `limit` bytes of any file fail with EFBIG, the OSError a full disk gives
    (SIGXFSZ ignored, so the write fails instead of killing the process)."""
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
@pytest.mark.integration
def test_a_full_disk_during_evaluate_keeps_the_old_eval_folder(clone, tmp_path):
    arch_dir = clone.path / "outputs" / "mlp"
    before = snapshot(arch_dir / "eval")
    # 8 KiB: metrics.json fits, confusion.csv (a row per test image) does not
    out = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--arch", "mlp"], cwd=clone.path,
                         env=stage_env(clone, tmp_path / "bentoml"), capture_output=True, text=True, timeout=300,
                         preexec_fn=file_size_limit(8192))
    assert out.returncode != 0 and "File too large" in out.stderr, out.stderr[-3000:]
    assert snapshot(arch_dir / "eval") == before
    assert temporaries(arch_dir) == []  # the half-written temporary folder was removed


STAGES_AND_OUTPUTS = [  # (stage, the exit code for an unusable store, what must not change)
    (["pipeline.evaluate", "--arch", "mlp"], 3, "outputs/mlp/eval"),
    (["pipeline.export", "--arch", "mlp"], 3, "exports/mlp"),
    (["pipeline.promote"], 3, "release"),
    (["pipeline.package", "--no-build"], 3, "release"),
]


@pytest.mark.slow
@pytest.mark.integration
def test_an_unreachable_tracking_server_fails_each_stage_fast_and_changes_no_output(clone, tmp_path):
    from tests.harness import free_port

    unreachable = f"http://127.0.0.1:{free_port()}"  # nothing listens there once the probe socket closed
    env = {**stage_env(clone, tmp_path / "bentoml"), "MLFLOW_TRACKING_URI": unreachable}
    timings = {}
    for args, code, output in STAGES_AND_OUTPUTS:
        before = snapshot(clone.path / output)
        started = time.monotonic()
        try:  # MLflow's own client retries for about four minutes
            out = subprocess.run([sys.executable, "-m", *args], cwd=clone.path, env=env, capture_output=True,
                                 text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{args[0]} was still waiting for {unreachable} after 60 s")
        timings[args[0]] = round(time.monotonic() - started, 1)
        assert out.returncode == code and f"{unreachable} is unreachable" in out.stderr, (args, out.stderr[-2000:])
        assert "Traceback" not in out.stderr, out.stderr[-3000:]
        assert snapshot(clone.path / output) == before, f"{args[0]} changed {output}"
    print("\nunreachable tracking server, seconds to fail:", timings)
