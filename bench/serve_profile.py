"""bench/serve.py --profile: py-spy on the servers' processes during an extra run of a load cell,
summarised by where the time goes."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.serve_load import settle, wrk_command

IDLE_LEAVES = ("Condition.wait", "EpollSelector.select", "Queue.get", "Event.wait", "select (", "_worker (")
#: (category, substrings of a frame): a sample goes to the first category any of its frames matches.
CATEGORIES = [
    ("bentoml output JSON schema per response (IOMixin.mime_type)", ("IOMixin.mime_type", "model_json_schema")),
    ("onnxruntime Session.run", ("onnxruntime_inference_collection", "OnnxClassifier.logits")),
    ("resize (PIL)", ("resize_image",)),
    ("decode (PIL open/verify/load/convert)", ("decode_image", "image_to_array")),
    ("normalize (numpy)", ("normalize (service/contract",)),
    ("postprocess (softmax/top-k dicts)", ("service/postprocessing",)),
    ("multipart/body parsing", ("from_http_request", "formparsers", "multipart/", "_get_form")),
    ("micro-batcher", ("service/batcher.py",)),
    ("response serialization", ("to_http_response", "IterableResponse", "json/encoder", "JSONResponse", "render (")),
    ("logging/metrics/tracing", ("logging/__init__", "prometheus_client", "opentelemetry/sdk", "trace/__init__",
                                 "_decorator.py", "access.py", "instruments.py")),
    ("pytorch eager forward (naive)", ("torch/nn/", "torch/_", "torch/autograd")),
    ("torchvision transforms (naive)", ("torchvision/",)),
    ("HTTP server (uvicorn/h11/starlette/asyncio)", ("",)),
]


def summarize_profile(raw_path: Path, top: int = 12) -> dict:
    """py-spy --format raw (collapsed stacks) -> active share, category shares and top self frames."""
    self_counts: Counter = Counter()
    categories: Counter = Counter()
    active = idle = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count, frames = int(n), stack.split(";")
        if frames[-1].startswith(IDLE_LEAVES):
            idle += count
            continue
        active += count
        self_counts[frames[-1]] += count
        for name, needles in CATEGORIES:
            if any(needle in frame for frame in frames for needle in needles):
                categories[name] += count
                break
    share = (lambda c: round(100 * c / active, 1)) if active else (lambda c: 0.0)
    return {"active_samples": active, "idle_samples": idle,
            "categories_pct": {k: share(v) for k, v in categories.most_common()},
            "top_self_pct": {k: share(v) for k, v in self_counts.most_common(top)}}


def spy_targets(server) -> dict[str, int]:
    """Every worker by role (api, api#2, ..., naive): connections may all land on one."""
    pids = server.tree.pids()
    return {(role if i == 0 else f"{role}#{i + 1}"): pid
            for role in ("api", "naive") for i, pid in enumerate(sorted(pids.get(role, [])))}


def record(targets: dict[str, int], outputs: dict[str, Path], seconds: int, rate: int) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    procs = [subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate),
                               "--format", "raw", "--output", str(outputs[role]), "--nonblocking"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for role, pid in targets.items()]
    for p in procs:
        p.wait(timeout=seconds + 60)


def profile_cell(server, bm, load: str, per_request: int, concurrency: int, duration: float,
                 bodies: Path, workdir: Path, rate: int = 100) -> dict:
    targets = spy_targets(server)
    spy_seconds = max(2, round(duration) - 2)
    cmd, env = wrk_command(server.url, bodies, concurrency, spy_seconds + 2, workdir / "wrk-profile.json")
    wrk = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    spies = {role: (workdir / f"pyspy-{bm.name}-{load}-c{concurrency}-{role}.txt") for role in targets}
    record(targets, spies, spy_seconds, rate)
    wrk.wait(timeout=spy_seconds + 60)
    settle(server)
    out = {"model": bm.name, "server": server.kind, "load": load, "concurrency": concurrency,
           "seconds": spy_seconds, "rate_hz": rate, "processes": {}}
    for role, path in spies.items():
        if path.is_file():
            out["processes"][role] = summarize_profile(path)
            out["processes"][role]["cpu_pct_of_one_core"] = round(
                100 * out["processes"][role]["active_samples"] / (spy_seconds * rate), 1)
    print(f"    profiled {bm.name} {server.kind} {load} c={concurrency}: "
          + "; ".join(f"{r}: {next(iter(p['categories_pct'].items()), ('-', 0))}" for r, p in out["processes"].items()),
          flush=True)
    return out
