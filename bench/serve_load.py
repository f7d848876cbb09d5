"""Load generation for the serving benches: multipart request bodies, ``wrk`` (bench/serve_wrk.lua),
the micro-batcher's figures from /metrics, CPU accounting and one measured load cell."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from pathlib import Path

from tests.harness import REPO, load_average

WRK_SCRIPT = REPO / "bench" / "serve_wrk.lua"
BOUNDARY = "----benchserve7d3f2a"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


# --- request bodies and wrk -------------------------------------------------------------------------

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


def wrk_command(url: str, bodies: Path, concurrency: int, seconds: int, out_json: Path) -> tuple[list[str], dict]:
    """(command, environment) of one wrk run POSTing the bodies in `bodies` to url/classify."""
    env = {**os.environ, "WRK_BODY_DIR": str(bodies), "WRK_BODY_COUNT": str(len(list(bodies.glob("body_*.bin")))),
           "WRK_PATH": "/classify", "WRK_CONTENT_TYPE": MULTIPART, "WRK_OUT": str(out_json)}
    cmd = ["wrk", "-t", "1", "-c", str(concurrency), "-d", f"{seconds}s", "--timeout", "10s",
           "-s", str(WRK_SCRIPT), f"{url}/classify"]
    return cmd, env


def run_wrk(url: str, bodies: Path, concurrency: int, duration: float, out_json: Path) -> dict:
    cmd, env = wrk_command(url, bodies, concurrency, max(1, round(duration)), out_json)
    out_json.unlink(missing_ok=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 60)
    if proc.returncode != 0 or not out_json.is_file():
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    return json.loads(out_json.read_text())


def wrk_version() -> str | None:
    try:
        return subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return None


# --- the service's figures ----------------------------------------------------------------------------

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


def settle(server, timeout: float = 20) -> None:
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


def smoke_check(server, bodies: Path, expected: int) -> dict:
    import httpx

    body = (bodies / "body_0.bin").read_bytes()
    r = httpx.post(server.url + "/classify", content=body, timeout=60, headers={"Content-Type": MULTIPART})
    if r.status_code != 200 or len(r.json()) != expected:
        raise RuntimeError(f"{server.kind}: smoke request failed: {r.status_code} {r.text[:500]}")
    return {"status": r.status_code, "first_label": r.json()[0]["label"]}


# --- the machine's CPU ----------------------------------------------------------------------------------

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
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuWindow:
    """CPU seconds spent between construction and `close()`: by the server's roles, by wrk (this
    process' children), by this process and by everything else on the machine."""

    def __init__(self, server) -> None:
        self.tree = server.tree
        self.roles_before = self.tree.cpu_seconds()
        self.machine, self.wrk, self.own = cpu_jiffies()[0], children_cpu(), time.process_time()
        self.t0 = time.monotonic()

    def close(self) -> dict:
        wall = time.monotonic() - self.t0
        roles = self.tree.cpu_seconds()
        server = sum(roles.values()) - sum(self.roles_before.values())
        wrk = children_cpu() - self.wrk
        others = cpu_jiffies()[0] - self.machine - server - wrk - (time.process_time() - self.own)
        return {"wall": wall, "server": server, "wrk": wrk, "others": others,
                "roles": {role: roles.get(role, 0) - self.roles_before.get(role, 0) for role in sorted(roles)}}


# --- one load cell ----------------------------------------------------------------------------------

def rates(row: dict) -> dict:
    """Throughput counts answered-OK requests only (wrk counts non-2xx answers as requests and as status errors)."""
    ok = row["requests"] - row["errors"]["status"]
    row["ok_requests"] = ok
    row["req_per_s"] = round(ok / row["duration_s"], 1)
    row["images_per_s"] = round(ok * row["images_per_request"] / row["duration_s"], 1)
    row["error_count"] = int(sum(row["errors"].values()))
    return row


def cell_row(w: dict, cpu: dict, load_before: list | None, **keys) -> dict:
    """A load cell's row from wrk's figures `w`, the CPU window `cpu` and the load averages before and
    now; `keys` name the cell."""
    lat, wall = w["latency_us"], cpu["wall"]
    row = {
        **keys, "duration_s": round(w["duration_us"] / 1e6, 2), "requests": w["requests"],
        "latency_ms": {k: round(lat[k] / 1000, 2) for k in ("mean", "p50", "p90", "p99", "p999", "max")},
        "errors": w["errors"], "error_count": int(sum(w["errors"].values())),
        "cpu_pct": {role: round(100 * used / wall, 1) for role, used in cpu["roles"].items()
                    if role not in ("other", "arbiter")},
        "server_cpu_ms_per_request": round(1000 * cpu["server"] / w["requests"], 3) if w["requests"] else None,
        "wrk_cpu_pct": round(100 * cpu["wrk"] / wall, 1),
        "other_processes_cpu_pct": round(100 * max(0.0, cpu["others"]) / wall, 1),
        "loadavg_before": load_before, "loadavg_after": load_average(),
    }
    return rates(row)


def batching(before: tuple[float, float], after: tuple[float, float], per_request: int, max_batch: int) -> dict:
    images, calls = (a - b for a, b in zip(after, before))
    per_chunk = min(per_request, max_batch)  # a request's images go to the batcher in chunks of max_batch
    return {"model_calls": int(calls), "images": int(images),
            "requests_per_call": round(images / per_chunk / calls, 2) if calls else None,
            "images_per_call": round(images / calls, 2) if calls else None}


def print_cell(row: dict) -> None:
    b = row.get("batching") or {}
    print(f"    {row['model']:8s} {row['server']:7s} {row['load']:7s} c={row['concurrency']:2d}: {row['req_per_s']:8.1f} req/s "
          f"{row['images_per_s']:8.1f} img/s p50 {row['latency_ms']['p50']:7.1f} ms p99 {row['latency_ms']['p99']:7.1f} ms "
          f"errors {row['error_count']}" + (f" img/call {b.get('images_per_call')}" if b else "")
          + f" cpu {row['cpu_pct']} {row['server_cpu_ms_per_request']} ms/req, others {row['other_processes_cpu_pct']}%",
          flush=True)


def load_cell(server, bm, load: str, per_request: int, concurrency: int, duration: float,
              bodies: Path, workdir: Path, max_batch: int) -> dict:
    """`duration` seconds of wrk at `concurrency` against `server`: throughput, latency, errors, CPU
    and (the service) how the micro-batcher merged the requests."""
    before_metrics = batch_metrics(server.url) if server.kind == "bentoml" else None
    load_before = load_average()
    window = CpuWindow(server)
    w = run_wrk(server.url, bodies, concurrency, duration, workdir / "wrk-out.json")
    cpu = window.close()
    settle(server)
    row = cell_row(w, cpu, load_before, model=bm.name, server=server.kind, load=load,
                   images_per_request=per_request, concurrency=concurrency)
    if before_metrics is not None:
        row["batching"] = batching(before_metrics, batch_metrics(server.url), per_request, max_batch)
    print_cell(row)
    return row
