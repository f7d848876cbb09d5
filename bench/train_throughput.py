"""Training throughput: the project's training loop against the PyTorch MNIST tutorial's loop.

Both run in this one process, on the same machine, the same MNIST files (staged from DATA_MIRROR, default
<repo>/../shared/data: tests.harness.mirror_path) and the same `cnn` model from `models.create_model`, for the same number of epochs;
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
from pipeline.train import (BatchMaker, DeviceData, DistContext, Fit, amp_dtype, evaluate,  # noqa: E402
                            make_optimizer, make_scheduler, train_epoch)
from tests import harness  # noqa: E402

TUTORIAL = {"batch_size": 64, "lr": 0.01, "momentum": 0.5, "mean": 0.1307, "std": 0.3081, "test_batch_size": 1000}
SPEEDUP_TARGET = 3.0


# --- machine and data --------------------------------------------------------------------------------

def machine_info(device: torch.device) -> dict:
    import torchvision

    m = harness.machine()
    return {
        "cpu_model": m["cpu_model"], "cpu_cores": m["usable_cores"], "os_cpu_count": m["cpu_count"],
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        **harness.versions(()), "platform": m["platform"], "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "command": harness.command_line(), "git_commit": harness.git_state()["commit"][:12],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": m["loadavg_start"],  # other work on the machine skews every figure: check these
    }


def subset_indices(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """The indices of a stratified sample of `limit` items (pipeline.download's rule, data.limit)."""
    return limit_split(Split(np.arange(len(labels)), labels), limit, seed).images


# --- the project's loop ------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_fit(arch: str, kwargs: dict, p, train: Split, n_train: int, device: torch.device) -> Fit:
    """pipeline.train's Fit for `arch` on `train` (its own channel statistics): model (channels_last when
    asked), optimizer, schedule, loss, AMP as the train stage builds them."""
    mean, std = channel_stats(train.images)
    memory_format = torch.channels_last if p.channels_last else torch.contiguous_format
    model = create_model(arch, train.images.shape[1], 10, train.images.shape[2], **kwargs)
    model = model.to(device=device, memory_format=memory_format)
    opt = make_optimizer(model, p)
    autocast = amp_dtype(p, device)
    return Fit(model, BatchMaker(mean, std, device, p.channels_last), opt, make_scheduler(opt, p, n_train // p.batch_size),
               nn.CrossEntropyLoss(label_smoothing=p.label_smoothing), p, DistContext(), "mnist", autocast,
               torch.amp.GradScaler("cuda") if autocast == torch.float16 else None)


def project_loop(arch: str, train: Split, test: Split, epochs: int, device: torch.device, log):
    """A generator: trains one epoch per next(), then returns (StopIteration.value) the summary row."""
    params = load_params(REPO_ROOT / "params.yaml")
    if arch in params.models:
        p, kwargs = params.train_for(arch), dict(params.models[arch].kwargs)
    else:  # a registered model that params.yaml does not train: the shared train section
        p, kwargs = params.train, {}
    p = dataclasses.replace(p, epochs=epochs)
    torch.manual_seed(p.seed)
    train_data, test_data = DeviceData.from_split(train, device), DeviceData.from_split(test, device)
    fit = make_fit(arch, kwargs, p, train, len(train_data), device)
    epoch_seconds, images = [], 0
    for epoch in range(epochs):
        sync(device)
        start = time.perf_counter()
        stats = train_epoch(fit, train_data, epoch, show_progress=False)
        sync(device)
        epoch_seconds.append(time.perf_counter() - start)
        images += stats.images
        log(f"  project  {arch:<10} epoch {epoch + 1}/{epochs}: loss {stats.loss:.4f} acc {stats.accuracy:.4f} "
            f"{stats.images / epoch_seconds[-1]:,.0f} img/s {epoch_seconds[-1]:.1f}s")
        yield
    autocast = fit.autocast_dtype
    result = evaluate(fit.model, test_data, fit.make_batch, autocast_dtype=autocast)
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
    config = {"optimizer": "sgd", "lr": TUTORIAL["lr"], "momentum": TUTORIAL["momentum"],
              "batch_size": TUTORIAL["batch_size"], "transforms": "ToTensor, Normalize((0.1307,), (0.3081,))",
              "dataloader_workers": workers}
    return summary("tutorial", "cnn", epochs, images, epoch_seconds, loader_accuracy(model, test_loader, device), config)


def loader_accuracy(model: nn.Module, loader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for data, target in loader:
            data, target = data.to(device), target.to(device)
            correct += (model(data).argmax(1) == target).sum().item()
            total += len(target)
    return correct / total


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    args.archs = sorted(archs, key=lambda m: (m != "cnn", m))  # cnn first: it is compared with the tutorial
    return args


def log(message: str) -> None:
    print(message, flush=True)


def load_splits(root: Path, mirror: Path, limit: int) -> tuple[Split, Split, dict[str, np.ndarray]]:
    """MNIST staged from the mirror into root/MNIST/raw (checksums verified): (train, test, their indices)."""
    from torchvision import datasets

    stage_idx_from_mirror("mnist", mirror, root)
    splits = {}
    for split, is_train in (("train", True), ("test", False)):
        ds = datasets.MNIST(str(root), train=is_train, download=False)
        splits[split] = Split(ds.data.numpy()[:, None].copy(), ds.targets.numpy().astype(np.int64))
    idx = {s: subset_indices(splits[s].labels, limit, seed=0) for s in splits}
    train = Split(splits["train"].images[idx["train"]], splits["train"].labels[idx["train"]])
    test = Split(splits["test"].images[idx["test"]], splits["test"].labels[idx["test"]])
    return train, test, idx


def run_loops(args: argparse.Namespace, root: Path, train: Split, test: Split, idx: dict, device: torch.device):
    """(rows, the tutorial's row or None): the tutorial and project cnn interleaved epoch by epoch (the
    head-to-head), then the project loop of every other model."""
    first = []
    if not args.no_tutorial:
        first.append(tutorial_loop(root, idx["train"], idx["test"], args.epochs, device, 0, args.tutorial_workers, log))
    if "cnn" in args.archs:
        first.append(project_loop("cnn", train, test, args.epochs, device, log))
    rows = run_interleaved(first)
    baseline = None if args.no_tutorial else rows[0]
    for arch in args.archs:
        if arch != "cnn":
            rows += run_interleaved([project_loop(arch, train, test, args.epochs, device, log)])
    return rows, baseline


def verdict_of(rows: list[dict], baseline: dict | None) -> dict | None:
    project_cnn = next((r for r in rows if r["loop"] == "project" and r["model"] == "cnn"), None)
    if not (baseline and project_cnn):
        return None
    speedup = project_cnn["images_per_sec"] / baseline["images_per_sec"]
    return {"speedup": round(speedup, 2), "target": SPEEDUP_TARGET,
            "accuracy_delta": round(project_cnn["test_acc"] - baseline["test_acc"], 4),
            "met": speedup >= SPEEDUP_TARGET and project_cnn["test_acc"] >= baseline["test_acc"]}


def report_markdown(name: str, result: dict, md: str) -> str:
    info, data, verdict = result["machine"], result["data"], result["project_vs_tutorial"]
    machine = (f"{info['cpu_model']}, {info['cpu_cores']} cores, {info['torch_threads']} torch threads, "
               f"torch {info['torch']}, torchvision {info['torchvision']}, Python {info['python']}, "
               f"device {info['device']}" + (f" ({info['gpu']})" if info["gpu"] else ""))
    text = [f"# Training throughput: {name}", "", f"- date: {info['date']} (git {info['git_commit'] or 'n/a'})",
            f"- machine: {machine}", f"- command: `{info['command']}`",
            f"- data: MNIST, {data['train_images']} train / {data['test_images']} test images, {result['epochs']} epoch(s)",
            f"- load average (1, 5, 15 min) before / after: {info['load_average_before']} / "
            f"{info['load_average_after']}",
            "", md, ""]
    if verdict:
        text += [f"Project cnn vs tutorial: **{verdict['speedup']:.2f}x** images/s (target >= {SPEEDUP_TARGET:g}x), "
                 f"test accuracy {verdict['accuracy_delta']:+.4f}: **{'met' if verdict['met'] else 'not met'}**.", ""]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or harness.usable_cores())
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    mirror = harness.mirror_path()
    info = machine_info(device)
    log(f"bench: {info['cpu_model']}, {info['cpu_cores']} cores, torch {info['torch']} "
        f"({info['torch_threads']} threads), device {device}")
    with tempfile.TemporaryDirectory(prefix="bench-mnist-") as tmp:
        train, test, idx = load_splits(Path(tmp), mirror, args.limit)
        log(f"bench: MNIST from {mirror}: {len(train.labels)} train / {len(test.labels)} test images, "
            f"{args.epochs} epoch(s)")
        rows, baseline = run_loops(args, Path(tmp), train, test, idx, device)
    info["load_average_after"] = harness.load_average()
    verdict = verdict_of(rows, baseline)
    md = table(rows, baseline)
    print()
    print(md)
    if verdict:
        print(f"\nproject cnn vs tutorial: {verdict['speedup']:.2f}x images/s (target >= {SPEEDUP_TARGET:g}x), "
              f"test accuracy {verdict['accuracy_delta']:+.4f}: {'MET' if verdict['met'] else 'NOT MET'}")
    name = args.name or "train_throughput_{}_{}ep{}".format(
        "all" if args.models == "all" else "-".join(args.archs), args.epochs, f"_limit{args.limit}" if args.limit else "")
    out_dir = Path(args.out)
    result = {"machine": info, "data": {"mirror": str(mirror), "train_images": int(len(train.labels)),
                                        "test_images": int(len(test.labels)), "limit": args.limit},
              "epochs": args.epochs, "results": rows, "project_vs_tutorial": verdict}
    atomic.write_json(out_dir / f"{name}.json", result)
    atomic.write_text(out_dir / f"{name}.md", report_markdown(name, result, md))
    print(f"\nbench: wrote {out_dir / (name + '.json')} and .md")
    return 1 if args.check and verdict and not verdict["met"] else 0


if __name__ == "__main__":
    sys.exit(main())
