"""The train stage on a real MNIST subset: outputs and MLflow run, kill -9 and resume, 2-process DDP,
stale checkpoints, and the batched augmentation.

End-to-end tests (marked slow) run `python -m pipeline.train` in a throwaway project folder holding a
copy of the session's prepared 3000-image subset (conftest.py: `prepared_mnist`).
"""
from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from pipeline.params import AugmentParams
from pipeline.train import BatchMaker, fingerprint, load_checkpoint, random_affine, random_pixels, save_checkpoint

TRAIN = {"lr": 0.05, "schedule": "onecycle", "optimizer": "sgd", "batch_size": 64, "channels_last": True}
OUTPUT_FILES = ("model.pt", "metrics.json", "history.csv", "curves.png")


@pytest.fixture
def trained_project(project, prepared_mnist):
    """A project folder with the prepared subset in data/prepared."""
    project.copy_prepared(prepared_mnist)
    return project


def read_history(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def epoch_lines(stdout, total):
    return [line for line in stdout.splitlines() if f"/{total}  loss" in line and " epoch " in line]


def mlflow_client(project):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=project.tracking_uri)


# --- (a) a short real training ---------------------------------------------------------------------

@pytest.mark.slow
def test_training_writes_outputs_and_an_mlflow_run(trained_project):
    project = trained_project
    project.write_params({"cnn": {"epochs": 2}}, train=TRAIN)
    out = project.run("pipeline.train", "--arch", "cnn")
    assert "on cpu" in out.stdout and "world size 1" in out.stdout
    assert [line.split(" epoch ")[1].split()[0] for line in epoch_lines(out.stdout, 2)] == ["1/2", "2/2"]

    arch = project.path / "outputs" / "cnn"
    assert sorted(p.name for p in arch.iterdir() if not p.name.startswith(".")) == sorted(OUTPUT_FILES)
    metrics = json.loads((arch / "metrics.json").read_text())
    assert metrics["val_acc"] > 0.8, metrics
    assert 0 < metrics["val_loss"] < 1 and metrics["train_images_per_sec"] > 0

    model_file = torch.load(arch / "model.pt", weights_only=True)
    assert model_file["arch"] == "cnn" and model_file["dataset"] == "mnist"
    assert (model_file["in_channels"], model_file["image_size"], model_file["num_classes"]) == (1, 28, 10)
    card = json.loads((project.path / "data" / "prepared" / "card.json").read_text())
    assert model_file["mean"] == card["mean"] and model_file["std"] == card["std"]
    assert model_file["classes"] == card["classes"]
    from models import create_model

    model = create_model("cnn", 1, 10, 28, **model_file["kwargs"])
    model.load_state_dict(model_file["state_dict"])  # loads into a fresh model, strict

    history = read_history(arch / "history.csv")
    assert [int(row["epoch"]) for row in history] == [1, 2]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_sec"} <= set(history[0])
    assert float(history[-1]["val_acc"]) == pytest.approx(metrics["val_acc"], abs=1e-4)
    assert float(history[1]["train_loss"]) < float(history[0]["train_loss"])
    assert (arch / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (project.path / "checkpoints" / "cnn" / "last.pt").exists()  # removed once complete

    client = mlflow_client(project)
    run = client.get_run(model_file["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    params = run.data.params
    assert params["arch"] == "cnn" and params["dataset"] == "mnist" and params["device"] == "cpu"
    assert int(params["epochs"]) == 2 and float(params["lr"]) == TRAIN["lr"]
    assert int(params["batch_size"]) == TRAIN["batch_size"] and int(params["num_params"]) == 8490
    val_acc = client.get_metric_history(run.info.run_id, "val_acc")
    assert len(val_acc) == 2 and sorted(m.step for m in val_acc) == [1, 2]
    assert sorted(m.value for m in val_acc)[-1] == pytest.approx(max(float(r["val_acc"]) for r in history), abs=1e-4)
    for key in ("train_loss", "train_acc", "val_loss", "lr", "images_per_sec"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    assert run.data.metrics["final_val_acc"] == pytest.approx(metrics["val_acc"], abs=1e-4)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"dataset_card.json", "model_summary.json"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "dataset_card.json", str(project.path))
    assert json.loads(open(local).read()) == card
    assert {a.path for a in client.list_artifacts(run.info.run_id, "train")} >= {
        "train/metrics.json", "train/history.csv", "train/curves.png"}


# --- (b) kill -9 mid-run, then resume --------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_mid_run_then_resume(trained_project):
    project = trained_project
    epochs = 6
    project.write_params({"cnn": {"epochs": epochs}}, train=TRAIN)
    ckpt = project.path / "checkpoints" / "cnn" / "last.pt"
    model_pt = project.path / "outputs" / "cnn" / "model.pt"

    proc = project.popen("pipeline.train", "--arch", "cnn")
    seen = []
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            seen.append(line)
            if f"epoch 2/{epochs}" in line:  # epoch 2 finished: its checkpoint is being written now
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "".join(seen)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)

    assert not model_pt.exists()
    assert not (project.path / "outputs" / "cnn" / "metrics.json").exists()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    killed_after = state["epoch"]
    assert 1 <= killed_after < epochs
    assert {"model", "optimizer", "scheduler", "epoch", "params", "fingerprint", "history"} <= set(state)
    assert [row["epoch"] for row in state["history"]] == list(range(1, killed_after + 1))

    out = project.run("pipeline.train", "--arch", "cnn")
    assert f"resuming from checkpoint checkpoints/cnn/last.pt after epoch {killed_after}" in out.stdout, out.stdout
    ran = [int(line.split(" epoch ")[1].split("/")[0]) for line in epoch_lines(out.stdout, epochs)]
    assert ran == list(range(killed_after + 1, epochs + 1)), out.stdout  # nothing trained twice

    history = read_history(project.path / "outputs" / "cnn" / "history.csv")
    assert [int(row["epoch"]) for row in history] == list(range(1, epochs + 1))
    for row, saved in zip(history, state["history"]):  # the epochs before the kill come from the checkpoint
        assert float(row["val_acc"]) == pytest.approx(saved["val_acc"]) and float(row["lr"]) == pytest.approx(saved["lr"])
    metrics = json.loads((project.path / "outputs" / "cnn" / "metrics.json").read_text())
    assert metrics["val_acc"] > 0.85, metrics
    assert not ckpt.exists()

    model_file = torch.load(model_pt, weights_only=True)
    assert model_file["mlflow_run_id"] == state["mlflow_run_id"]  # the same MLflow run, resumed
    client = mlflow_client(project)
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_acc")} == set(range(1, epochs + 1))


# --- (c) two processes, DistributedDataParallel on CPU ---------------------------------------------

@pytest.mark.slow
def test_two_process_ddp_through_torchrun(trained_project):
    project = trained_project
    project.write_params({"cnn": {"epochs": 2}}, train=TRAIN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.train", "--arch", "cnn"]
    out = subprocess.run(cmd, cwd=project.path, env=project.env(OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "world size 2" in out.stdout, out.stdout
    assert len(epoch_lines(out.stdout, 2)) == 2, out.stdout  # rank 0 alone reports, once per epoch

    arch = project.path / "outputs" / "cnn"
    assert all((arch / name).is_file() for name in OUTPUT_FILES)
    metrics = json.loads((arch / "metrics.json").read_text())
    assert metrics["val_acc"] > 0.8, metrics
    model_file = torch.load(arch / "model.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in model_file["state_dict"])  # saved unwrapped
    assert not (project.path / "checkpoints" / "cnn" / "last.pt").exists()

    client = mlflow_client(project)
    run = client.get_run(model_file["mlflow_run_id"])
    assert run.data.params["world_size"] == "2" and run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # rank 1 logged nothing


# --- (e) a stale checkpoint (other params) is ignored ----------------------------------------------

@pytest.mark.slow
def test_a_checkpoint_for_other_params_is_ignored(trained_project):
    project = trained_project
    ckpt = project.path / "checkpoints" / "cnn" / "last.pt"
    project.write_params({"cnn": {"epochs": 2}}, train=TRAIN)
    project.run("pipeline.train", "--arch", "cnn", "--stop-after-epochs", "1")
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1 and not (project.path / "outputs" / "cnn").exists()

    project.write_params({"cnn": {"epochs": 2}}, train={**TRAIN, "lr": 0.04})  # the fingerprint changes
    out = project.run("pipeline.train", "--arch", "cnn")
    assert "resuming" not in out.stdout
    assert "for other params" in out.stderr, out.stderr
    assert [line.split(" epoch ")[1].split()[0] for line in epoch_lines(out.stdout, 2)] == ["1/2", "2/2"]
    assert [int(r["epoch"]) for r in read_history(project.path / "outputs" / "cnn" / "history.csv")] == [1, 2]
    assert not ckpt.exists()


def test_load_checkpoint_checks_the_fingerprint(tmp_path):
    path = tmp_path / "last.pt"
    config = {"arch": "cnn", "train": {"lr": 0.1, "epochs": 3}, "world_size": 1}
    save_checkpoint(path, {"fingerprint": fingerprint(config), "epoch": 2, "history": []})
    assert load_checkpoint(path, fingerprint(config))["epoch"] == 2
    assert load_checkpoint(path, fingerprint({**config, "world_size": 2})) is None
    assert load_checkpoint(path, fingerprint({**config, "train": {"lr": 0.2, "epochs": 3}})) is None
    assert load_checkpoint(tmp_path / "missing.pt", fingerprint(config)) is None
    path.write_bytes(path.read_bytes()[:50])  # truncated: train from scratch rather than crash
    assert load_checkpoint(path, fingerprint(config)) is None


def test_fingerprint_is_stable_and_sensitive():
    a = {"arch": "cnn", "train": {"lr": 0.1, "epochs": 3}}
    assert fingerprint(a) == fingerprint({"train": {"epochs": 3, "lr": 0.1}, "arch": "cnn"})  # key order
    assert fingerprint(a) != fingerprint({"arch": "cnn", "train": {"lr": 0.1, "epochs": 4}})


def test_a_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"fingerprint": "x", "epoch": 1, "evil": EvilPickle()}, path)
    assert load_checkpoint(path, "x") is None  # weights_only=True: arbitrary objects are not unpickled


class EvilPickle:
    pass


# --- (d) the batched augmentation ------------------------------------------------------------------

def images(batch=64, channels=3, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=gen)


def test_augmentation_disabled_is_the_identity():
    x = images()
    out = random_affine(x, AugmentParams(translate=0, hflip=False, rotate_degrees=0), torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.allclose(out, x, atol=1e-5)


def test_hflip_only_flips_exactly_and_sometimes():
    x = images()
    out = random_affine(x, AugmentParams(hflip=True), torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    flipped = kept = 0
    for original, augmented in zip(x, out):
        if torch.allclose(augmented, original.flip(-1), atol=1e-5):
            flipped += 1
        elif torch.allclose(augmented, original, atol=1e-5):
            kept += 1
    assert flipped + kept == len(x), "every image is either unchanged or mirrored left-right"
    assert 10 < flipped < 54, flipped  # about half of 64


def shift(image, dx, dy):
    """`image` [C, H, W] sampled at (x + dx, y + dy), zeros outside (what a translation warp gives)."""
    out = torch.zeros_like(image)
    _, h, w = image.shape
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    ys_src, xs_src = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
    out[:, ys, xs] = image[:, ys_src, xs_src]
    return out


def test_translate_shifts_by_whole_pixels_within_the_limit():
    t = 3
    x = images(batch=32, channels=1, size=28)
    out = random_affine(x, AugmentParams(translate=t), torch.Generator().manual_seed(2))
    assert out.shape == x.shape
    shifts = []
    for original, augmented in zip(x, out):
        match = [(dx, dy) for dx in range(-t, t + 1) for dy in range(-t, t + 1)
                 if torch.allclose(augmented, shift(original, dx, dy), atol=1e-4)]
        assert len(match) == 1, "each image is the original moved by whole pixels, zero-filled"
        shifts.append(match[0])
    assert len(set(shifts)) > 5  # random per image


def test_rotation_keeps_shape_and_is_seeded():
    x = images(batch=8)
    aug = AugmentParams(rotate_degrees=30, translate=2, hflip=True)
    out = random_affine(x, aug, torch.Generator().manual_seed(3))
    again = random_affine(x, aug, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out, again)
    assert not torch.allclose(out, x, atol=1e-2)
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6  # bilinear: stays within the input range


def test_batch_maker_normalizes_and_uses_channels_last():
    make = BatchMaker([0.5], [0.25], torch.device("cpu"), channels_last=True)
    raw = torch.tensor([0, 255, 128], dtype=torch.uint8).repeat(4, 1, 28, 10)[..., :28]
    x = make(raw)
    assert x.shape == raw.shape and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x, (raw.float() / 255 - 0.5) / 0.25)
    assert math.isclose(float(x.max()), 2.0, abs_tol=1e-6) and math.isclose(float(x.min()), -2.0, abs_tol=1e-6)
    aug = BatchMaker([0.5], [0.25], torch.device("cpu"), channels_last=False)(
        raw, AugmentParams(hflip=True), torch.Generator().manual_seed(0))
    assert aug.shape == raw.shape and aug.is_contiguous()


def stroke_digits(batch: int = 32) -> torch.Tensor:
    """White strokes on black [B, 1, 28, 28]: a bar of width 3 and a ring, what the digit augments see."""
    x = torch.zeros(batch, 1, 28, 28)
    x[:, :, 6:22, 12:15] = 1.0
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    ring = ((ys - 14) ** 2 + (xs - 14) ** 2).sqrt()
    x[:, 0][:, (ring > 8) & (ring < 10)] = 1.0
    return x


def test_zoom_scales_the_ink_within_the_limit():
    x = stroke_digits()
    out = random_affine(x, AugmentParams(scale=0.2), torch.Generator().manual_seed(4))
    ratio = out.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))  # ink area scales with zoom squared
    assert ratio.min() > 0.8 ** 2 - 0.05 and ratio.max() < 1.2 ** 2 + 0.05
    assert ratio.max() - ratio.min() > 0.3  # random per image
    assert torch.allclose(random_affine(x, AugmentParams(scale=0.0), torch.Generator().manual_seed(4)), x, atol=1e-5)


def test_stroke_augment_thickens_and_thins_some_images():
    x = stroke_digits(64)
    out = random_pixels(x, AugmentParams(stroke=1.0), torch.Generator().manual_seed(5))
    ratio = out.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))
    assert (ratio > 1.2).sum() > 10 and (ratio < 0.8).sum() > 10
    assert out.min() >= 0 and out.max() <= 1 and out.shape == x.shape


def test_blur_and_noise_stay_in_range_and_are_seeded():
    x = stroke_digits(16)
    aug = AugmentParams(blur=1.0, noise=0.1)
    out = random_pixels(x, aug, torch.Generator().manual_seed(6))
    assert torch.equal(out, random_pixels(x, aug, torch.Generator().manual_seed(6)))
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x, atol=1e-2)
    assert torch.equal(random_pixels(x, AugmentParams(), torch.Generator().manual_seed(6)), x)


def test_the_separable_3x3_filters_are_the_pooling_they_replace():
    """Dilation and erosion are max_pool2d bit for bit (borders: in-bounds neighbours); any size,
    channels and memory format."""
    from pipeline.train import _extreme3x3

    gen = torch.Generator().manual_seed(7)
    for shape in ((16, 1, 28, 28), (4, 3, 32, 17), (2, 2, 3, 5)):
        x = torch.rand(shape, generator=gen)
        for t in (x, x.contiguous(memory_format=torch.channels_last)):
            assert torch.equal(_extreme3x3(t, torch.maximum), F.max_pool2d(t, 3, 1, 1))
            assert torch.equal(_extreme3x3(t, torch.minimum), -F.max_pool2d(-t, 3, 1, 1))


def test_the_batch_maker_applies_pixel_augments_without_a_warp():
    raw = (stroke_digits(8) * 255).to(torch.uint8)
    make = BatchMaker([0.0], [1.0], torch.device("cpu"), channels_last=False)
    aug = AugmentParams(stroke=1.0)
    assert aug.enabled and not aug.warps
    assert not torch.allclose(make(raw, aug, torch.Generator().manual_seed(0)), make(raw))


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 50])
def test_schedules_survive_runs_of_a_few_steps(steps):
    """A quick run (a tiny `data.limit`, one epoch) has only a few optimizer steps: OneCycleLR raised
    ZeroDivisionError at 5 steps with the default 0.2 warm-up."""
    import torch

    from pipeline.params import TrainParams
    from pipeline.train import make_scheduler

    for schedule in ("onecycle", "cosine", "constant"):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = make_scheduler(opt, TrainParams(epochs=1, schedule=schedule), steps)
        for _ in range(steps):
            opt.step()
            sched.step()
        assert all(g["lr"] >= 0 for g in opt.param_groups)
