"""Batch prediction benchmark: `imgcls predict` on a folder of JPEGs against raw ONNX Runtime, side by side.

    .venv/bin/python -m bench.predict --model cifar-resnet=exports/resnet/model.onnx --data DIR [--limit 10000]
    .venv/bin/python -m bench.predict --model a=A.onnx --model b=B.onnx --data DIR --quick

On demand, not a test. ``DIR`` is an ImageFolder of real images (class subfolders), e.g. the CIFAR-10
training JPEGs of ../shared/data extracted (``tar xzf cifar10-train-jpg.tar.gz``); the first ``--limit``
files in sorted order, the same for every model.

Policy, per model:

- **raw ONNX Runtime**: every image decoded beforehand (not timed) into one in-memory normalized
  ``float32 [N, C, H, W]`` tensor, run at each of ``--batch-sizes`` (best of ``REPEATS``) in two
  layouts: one session (``service.engine.OnnxClassifier``, the serving options) with intra-op threads =
  the usable CPUs, and one one-thread session per usable CPU, each in its own process on its share of
  the tensor, started together. The best of all is the baseline.
- **imgcls predict**: the installed console script as a subprocess, on the files, at the raw run's best
  batch size, with its default workers (the usable CPUs, each decoding and classifying with a one-thread
  session) and with ``--workers 0`` (everything in the main process, one session on every CPU): its own
  images/s (``--metrics``: first decode to last answer; no interpreter start or model load), and the
  whole command's wall time.

Speed does not depend on the weights: an exported untrained model measures the same as a trained one
(the accuracy column then only shows that the folder labels were read).

Target (PASS): predict with default workers >= 80 % of raw ONNX Runtime's best images/s, for every model.
Beside it, the bound: the share reachable with no overhead at all, inference / (inference + decoding)
in core-microseconds per image (decoding measured on one core, inference = usable cores / raw best
images/s): a model that needs less time per image than its JPEG's decoding cannot reach 80 %.
Writes bench/results/predict-<date>[-suffix].json and .md (machine, versions, command, git state);
``--quick`` (2,000 images, batch sizes 64 and 256) writes to a temporary folder unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests import harness

REPEATS = 3
TARGET = 0.80
DISTS = ("onnxruntime", "onnxruntime-gpu", "numpy", "pillow")
IMGCLS = Path(sys.executable).with_name("imgcls")


def raw_images_per_s(model: Path, files: list[Path], batch_sizes: list[int]) -> tuple[dict[str, float], float]:
    """Images/s by layout and batch size (``"<layout> <batch>"``): one session on every usable CPU, and
    one one-thread session per usable CPU in as many processes, each on its share of the tensor; and
    the microseconds one core takes to prepare (decode, transform) an image's bytes."""
    from service.contract import normalize
    from service.predictor import ImageError, Predictor

    cpus = harness.usable_cores()
    predictor = Predictor(model, threads=cpus)
    blobs = [p.read_bytes() for p in files]
    for blob in blobs[:32]:  # first calls: imports, plugin registration
        predictor.prepare(blob)
    started = time.perf_counter()
    arrays = [a for a in map(predictor.prepare, blobs) if not isinstance(a, ImageError)]
    decode_us = (time.perf_counter() - started) / len(files) * 1e6
    batch = normalize(np.stack(arrays), predictor.spec.mean, predictor.spec.std)
    predictor.engine.warmup(batch_sizes)
    rates = {f"1 session x {cpus} threads, batch {size}": len(batch) / _best_seconds(predictor.engine, batch, size)
             for size in batch_sizes}
    if cpus > 1:
        rates |= {f"{cpus} processes x 1 thread, batch {size}": _processes_rate(model, batch, size, cpus)
                  for size in batch_sizes}
    return rates, decode_us


def _best_seconds(engine, batch: np.ndarray, size: int, barrier=None) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        if barrier is not None:
            barrier.wait()
        started = time.perf_counter()
        for i in range(0, len(batch), size):
            engine.logits(batch[i:i + size])
        best = min(best, time.perf_counter() - started)
    return best


def _process_shard(model: str, shard: np.ndarray, size: int, barrier, results) -> None:
    from service.engine import OnnxClassifier

    engine = OnnxClassifier(model, providers="cpu", intra_op_threads=1)
    engine.warmup([size])
    results.put(_best_seconds(engine, shard, size, barrier))


def _processes_rate(model: Path, batch: np.ndarray, size: int, processes: int) -> float:
    """All images/s of ``processes`` one-thread sessions started together, each on 1/processes of the
    tensor (spawned: no process inherits this one's session)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_process_shard, args=(str(model), batch[i::processes], size, barrier, results))
             for i in range(processes)]
    for proc in procs:
        proc.start()
    slowest = max(results.get(timeout=600) for _ in procs)
    for proc in procs:
        proc.join()
    return len(batch) / slowest


def predict_run(model: Path, data: Path, files: int, batch_size: int, workers: int | None, work: Path) -> dict:
    """One `imgcls predict` over the first `files` images (a file list: the same images as the raw run)."""
    listing = sorted(p for p in data.rglob("*.jpg"))[:files]
    subset = work / f"subset-{files}"
    if not subset.exists():  # links in class folders: ImageFolder-shaped, so accuracy is measured too
        for p in listing:
            (subset / p.parent.name).mkdir(parents=True, exist_ok=True)
            (subset / p.parent.name / p.name).symlink_to(p.resolve())
    metrics = work / "metrics.json"
    cmd = [str(IMGCLS), "predict", str(subset), "--model", str(model), "-o", str(work / "predictions.csv"),
           "--batch-size", str(batch_size), "--metrics", str(metrics), "--no-progress"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"bench predict: {' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    out = json.loads(metrics.read_text())
    return {"workers": "default (usable CPUs)" if workers is None else workers, "images_per_s": out["images_per_s"],
            "wall_s": round(wall, 2), "classified": out["classified"], "skipped": out["skipped"],
            "accuracy": out.get("accuracy"), "command": " ".join(cmd)}


def measure(name: str, model: Path, args: argparse.Namespace, work: Path) -> dict:
    files = sorted(p for p in args.data.rglob("*.jpg"))[:args.limit]
    rates, decode_us = raw_images_per_s(model, files, args.batch_sizes)
    best = max(rates, key=rates.get)
    # the share reachable with no overhead at all: every core decodes its images and runs the model on them
    inference_us = harness.usable_cores() / rates[best] * 1e6
    bound = inference_us / (inference_us + decode_us)
    best_size = int(best.rsplit(" ", 1)[1])
    runs = [predict_run(model, args.data, len(files), best_size, workers, work) for workers in (None, 0)]
    ratio = runs[0]["images_per_s"] / rates[best]
    print(f"predict bench: {name}: raw ORT best {rates[best]:,.0f} images/s ({best}); "
          f"predict {runs[0]['images_per_s']:,.0f} images/s ({ratio:.0%}), --workers 0 {runs[1]['images_per_s']:,.0f}",
          flush=True)
    return {"name": name, "model": str(model), "images": len(files),
            "raw_images_per_s": {k: round(v, 1) for k, v in rates.items()}, "best": best, "best_batch_size": best_size,
            "decode_us_per_image": round(decode_us, 1), "inference_core_us_per_image": round(inference_us, 1),
            "bound": round(bound, 3), "predict": runs, "ratio": round(ratio, 3), "passed": ratio >= TARGET}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Batch prediction: imgcls predict vs raw ONNX Runtime ({result['date']})", "",
             f"Machine: {m['cpu_model']}, {m['usable_cores']} usable cores, load at start {m['loadavg_start']}; "
             f"versions {result['versions']}; commit {result['git']['commit'][:10]}.", "",
             f"Command: `{result['command']}`", "",
             "| model | images | raw ORT images/s by layout and batch size | best | predict images/s (workers) | "
             "predict / raw best | decode + inference, core-us per image | bound (no overhead) | wall s | accuracy "
             "| target >= 80 % |", "|---|---:|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in result["models"]:
        raw = "; ".join(f"{k}: {v:,.0f}" for k, v in r["raw_images_per_s"].items())
        runs = "; ".join(f"{p['images_per_s']:,.0f} ({p['workers']})" for p in r["predict"])
        acc = r["predict"][0]["accuracy"]
        lines.append(f"| {r['name']} | {r['images']:,} | {raw} | {r['best']} | {runs} | {r['ratio']:.0%} | "
                     f"{r['decode_us_per_image']:.0f} + {r['inference_core_us_per_image']:.0f} | {r['bound']:.0%} | "
                     f"{r['predict'][0]['wall_s']} | {acc if acc is None else f'{acc:.4f}'} | "
                     f"{'PASS' if r['passed'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH.onnx",
                   type=lambda s: (s.split("=", 1)[0], Path(s.split("=", 1)[1])) if "=" in s else (Path(s).stem, Path(s)))
    p.add_argument("--data", type=Path, required=True, help="an ImageFolder of JPEGs")
    p.add_argument("--limit", type=int, default=10_000)
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256, 1024])
    p.add_argument("--out", type=Path)
    p.add_argument("--suffix", default="")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.limit, args.batch_sizes = min(args.limit, 2000), [64, 256]
    args.out = args.out or (Path(tempfile.gettempdir()) / "bench-predict" if args.quick else harness.REPO / "bench" / "results")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": harness.command_line(),
              "machine": harness.machine(), "versions": harness.versions(DISTS), "git": harness.git_state(("service", "pipeline", "bench", ":!bench/results")),
              "policy": __doc__.split("Policy, per model:")[1].split("Target")[0].strip()}
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as work:
        result["models"] = [measure(name, path, args, Path(work) / name) for name, path in args.model]
    result["passed"] = all(r["passed"] for r in result["models"])
    stem = args.out / f"predict-{dt.date.today().isoformat()}{'-' + args.suffix if args.suffix else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print("\n" + markdown(result) + f"\nbench predict: wrote {stem}.json and .md")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
