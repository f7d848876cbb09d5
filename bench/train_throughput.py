"""Training throughput: the project's training loop against the PyTorch MNIST tutorial's loop.

Both run in this one process, on the same machine, the same MNIST files (staged from DATA_MIRROR, default
<repo>/../shared/data) and the same `cnn` model from `models.create_model`, for the same number of epochs;
then both are evaluated on the MNIST test set.

- project:  pipeline.train's building blocks as `python -m pipeline.train` uses them (the whole uint8
            split in memory, index-slice batches, BatchMaker normalisation, channels_last, the optimizer
            and schedule from params.yaml: `train` with the `models.<arch>` overrides), training on the
            full training split (no validation carve-out, like the tutorial).
- tutorial: torchvision.datasets.MNIST with per-sample transforms.Compose([ToTensor(), Normalize((0.1307,),
            (0.3081,))]), DataLoader(batch_size=64, shuffle=True), SGD(lr=0.01, momentum=0.5),
            cross-entropy on the logits (the tutorial's log_softmax + nll_loss).

Images/s = training images seen / wall seconds of the epoch (the data pipeline included, evaluation not).

    python bench/train_throughput.py                      # cnn, 3 epochs, full MNIST
    python bench/train_throughput.py --models all --epochs 1   # + the project loop for every registered model
    python bench/train_throughput.py --limit 5000 --epochs 1   # a quick run

Results: a table on stdout, and bench/results/<name>.json + .md (machine, command, figures).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from models import create_model, list_models  # noqa: E402
from pipeline import atomic  # noqa: E402
from pipeline.download import Split, channel_stats, limit_split, stage_idx_from_mirror  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.train import (BatchMaker, DeviceData, DistContext, amp_dtype, evaluate, make_optimizer,  # noqa: E402
                            make_scheduler, train_epoch)

TUTORIAL = {"batch_size": 64, "lr": 0.01, "momentum": 0.5, "mean": 0.1307, "std": 0.3081, "test_batch_size": 1000}
SPEEDUP_TARGET = 3.0


# --- machine and data --------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(device: torch.device) -> dict:
    import torchvision

    commit = ""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip()
    except OSError:
        pass
    info = {
        "cpu_model": cpu_model(), "cpu_cores": usable_cores(), "os_cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "git_commit": commit, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": load_average(),  # other work on the machine skews every figure: check these
    }
    return info


def subset_indices(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """The indices of a stratified sample of `limit` items (pipeline.download's rule, data.limit)."""
    return limit_split(Split(np.arange(len(labels)), labels), limit, seed).images


# --- the project's loop ------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def project_loop(arch: str, train: Split, test: Split, epochs: int, device: torch.device, log):
    """A generator: trains one epoch per next(), then returns (StopIteration.value) the summary row."""
    params = load_params(REPO_ROOT / "params.yaml")
    if arch in params.models:
        p, kwargs = params.train_for(arch), dict(params.models[arch].kwargs)
    else:  # a registered model that params.yaml does not train: the shared train section
        p, kwargs = params.train, {}
    p = dataclasses.replace(p, epochs=epochs)
    ctx = DistContext()
    torch.manual_seed(p.seed)
    mean, std = channel_stats(train.images)
    train_data, test_data = DeviceData.from_split(train, device), DeviceData.from_split(test, device)
    make_batch = BatchMaker(mean, std, device, p.channels_last)
    memory_format = torch.channels_last if p.channels_last else torch.contiguous_format
    model = create_model(arch, train.images.shape[1], 10, train.images.shape[2], **kwargs)
    model = model.to(device=device, memory_format=memory_format)
    steps_per_epoch = len(train_data) // p.batch_size
    opt = make_optimizer(model, p)
    sched = make_scheduler(opt, p, steps_per_epoch)
    autocast = amp_dtype(p, device)
    scaler = torch.amp.GradScaler("cuda") if autocast == torch.float16 else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    epoch_seconds, images = [], 0
    for epoch in range(epochs):
        sync(device)
        start = time.perf_counter()
        stats = train_epoch(model, train_data, make_batch, opt, sched, loss_fn, p, epoch, "mnist", ctx,
                            autocast, scaler, show_progress=False)
        sync(device)
        epoch_seconds.append(time.perf_counter() - start)
        images += stats.images
        log(f"  project  {arch:<10} epoch {epoch + 1}/{epochs}: loss {stats.loss:.4f} acc {stats.accuracy:.4f} "
            f"{stats.images / epoch_seconds[-1]:,.0f} img/s {epoch_seconds[-1]:.1f}s")
        yield
    result = evaluate(model, test_data, make_batch, autocast_dtype=autocast)
    config = {"optimizer": p.optimizer, "lr": p.lr, "momentum": p.momentum, "nesterov": p.nesterov,
              "weight_decay": p.weight_decay, "schedule": p.schedule, "batch_size": p.batch_size,
              "channels_last": p.channels_last, "amp": str(autocast).replace("torch.", "") if autocast else "off",
              "kwargs": kwargs}
    return summary("project", arch, epochs, images, epoch_seconds, result.accuracy, config)


# --- the tutorial's loop -----------------------------------------------------------------------------

def tutorial_loop(root: Path, train_idx: np.ndarray, test_idx: np.ndarray, epochs: int, device: torch.device,
                  seed: int, workers: int, log):
    """A generator like project_loop."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize((TUTORIAL["mean"],), (TUTORIAL["std"],))])
    train_ds = datasets.MNIST(str(root), train=True, download=False, transform=transform)
    test_ds = datasets.MNIST(str(root), train=False, download=False, transform=transform)
    if len(train_idx) < len(train_ds):
        train_ds = Subset(train_ds, train_idx.tolist())
    if len(test_idx) < len(test_ds):
        test_ds = Subset(test_ds, test_idx.tolist())
    torch.manual_seed(seed)
    loader = DataLoader(train_ds, batch_size=TUTORIAL["batch_size"], shuffle=True, num_workers=workers)
    test_loader = DataLoader(test_ds, batch_size=TUTORIAL["test_batch_size"], num_workers=workers)
    model = create_model("cnn", 1, 10, 28).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=TUTORIAL["lr"], momentum=TUTORIAL["momentum"])
    epoch_seconds, images = [], 0
    for epoch in range(epochs):
        model.train()
        sync(device)
        start = time.perf_counter()
        seen, loss_sum = 0, 0.0
        for data, target in loader:
            data, target = data.to(device), target.to(device)
            opt.zero_grad()
            loss = F.cross_entropy(model(data), target)
            loss.backward()
            opt.step()
            seen += len(target)
            loss_sum += loss.item() * len(target)
        sync(device)
        epoch_seconds.append(time.perf_counter() - start)
        images += seen
        log(f"  tutorial cnn        epoch {epoch + 1}/{epochs}: loss {loss_sum / seen:.4f} "
            f"{seen / epoch_seconds[-1]:,.0f} img/s {epoch_seconds[-1]:.1f}s")
        yield
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            correct += (model(data).argmax(1) == target).sum().item()
            total += len(target)
    config = {"optimizer": "sgd", "lr": TUTORIAL["lr"], "momentum": TUTORIAL["momentum"],
              "batch_size": TUTORIAL["batch_size"], "transforms": "ToTensor, Normalize((0.1307,), (0.3081,))",
              "dataloader_workers": workers}
    return summary("tutorial", "cnn", epochs, images, epoch_seconds, correct / total, config)


def run_interleaved(loops: list) -> list[dict]:
    """Run the loop generators epoch by epoch in turn (tutorial epoch 1, project epoch 1, tutorial epoch 2,
    ...), so that both see the same machine conditions; returns their summaries in order."""
    results: list[dict | None] = [None] * len(loops)
    pending = dict(enumerate(loops))
    while pending:
        for i, gen in list(pending.items()):
            try:
                next(gen)
            except StopIteration as stop:
                results[i] = stop.value
                del pending[i]
    return results


def summary(loop: str, arch: str, epochs: int, images: int, epoch_seconds: list[float], accuracy: float,
            config: dict) -> dict:
    total = sum(epoch_seconds)
    return {"loop": loop, "model": arch, "epochs": epochs, "train_images": images,
            "images_per_sec": round(images / total, 1), "epoch_seconds": round(total / len(epoch_seconds), 2),
            "epoch_seconds_each": [round(s, 2) for s in epoch_seconds], "test_acc": round(accuracy, 4),
            "config": config}


# --- report ------------------------------------------------------------------------------------------

def table(rows: list[dict], baseline: dict | None) -> str:
    lines = ["| loop | model | epochs | images/s | epoch s | test acc | speedup vs tutorial cnn |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        same_model = baseline is not None and row["model"] == baseline["model"]
        speed = f"{row['images_per_sec'] / baseline['images_per_sec']:.2f}x" if same_model else ""
        lines.append(f"| {row['loop']} | {row['model']} | {row['epochs']} | {row['images_per_sec']:,.0f} | "
                     f"{row['epoch_seconds']:.2f} | {row['test_acc']:.4f} | {speed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs for every loop (default 3)")
    parser.add_argument("--models", default="cnn",
                        help="comma-separated registered models for the project loop, or `all` (default cnn); "
                             "the tutorial loop always trains cnn")
    parser.add_argument("--limit", type=int, default=0,
                        help="a stratified subset of at most about this many images per split (0 = all)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="device for both loops")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: the usable cores)")
    parser.add_argument("--tutorial-workers", type=int, default=0, help="DataLoader workers of the tutorial loop")
    parser.add_argument("--no-tutorial", action="store_true", help="skip the tutorial loop")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"), help="results folder")
    parser.add_argument("--name", default="", help="results file stem (default from the options)")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 unless project cnn >= {SPEEDUP_TARGET:g}x the tutorial's images/s at no "
                             f"lower test accuracy")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")

    archs = list_models() if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in archs if m not in list_models()]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(list_models())}")
    archs = sorted(archs, key=lambda m: (m != "cnn", m))  # cnn first: it is compared with the tutorial

    torch.set_num_threads(args.threads or usable_cores())
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    mirror = Path(os.environ.get("DATA_MIRROR") or REPO_ROOT.parent / "shared" / "data").expanduser()

    def log(message: str) -> None:
        print(message, flush=True)

    info = machine_info(device)
    log(f"bench: {info['cpu_model']}, {info['cpu_cores']} cores, torch {info['torch']} "
        f"({info['torch_threads']} threads), device {device}")
    with tempfile.TemporaryDirectory(prefix="bench-mnist-") as tmp:
        root = Path(tmp)
        stage_idx_from_mirror("mnist", mirror, root)  # -> <root>/MNIST/raw/, checksums verified
        from torchvision import datasets

        splits = {}
        for split, is_train in (("train", True), ("test", False)):
            ds = datasets.MNIST(str(root), train=is_train, download=False)
            splits[split] = Split(ds.data.numpy()[:, None].copy(), ds.targets.numpy().astype(np.int64))
        idx = {s: subset_indices(splits[s].labels, args.limit, seed=0) for s in splits}
        train = Split(splits["train"].images[idx["train"]], splits["train"].labels[idx["train"]])
        test = Split(splits["test"].images[idx["test"]], splits["test"].labels[idx["test"]])
        log(f"bench: MNIST from {mirror}: {len(train.labels)} train / {len(test.labels)} test images, "
            f"{args.epochs} epoch(s)")

        rows, baseline = [], None
        first = []  # the head-to-head: tutorial and project cnn, interleaved epoch by epoch
        if not args.no_tutorial:
            first.append(tutorial_loop(root, idx["train"], idx["test"], args.epochs, device, 0,
                                       args.tutorial_workers, log))
        if "cnn" in archs:
            first.append(project_loop("cnn", train, test, args.epochs, device, log))
        rows += run_interleaved(first)
        if not args.no_tutorial:
            baseline = rows[0]
        for arch in archs:
            if arch != "cnn":
                rows += run_interleaved([project_loop(arch, train, test, args.epochs, device, log)])

    info["load_average_after"] = load_average()
    project_cnn = next((r for r in rows if r["loop"] == "project" and r["model"] == "cnn"), None)
    verdict = None
    if baseline and project_cnn:
        speedup = project_cnn["images_per_sec"] / baseline["images_per_sec"]
        verdict = {"speedup": round(speedup, 2), "target": SPEEDUP_TARGET,
                   "accuracy_delta": round(project_cnn["test_acc"] - baseline["test_acc"], 4),
                   "met": speedup >= SPEEDUP_TARGET and project_cnn["test_acc"] >= baseline["test_acc"]}
    md = table(rows, baseline)
    print()
    print(md)
    if verdict:
        print(f"\nproject cnn vs tutorial: {verdict['speedup']:.2f}x images/s (target >= {SPEEDUP_TARGET:g}x), "
              f"test accuracy {verdict['accuracy_delta']:+.4f}: {'MET' if verdict['met'] else 'NOT MET'}")

    name = args.name or "train_throughput_{}_{}ep{}".format(
        "all" if args.models == "all" else "-".join(archs), args.epochs, f"_limit{args.limit}" if args.limit else "")
    out_dir = Path(args.out)
    result = {"machine": info, "data": {"mirror": str(mirror), "train_images": int(len(train.labels)),
                                        "test_images": int(len(test.labels)), "limit": args.limit},
              "epochs": args.epochs, "results": rows, "project_vs_tutorial": verdict}
    atomic.write_json(out_dir / f"{name}.json", result)
    machine = (f"{info['cpu_model']}, {info['cpu_cores']} cores, {info['torch_threads']} torch threads, "
               f"torch {info['torch']}, torchvision {info['torchvision']}, Python {info['python']}, "
               f"device {info['device']}" + (f" ({info['gpu']})" if info["gpu"] else ""))
    text = [f"# Training throughput: {name}", "", f"- date: {info['date']} (git {info['git_commit'] or 'n/a'})",
            f"- machine: {machine}", f"- command: `{info['command']}`",
            f"- data: MNIST, {len(train.labels)} train / {len(test.labels)} test images, {args.epochs} epoch(s)",
            f"- load average (1, 5, 15 min) before / after: {info['load_average_before']} / "
            f"{info['load_average_after']}",
            "", md, ""]
    if verdict:
        text += [f"Project cnn vs tutorial: **{verdict['speedup']:.2f}x** images/s (target >= {SPEEDUP_TARGET:g}x), "
                 f"test accuracy {verdict['accuracy_delta']:+.4f}: **{'met' if verdict['met'] else 'not met'}**.", ""]
    atomic.write_text(out_dir / f"{name}.md", "\n".join(text))
    print(f"\nbench: wrote {out_dir / (name + '.json')} and .md")
    return 1 if args.check and verdict and not verdict["met"] else 0


if __name__ == "__main__":
    sys.exit(main())
