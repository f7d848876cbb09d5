"""bench/serve.py's derived figures: the median round of every cell, and the issue's targets.

The targets are data (``TARGETS``): what is measured (a key of ``MEASURES``), on which model, server,
load and concurrencies, against which limit. Ratios are taken per round (the servers are measured
back to back) and the median is judged.
"""
from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

TARGET_CONCURRENCY = 32


@dataclass(frozen=True)
class Target:
    name: str  # "{model}" is replaced by the model's name
    measure: str  # a key of MEASURES
    limit: float | None  # None: the figure is reported, not judged
    op: str = ">="  # measured <op> limit passes
    model: str | None = None  # None: once per model of the result (after the others, in the result's order)
    server: str = "bentoml"
    load: str = "single"
    concurrency: tuple[int, ...] | None = (TARGET_CONCURRENCY,)  # None: any


TARGETS = (
    Target("cnn single-image c=32: service req/s >= 1.5x naive", "speedup_vs_naive", 1.5, ">=", "cnn"),
    Target("cnn single-image c=32: service p99 <= 50 ms", "p99_ms", 50, "<=", "cnn"),
    Target("cnn single-image c=32: zero errors", "errors", 0, "==", "cnn"),
    Target("resnet18 single-image c=32: service images/s >= 85% of raw ORT best batched", "share_of_raw_ort", 0.85,
           ">=", "resnet18"),
    Target("resnet18 64-image requests: service images/s >= 90% of raw ORT best", "share_of_raw_ort", 0.90, ">=",
           "resnet18", load="batch64", concurrency=None),
    Target("cnn 64-image requests: service images/s >= 50% of raw ORT best", "share_of_raw_ort", 0.50, ">=", "cnn",
           load="batch64", concurrency=None),
    Target("{model}: service ready <= 5 s after start", "ready_s", 5, "<="),
    Target("{model}: service peak RSS (reported)", "peak_rss_mib", None),
    Target("{model}: naive server peak RSS (reported)", "peak_rss_mib", None, server="naive"),
)
OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq}


# --- medians ------------------------------------------------------------------------------------------

def median_rows(rows: list[dict], keys: tuple[str, ...], metric: str) -> list[dict]:
    """One row per key: the round with the median `metric` (lower median), plus every round's values."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for members in groups.values():
        ordered = sorted(members, key=lambda r: r[metric])
        pick = dict(ordered[(len(ordered) - 1) // 2])
        pick[f"{metric}_rounds"] = [r[metric] for r in members]
        if "req_per_s" in pick:
            pick["p99_ms_rounds"] = [r["latency_ms"]["p99"] for r in members]
            pick["errors_rounds"] = [r["error_count"] for r in members]
        out.append(pick)
    return out


def summarize(result: dict) -> dict:
    return {"raw_ort": median_rows(result["raw_ort"], ("model", "threads", "batch"), "images_per_s"),
            "cells": median_rows(result["cells"], ("model", "server", "load", "concurrency"), "images_per_s")}


# --- measures: (target, result, model) -> (value judged, value shown, detail), or None -------------------

Measured = tuple[float, float, str] | None


def find(rows: list[dict], **match) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def rounds(result: dict) -> list[int]:
    return sorted({c["round"] for c in result["cells"]})


def cell(t: Target, rows: list[dict], model: str, **match) -> dict | None:
    return find(rows, model=model, server=t.server, load=t.load, concurrency=t.concurrency[0], **match)


def speedup_vs_naive(t: Target, result: dict, model: str) -> Measured:
    ratios = []
    for r in rounds(result):
        svc = cell(t, result["cells"], model, round=r)
        naive = find(result["cells"], model=model, server="naive", load=t.load, concurrency=t.concurrency[0], round=r)
        if svc and naive and naive["req_per_s"]:
            ratios.append(svc["req_per_s"] / naive["req_per_s"])
    if not ratios:
        return None
    ratio = float(np.median(ratios))
    return ratio, round(ratio, 2), "per-round ratios " + ", ".join(f"{x:.2f}" for x in ratios)


def p99_ms(t: Target, result: dict, model: str) -> Measured:
    svc = cell(t, result["summary"]["cells"], model)
    if not svc:
        return None
    p99 = svc["latency_ms"]["p99"]
    return p99, p99, (f"median round; rounds {svc['p99_ms_rounds']} ms; p50 {svc['latency_ms']['p50']} ms "
                      f"at {svc['req_per_s']} req/s")


def errors(t: Target, result: dict, model: str) -> Measured:
    svc = cell(t, result["summary"]["cells"], model)
    if not svc:
        return None
    count = sum(svc["errors_rounds"])
    return count, count, "all rounds"


def share_of_raw_ort(t: Target, result: dict, model: str) -> Measured:
    fractions, details = [], []
    for r in rounds(result):
        ceiling = max((x["images_per_s"] for x in result["raw_ort"] if x["model"] == model and x["round"] == r),
                      default=None)
        candidates = [c for c in result["cells"] if c["model"] == model and c["server"] == t.server
                      and c["load"] == t.load and c["round"] == r
                      and (t.concurrency is None or c["concurrency"] in t.concurrency)]
        if ceiling and candidates:
            best = max(candidates, key=lambda c: c["images_per_s"])
            fractions.append(best["images_per_s"] / ceiling)
            details.append(f"{best['images_per_s']:.0f} (c={best['concurrency']}) / {ceiling:.0f}")
    if not fractions:
        return None
    frac = float(np.median(fractions))
    return frac, round(frac, 3), "per round, service / raw ORT img/s: " + "; ".join(details)


def ready_s(t: Target, result: dict, model: str) -> Measured:
    info = result["servers"].get(model, {}).get(t.server)
    if info is None:
        return None
    return info["ready_s"], info["ready_s"], f"median of {len(info.get('ready_s_all', [info['ready_s']]))} starts: " \
                                             f"{info.get('ready_s_all')}"


def peak_rss_mib(t: Target, result: dict, model: str) -> Measured:
    info = result["servers"].get(model, {}).get(t.server)
    if info is None:
        return None
    peak = info["memory"]["peak_rss_total_mib"]
    if t.server == "bentoml":
        return peak, peak, "MiB, all service processes; by role " + json.dumps(info["memory"]["peak_rss_by_role_mib"])
    return peak, peak, f"MiB; ready after {info['ready_s']} s"


MEASURES: dict[str, Callable[[Target, dict, str], Measured]] = {
    "speedup_vs_naive": speedup_vs_naive, "p99_ms": p99_ms, "errors": errors, "share_of_raw_ort": share_of_raw_ort,
    "ready_s": ready_s, "peak_rss_mib": peak_rss_mib,
}


# --- judging ----------------------------------------------------------------------------------------

def judge(t: Target, result: dict, model: str) -> dict | None:
    measured = MEASURES[t.measure](t, result, model)
    if measured is None:
        return None
    value, shown, detail = measured
    met = None if t.limit is None else bool(OPS[t.op](value, t.limit))
    return {"target": t.name.format(model=model), "measured": shown, "limit": t.limit, "met": met, "detail": detail}


def evaluate_targets(result: dict, targets: tuple[Target, ...] = TARGETS) -> list[dict]:
    """Every target that the result can measure: the fixed-model ones, then the per-model ones model by model."""
    plan = [(t, t.model) for t in targets if t.model is not None]
    plan += [(t, model) for model in result["servers"] for t in targets if t.model is None]
    return [row for row in (judge(t, result, model) for t, model in plan) if row is not None]
