"""`imgcls`, the console script: each subcommand's happy path and a bad value, run for real (the installed
script, as a subprocess) in a clone of the session's exported project (a real MLflow store, real stages).

`imgcls serve` and predict-versus-HTTP are in tests/service/test_service_predict.py (they need a server).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import COMMANDS
from tests.conftest import Project, clone_project
from tests.harness import mnist_image_folder

pytestmark = [pytest.mark.slow, pytest.mark.integration]
IMGCLS = str(Path(sys.executable).with_name("imgcls"))


@pytest.fixture(scope="module")
def project(tmp_path_factory, exported_models) -> Project:
    proj = clone_project(exported_models, tmp_path_factory.mktemp("cli") / "project")
    proj.home = tmp_path_factory.mktemp("cli-bentoml")
    return proj


def imgcls(project: Project | None, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = project.env(BENTOML_HOME=str(project.home), BENTOML_DO_NOT_TRACK="true") if project else None
    return subprocess.run([IMGCLS, *args], cwd=project.path if project else None, env=env, capture_output=True,
                          text=True, timeout=timeout)


def fails(out: subprocess.CompletedProcess, code: int, *named: str) -> None:
    """Exit `code`, a message naming each of `named`, no traceback."""
    text = out.stdout + out.stderr
    assert out.returncode == code, (out.returncode, text[-3000:])
    assert "Traceback" not in text, text[-3000:]
    for value in named:
        assert value in text, (value, text[-3000:])


def test_help_lists_every_command_and_a_bad_command_exits_2():
    out = imgcls(None, "--help")
    assert out.returncode == 0 and all(name in out.stdout for name in COMMANDS)
    fails(imgcls(None), 2, "usage: imgcls")
    fails(imgcls(None, "trian"), 2, "'trian'", "train")
    for name in COMMANDS:
        helped = imgcls(None, name, "--help")
        assert helped.returncode == 0 and f"usage: imgcls {name}" in helped.stdout, (name, helped.stderr[-2000:])


def test_stage_commands_train_evaluate_export_promote_and_package(project):
    done = imgcls(project, "download")
    assert done.returncode == 0 and "download: mnist" in done.stdout, done.stderr[-3000:]
    fails(imgcls(project, "train", "--arch", "nosuch"), 2, "nosuch")
    fails(imgcls(project, "evaluate", "--arch", "nosuch"), 2, "nosuch")
    fails(imgcls(project, "export", "--arch", "resnet"), 2, "resnet")  # not listed, never trained
    fails(imgcls(project, "train", "--arch", "mlp", "--epoch", "3"), 2, "--epoch")
    for command in ("train", "evaluate", "export"):
        done = imgcls(project, command, "--arch", "mlp")
        assert done.returncode == 0, (command, done.stderr[-3000:])
    assert json.loads((project.path / "exports" / "mlp" / "export.json").read_text())["passed"] is True
    done = imgcls(project, "promote")
    assert done.returncode == 0 and "champion is v" in done.stdout, done.stderr[-3000:]
    listing = imgcls(project, "promote", "list")
    assert listing.returncode == 0 and "champion" in listing.stdout
    fails(imgcls(project, "promote", "set", "999"), 2, "999")
    fails(imgcls(project, "promote", "rollback"), 2, "no previous champion")
    done = imgcls(project, "package", "--no-build")
    assert done.returncode == 0 and "BentoML model" in done.stdout, done.stderr[-3000:]
    fails(imgcls(project, "package", "--no-build", "--alias", "nosuch"), 2, "nosuch")
    fails(imgcls(project, "download", "--params", "missing.yaml"), 2, "missing.yaml")
    fails(imgcls(project, "package", "--no-build", "--params", "missing.yaml"), 2, "missing.yaml")


def test_models_lists_the_zoo():
    from models import list_models

    out = imgcls(None, "models")
    assert out.returncode == 0 and [line.split()[0] for line in out.stdout.splitlines()[1:]] == list_models()
    fails(imgcls(None, "models", "--bogus"), 2, "--bogus")
    # a reader that leaves early (`| head -1`): exit 0, nothing on stderr (unbuffered: each row is a write)
    reader = subprocess.Popen([IMGCLS, "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    reader.stdout.readline()
    reader.stdout.close()
    assert reader.wait(timeout=120) == 0 and reader.stderr.read() == b""


@pytest.mark.parametrize("reader_left, code", [(True, 0), (False, 3)])
def test_a_broken_pipe_is_quiet_only_when_it_is_stdouts_reader_that_left(reader_left, code, tmp_path):
    script = ("import sys\nfrom pipeline import stage\n"
              "def main(argv):\n    raise BrokenPipeError(32, 'Broken pipe')\n"
              "sys.exit(stage.run('demo', main))\n")
    read_end, write_end = os.pipe()
    if reader_left:
        os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-c", script], stdout=write_end, stderr=subprocess.PIPE, text=True,
                              timeout=60, cwd=Path(__file__).parents[1])
    finally:
        os.close(write_end)
        if not reader_left:
            os.close(read_end)
    assert done.returncode == code and ("Broken pipe" in done.stderr) is not reader_left, done.stderr


@pytest.fixture(scope="module")
def digits(mnist, tmp_path_factory) -> Path:
    """60 real MNIST test digits as PNGs, in class folders."""
    return mnist_image_folder(mnist, tmp_path_factory.mktemp("digits") / "mnist", per_class=6)


def test_predict_from_the_registry_champion_to_csv(project, digits, tmp_path):
    if imgcls(project, "promote", "list").stdout.count("champion") == 0:
        assert imgcls(project, "promote").returncode == 0
    out = tmp_path / "predictions.csv"
    done = imgcls(project, "predict", str(digits), "-o", str(out), "--top-k", "2")  # model: params' champion
    assert done.returncode == 0, done.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert lines[0] == "path,label,index,score,top_k,error,reason,true_label" and len(lines) == 61
    assert "60 classified, 0 skipped" in done.stdout and "accuracy" in done.stdout
    glob = imgcls(project, "predict", f"{digits}/**/*.png", "--model", "models:/image-classifier/1", "--no-progress")
    assert glob.returncode == 0 and glob.stdout.count("\n") == 61, glob.stderr[-3000:]  # CSV on stdout


def test_predict_names_every_bad_value_and_writes_nothing(project, digits, tmp_path):
    out = tmp_path / "out.csv"
    model = str(project.path / "exports" / "cnn" / "model.onnx")
    cases = [
        (["/no/such/folder"], "/no/such/folder"),
        ([f"{digits}/*.jpeg"], "matches no image file"),
        ([str(digits), "--model", "nosuch.onnx"], "nosuch.onnx"),
        ([str(digits), "--model", str(next((digits / "7").glob("*.png")))], "not a classifier"),
        ([str(digits), "--model", "models:/image-classifier@nosuch"], "nosuch"),
        ([str(digits), "--model", "models:/image-classifier/x"], "models:/image-classifier/x"),
        ([str(digits), "--model", model, "-o", str(tmp_path / "out.txt")], "out.txt"),
        ([str(digits), "--model", model, "--top-k", "0"], "--top-k"),
        ([str(digits), "--model", model, "--batch-size", "many"], "many"),
        ([str(digits), "--model", model, "--workers", "-1"], "--workers"),
    ]
    for args, named in cases:
        fails(imgcls(project, "predict", *args, "-o", str(out)) if "-o" not in args else imgcls(project, "predict", *args),
              2, named)
        assert not out.exists() and not (tmp_path / "out.txt").exists(), args
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_text("not an image")
    fails(imgcls(project, "predict", str(tmp_path / "junk"), "--model", model, "-o", str(out)), 2, "none of the 1 files")
    assert "not_an_image" in out.read_text()  # the output still says why, per file
