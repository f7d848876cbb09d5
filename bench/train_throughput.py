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
SPEEDUP_TARGET = 4.0  # the tutorial loop -> project loop target of issue 18 (was 3x)


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
                  seed: int, workers: int, log, arch: str = "cnn"):
    """A generator like project_loop: the tutorial's data pipeline and optimizer, training `arch`."""
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
    params = load_params(REPO_ROOT / "params.yaml")  # the same model as the project loop's: params.yaml's kwargs
    kwargs = dict(params.models[arch].kwargs) if arch in params.models else {}
    model = create_model(arch, 1, 10, 28, **kwargs).to(device)
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
        log(f"  tutorial {arch:<10} epoch {epoch + 1}/{epochs}: loss {loss_sum / seen:.4f} "
            f"{seen / epoch_seconds[-1]:,.0f} img/s {epoch_seconds[-1]:.1f}s")
        yield
    config = {"optimizer": "sgd", "lr": TUTORIAL["lr"], "momentum": TUTORIAL["momentum"],
              "batch_size": TUTORIAL["batch_size"], "transforms": "ToTensor, Normalize((0.1307,), (0.3081,))",
              "dataloader_workers": workers}
    return summary("tutorial", arch, epochs, images, epoch_seconds, loader_accuracy(model, test_loader, device), config)


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


# --- where a step's time goes ------------------------------------------------------------------------

def profile_steps(arch: str, train: Split, device: torch.device, steps: int = 40) -> list[dict]:
    """Wall ms per step of the project loop by phase (the steps of Fit.step, timed apart), and the
    top operators by self CPU time (torch.profiler), after 5 unrecorded steps."""
    from torch.profiler import profile, record_function

    params = load_params(REPO_ROOT / "params.yaml")
    p = dataclasses.replace(params.train_for(arch) if arch in params.models else params.train, epochs=100)
    data = DeviceData.from_split(train, device)
    fit = make_fit(arch, {}, p, train, len(data), device)
    aug, gen = p.augment_for("mnist"), torch.Generator(device=device).manual_seed(0)
    phases = {"augment + normalize": 0.0, "forward + loss": 0.0, "backward": 0.0, "optimizer + schedule": 0.0}

    def step(i: int, timed: bool) -> None:
        idx = torch.arange(i * p.batch_size, (i + 1) * p.batch_size, device=device) % len(data)
        fit.opt.zero_grad(set_to_none=True)  # outside the phases (set_to_none: no work)
        marks = [time.perf_counter()]
        with record_function("augment + normalize"):
            x = fit.make_batch(data.images[idx], aug, gen)
        marks.append(time.perf_counter())
        with record_function("forward + loss"):
            loss = fit.loss_fn(fit.model(x), data.labels[idx])
        marks.append(time.perf_counter())
        with record_function("backward"):
            loss.backward()
        marks.append(time.perf_counter())
        with record_function("optimizer + schedule"):
            fit.opt.step()
            fit.sched.step()
        marks.append(time.perf_counter())
        if timed:
            for name, a, b in zip(phases, marks, marks[1:]):
                phases[name] += (b - a) * 1000 / steps

    fit.model.train()
    for i in range(5):
        step(i, False)
    with profile() as prof:
        for i in range(steps):
            step(i, True)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) or 1
    top = [{"op": e.key, "self_cpu_pct": round(100 * e.self_cpu_time_total / total, 1)}
           for e in ops if not e.key.startswith(tuple(phases))][:8]
    return [{"phase": k, "ms_per_step": round(v, 3)} for k, v in phases.items()] + [{"top_ops": top,
                                                                                  "batch_size": p.batch_size}]


def profile_markdown(rows: list[dict]) -> str:
    phases, extra = rows[:-1], rows[-1]
    total = sum(r["ms_per_step"] for r in phases)
    lines = [f"Project loop, one step of {extra['batch_size']} images ({total:.2f} ms, "
             f"{extra['batch_size'] / total * 1000:,.0f} images/s without the epoch's bookkeeping):", "",
             "| phase | ms per step | share |", "|---|---:|---:|"]
    lines += [f"| {r['phase']} | {r['ms_per_step']:.2f} | {100 * r['ms_per_step'] / total:.0f} % |" for r in phases]
    lines += ["", "Top operators by self CPU time: " + ", ".join(f"`{o['op']}` {o['self_cpu_pct']} %"
                                                            for o in extra["top_ops"])]
    return "\n".join(lines)


# --- report ------------------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    """Every row, with the project loop's speed-up over the tutorial loop on the same model."""
    tutorial = {r["model"]: r for r in rows if r["loop"] == "tutorial"}
    lines = ["| loop | model | epochs | images/s | epoch s | test acc | speedup vs tutorial loop |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        base = tutorial.get(row["model"])
        speed = f"{row['images_per_sec'] / base['images_per_sec']:.2f}x" if base is not None else ""
        lines.append(f"| {row['loop']} | {row['model']} | {row['epochs']} | {row['images_per_sec']:,.0f} | "
                     f"{row['epoch_seconds']:.2f} | {row['test_acc']:.4f} | {speed} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs for every loop (default 3)")
    parser.add_argument("--models", default="cnn",
                        help="comma-separated registered models for the project loop, or `all` (default cnn); "
                             "the tutorial loop trains cnn, or every one of them with --tutorial-all")
    parser.add_argument("--tutorial-all", action="store_true",
                        help="run the tutorial loop on every model too (each pair interleaved epoch by epoch)")
    parser.add_argument("--limit", type=int, default=0,
                        help="a stratified subset of at most about this many images per split (0 = all)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="device for both loops")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: the usable cores)")
    parser.add_argument("--tutorial-workers", type=int, default=0, help="DataLoader workers of the tutorial loop")
    parser.add_argument("--no-tutorial", action="store_true", help="skip the tutorial loop")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"), help="results folder")
    parser.add_argument("--name", default="", help="results file stem (default from the options)")
    parser.add_argument("--profile", action="store_true",
                        help="also time the project loop's cnn step by phase and list its top operators")
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
            pair = [project_loop(arch, train, test, args.epochs, device, log)]
            if args.tutorial_all and not args.no_tutorial:
                pair.insert(0, tutorial_loop(root, idx["train"], idx["test"], args.epochs, device, 0,
                                             args.tutorial_workers, log, arch))
            rows += run_interleaved(pair)
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
        profiled = profile_steps("cnn", train, device) if args.profile else None
    info["load_average_after"] = harness.load_average()
    verdict = verdict_of(rows, baseline)
    md = table(rows)
    if profiled:
        md += "\n\n" + profile_markdown(profiled)
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
              "epochs": args.epochs, "results": rows, "project_vs_tutorial": verdict, "profile": profiled}
    atomic.write_json(out_dir / f"{name}.json", result)
    atomic.write_text(out_dir / f"{name}.md", report_markdown(name, result, md))
    print(f"\nbench: wrote {out_dir / (name + '.json')} and .md")
    return 1 if args.check and verdict and not verdict["met"] else 0


if __name__ == "__main__":
    sys.exit(main())
