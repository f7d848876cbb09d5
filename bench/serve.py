"""Serving benchmark: raw ONNX Runtime vs the BentoML service vs a naive FastAPI + PyTorch server, in ONE run.

    .venv/bin/python bench/serve.py --profile --wait-quiet 300     # both models, 2 rounds of 10 s cells (~15 min)
    .venv/bin/python bench/serve.py --models cnn --duration 5 --repeat 1
    .venv/bin/python bench/serve.py --service-env CLASSIFIER_WORKERS=1 --tag one-worker
    .venv/bin/python bench/serve.py --rebuild bench/results/serve-<date>.json   # re-derive tables/targets

For each model:

(a) raw ONNX Runtime in this process (``service.engine.OnnxClassifier``, the service's own session
    settings) at the service's batch sizes 1, 8, 32, 64 with 1 and 2 intra-op threads: the ceiling;
(b) the BentoML service: a real ``bentoml serve service.service:Classifier`` subprocess on a free port
    with a temporary BENTOML_HOME holding the model (``pipeline.bento_store.save_to_bento_store``);
(c) the naive baseline ``bench/serve_naive.py`` (FastAPI + PyTorch eager, one image per request, one
    uvicorn process) on the same weights.

Models: ``cnn`` (the trained MNIST export ``exports/cnn/model.onnx`` + ``outputs/cnn/model.pt``,
1x28x28, tiny: overhead-bound) and ``resnet18``, the CIFAR-style ResNet-18 on 3x32x32
(``models.create_model("resnet", 3, 10, 32)``), randomly initialised (BatchNorm statistics from a few
real CIFAR images) and exported with ``pipeline.export.export_onnx``; speed does not depend on the
weights, so no CIFAR training is needed. Its .pt is saved for the naive server.

Loads (``wrk`` with ``bench/serve_wrk.lua``, one wrk thread, every cell bounded by ``--duration``):
single-image PNG requests at concurrency 1, 8, 32, 64 (both servers) and 64-image multipart requests
(BentoML only: the naive API takes one image per request). Reported: requests/s, images/s,
p50/p99 latency, errors (non-2xx, socket errors, timeouts), the requests and images per model call
the service's micro-batching formed (``classifier_batch_size`` sum/count from ``/metrics``: images
per model call; requests per call = that / images per request chunk), CPU used by each server process, readiness time after start, peak RSS.
``--profile`` adds, after the measured cells, one extra run of each target cell under py-spy
(the service's worker processes), summarised by where the time goes.

Writes bench/results/serve-<date>[-<tag>].json and .md (machine, load averages, versions, command);
``--rebuild RESULT.json`` recomputes a result's summary, targets and .md. Throughput counts requests
answered 200 only; non-2xx answers (e.g. 503 when the micro-batcher sheds load) are errors.
Needs: wrk (``apt-get install -y wrk``); py-spy for --profile (``pip install py-spy``).

This file is the command line and the run; the parts are beside it: ``serve_models`` (models, request
images, raw ORT), ``serve_servers`` (the servers and their process trees), ``serve_load`` (bodies,
wrk, CPU accounting, one load cell), ``serve_profile`` (py-spy), ``serve_targets`` (medians and the
targets, as a table) and ``serve_report`` (the markdown); ports, servers, model stores and the
machine records come from tests/harness.py.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.serve_load import (load_cell, rates, run_wrk, settle, smoke_check, wait_for_quiet, write_bodies,  # noqa: E402
                              wrk_version)
from bench.serve_models import BenchModel, bench_raw_ort, prepare  # noqa: E402
from bench.serve_profile import profile_cell  # noqa: E402
from bench.serve_report import markdown  # noqa: E402
from bench.serve_servers import Server, bentoml_server, naive_server  # noqa: E402
from bench.serve_targets import TARGET_CONCURRENCY, evaluate_targets, summarize  # noqa: E402
from tests import harness  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
DISTS = ("bentoml", "onnxruntime-gpu", "onnxruntime", "onnx", "torch", "torchvision", "fastapi", "uvicorn",
         "starlette", "numpy", "pillow", "pydantic", "aiohttp")


def versions() -> dict:
    out = harness.versions(DISTS)
    if (wrk := wrk_version()) is not None:
        out["wrk"] = wrk
    return out


# --- the run -------------------------------------------------------------------------------------------

def new_result(args: argparse.Namespace, service_env: dict) -> dict:
    return {
        "benchmark": "serve", "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": harness.command_line(),
        "machine": harness.machine(), "versions": versions(), "git": harness.git_state(),
        "settings": {"duration_s": args.duration, "repeat": args.repeat, "concurrency": args.concurrency,
                     "batch_concurrency": args.batch_concurrency, "images_per_batch_request": args.batch_images,
                     "raw_ort_batch_sizes": args.batch_sizes, "raw_ort_threads": args.ort_threads,
                     "service_env": service_env, "service_dir": str(args.service_dir), "load_generator": "wrk -t1 (bench/serve_wrk.lua), --timeout 10s",
                     "method": "both servers up at once (idle when not under load); each round measures raw ORT, then "
                               "every load cell, alternating servers per concurrency; tables show the median round"},
        "models": {}, "raw_ort": [], "servers": {}, "cells": [], "profiles": [],
    }


class ServeRun:
    """One run: every model of --models in turn, its servers up at once, --repeat rounds of cells."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        # no penalty box unless asked for: wrk drops its in-flight requests at the end of every cell,
        # which the box counts as clients that left (bench/abuse.py measures the box)
        self.service_env = {"CLASSIFIER_REFUSAL_RATE": "0", **dict(kv.split("=", 1) for kv in args.service_env)}
        self.max_batch = int(self.service_env.get("CLASSIFIER_MAX_BATCH_SIZE",
                                                  os.environ.get("CLASSIFIER_MAX_BATCH_SIZE", "64")))
        self.batch_load = f"batch{args.batch_images}"
        self.result = new_result(args, self.service_env)

    def quiet(self) -> dict | None:
        return wait_for_quiet(self.args.wait_quiet, self.args.quiet_threshold) if self.args.wait_quiet else None

    def model(self, name: str) -> None:
        print(f"== {name}", flush=True)
        bm = prepare(name, self.workdir)
        self.result["models"][name] = {"onnx": str(bm.onnx), "pt": str(bm.pt), "note": bm.note, **bm.facts}
        single = write_bodies(self.workdir / f"{name}-single", bm.pngs, 1, 64)
        batch = write_bodies(self.workdir / f"{name}-batch", bm.pngs, self.args.batch_images, 4)
        info = self.result["servers"].setdefault(name, {})
        with contextlib.ExitStack() as stack:
            servers = {kind: self.start(stack, kind, bm, info, single, batch) for kind in self.args.servers}
            for rep in range(self.args.repeat):
                self.round(rep, bm, servers, single, batch)
            if self.args.profile:
                self.profile(bm, servers, single, batch)
            for kind, server in servers.items():
                info[kind]["memory"] = server.tree.stop()
                info[kind]["log_tail"] = server.log_path.read_text(errors="replace")[-1500:].splitlines()[-8:]

    def start(self, stack: contextlib.ExitStack, kind: str, bm: BenchModel, info: dict, single: Path,
              batch: Path) -> Server:
        """Start `kind` (one at a time, so each start-up is timed alone; the service --startup-repeats
        times), smoke-test and warm it up."""
        def make():
            if kind == "bentoml":
                return bentoml_server(bm, self.workdir, self.service_env, self.args.service_dir)
            return naive_server(bm, self.workdir)

        ready_times = []
        for _ in range(max(0, self.args.startup_repeats - 1) if kind == "bentoml" else 0):
            self.quiet()
            with make() as extra:  # started, timed, stopped: start-up time only
                ready_times.append(round(extra.ready_s, 3))
                extra.tree.stop()
        self.quiet()
        server = stack.enter_context(make())
        ready_times.append(round(server.ready_s, 3))
        info[kind] = {"ready_s": float(np.median(ready_times)), "ready_s_all": ready_times,
                      "command": shlex.join(server.command), "env": server.env, "smoke": smoke_check(server, single, 1)}
        print(f"  {kind} ready after {ready_times} s", flush=True)
        if kind == "bentoml":
            smoke_check(server, batch, self.args.batch_images)
            if (meta := service_metadata(server)) is not None:
                info[kind]["metadata"] = meta
        run_wrk(server.url, single, 8, self.args.warmup, self.workdir / "wrk-warmup.json")  # warm-up, not recorded
        settle(server)
        return server

    def round(self, rep: int, bm: BenchModel, servers: dict[str, Server], single: Path, batch: Path) -> None:
        args, cells = self.args, self.result["cells"]
        if (waited := self.quiet()) is not None:
            self.result.setdefault("quiet_waits", []).append({"model": bm.name, "round": rep, **waited})
        print(f"  -- round {rep + 1}/{args.repeat}", flush=True)
        for row in bench_raw_ort(bm, args.batch_sizes, args.ort_threads, args.raw_seconds):
            self.result["raw_ort"].append({**row, "round": rep})
        for c in args.concurrency:
            for server in servers.values():
                row = load_cell(server, bm, "single", 1, c, args.duration, single, self.workdir, self.max_batch)
                cells.append({**row, "round": rep})
        if "bentoml" in servers:
            for c in args.batch_concurrency:
                row = load_cell(servers["bentoml"], bm, self.batch_load, args.batch_images, c, args.duration, batch,
                                self.workdir, self.max_batch)
                cells.append({**row, "round": rep})

    def profile(self, bm: BenchModel, servers: dict[str, Server], single: Path, batch: Path) -> None:
        for kind, server in servers.items():
            specs = [("single", 1, TARGET_CONCURRENCY, single)]
            if kind == "bentoml" and bm.name == "cnn":
                specs.append((self.batch_load, self.args.batch_images, max(self.args.batch_concurrency), batch))
            for load, per, c, bodies in specs:
                self.result["profiles"].append(profile_cell(server, bm, load, per, c, self.args.duration, bodies,
                                                            self.workdir))

    def finish(self) -> dict:
        result = self.result
        result["machine"]["loadavg_end"] = harness.load_average()
        result["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        result["summary"] = summarize(result)
        result["targets"] = evaluate_targets(result)
        return result


def service_metadata(server: Server) -> dict | None:
    with contextlib.suppress(Exception):
        import httpx

        meta = httpx.get(server.url + "/metadata", timeout=10).json()
        return {k: meta.get(k) for k in ("active_providers", "intra_op_threads", "batching", "workers", "limits")}
    return None


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        bench = ServeRun(args, Path(tmp))
        for name in args.models:
            bench.model(name)
    return bench.finish()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=lambda s: s.split(","), default=["cnn", "resnet18"], help="cnn,resnet18")
    p.add_argument("--servers", type=lambda s: s.split(","), default=["bentoml", "naive"], help="bentoml,naive")
    p.add_argument("--duration", type=float, default=10, help="seconds per load cell (default 10)")
    p.add_argument("--repeat", type=int, default=2, help="rounds of every cell (medians reported; default 2)")
    p.add_argument("--warmup", type=float, default=3, help="seconds of unrecorded load after start (default 3)")
    p.add_argument("--raw-seconds", type=float, default=2, help="seconds per raw ORT cell (default 2)")
    p.add_argument("--concurrency", type=ints, default=[1, 8, 32, 64], help="single-image concurrencies")
    p.add_argument("--batch-concurrency", type=ints, default=[1, 4], help="concurrencies of the 64-image requests")
    p.add_argument("--batch-images", type=int, default=64)
    p.add_argument("--batch-sizes", type=ints, default=[1, 8, 32, 64], help="raw ORT batch sizes")
    p.add_argument("--ort-threads", type=ints, default=[1, 2], help="raw ORT intra-op thread counts")
    p.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for bentoml serve, e.g. CLASSIFIER_WORKERS=2 (repeatable)")
    p.add_argument("--service-dir", type=Path, default=REPO,
                   help="serve the `service` package from this folder (e.g. an older copy: `git archive HEAD service`)")
    p.add_argument("--startup-repeats", type=int, default=3, help="times the service start-up is timed (median)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each round wait up to this long for other jobs to use < --quiet-threshold %% CPU")
    p.add_argument("--quiet-threshold", type=float, default=30, help="CPU %% (100 = one core), default 30")
    p.add_argument("--profile", action="store_true", help="py-spy the servers during extra runs of the target cells")
    p.add_argument("--tag", default="", help="suffix of the result files (serve-<date>-<tag>.json)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    unknown = [m for m in args.models if m not in ("cnn", "resnet18")]
    if unknown:
        p.error(f"unknown model(s) {unknown}: use cnn, resnet18")
    if any("=" not in kv for kv in args.service_env):
        p.error("--service-env takes KEY=VALUE")
    return args


def rebuild(path: Path) -> int:
    """Recompute the derived figures, summary and targets of a result JSON and rewrite it and its .md."""
    result = json.loads(path.read_text())
    for cell in result["cells"]:
        rates(cell)
    result["summary"] = summarize(result)
    result["targets"] = evaluate_targets(result)
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--rebuild":
        return rebuild(Path(sys.argv[2]))
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the servers' process groups are stopped
    if shutil.which("wrk") is None:
        print("serve bench: wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    result = run(args)
    stem = f"serve-{dt.date.today().isoformat()}" + (f"-{args.tag}" if args.tag else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    report = markdown(result)
    (args.out_dir / f"{stem}.md").write_text(report)
    print("\n" + report)
    print(f"wrote {args.out_dir / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
