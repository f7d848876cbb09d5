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
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS_DIR = REPO / "bench" / "results"
WRK_SCRIPT = REPO / "bench" / "serve_wrk.lua"
DATA_MIRROR = Path(os.environ.get("DATA_MIRROR") or REPO.parent / "shared" / "data")  # as the tests use it
CIFAR_TAR = Path(os.environ.get("CIFAR_JPG_TAR") or DATA_MIRROR / "cifar10" / "cifar10-train-jpg.tar.gz")
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
BOUNDARY = "----benchserve7d3f2a"
TARGET_CONCURRENCY = 32


# --- models and request images ----------------------------------------------------------------------

@dataclass
class BenchModel:
    name: str
    onnx: Path
    pt: Path
    pngs: list[bytes]
    note: str
    facts: dict = field(default_factory=dict)


def png_bytes(chw: np.ndarray) -> bytes:
    from PIL import Image

    arr = chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def prepare_cnn(n_images: int = 256) -> BenchModel:
    onnx_path, pt_path = REPO / "exports/cnn/model.onnx", REPO / "outputs/cnn/model.pt"
    test = REPO / "data/prepared/test.npz"
    for path in (onnx_path, pt_path, test):
        if not path.is_file():
            raise SystemExit(f"serve bench: {path} is missing: run the pipeline (dvc repro) first")
    with np.load(test) as npz:
        images = npz["images"][:n_images]
    return BenchModel("cnn", onnx_path, pt_path, [png_bytes(a) for a in images],
                      "trained MNIST cnn (exports/cnn/model.onnx, outputs/cnn/model.pt), 1x28x28")


def cifar_images(n: int) -> tuple[np.ndarray, str]:
    """n real CIFAR-10 images uint8 [n, 3, 32, 32] from the shared JPEG tarball, else a synthetic pattern."""
    from PIL import Image

    out = []
    if CIFAR_TAR.is_file():
        with tarfile.open(CIFAR_TAR, "r|gz") as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith(".jpg"):
                    data = tar.extractfile(member).read()
                    out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32))).transpose(2, 0, 1))
                    if len(out) == n:
                        return np.stack(out), f"{CIFAR_TAR} (first {n} JPEGs, re-encoded as PNG)"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), "synthetic random pixels (CIFAR tarball not found)"


def prepare_resnet18(workdir: Path, n_images: int = 256) -> BenchModel:
    import torch

    from models import create_model
    from pipeline.export import export_onnx, onnx_logits
    from pipeline.modelfile import load_model_file, normalize, predict_logits

    images, source = cifar_images(n_images)
    torch.manual_seed(0)
    model = create_model("resnet", 3, 10, 32)  # image_size 32 -> the CIFAR-style ResNet-18
    x = normalize(torch.as_tensor(images[:128]), CIFAR_MEAN, CIFAR_STD)
    model.train()
    with torch.no_grad():  # "brief initialisation": BatchNorm running statistics from real images
        for _ in range(3):
            model(x)
    model.eval()
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    meta = {"arch": "resnet", "kwargs": {}, "in_channels": 3, "image_size": 32, "num_classes": 10,
            "classes": CIFAR_CLASSES, "mean": CIFAR_MEAN, "std": CIFAR_STD, "dataset": "cifar10",
            "mlflow_run_id": "bench-untrained-resnet18", "num_params": num_params}
    proto = export_onnx(model, meta, opset=17)
    onnx_path, pt_path = workdir / "resnet18.onnx", workdir / "resnet18.pt"
    onnx_path.write_bytes(proto.SerializeToString())
    torch.save({**meta, "state_dict": model.state_dict()}, pt_path)
    reloaded, _ = load_model_file(pt_path)
    check = images[:64]
    diff = float(np.abs(predict_logits(reloaded, check, CIFAR_MEAN, CIFAR_STD).numpy() - onnx_logits(
        proto.SerializeToString(), normalize(torch.as_tensor(check), CIFAR_MEAN, CIFAR_STD))).max())
    return BenchModel("resnet18", onnx_path, pt_path, [png_bytes(a) for a in images],
                      f"CIFAR-style ResNet-18 (create_model('resnet', 3, 10, 32)), 3x32x32, {num_params} params, "
                      f"random init + BatchNorm stats from real images (speed only); request images: {source}",
                      {"num_params": num_params, "parity_max_abs_logit_diff_64_images": diff})


# --- raw ONNX Runtime (the ceiling) -------------------------------------------------------------------

def bench_raw_ort(bm: BenchModel, batch_sizes: list[int], threads: list[int], seconds: float) -> list[dict]:
    from service.engine import OnnxClassifier
    from service.preprocessing import preprocess_batch

    rows = []
    for n_threads in threads:
        engine = OnnxClassifier(bm.onnx, providers="cpu", intra_op_threads=n_threads)
        pool = preprocess_batch(bm.pngs, engine.spec)
        for bs in batch_sizes:
            x = np.ascontiguousarray(np.resize(pool, (bs, *pool.shape[1:])))
            for _ in range(3):
                engine.logits(x)
            times = []
            start = time.perf_counter()
            while time.perf_counter() - start < seconds or len(times) < 5:
                t0 = time.perf_counter()
                engine.logits(x)
                times.append(time.perf_counter() - t0)
            total = time.perf_counter() - start
            rows.append({"model": bm.name, "threads": n_threads, "batch": bs, "calls": len(times),
                         "images_per_s": round(bs * len(times) / total, 1),
                         "ms_per_call_p50": round(1000 * float(np.median(times)), 3),
                         "images_per_s_at_p50": round(bs / float(np.median(times)), 1),
                         "ms_per_call_p99": round(1000 * float(np.percentile(times, 99)), 3)})
            print(f"  raw ORT {bm.name} threads={n_threads} batch={bs:3d}: {rows[-1]['images_per_s']:9.1f} images/s "
                  f"({rows[-1]['ms_per_call_p50']:.3f} ms/call)", flush=True)
        del engine
    return rows


# --- processes: start, readiness, CPU and memory ------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def role_of(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    if "--service-name image-classifier" in text:
        return "api"
    if "bentoml serve" in text or "bentoml.__main__" in text or " -m bentoml " in f" {text} ":
        return "arbiter"
    if "uvicorn" in text:
        return "naive"
    return "other"


class ProcessTree:
    """The server's process group: per-role CPU seconds, and a sampler of total and per-role peak RSS."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_total = 0
        self.peak_by_role: Counter = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def processes(self) -> list:
        import psutil

        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total, by_role = 0, Counter()
            for p in self.processes():
                try:
                    rss = p.memory_info().rss
                    by_role[role_of(p.cmdline())] += rss
                    total += rss
                except psutil.Error:
                    pass
            self.peak_total = max(self.peak_total, total)
            for role, rss in by_role.items():
                self.peak_by_role[role] = max(self.peak_by_role[role], rss)
            self._stop.wait(self.interval)

    def cpu_seconds(self) -> dict[str, float]:
        import psutil

        out: Counter = Counter()
        for p in self.processes():
            try:
                t = p.cpu_times()
                out[role_of(p.cmdline())] += t.user + t.system
            except psutil.Error:
                pass
        return dict(out)

    def pids(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for p in self.processes():
            with contextlib.suppress(Exception):
                out.setdefault(role_of(p.cmdline()), []).append(p.pid)
        return out

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=5)
        mib = 1024 * 1024
        return {"peak_rss_total_mib": round(self.peak_total / mib, 1),
                "peak_rss_by_role_mib": {k: round(v / mib, 1) for k, v in sorted(self.peak_by_role.items())}}


@dataclass
class Server:
    kind: str  # bentoml | naive
    url: str
    proc: subprocess.Popen
    ready_s: float
    command: list[str]
    env: dict
    log_path: Path
    tree: ProcessTree | None = None


def wait_ready(url: str, proc: subprocess.Popen, path: str, started: float, log_path: Path, timeout: float = 120) -> float:
    import httpx

    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=2).status_code == 200:
                return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"server not ready after {timeout} s:\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.02)


@contextlib.contextmanager
def running(kind: str, cmd: list[str], env: dict, ready_path: str, port: int, log_path: Path):
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        ready_s = wait_ready(url, proc, ready_path, started, log_path)
        server = Server(kind, url, proc, ready_s, cmd, env, log_path)
        server.tree = ProcessTree(proc.pid)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the process group this function started
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def store_model(onnx_path: Path, home: Path, alias: str = "champion") -> str:
    """The model in `home`'s store with `alias` pointing at it (what the service follows)."""
    code = ("from pipeline.bento_store import store_serving\n"
            f"print(store_serving({str(onnx_path)!r}, alias={alias!r}))")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"storing {onnx_path} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout.strip().splitlines()[-1]


def bentoml_server(bm: BenchModel, workdir: Path, service_env: dict, service_dir: Path = REPO):
    """`bentoml serve` of the service package found in `service_dir` (default: this checkout)."""
    home = workdir / f"bentoml_home_{bm.name}"
    tag = store_model(bm.onnx, home)
    port = free_port()
    cmd = [sys.executable, "-m", "bentoml", "serve", "service.service:Classifier", "--host", "127.0.0.1",
           "--port", str(port), "--working-dir", str(service_dir)]
    env = {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", **service_env}
    if service_dir != REPO:
        env["PYTHONPATH"] = f"{service_dir}{os.pathsep}{REPO}"
    print(f"  starting bentoml serve ({tag}) on port {port} {service_env or ''}", flush=True)
    return running("bentoml", cmd, env, "/readyz", port, workdir / f"bentoml-{bm.name}.log")


def naive_server(bm: BenchModel, workdir: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "bench.serve_naive:app", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    print(f"  starting naive FastAPI + PyTorch server on port {port}", flush=True)
    return running("naive", cmd, {"NAIVE_MODEL": str(bm.pt)}, "/healthz", port, workdir / f"naive-{bm.name}.log")


# --- load generation -----------------------------------------------------------------------------------

def multipart(files: list[tuple[str, bytes]]) -> bytes:
    parts = [(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
              f"Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def write_bodies(folder: Path, pngs: list[bytes], per_request: int, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        files = [(f"img{(k * per_request + j) % len(pngs)}.png", pngs[(k * per_request + j) % len(pngs)])
                 for j in range(per_request)]
        (folder / f"body_{k}.bin").write_bytes(multipart(files))
    return folder


def run_wrk(url: str, bodies: Path, concurrency: int, duration: float, out_json: Path) -> dict:
    count = len(list(bodies.glob("body_*.bin")))
    env = {**os.environ, "WRK_BODY_DIR": str(bodies), "WRK_BODY_COUNT": str(count), "WRK_PATH": "/classify",
           "WRK_CONTENT_TYPE": f"multipart/form-data; boundary={BOUNDARY}", "WRK_OUT": str(out_json)}
    cmd = ["wrk", "-t", "1", "-c", str(concurrency), "-d", f"{max(1, round(duration))}s", "--timeout", "10s",
           "-s", str(WRK_SCRIPT), f"{url}/classify"]
    out_json.unlink(missing_ok=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 60)
    if proc.returncode != 0 or not out_json.is_file():
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    return json.loads(out_json.read_text())


def batch_metrics(url: str) -> tuple[float, float]:
    """(images, model calls) of the service's micro-batcher so far (all workers), from /metrics."""
    import httpx

    merged = calls = 0.0
    text = httpx.get(url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("classifier_batch_size_sum"):
            merged += float(line.rsplit(" ", 1)[1])
        elif line.startswith("classifier_batch_size_count"):
            calls += float(line.rsplit(" ", 1)[1])
    return merged, calls


def settle(server: Server, timeout: float = 20) -> None:
    """Wait until requests queued when wrk stopped have drained (model-call count stable for 0.5 s)."""
    if server.kind != "bentoml":
        time.sleep(0.5)
        return
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        now = batch_metrics(server.url)
        if now == last:
            return
        last = now
        time.sleep(0.5)


def smoke_check(server: Server, bodies: Path, expected: int) -> dict:
    import httpx

    body = (bodies / "body_0.bin").read_bytes()
    r = httpx.post(server.url + "/classify", content=body, timeout=60,
                   headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    if r.status_code != 200 or len(r.json()) != expected:
        raise RuntimeError(f"{server.kind}: smoke request failed: {r.status_code} {r.text[:500]}")
    return {"status": r.status_code, "first_label": r.json()[0]["label"]}


def cpu_jiffies() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / hz, sum(fields[:8]) / hz


def background_cpu_pct(window: float = 3.0) -> float:
    """CPU % (100 = one core) the machine spends over `window` seconds while this bench idles."""
    before = cpu_jiffies()[0]
    time.sleep(window)
    return 100 * (cpu_jiffies()[0] - before) / window


def wait_for_quiet(max_wait: float, threshold: float) -> dict:
    """Wait (up to max_wait s) until other jobs use less than `threshold` % CPU; returns what was seen."""
    started, seen = time.monotonic(), []
    while True:
        seen.append(round(background_cpu_pct(), 1))
        if seen[-1] < threshold or time.monotonic() - started >= max_wait:
            return {"waited_s": round(time.monotonic() - started, 1), "background_cpu_pct_samples": seen[-20:],
                    "quiet": seen[-1] < threshold, "threshold_pct": threshold}
        print(f"  waiting for a quieter machine: other jobs use {seen[-1]:.0f}% CPU", flush=True)


def children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rates(row: dict) -> dict:
    """Throughput counts answered-OK requests only (wrk counts non-2xx answers as requests and as status errors)."""
    ok = row["requests"] - row["errors"]["status"]
    row["ok_requests"] = ok
    row["req_per_s"] = round(ok / row["duration_s"], 1)
    row["images_per_s"] = round(ok * row["images_per_request"] / row["duration_s"], 1)
    row["error_count"] = int(sum(row["errors"].values()))
    return row


def load_cell(server: Server, bm: BenchModel, load: str, per_request: int, concurrency: int, duration: float,
              bodies: Path, workdir: Path, max_batch: int) -> dict:
    before_metrics = batch_metrics(server.url) if server.kind == "bentoml" else None
    cpu_before = server.tree.cpu_seconds()
    load_before = os.getloadavg()
    machine_before, wrk_before, self_before = cpu_jiffies(), children_cpu(), time.process_time()
    t0 = time.monotonic()
    w = run_wrk(server.url, bodies, concurrency, duration, workdir / "wrk-out.json")
    wall = time.monotonic() - t0
    cpu_after = server.tree.cpu_seconds()
    machine_after, wrk_after, self_after = cpu_jiffies(), children_cpu(), time.process_time()
    server_cpu = sum(cpu_after.values()) - sum(cpu_before.values())
    wrk_cpu = wrk_after - wrk_before
    machine_busy = machine_after[0] - machine_before[0]
    others_cpu = machine_busy - server_cpu - wrk_cpu - (self_after - self_before)
    settle(server)
    seconds = w["duration_us"] / 1e6
    errors = w["errors"]
    lat = w["latency_us"]
    row = {
        "model": bm.name, "server": server.kind, "load": load, "images_per_request": per_request,
        "concurrency": concurrency, "duration_s": round(seconds, 2), "requests": w["requests"],
        "latency_ms": {k: round(lat[k] / 1000, 2) for k in ("mean", "p50", "p90", "p99", "p999", "max")},
        "errors": errors, "error_count": int(sum(errors.values())),
        "cpu_pct": {role: round(100 * (cpu_after.get(role, 0) - cpu_before.get(role, 0)) / wall, 1)
                    for role in sorted(cpu_after) if role not in ("other", "arbiter")},
        "server_cpu_ms_per_request": round(1000 * server_cpu / w["requests"], 3) if w["requests"] else None,
        "wrk_cpu_pct": round(100 * wrk_cpu / wall, 1),
        "other_processes_cpu_pct": round(100 * max(0.0, others_cpu) / wall, 1),
        "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
    }
    rates(row)
    if before_metrics is not None:
        images, calls = (a - b for a, b in zip(batch_metrics(server.url), before_metrics))
        per_chunk = min(per_request, max_batch)  # a request's images go to the batcher in chunks of max_batch
        row["batching"] = {
            "model_calls": int(calls), "images": int(images),
            "requests_per_call": round(images / per_chunk / calls, 2) if calls else None,
            "images_per_call": round(images / calls, 2) if calls else None,
        }
    b = row.get("batching") or {}
    print(f"    {bm.name:8s} {server.kind:7s} {load:7s} c={concurrency:2d}: {row['req_per_s']:8.1f} req/s "
          f"{row['images_per_s']:8.1f} img/s p50 {row['latency_ms']['p50']:7.1f} ms p99 {row['latency_ms']['p99']:7.1f} ms "
          f"errors {row['error_count']}" + (f" img/call {b.get('images_per_call')}" if b else "")
          + f" cpu {row['cpu_pct']} {row['server_cpu_ms_per_request']} ms/req, others {row['other_processes_cpu_pct']}%",
          flush=True)
    return row


# --- profiling (py-spy) ---------------------------------------------------------------------------------

IDLE_LEAVES = ("Condition.wait", "EpollSelector.select", "Queue.get", "Event.wait", "select (", "_worker (")
#: (category, substrings of a frame): a sample goes to the first category any of its frames matches.
CATEGORIES = [
    ("bentoml output JSON schema per response (IOMixin.mime_type)", ("IOMixin.mime_type", "model_json_schema")),
    ("onnxruntime Session.run", ("onnxruntime_inference_collection", "OnnxClassifier.logits")),
    ("resize (PIL)", ("resize_image",)),
    ("decode (PIL open/verify/load/convert)", ("decode_image", "image_to_array")),
    ("normalize (numpy)", ("normalize (service/preprocessing",)),
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


def profile_cell(server: Server, bm: BenchModel, load: str, per_request: int, concurrency: int, duration: float,
                 bodies: Path, workdir: Path, rate: int = 100) -> dict:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    pids = server.tree.pids()
    targets = {(role if i == 0 else f"{role}#{i + 1}"): pid  # every worker: connections may all land on one
               for role in ("api", "naive") for i, pid in enumerate(sorted(pids.get(role, [])))}
    spy_seconds = max(2, round(duration) - 2)
    env = {**os.environ, "WRK_BODY_DIR": str(bodies), "WRK_BODY_COUNT": str(len(list(bodies.glob("body_*.bin")))),
           "WRK_PATH": "/classify", "WRK_CONTENT_TYPE": f"multipart/form-data; boundary={BOUNDARY}",
           "WRK_OUT": str(workdir / "wrk-profile.json")}
    wrk = subprocess.Popen(["wrk", "-t", "1", "-c", str(concurrency), "-d", f"{spy_seconds + 2}s", "--timeout", "10s",
                            "-s", str(WRK_SCRIPT), f"{server.url}/classify"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    spies = {role: (workdir / f"pyspy-{bm.name}-{load}-c{concurrency}-{role}.txt") for role in targets}
    procs = [subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", str(spy_seconds), "--rate", str(rate),
                               "--format", "raw", "--output", str(spies[role]), "--nonblocking"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for role, pid in targets.items()]
    for p in procs:
        p.wait(timeout=spy_seconds + 60)
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


# --- the run -------------------------------------------------------------------------------------------

def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("bentoml", "onnxruntime-gpu", "onnxruntime", "onnx", "torch", "torchvision", "fastapi", "uvicorn",
                 "starlette", "numpy", "pillow", "pydantic", "aiohttp"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    with contextlib.suppress(Exception):
        out["wrk"] = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    return out


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "memory": mem, "platform": platform.platform(),
            "loadavg_start": [round(v, 2) for v in os.getloadavg()]}


def command_line() -> str:
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(REPO)
    return shlex.join([str(exe), *sys.argv])


def git_state() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty_files": git("status", "--porcelain", "--", "service", "bench",
                                                                       ":!bench/results").splitlines()}


def find(rows: list[dict], **match) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def evaluate_targets(result: dict) -> list[dict]:
    """The issue's targets; ratios are taken per round (servers measured back to back) and the median is judged."""
    cells, raw, servers = result["cells"], result["raw_ort"], result["servers"]
    summary = result["summary"]["cells"]
    rounds = sorted({c["round"] for c in cells})
    targets = []

    def add(name: str, measured, limit, passed, detail: str = "") -> None:
        targets.append({"target": name, "measured": measured, "limit": limit,
                        "met": None if passed is None else bool(passed), "detail": detail})

    ratios = []
    for r in rounds:
        svc = find(cells, model="cnn", server="bentoml", load="single", concurrency=TARGET_CONCURRENCY, round=r)
        naive = find(cells, model="cnn", server="naive", load="single", concurrency=TARGET_CONCURRENCY, round=r)
        if svc and naive and naive["req_per_s"]:
            ratios.append(svc["req_per_s"] / naive["req_per_s"])
    if ratios:
        ratio = float(np.median(ratios))
        add("cnn single-image c=32: service req/s >= 1.5x naive", round(ratio, 2), 1.5, ratio >= 1.5,
            "per-round ratios " + ", ".join(f"{x:.2f}" for x in ratios))
    svc = find(summary, model="cnn", server="bentoml", load="single", concurrency=TARGET_CONCURRENCY)
    if svc:
        add("cnn single-image c=32: service p99 <= 50 ms", svc["latency_ms"]["p99"], 50, svc["latency_ms"]["p99"] <= 50,
            f"median round; rounds {svc['p99_ms_rounds']} ms; p50 {svc['latency_ms']['p50']} ms at {svc['req_per_s']} req/s")
        errors = sum(svc["errors_rounds"])
        add("cnn single-image c=32: zero errors", errors, 0, errors == 0, "all rounds")
    for model, load, conc, share, label in (
        ("resnet18", "single", [TARGET_CONCURRENCY], 0.85,
         "resnet18 single-image c=32: service images/s >= 85% of raw ORT best batched"),
        ("cnn", "batch64", None, 0.50, "cnn 64-image requests: service images/s >= 50% of raw ORT best"),
    ):
        fractions, details = [], []
        for r in rounds:
            ceiling = max((x["images_per_s"] for x in raw if x["model"] == model and x["round"] == r), default=None)
            candidates = [c for c in cells if c["model"] == model and c["server"] == "bentoml" and c["load"] == load
                          and c["round"] == r and (conc is None or c["concurrency"] in conc)]
            if ceiling and candidates:
                best = max(candidates, key=lambda c: c["images_per_s"])
                fractions.append(best["images_per_s"] / ceiling)
                details.append(f"{best['images_per_s']:.0f} (c={best['concurrency']}) / {ceiling:.0f}")
        if fractions:
            frac = float(np.median(fractions))
            add(label, round(frac, 3), share, frac >= share, "per round, service / raw ORT img/s: " + "; ".join(details))
    for model, info in servers.items():
        if "bentoml" in info:
            ready = info["bentoml"]["ready_s"]
            add(f"{model}: service ready <= 5 s after start", ready, 5, ready <= 5,
                f"median of {len(info['bentoml'].get('ready_s_all', [ready]))} starts: {info['bentoml'].get('ready_s_all')}")
            add(f"{model}: service peak RSS (reported)", info["bentoml"]["memory"]["peak_rss_total_mib"], None, None,
                "MiB, all service processes; by role " + json.dumps(info["bentoml"]["memory"]["peak_rss_by_role_mib"]))
        if "naive" in info:
            add(f"{model}: naive server peak RSS (reported)", info["naive"]["memory"]["peak_rss_total_mib"], None, None,
                f"MiB; ready after {info['naive']['ready_s']} s")
    return targets


def run(args: argparse.Namespace) -> dict:
    service_env = dict(kv.split("=", 1) for kv in args.service_env)
    max_batch = int(service_env.get("CLASSIFIER_MAX_BATCH_SIZE", os.environ.get("CLASSIFIER_MAX_BATCH_SIZE", "64")))
    batch_load = f"batch{args.batch_images}"
    result: dict = {
        "benchmark": "serve", "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command_line(),
        "machine": machine(), "versions": versions(), "git": git_state(),
        "settings": {"duration_s": args.duration, "repeat": args.repeat, "concurrency": args.concurrency,
                     "batch_concurrency": args.batch_concurrency, "images_per_batch_request": args.batch_images,
                     "raw_ort_batch_sizes": args.batch_sizes, "raw_ort_threads": args.ort_threads,
                     "service_env": service_env, "service_dir": str(args.service_dir), "load_generator": "wrk -t1 (bench/serve_wrk.lua), --timeout 10s",
                     "method": "both servers up at once (idle when not under load); each round measures raw ORT, then "
                               "every load cell, alternating servers per concurrency; tables show the median round"},
        "models": {}, "raw_ort": [], "servers": {}, "cells": [], "profiles": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        for name in args.models:
            print(f"== {name}", flush=True)
            bm = prepare_cnn() if name == "cnn" else prepare_resnet18(workdir)
            result["models"][name] = {"onnx": str(bm.onnx), "pt": str(bm.pt), "note": bm.note, **bm.facts}
            single = write_bodies(workdir / f"{name}-single", bm.pngs, 1, 64)
            batch = write_bodies(workdir / f"{name}-batch", bm.pngs, args.batch_images, 4)
            info = result["servers"].setdefault(name, {})
            with contextlib.ExitStack() as stack:
                servers: dict[str, Server] = {}
                for kind in args.servers:  # one at a time, so each start-up is timed alone
                    make = (lambda: bentoml_server(bm, workdir, service_env, args.service_dir)) if kind == "bentoml" else (
                        lambda: naive_server(bm, workdir))
                    ready_times = []
                    for _ in range(max(0, args.startup_repeats - 1) if kind == "bentoml" else 0):
                        if args.wait_quiet:
                            wait_for_quiet(args.wait_quiet, args.quiet_threshold)
                        with make() as extra:  # started, timed, stopped: start-up time only
                            ready_times.append(round(extra.ready_s, 3))
                            extra.tree.stop()
                    if args.wait_quiet:
                        wait_for_quiet(args.wait_quiet, args.quiet_threshold)
                    server = servers[kind] = stack.enter_context(make())
                    ready_times.append(round(server.ready_s, 3))
                    info[kind] = {"ready_s": float(np.median(ready_times)), "ready_s_all": ready_times,
                                  "command": shlex.join(server.command), "env": server.env,
                                  "smoke": smoke_check(server, single, 1)}
                    print(f"  {kind} ready after {ready_times} s", flush=True)
                    if kind == "bentoml":
                        smoke_check(server, batch, args.batch_images)
                        with contextlib.suppress(Exception):
                            import httpx

                            meta = httpx.get(server.url + "/metadata", timeout=10).json()
                            info[kind]["metadata"] = {k: meta.get(k) for k in (
                                "active_providers", "intra_op_threads", "batching", "workers", "limits")}
                    run_wrk(server.url, single, 8, args.warmup, workdir / "wrk-warmup.json")  # warm-up, not recorded
                    settle(server)
                for rep in range(args.repeat):
                    if args.wait_quiet:
                        result.setdefault("quiet_waits", []).append(
                            {"model": name, "round": rep, **wait_for_quiet(args.wait_quiet, args.quiet_threshold)})
                    print(f"  -- round {rep + 1}/{args.repeat}", flush=True)
                    for row in bench_raw_ort(bm, args.batch_sizes, args.ort_threads, args.raw_seconds):
                        result["raw_ort"].append({**row, "round": rep})
                    for c in args.concurrency:
                        for kind, server in servers.items():
                            row = load_cell(server, bm, "single", 1, c, args.duration, single, workdir, max_batch)
                            result["cells"].append({**row, "round": rep})
                    if "bentoml" in servers:
                        for c in args.batch_concurrency:
                            row = load_cell(servers["bentoml"], bm, batch_load, args.batch_images, c, args.duration,
                                            batch, workdir, max_batch)
                            result["cells"].append({**row, "round": rep})
                if args.profile:
                    for kind, server in servers.items():
                        specs = [("single", 1, TARGET_CONCURRENCY, single)]
                        if kind == "bentoml" and name == "cnn":
                            specs.append((batch_load, args.batch_images, max(args.batch_concurrency), batch))
                        for load, per, c, bodies in specs:
                            result["profiles"].append(profile_cell(server, bm, load, per, c, args.duration, bodies, workdir))
                for kind, server in servers.items():
                    info[kind]["memory"] = server.tree.stop()
                    info[kind]["log_tail"] = server.log_path.read_text(errors="replace")[-1500:].splitlines()[-8:]
    result["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    result["summary"] = {"raw_ort": median_rows(result["raw_ort"], ("model", "threads", "batch"), "images_per_s"),
                         "cells": median_rows(result["cells"], ("model", "server", "load", "concurrency"), "images_per_s")}
    result["targets"] = evaluate_targets(result)
    return result


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


# --- report --------------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    m, v = result["machine"], result["versions"]
    lines = [f"# Serving benchmark ({result['started']})", "",
             f"- command: `{result['command']}`",
             f"- machine: {m['cpu_model']}, {m['cpu_count']} cores, {m['memory']}; load average at start "
             f"{m['loadavg_start']}, at end {m.get('loadavg_end')} (shared machine: other jobs may have run)",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"- git: {result['git']['commit'][:12]}" + (" (uncommitted changes in service/ or bench/)" if result["git"]["dirty_files"] else ""),
             f"- settings: {json.dumps(result['settings'])}", ""]
    for name, info in result["models"].items():
        lines.append(f"- model `{name}`: {info['note']}")
    for wait in result.get("quiet_waits", []):
        lines.append(f"- before {wait['model']} round {wait['round'] + 1}: waited {wait['waited_s']} s for other jobs' CPU "
                     f"< {wait['threshold_pct']}% (last samples {wait['background_cpu_pct_samples'][-3:]}; quiet: {wait['quiet']})")
    lines += ["", "## Raw ONNX Runtime in-process (the ceiling)", "",
              "| model | intra-op threads | batch | images/s (median round) | all rounds | ms/call p50 | ms/call p99 |",
              "|---|---:|---:|---:|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['threads']} | {r['batch']} | {r['images_per_s']:.0f} | "
              f"{', '.join(f'{x:.0f}' for x in r['images_per_s_rounds'])} | {r['ms_per_call_p50']:.3f} | "
              f"{r['ms_per_call_p99']:.3f} |" for r in result["summary"]["raw_ort"]]
    lines += ["", "## HTTP serving", "",
              "| model | server | load | conc | req/s | images/s | img/s all rounds | p50 ms | p99 ms | errors "
              "| req/call | img/call | CPU % by process | server CPU ms/req | wrk CPU % | other jobs CPU % |",
              "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for c in result["summary"]["cells"]:
        b = c.get("batching") or {}
        cpu = ", ".join(f"{k} {val:.0f}" for k, val in c["cpu_pct"].items() if val >= 1)
        lines.append(f"| {c['model']} | {c['server']} | {c['load']} | {c['concurrency']} | {c['req_per_s']:.1f} | "
                     f"{c['images_per_s']:.1f} | {', '.join(f'{x:.0f}' for x in c['images_per_s_rounds'])} | "
                     f"{c['latency_ms']['p50']:.1f} | {c['latency_ms']['p99']:.1f} | {sum(c['errors_rounds'])} | {b.get('requests_per_call', '-')} | {b.get('images_per_call', '-')} | {cpu} | "
                     f"{c['server_cpu_ms_per_request']} | {c['wrk_cpu_pct']:.0f} | {c['other_processes_cpu_pct']:.0f} |")
    lines += ["", "## Start-up and memory", "", "| model | server | ready after start (s) | peak RSS total (MiB) | peak RSS by process (MiB) |",
              "|---|---|---:|---:|---|"]
    for name, info in result["servers"].items():
        for kind, s in info.items():
            mem = s.get("memory", {})
            lines.append(f"| {name} | {kind} | {s['ready_s']:.2f} (all: {s.get('ready_s_all')}) | {mem.get('peak_rss_total_mib')} | "
                         f"{json.dumps(mem.get('peak_rss_by_role_mib'))} |")
    lines += ["", "## Targets", "", "| target | measured | limit | met | detail |", "|---|---:|---:|---|---|"]
    for t in result["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**NO**")
        lines.append(f"| {t['target']} | {t['measured']} | {t['limit'] if t['limit'] is not None else '-'} | {met} | {t['detail']} |")
    if result["profiles"]:
        lines += ["", "## Where the time goes (py-spy, separate run of the same load)", ""]
        for p in result["profiles"]:
            lines.append(f"### {p['model']} {p['server']} {p['load']} c={p['concurrency']} ({p['seconds']} s at {p['rate_hz']} Hz)")
            lines.append("")
            for role, s in p["processes"].items():
                cats = ", ".join(f"{k} {val}%" for k, val in s["categories_pct"].items())
                tops = "; ".join(f"`{k}` {val}%" for k, val in list(s["top_self_pct"].items())[:8])
                lines.append(f"- **{role}** (busy {s['cpu_pct_of_one_core']}% of one core): {cats}")
                lines.append(f"  - top self frames: {tops}")
            lines.append("")
    return "\n".join(lines) + "\n"


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
                   help="environment for bentoml serve, e.g. CLASSIFIER_API_WORKERS=2 (repeatable)")
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
    result["summary"] = {"raw_ort": median_rows(result["raw_ort"], ("model", "threads", "batch"), "images_per_s"),
                         "cells": median_rows(result["cells"], ("model", "server", "load", "concurrency"), "images_per_s")}
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
