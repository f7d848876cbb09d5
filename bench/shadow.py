"""Shadow-mode cost: champion req/s and p99 with and without a shadowed challenger, in ONE run.

    .venv/bin/python bench/shadow.py                       # cnn champion, resnet challenger, c=32, 10 % shadowed
    .venv/bin/python bench/shadow.py --rate 0.1 --duration 10 --repeat 3 --challenger vgg

Both servers are the real ``bentoml serve service.service:Classifier`` on one temporary BentoML
store holding the trained ``exports/cnn/model.onnx`` as ``champion`` and another trained export
(``exports/<challenger>/model.onnx``) as ``challenger``; the only difference between the two
servers is ``CLASSIFIER_SHADOW_ALIAS=challenger`` (+ ``CLASSIFIER_SHADOW_RATE``). The rounds
alternate off / on so that drift on a shared machine hits both alike; medians are reported, and
the cost is judged per round. Load: ``wrk`` (bench/serve_wrk.lua), single-image PNG requests at
concurrency 32. Also read from the shadowed server's /metrics: images shadowed, skipped and the
top-1 agreement. Needs the pipeline's outputs (``make run``) and wrk (``apt-get install -y wrk``).

Writes bench/results/shadow-<date>.json and .md (machine, versions, command).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.serve import RESULTS_DIR, versions  # noqa: E402
from bench.serve_load import load_cell, run_wrk, settle, write_bodies  # noqa: E402
from bench.serve_models import prepare_cnn  # noqa: E402
from bench.serve_servers import bentoml_serving  # noqa: E402
from bench.serve_targets import TARGET_CONCURRENCY  # noqa: E402
from tests import harness  # noqa: E402

TARGET_COST = 0.10  # the limit: shadowing 10 % of the traffic costs < 10 % of req/s and p99


def shadow_counts(url: str) -> dict:
    import httpx

    counts: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("classifier_shadow_images_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = counts.get(outcome, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def start(home: Path, workdir: Path, env: dict, tag: str):
    """`bentoml serve` on the store `home` as it is (the registry not polled), + `env`."""
    return bentoml_serving(home, {"CLASSIFIER_REGISTRY_POLL_S": "0", **env}, workdir / f"bentoml-{tag}.log")


def wait_shadow_loaded(url: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while not (httpx.get(url + "/metadata", timeout=10).json().get("shadow") or {}).get("active"):
        if time.monotonic() > deadline:
            raise SystemExit("shadow bench: the challenger never loaded (see the server log)")
        time.sleep(0.5)


def measure(args: argparse.Namespace, workdir: Path, home: Path, bm, bodies: Path) -> list[dict]:
    rows = []
    shadow_env = {"CLASSIFIER_SHADOW_ALIAS": "challenger", "CLASSIFIER_SHADOW_RATE": str(args.rate)}
    for rnd in range(1, args.repeat + 1):
        for mode, env in (("off", {}), ("on", shadow_env)):
            with start(home, workdir, env, f"{mode}-{rnd}") as server:
                if mode == "on":
                    wait_shadow_loaded(server.url)
                run_wrk(server.url, bodies, args.concurrency, args.warmup, workdir / "warm.json")
                settle(server)
                before = shadow_counts(server.url)
                row = load_cell(server, bm, "1 image", 1, args.concurrency, args.duration, bodies, workdir, 64)
                after = shadow_counts(server.url)
                row.update(round=rnd, shadow=mode, shadow_images={k: after.get(k, 0) - before.get(k, 0) for k in after})
                rows.append(row)
    return rows


def summarize(rows: list[dict], rate: float) -> dict:
    rounds = sorted({r["round"] for r in rows})
    per_round = []
    for rnd in rounds:
        off = next(r for r in rows if r["round"] == rnd and r["shadow"] == "off")
        on = next(r for r in rows if r["round"] == rnd and r["shadow"] == "on")
        per_round.append({"round": rnd, "req_s_cost": 1 - on["req_per_s"] / off["req_per_s"],
                          "p99_cost": on["latency_ms"]["p99"] / off["latency_ms"]["p99"] - 1})
    med = {mode: {"req_per_s": statistics.median(r["req_per_s"] for r in rows if r["shadow"] == mode),
                  "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in rows if r["shadow"] == mode),
                  "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in rows if r["shadow"] == mode),
                  "errors": sum(r["error_count"] for r in rows if r["shadow"] == mode)}
           for mode in ("off", "on")}
    shadowed = {}
    for r in rows:
        for k, v in (r.get("shadow_images") or {}).items():
            shadowed[k] = shadowed.get(k, 0) + v
    compared = shadowed.get("agree", 0) + shadowed.get("disagree", 0)
    req_cost = statistics.median(p["req_s_cost"] for p in per_round)
    p99_cost = statistics.median(p["p99_cost"] for p in per_round)
    return {"rate": rate, "medians": med, "per_round": per_round, "shadow_images": shadowed,
            "agreement": round(shadowed.get("agree", 0) / compared, 4) if compared else None,
            "req_s_cost": round(req_cost, 4), "p99_cost": round(p99_cost, 4),
            "passed": req_cost < TARGET_COST and p99_cost < TARGET_COST and med["on"]["errors"] == 0}


def markdown(result: dict) -> str:
    s = result["summary"]
    m = s["medians"]
    lines = [f"# Shadow-mode cost ({result['date']})", "", f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']['cpu_model']}, {result['machine']['cpu_count']} CPUs; versions: "
             f"{', '.join(f'{k} {v}' for k, v in result['versions'].items())}", "",
             f"Champion `cnn`, challenger `{result['challenger']}`, single-image requests at c={result['concurrency']}, "
             f"{result['rounds']} rounds of {result['duration_s']} s per mode (medians); shadow rate {s['rate']}.", "",
             "| shadow | req/s | p50 ms | p99 ms | errors |", "|---|---:|---:|---:|---:|"]
    for mode in ("off", "on"):
        lines.append(f"| {mode} | {m[mode]['req_per_s']:,.1f} | {m[mode]['p50_ms']} | {m[mode]['p99_ms']} | {m[mode]['errors']} |")
    lines += ["", f"Cost (median of per-round ratios): req/s {100 * s['req_s_cost']:+.1f} %, p99 {100 * s['p99_cost']:+.1f} % "
              f"(limit < {100 * TARGET_COST:.0f} % each): **{'passed' if s['passed'] else 'NOT met'}**.",
              f"Shadowed images: {json.dumps(s['shadow_images'])}; top-1 agreement with the champion: {s['agreement']}.",
              "", "Per round: " + "; ".join(f"round {p['round']}: req/s {100 * p['req_s_cost']:+.1f} %, p99 "
                                           f"{100 * p['p99_cost']:+.1f} %" for p in s["per_round"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--challenger", default="resnet", help="export used as the challenger (default resnet)")
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--concurrency", type=int, default=TARGET_CONCURRENCY)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--warmup", type=float, default=3)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    bm = prepare_cnn()
    challenger = REPO / "exports" / args.challenger / "model.onnx"
    if not challenger.is_file():
        raise SystemExit(f"shadow bench: {challenger} is missing: run the pipeline (make run) first")
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp:
        workdir = Path(tmp)
        home = workdir / "bentoml_home"
        harness.store_in_bento_home(bm.onnx, home, "champion")
        harness.store_in_bento_home(challenger, home, "challenger")
        bodies = write_bodies(workdir / "bodies-1", bm.pngs, 1, 64)
        rows = measure(args, workdir, home, bm, bodies)
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": harness.command_line(),
              "machine": harness.machine(), "versions": versions(), "git": harness.git_state(),
              "challenger": args.challenger, "concurrency": args.concurrency, "rounds": args.repeat,
              "duration_s": args.duration, "cells": rows, "summary": summarize(rows, args.rate)}
    stem = RESULTS_DIR / f"shadow-{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["summary"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
