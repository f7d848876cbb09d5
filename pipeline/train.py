"""Train stage: one architecture on the prepared dataset, logged to MLflow, resumable, DDP-ready.

    python -m pipeline.train --arch cnn
    torchrun --nproc_per_node 2 -m pipeline.train --arch cnn      # DistributedDataParallel

Fast data path: the whole uint8 dataset lives in memory (on the GPU when training there); batches
are index slices; augmentation is one batched affine warp; inputs and weights are channels_last.

Outputs (`outputs/<arch>/`): model.pt (weights + everything the later stages need), metrics.json,
history.csv (per-epoch curves, a DVC plot), curves.png. A checkpoint is written atomically after
every epoch to `checkpoints/<arch>/last.pt`; a re-run with the same params resumes from it.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models import create_model, summarize
from service.cpus import usable_cpus

from . import atomic, stage, tracking
from .download import Split, load_card, load_prepared, split_card, stratified_split
from .params import AugmentParams, Params, ParamsError, TrainParams, load_params
from .paths import PREPARED_DIR, arch_dir, checkpoint_path


# --- distributed context ----------------------------------------------------------------------------

@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_kind: str) -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device_kind == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return ctx


# --- devices and precision --------------------------------------------------------------------------

def resolve_device(p: TrainParams, local_rank: int = 0) -> torch.device:
    if p.device == "cuda" and not torch.cuda.is_available():
        raise ParamsError("params: train.device = 'cuda' but no CUDA device is available")
    if p.device == "cuda" or (p.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def amp_dtype(p: TrainParams, device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA only: bf16 where the GPU supports it (no loss scaling needed), else fp16."""
    if device.type != "cuda" or p.amp == "off":
        return None
    if p.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[p.amp]


def configure_threads(ctx: DistContext) -> None:
    """Split the CPUs this process may use (affinity, cgroup quota: service.cpus) between the processes
    of this node so they don't oversubscribe the CPU."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    torch.set_num_threads(max(1, usable_cpus() // max(1, local_world)))


# --- data on the device -----------------------------------------------------------------------------

@dataclass
class DeviceData:
    """A split held on the training device: uint8 images [N, C, H, W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_split(cls, split: Split, device: torch.device) -> "DeviceData":
        return cls(torch.from_numpy(split.images).to(device), torch.from_numpy(split.labels).to(device))

    def __len__(self) -> int:
        return len(self.labels)


def random_affine(x: torch.Tensor, aug: AugmentParams, gen: torch.Generator) -> torch.Tensor:
    """One random rotation / zoom / translation / horizontal flip per image, as a single batched warp.

    x: float [B, C, H, W] on the 0..1 scale; areas moved in from outside the image are 0 (black).
    A translation of t pixels is 2t/W in affine_grid's normalized coordinates; a zoom by z samples
    the source at 1/z of the spacing.
    """
    b, _, h, w = x.shape
    rand = lambda *shape: torch.rand(*shape, generator=gen, device=gen.device)  # noqa: E731
    angle = (rand(b) * 2 - 1) * math.radians(aug.rotate_degrees)
    flip = torch.where(rand(b) < 0.5, -1.0, 1.0) if aug.hflip else torch.ones(b, device=gen.device)
    inv_zoom = 1.0 / (1.0 + (rand(b) * 2 - 1) * aug.scale)
    shift = torch.floor(rand(b, 2) * (2 * aug.translate + 1)) - aug.translate  # integer pixels
    cos, sin = torch.cos(angle) * inv_zoom, torch.sin(angle) * inv_zoom
    theta = torch.stack([
        torch.stack([cos * flip, -sin, shift[:, 0] * 2 / w], dim=1),
        torch.stack([sin * flip, cos, shift[:, 1] * 2 / h], dim=1),
    ], dim=1).to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_pixels(x: torch.Tensor, aug: AugmentParams, gen: torch.Generator) -> torch.Tensor:
    """What a digit's normalization cannot remove, per image: stroke width (a random share of a 3x3
    dilation or erosion blended in: pen and font weights), blur (a share of a 3x3 box blur: focus,
    JPEG) and Gaussian noise (sensor, paper). x: float [B, C, H, W] on the 0..1 scale, light ink."""
    b = x.shape[0]
    rand = lambda: torch.rand(b, 1, 1, 1, generator=gen, device=gen.device).to(x.device)  # noqa: E731
    if aug.stroke:
        share = (rand() * 2 - 1) * aug.stroke  # > 0 thicker, < 0 thinner
        target = torch.where(share > 0, _extreme3x3(x, torch.maximum), _extreme3x3(x, torch.minimum))
        x = x + share.abs() * (target - x)
    if aug.blur:
        x = x + rand() * aug.blur * (F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) - x)
    if aug.noise:
        noise = torch.randn(x.shape, generator=gen, device=gen.device).to(x.device)
        x = (x + rand() * aug.noise * noise).clamp_(0, 1)
    return x


def _extreme3x3(x: torch.Tensor, pick) -> torch.Tensor:
    """The 3x3 neighbourhood maximum (``pick=torch.maximum``: ``max_pool2d(x, 3, 1, 1)``, bit for bit)
    or minimum, in-bounds neighbours only, as two separable passes over shifted views: ~0.17 ms for
    [128, 1, 28, 28] against max_pool2d's ~1.5 ms (torch 2.14, 2 CPU threads)."""
    fill = float("-inf") if pick is torch.maximum else float("inf")
    p = F.pad(x, (1, 1, 1, 1), value=fill)
    rows = pick(pick(p[..., :-2, :], p[..., 1:-1, :]), p[..., 2:, :])
    return pick(pick(rows[..., :-2], rows[..., 1:-1]), rows[..., 2:])


class BatchMaker:
    """Turns uint8 batches into normalized float inputs: (x / 255 - mean) / std, per channel.

    The contract's formula (``service.contract.normalize``) in torch, on the training device, with
    the augmentation between its two steps; tests/test_contract.py checks they agree."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, channels_last: bool):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor, aug: AugmentParams | None = None, gen=None) -> torch.Tensor:
        x = images.float().div_(255)
        if aug is not None and aug.warps:
            x = random_affine(x, aug, gen)
        if aug is not None and aug.enabled:
            x = random_pixels(x, aug, gen)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)


def epoch_indices(n: int, epoch: int, seed: int, ctx: DistContext, device: torch.device) -> torch.Tensor:
    """This rank's share of a permutation that depends only on (seed, epoch): resumable and DDP-safe."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen)
    return order[ctx.rank::ctx.world_size].to(device)


# --- optimization -----------------------------------------------------------------------------------

def make_optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    """Weight decay on weights of conv and linear layers only, not on biases and norm scales."""
    decay = [t for t in model.parameters() if t.requires_grad and t.ndim > 1]
    no_decay = [t for t in model.parameters() if t.requires_grad and t.ndim <= 1]
    groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if p.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, nesterov=p.nesterov and p.momentum > 0)
    return torch.optim.AdamW(groups, lr=p.lr)


def make_scheduler(opt: torch.optim.Optimizer, p: TrainParams, steps_per_epoch: int):
    total = p.epochs * steps_per_epoch
    warmup = int(total * p.warmup_fraction)
    if p.schedule == "onecycle" and total >= 4:
        # OneCycleLR divides by each phase's length in steps: keep both >= 2 steps (a tiny quick run
        # of 5 steps at warm-up 0.2 raised ZeroDivisionError)
        pct = min(max(p.warmup_fraction, 2 / total), 1 - 2 / total)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=total, pct_start=pct,
                                                   cycle_momentum=False)

    def factor(step: int) -> float:  # linear warm-up, then cosine to zero (or constant)
        if step < warmup:
            return (step + 1) / warmup
        if p.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --- one epoch --------------------------------------------------------------------------------------

@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_sec(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def _reduce(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Sum per-rank counters across processes (float64 so counts stay exact)."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, leave=False, dynamic_ncols=True)


@dataclass
class Fit:
    """What a training run steps with: built once by :func:`build_fit`, read by :func:`train_epoch`."""

    model: nn.Module
    make_batch: BatchMaker
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    p: TrainParams
    ctx: DistContext
    dataset: str  # selects the augmentation (TrainParams.augment_for)
    autocast_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch; (loss, logits)."""
        device_type = x.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.model(x)
            loss = self.loss_fn(logits, y)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.sched.step()
        return loss, logits


def train_epoch(fit: Fit, data: DeviceData, epoch: int, show_progress: bool = False) -> EpochStats:
    p, ctx = fit.p, fit.ctx
    fit.model.train()
    device = data.images.device
    indices = epoch_indices(len(data), epoch, p.seed, ctx, device)
    batch = max(1, p.batch_size // ctx.world_size)  # global batch = train.batch_size
    steps = len(data) // ctx.world_size // batch  # whole batches from the smallest shard: equal on every rank
    aug = p.augment_for(fit.dataset)
    gen = torch.Generator(device=device).manual_seed(p.seed * 7919 + epoch * 31 + ctx.rank)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    bar = progress_bar(steps * batch, f"epoch {epoch + 1}/{p.epochs}", show_progress and ctx.is_main)
    start = time.perf_counter()
    for step in range(steps):
        idx = indices[step * batch:(step + 1) * batch]
        y = data.labels[idx]
        loss, logits = fit.step(fit.make_batch(data.images[idx], aug, gen), y)
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.argmax(1) == y).sum()
        if bar is not None:
            bar.update(len(y))
            if step % 20 == 0:
                seen = (step + 1) * batch
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    total_loss, total_correct, images = _reduce([loss_sum.item(), float(correct.item()), float(steps * batch)],
                                                ctx, device)
    return EpochStats(total_loss / max(images, 1), total_correct / max(images, 1), int(images), seconds)


@torch.no_grad()
def evaluate(model, data: DeviceData, make_batch: BatchMaker, ctx: DistContext = DistContext(),
             batch_size: int = 1024, autocast_dtype=None) -> EpochStats:
    """Loss and accuracy over `data` (each rank takes a strided share; the sums are all-reduced)."""
    model.eval()
    device = data.images.device
    indices = torch.arange(ctx.rank, len(data), ctx.world_size, device=device)
    loss_sum, correct = 0.0, 0
    start = time.perf_counter()
    for begin in range(0, len(indices), batch_size):
        idx = indices[begin:begin + batch_size]
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(make_batch(data.images[idx]))
        loss_sum += F.cross_entropy(logits.float(), data.labels[idx], reduction="sum").item()
        correct += (logits.argmax(1) == data.labels[idx]).sum().item()
    seconds = time.perf_counter() - start
    total_loss, total_correct, n = _reduce([loss_sum, float(correct), float(len(indices))], ctx, device)
    return EpochStats(total_loss / max(n, 1), total_correct / max(n, 1), int(n), seconds)


# --- checkpoints ------------------------------------------------------------------------------------

def fingerprint(config: dict) -> str:
    """Identifies the training configuration a checkpoint belongs to."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, state: dict) -> None:
    def write(tmp: Path) -> None:
        torch.save(state, tmp)

    atomic.atomic_write(path, write)


def load_checkpoint(path: Path, expected_fingerprint: str) -> dict | None:
    """The checkpoint at `path` if it is readable and belongs to this configuration, else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (truncated or foreign file: train from scratch)
        print(f"train: ignoring unreadable checkpoint {path}: {err}", file=sys.stderr)
        return None
    if state.get("fingerprint") != expected_fingerprint:
        print(f"train: checkpoint {path} is for other params; starting from scratch", file=sys.stderr)
        return None
    return state


# --- the whole run ----------------------------------------------------------------------------------

@dataclass
class TrainResult:
    arch: str
    history: list[dict]
    val: EpochStats
    seconds: float
    device: str
    summary: dict
    run_id: str
    resumed_from_epoch: int


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def build_fit(arch: str, kwargs: dict, p: TrainParams, card: dict, train_images: int, device: torch.device,
              ctx: DistContext) -> tuple[Fit, dict, dict]:
    """The model (on ``device``, channels_last when asked), optimizer, schedule and AMP scaler; with
    the model's summary and the configuration a checkpoint must match."""
    channels, size = card["channels"], card["image_size"]
    model = create_model(arch, channels, card["num_classes"], size, **kwargs)
    summary = summarize(model, (channels, size, size))
    memory_format = torch.channels_last if p.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    steps_per_epoch = train_images // ctx.world_size // max(1, p.batch_size // ctx.world_size)
    if steps_per_epoch < 1:
        raise ParamsError(f"params: train.batch_size = {p.batch_size} is larger than the training split "
                          f"({train_images} images)")
    opt = make_optimizer(model, p)
    autocast_dtype = amp_dtype(p, device)
    fit = Fit(model, BatchMaker(card["mean"], card["std"], device, p.channels_last), opt,
              make_scheduler(opt, p, steps_per_epoch), nn.CrossEntropyLoss(label_smoothing=p.label_smoothing), p, ctx,
              card["dataset"], autocast_dtype,
              torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None)
    config = {"arch": arch, "kwargs": kwargs, "train": dataclasses.asdict(p), "world_size": ctx.world_size,
              "data_sha256": card["splits"]["train"]["sha256"]}
    return fit, summary, config


def resume(fit: Fit, state: dict | None) -> tuple[int, list[dict]]:
    """Load a matching checkpoint into ``fit``; (epochs already done, their history)."""
    if state is None:
        return 0, []
    fit.model.load_state_dict(state["model"])
    fit.opt.load_state_dict(state["optimizer"])
    fit.sched.load_state_dict(state["scheduler"])
    if fit.scaler is not None and state.get("scaler"):
        fit.scaler.load_state_dict(state["scaler"])
    return state["epoch"], list(state["history"])


def open_train_run(arch: str, kwargs: dict, fit: Fit, card: dict, summary: dict, device: torch.device,
                   state: dict | None):
    """The MLflow run (the checkpoint's own when resuming), with params, dataset card and summary."""
    p = fit.p
    run = tracking.start_run(p.experiment, arch, tags={"stage": "train", "arch": arch, "dataset": card["dataset"]},
                             resume_run_id=state.get("mlflow_run_id") if state else None)
    run.log_params({"arch": arch, "model_kwargs": json.dumps(kwargs), **dataclasses.asdict(p),
                    "dataset": card["dataset"], "device": str(device), "world_size": fit.ctx.world_size,
                    "amp": str(fit.autocast_dtype).replace("torch.", "") if fit.autocast_dtype else "off",
                    "num_params": summary["num_params"], "macs": summary["macs"]})
    run.log_dict(card, "dataset_card.json")
    run.log_dict({**summary, "architecture": repr(unwrap(fit.model))}, "model_summary.json")
    return run


def epoch_row(epoch: int, stats: EpochStats, val: EpochStats, lr: float) -> dict:
    return {"epoch": epoch + 1, "train_loss": round(stats.loss, 5), "train_acc": round(stats.accuracy, 5),
            "val_loss": round(val.loss, 5), "val_acc": round(val.accuracy, 5), "lr": lr,
            "images_per_sec": round(stats.images_per_sec, 1), "epoch_seconds": round(stats.seconds, 2)}


def checkpoint_state(fit: Fit, epoch: int, config: dict, history: list[dict], run_id: str) -> dict:
    return {"model": unwrap(fit.model).state_dict(), "optimizer": fit.opt.state_dict(),
            "scheduler": fit.sched.state_dict(), "scaler": fit.scaler.state_dict() if fit.scaler is not None else {},
            "epoch": epoch + 1, "params": config, "fingerprint": fingerprint(config), "history": history,
            "mlflow_run_id": run_id}


def run_epochs(fit: Fit, train_data: DeviceData, val_data: DeviceData, epochs: range, history: list[dict], run,
               ckpt_path: Path, config: dict, show_progress: bool, stop_after: int | None) -> list[dict]:
    """Train and validate each epoch; rank 0 logs it and checkpoints after it. The grown history."""
    p, ctx = fit.p, fit.ctx
    for done, epoch in enumerate(epochs, start=1):
        lr = fit.opt.param_groups[0]["lr"]
        stats = train_epoch(fit, train_data, epoch, show_progress)
        val = evaluate(fit.model, val_data, fit.make_batch, ctx, autocast_dtype=fit.autocast_dtype)
        history.append(epoch_row(epoch, stats, val, lr))
        if ctx.is_main:
            print(f"train: {config['arch']} epoch {epoch + 1}/{p.epochs}  loss {stats.loss:.4f}  "
                  f"acc {stats.accuracy:.4f}  val_loss {val.loss:.4f}  val_acc {val.accuracy:.4f}  lr {lr:.4g}  "
                  f"{stats.images_per_sec:,.0f} img/s  {stats.seconds:.1f}s", flush=True)
            run.log_metrics({k: v for k, v in history[-1].items() if k != "epoch"}, step=epoch + 1)
            save_checkpoint(ckpt_path, checkpoint_state(fit, epoch, config, history, run.run_id))
        if ctx.enabled:
            dist.barrier()  # nobody runs ahead of the checkpoint
        if stop_after is not None and done >= stop_after:
            break
    return history


def train(arch: str, params: Params, *, prepared_dir: Path = PREPARED_DIR, out_dir: Path | None = None,
          ckpt_path: Path | None = None, ctx: DistContext = DistContext(), show_progress: bool = True,
          stop_after_epochs: int | None = None) -> TrainResult:
    """Train `arch` end to end: data, model, loop, checkpoints, MLflow run, outputs (rank 0 writes)."""
    p, kwargs = params.train_for(arch), params.models[arch].kwargs
    out_dir, ckpt_path = out_dir or arch_dir(arch), ckpt_path or checkpoint_path(arch)
    device = resolve_device(p, ctx.local_rank)
    torch.manual_seed(p.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    card = load_card(prepared_dir)
    train_split, val_split = stratified_split(load_prepared("train", prepared_dir), p.val_fraction, p.seed)
    train_data, val_data = DeviceData.from_split(train_split, device), DeviceData.from_split(val_split, device)
    fit, summary, config = build_fit(arch, kwargs, p, card, len(train_data), device, ctx)
    state = load_checkpoint(ckpt_path, fingerprint(config))
    start_epoch, history = resume(fit, state)
    if ctx.enabled:
        fit.model = nn.parallel.DistributedDataParallel(fit.model, device_ids=[ctx.local_rank] if device.type == "cuda" else None)
    run = open_train_run(arch, kwargs, fit, card, summary, device, state) if ctx.is_main else tracking.NullRun()
    if ctx.is_main:
        run.log_datasets(card, prepared_dir, validation=split_card(val_split, card["classes"]))  # MLflow dataset inputs
        if start_epoch:
            print(f"train: {arch}: resuming from checkpoint {ckpt_path} after epoch {start_epoch}", flush=True)
        print(f"train: {arch} on {device} ({'AMP ' + str(fit.autocast_dtype) if fit.autocast_dtype else 'fp32'}), "
              f"{summary['num_params']:,} params, {summary['macs']:,} MACs/image, "
              f"{len(train_data)} train / {len(val_data)} val images, world size {ctx.world_size}", flush=True)
    t0 = time.perf_counter()
    history = run_epochs(fit, train_data, val_data, range(start_epoch, p.epochs), history, run, ckpt_path, config,
                         show_progress, stop_after_epochs)
    val = evaluate(fit.model, val_data, fit.make_batch, ctx, autocast_dtype=fit.autocast_dtype)
    result = TrainResult(arch, history, val, time.perf_counter() - t0, str(device), summary, run.run_id, start_epoch)
    if ctx.is_main and len(history) == p.epochs:
        write_outputs(out_dir, unwrap(fit.model), result, card, arch, kwargs, p)
        run.log_artifacts([out_dir / "metrics.json", out_dir / "history.csv", out_dir / "curves.png"], "train")
        run.log_metrics({"final_val_acc": val.accuracy, "final_val_loss": val.loss, "train_seconds": result.seconds})
        run.finish()
        ckpt_path.unlink(missing_ok=True)  # complete: the next run with other params starts clean
    return result


def write_outputs(out_dir: Path, model: nn.Module, result: TrainResult, card: dict, arch: str, kwargs: dict,
                  p: TrainParams) -> None:
    """model.pt, metrics.json, history.csv, curves.png: each written atomically."""
    model_file = {
        "arch": arch, "kwargs": kwargs, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "in_channels": card["channels"], "image_size": card["image_size"], "num_classes": card["num_classes"],
        "classes": card["classes"], "mean": card["mean"], "std": card["std"], "dataset": card["dataset"],
        "input_transform": card.get("input_transform", "resize"),  # cards from before the key: as before
        "mlflow_run_id": result.run_id, "num_params": result.summary["num_params"], "macs": result.summary["macs"],
    }
    save_checkpoint(out_dir / "model.pt", model_file)
    speeds = [row["images_per_sec"] for row in result.history]
    atomic.write_json(out_dir / "metrics.json", {  # the DVC metrics file: a few scalars, one table row
        "val_acc": round(result.val.accuracy, 5), "val_loss": round(result.val.loss, 5),
        "train_acc": result.history[-1]["train_acc"],
        "train_images_per_sec": round(float(np.median(speeds)), 1), "train_seconds": round(result.seconds, 1),
    })
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(result.history[0]))
    writer.writeheader()
    writer.writerows(result.history)
    atomic.write_text(out_dir / "history.csv", buf.getvalue())
    atomic.write_bytes(out_dir / "curves.png", plot_curves(result.history, arch))


def plot_curves(history: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        ax_loss.plot(epochs, [row[key] for row in history], marker="o", label=label)
    for key, label in (("train_acc", "train"), ("val_acc", "val")):
        ax_acc.plot(epochs, [row[key] for row in history], marker="o", label=label)
    ax_loss.set(title=f"{title}: loss", xlabel="epoch")
    ax_acc.set(title=f"{title}: accuracy", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train one architecture of the model zoo.")
    parser.add_argument("--arch", required=True, help="a name under `models:` in params.yaml")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--stop-after-epochs", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    p = params.train_for(args.arch)
    try:
        device = resolve_device(p)
        create_model(args.arch, 1, 10, 28, **params.models[args.arch].kwargs)  # bad kwargs fail before any work
    except ValueError as err:
        raise ParamsError(str(err)) from err
    if not (PREPARED_DIR / "card.json").is_file():
        raise ParamsError(f"no prepared dataset in {PREPARED_DIR}: run `python -m pipeline.download` first")
    ctx = init_distributed(device.type)
    if device.type == "cpu":
        configure_threads(ctx)
    try:  # a ParamsError from here: checks that need the data (batch size vs split size)
        train(args.arch, params, ctx=ctx, stop_after_epochs=args.stop_after_epochs)
    finally:
        if ctx.enabled:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(stage.run("train", main))
