"""Soak test: minutes of mixed valid and invalid requests against the service, on demand (not a test).

    .venv/bin/python bench/soak.py                          # 5 min, concurrency 64, local server
    .venv/bin/python bench/soak.py --minutes 1 --tag smoke
    .venv/bin/python bench/soak.py --url http://127.0.0.1:3000 --server-pid 1234

Without ``--url`` it starts its own ``bentoml serve service.service:Classifier`` on a free loopback
port, with a temporary BENTOML_HOME holding ``--onnx`` (default ``exports/cnn/model.onnx``, stored
with ``pipeline.bento_store.save_to_bento_store``), or the store ``--bentoml-home`` as it is. CLASSIFIER_*
variables of this environment pass through (``--service-env NAME=VALUE`` adds more).

Load: ``--concurrency`` asyncio clients (httpx, one connection each, loopback only), each sending
requests back to back for ``--minutes``; every request has a 30 s timeout. The mix (seeded): valid
single-image and 8-image multipart, base64 JSON, GET /metadata; invalid: not an image, truncated
PNG, empty file, bad base64, wrong content type, bad top_k, a decompression bomb header. Each kind
has its expected status; 429 (CLASSIFIER_MAX_CONCURRENCY reached) is counted but allowed.

Checks (exit status 1 if one fails):
- zero 5xx responses (and no transport errors / timeouts);
- no unexpected status (a valid request answered 4xx other than 429, an invalid one not its 4xx);
- RSS of the server processes (the ``bentoml serve`` process and all its children, summed) at the end
  is at most ``--rss-ratio`` (1.1) times the RSS after warm-up (``--warmup`` seconds, default 20 %
  of the run, 30..60 s), sampled every 2 s. (Measured on 2 CPUs at concurrency 64: the API worker's
  RSS climbs from ~130 to ~200 MB during the first ~35 s, allocator and buffer warm-up, then stays
  flat, +3 MB over the next 85 s; a shorter warm-up measures that ramp, not a leak.)
Reported per minute: requests, requests/s, status counts, latency p50/p90/p99/max for valid and
invalid requests. Writes bench/results/soak-<date>[-<tag>].json and .md.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import io
import contextlib
import ipaddress
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import harness  # noqa: E402

RESULTS = REPO / "bench" / "results"
REQUEST_TIMEOUT_S = 30.0


# --- request mix ------------------------------------------------------------------------------------

def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


@dataclass(frozen=True)
class Kind:
    name: str
    weight: float
    valid: bool
    expected: int  # the status a correct server answers (429 is always allowed too)


KINDS = [
    Kind("png_1", 40, True, 200),
    Kind("png_8", 10, True, 200),
    Kind("base64_1", 10, True, 200),
    Kind("metadata", 5, True, 200),
    Kind("not_an_image", 7, False, 415),
    Kind("truncated_png", 7, False, 400),
    Kind("empty_file", 5, False, 400),
    Kind("bad_base64", 5, False, 400),
    Kind("wrong_content_type", 4, False, 415),
    Kind("bad_top_k", 4, False, 400),
    Kind("bomb", 3, False, 413),
]


class Requests:
    """Pre-encoded request bodies; ``build(kind, rng)`` -> httpx request kwargs."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.pngs = [_png(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(64)]
        big = _png(rng.integers(0, 256, (200, 200), dtype=np.uint8))
        self.truncated = big[: len(big) // 2]
        self.bomb = _bomb()

    @staticmethod
    def files(items: list[tuple[str, bytes]]) -> list:
        return [("images", (name, data, "application/octet-stream")) for name, data in items]

    def build(self, kind: str, rng: random.Random) -> tuple[str, str, dict]:
        png = rng.choice(self.pngs)
        if kind == "png_1":
            return "POST", "/classify", {"files": self.files([("a.png", png)])}
        if kind == "png_8":
            return "POST", "/classify", {"files": self.files([(f"{i}.png", rng.choice(self.pngs)) for i in range(8)])}
        if kind == "base64_1":
            return "POST", "/classify_base64", {"json": {"images": [base64.b64encode(png).decode()]}}
        if kind == "metadata":
            return "GET", "/metadata", {}
        if kind == "not_an_image":
            # text first: bare random bytes start with a 2-byte JPEG/BMP signature once in ~30,000
            # requests, and are then (rightly) a corrupt image, 400, not "not an image", 415
            return "POST", "/classify", {"files": self.files([("notes.txt", b"notes, not an image\n" + rng.randbytes(300))])}
        if kind == "truncated_png":
            return "POST", "/classify", {"files": self.files([("cut.png", self.truncated)])}
        if kind == "empty_file":
            return "POST", "/classify", {"files": self.files([("empty.png", b"")])}
        if kind == "bad_base64":
            return "POST", "/classify_base64", {"json": {"images": ["not base64!!"]}}
        if kind == "wrong_content_type":
            return "POST", "/classify", {"json": {"images": [base64.b64encode(png).decode()]}}
        if kind == "bad_top_k":
            return "POST", "/classify", {"files": self.files([("a.png", png)]), "data": {"top_k": "-1"}}
        if kind == "bomb":
            return "POST", "/classify", {"files": self.files([("bomb.png", self.bomb)])}
        raise ValueError(kind)


# --- the server -------------------------------------------------------------------------------------

def store_model(onnx_path: Path, home: Path) -> str:
    try:
        return harness.store_in_bento_home(onnx_path, home)
    except RuntimeError as err:
        raise SystemExit(f"soak: cannot store {onnx_path} in {home}: {err}") from None


@contextlib.contextmanager
def local_server(home: Path, log_path: Path, service_env: dict[str, str]):
    """`bentoml serve` of this checkout on the store `home`, + `service_env`, until the block exits."""
    port = harness.free_port()
    stack = contextlib.ExitStack()
    try:
        server = stack.enter_context(harness.running(harness.bentoml_command(port), port,
                                                     {**service_env, **harness.bentoml_env(home)}, log_path,
                                                     timeout=180, stop_timeout=30))
    except RuntimeError as err:  # exited, or not ready in time; the message ends with the log's tail
        raise SystemExit(f"soak: bentoml {err}") from None
    with stack:
        yield server


def pid_listening_on(port: int) -> int | None:
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except (psutil.AccessDenied, PermissionError):
        return None
    return None


def server_root(pid: int) -> int:
    """Climb from a listening worker to the `bentoml serve` process (the circus arbiter)."""
    import psutil

    proc = psutil.Process(pid)
    for parent in proc.parents():
        try:
            if "bentoml" in " ".join(parent.cmdline()) and "serve" in parent.cmdline():
                return parent.pid
        except psutil.Error:
            break
    return pid


class RssSampler(threading.Thread):
    """Sums RSS over a process and all its descendants every `interval` seconds."""

    def __init__(self, pid: int | None, interval: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int, int]] = []  # (t, rss bytes, processes)
        self.by_role: list[tuple[float, dict[str, int]]] = []  # (t, {role: rss bytes})
        self.halt = threading.Event()

    @staticmethod
    def role(proc) -> str:
        try:
            cmd = proc.cmdline()
        except Exception:
            return "?"
        if "--service-name" in cmd:
            return f"{cmd[cmd.index('--service-name') + 1]}#{cmd[cmd.index('--worker-id') + 1] if '--worker-id' in cmd else ''}"
        return "arbiter" if "serve" in cmd else "other"

    def measure(self) -> tuple[int, int, dict[str, int]] | None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return None
        total, roles = 0, {}
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            role = self.role(p)
            roles[role] = roles.get(role, 0) + rss
        return total, len(procs), roles

    def run(self) -> None:
        if self.pid is None:
            return
        t0 = time.monotonic()
        while not self.halt.is_set():
            got = self.measure()
            if got is not None:
                t = time.monotonic() - t0
                self.samples.append((t, got[0], got[1]))
                self.by_role.append((t, got[2]))
            self.halt.wait(self.interval)


# --- the load ---------------------------------------------------------------------------------------

@dataclass
class Result:
    t: float  # seconds since the load started (request start)
    kind: str
    valid: bool
    status: int | None
    latency: float
    error: str | None = None


async def client_loop(i: int, url: str, deadline: float, t0: float, reqs: Requests, seed: int,
                      results: list[Result]) -> None:
    import httpx

    rng = random.Random(seed * 1000 + i)
    names = [k.name for k in KINDS]
    weights = [k.weight for k in KINDS]
    by_name = {k.name: k for k in KINDS}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        while time.monotonic() < deadline:
            kind = by_name[rng.choices(names, weights)[0]]
            method, path, kwargs = reqs.build(kind.name, rng)
            start = time.monotonic()
            try:
                resp = await client.request(method, path, **kwargs)
                results.append(Result(start - t0, kind.name, kind.valid, resp.status_code, time.monotonic() - start))
            except httpx.HTTPError as err:
                results.append(Result(start - t0, kind.name, kind.valid, None, time.monotonic() - start,
                                      f"{type(err).__name__}: {err}"[:200]))


async def run_load(url: str, seconds: float, concurrency: int, seed: int) -> tuple[list[Result], float]:
    reqs = Requests(seed)
    results: list[Result] = []
    t0 = time.monotonic()
    deadline = t0 + seconds
    tasks = [asyncio.create_task(client_loop(i, url, deadline, t0, reqs, seed, results)) for i in range(concurrency)]
    # bounded: each client stops starting requests at the deadline; its last one ends within the timeout
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + REQUEST_TIMEOUT_S + 30)
    return results, time.monotonic() - t0


# --- analysis ---------------------------------------------------------------------------------------

def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    arr = np.asarray(values) * 1000
    return {"p50_ms": round(float(np.percentile(arr, 50)), 1), "p90_ms": round(float(np.percentile(arr, 90)), 1),
            "p99_ms": round(float(np.percentile(arr, 99)), 1), "max_ms": round(float(arr.max()), 1)}


def per_minute(results: list[Result], elapsed: float) -> list[dict]:
    minutes = []
    for m in range(int(elapsed // 60) + 1):
        rows = [r for r in results if m * 60 <= r.t < (m + 1) * 60]
        if not rows:
            continue
        span = min(60.0, elapsed - m * 60)
        minutes.append({
            "minute": m + 1, "requests": len(rows), "req_per_s": round(len(rows) / max(span, 1e-9), 1),
            "statuses": dict(sorted(Counter(str(r.status) for r in rows).items())),
            **valid_invalid(rows), "rejected_429": sum(r.status == 429 for r in rows),
        })
    return minutes


def valid_invalid(rows: list[Result]) -> dict:
    """Counts and latency percentiles of the valid requests answered 200 and of the invalid ones."""
    return {"valid": {"n": sum(r.valid for r in rows), **percentiles([r.latency for r in rows if r.valid and r.status == 200])},
            "invalid": {"n": sum(not r.valid for r in rows), **percentiles([r.latency for r in rows if not r.valid])}}


def per_kind(results: list[Result]) -> dict:
    out = {}
    for k in KINDS:
        rows = [r for r in results if r.kind == k.name]
        out[k.name] = {"n": len(rows), "expected": k.expected,
                       "statuses": dict(sorted(Counter(str(r.status) for r in rows).items())),
                       **percentiles([r.latency for r in rows])}
    return out


def memory_summary(rss: list[tuple[float, int, int]], warmup: float, by_role: list[tuple[float, dict[str, int]]]) -> dict:
    memory: dict = {"samples": len(rss)}
    if not rss:
        return memory
    after_warmup = [s for s in rss if s[0] >= warmup] or rss[-1:]
    base, end = after_warmup[0], rss[-1]
    memory.update({
        "rss_after_warmup_mb": round(base[1] / 2**20, 1), "rss_end_mb": round(end[1] / 2**20, 1),
        "rss_peak_mb": round(max(s[1] for s in rss) / 2**20, 1), "ratio_end_to_warmup": round(end[1] / base[1], 3),
        "processes_after_warmup": base[2], "processes_end": end[2],
        "series_mb": [(round(t), round(b / 2**20, 1)) for t, b, _ in rss[:: max(1, len(rss) // 60)]],
    })
    if by_role:
        base_roles = next((r for t, r in by_role if t >= warmup), by_role[-1][1])
        memory["by_process_mb"] = {role: {"after_warmup": round(base_roles.get(role, 0) / 2**20, 1),
                                          "end": round(rss_end / 2**20, 1)}
                                   for role, rss_end in sorted(by_role[-1][1].items())}
    return memory


def checks(results: list[Result], memory: dict, rss_limit: float) -> dict:
    expected = {k.name: k.expected for k in KINDS}
    five_xx = [r for r in results if r.status is not None and r.status >= 500]
    errors = [r for r in results if r.status is None]
    unexpected = [r for r in results if r.status is not None and r.status < 500
                  and r.status not in (expected[r.kind], 429)]
    measured = memory["samples"] > 0
    return {
        "zero_5xx": {"passed": not five_xx, "count": len(five_xx),
                     "examples": [(r.kind, r.status) for r in five_xx[:10]]},
        "no_transport_errors": {"passed": not errors, "count": len(errors), "examples": [r.error for r in errors[:10]]},
        "only_expected_statuses": {"passed": not unexpected, "count": len(unexpected),
                                   "examples": [(r.kind, r.status) for r in unexpected[:10]]},
        "rss_ratio": {"passed": measured and memory["ratio_end_to_warmup"] <= rss_limit,
                      "limit": rss_limit, "value": memory.get("ratio_end_to_warmup"),
                      **({} if measured else {"note": "no server pid: RSS not measured"})},
    }


def analyse(results: list[Result], elapsed: float, rss: list[tuple[float, int, int]], warmup: float,
            rss_limit: float, by_role: list[tuple[float, dict[str, int]]] = ()) -> dict:
    statuses = Counter(str(r.status) if r.status is not None else "transport_error" for r in results)
    memory = memory_summary(rss, warmup, by_role)
    verdicts = checks(results, memory, rss_limit)
    return {
        "requests": len(results), "elapsed_s": round(elapsed, 1), "req_per_s": round(len(results) / elapsed, 1),
        "statuses": dict(sorted(statuses.items())), **valid_invalid(results),
        "per_minute": per_minute(results, elapsed), "per_kind": per_kind(results), "memory": memory,
        "checks": verdicts, "passed": all(c["passed"] for c in verdicts.values()),
    }


def markdown(result: dict) -> str:
    a = result["analysis"]
    lines = [f"# Soak test {result['started']}", "",
             f"`{result['command']}`", "",
             f"Target {result['target']}; {result['minutes']} min at concurrency {result['concurrency']}; "
             f"machine: {result['machine']['cpu_count']} CPUs, load average before {result['machine']['loadavg_start']}, "
             f"after {result['machine']['loadavg_end']}.", "",
             f"**{'PASSED' if a['passed'] else 'FAILED'}**: {a['requests']} requests, {a['req_per_s']} req/s, "
             f"statuses {a['statuses']}.", "", "| check | passed | detail |", "|---|---|---|"]
    for name, check in a["checks"].items():
        detail = {k: v for k, v in check.items() if k != "passed" and v not in ([], None)}
        lines.append(f"| {name} | {'yes' if check['passed'] else 'NO'} | {json.dumps(detail)} |")
    m = a["memory"]
    if m.get("samples"):
        lines += ["", f"Server RSS (all {m['processes_end']} processes): {m['rss_after_warmup_mb']} MB after "
                      f"warm-up ({result['warmup_s']} s), {m['rss_end_mb']} MB at the end (ratio "
                      f"{m['ratio_end_to_warmup']}), peak {m['rss_peak_mb']} MB; by process: "
                      f"{json.dumps(m.get('by_process_mb', {}))}; series (s, MB): {m['series_mb']}."]
    lines += ["", "## Per minute", "",
              "| minute | requests | req/s | statuses | valid n | valid p50 / p90 / p99 / max ms | invalid n | invalid p50 / p90 / p99 / max ms |",
              "|---|---|---|---|---|---|---|---|"]
    for row in a["per_minute"]:
        v, i = row["valid"], row["invalid"]
        fmt = lambda d: " / ".join(str(d.get(k, "-")) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))  # noqa: E731
        lines.append(f"| {row['minute']} | {row['requests']} | {row['req_per_s']} | {row['statuses']} | {v['n']} | "
                     f"{fmt(v)} | {i['n']} | {fmt(i)} |")
    lines += ["", "## Per request kind", "", "| kind | n | expected | statuses | p50 / p99 ms |", "|---|---|---|---|---|"]
    for name, row in a["per_kind"].items():
        lines.append(f"| {name} | {row['n']} | {row['expected']} | {row['statuses']} | "
                     f"{row.get('p50_ms', '-')} / {row.get('p99_ms', '-')} |")
    lines.append("")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------------

def loopback_only(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"soak: --url must be a loopback address (127.0.0.1, ::1, localhost), got {url!r}")
    return url.rstrip("/")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running service (loopback only); default: start one")
    p.add_argument("--server-pid", type=int, help="with --url: the `bentoml serve` pid, for RSS (default: found from the port)")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--warmup", type=float, default=None, help="seconds before the RSS baseline (default 20%% of the run, 30..60)")
    p.add_argument("--rss-ratio", type=float, default=1.1)
    p.add_argument("--onnx", type=Path, default=REPO / "exports" / "cnn" / "model.onnx", help="model for the local server")
    p.add_argument("--bentoml-home", type=Path, help="use this BentoML store as it is instead of --onnx")
    p.add_argument("--service-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def open_target(args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack):
    """(description, url, server pid or None, the local server or None): --url, else a server started here."""
    if args.url:
        url = loopback_only(args.url)
        pid = args.server_pid or pid_listening_on(urlparse(url).port or 80)
        return url, url, (server_root(pid) if pid else None), None
    home = args.bentoml_home
    if home is None:
        if not args.onnx.is_file():
            raise SystemExit(f"soak: no model {args.onnx}: run the pipeline (make pipeline) or pass --onnx/--url")
        home = tmp / "bentoml"
        print(f"soak: storing {args.onnx} in {home}", flush=True)
        store_model(args.onnx, home)
    # no penalty box unless asked for: a third of soak's requests are invalid on purpose, from one address
    service_env = {"CLASSIFIER_REFUSAL_RATE": "0",
                   **{k: v for k, v in os.environ.items() if k.startswith("CLASSIFIER_")}}
    service_env.update(dict(item.split("=", 1) for item in args.service_env))
    server = stack.enter_context(local_server(home, tmp / "bentoml-serve.log", service_env))
    model = f"store {home}" if args.bentoml_home else str(args.onnx)
    print(f"soak: server ready on {server.url} in {server.ready_s:.1f} s", flush=True)
    return f"local bentoml serve ({model}; env {service_env or 'defaults'})", server.url, server.proc.pid, server


def soak(url: str, pid: int | None, args: argparse.Namespace, warmup: float) -> dict:
    """The load for --minutes with RSS sampled: the analysis."""
    print(f"soak: {args.minutes} min at concurrency {args.concurrency} against {url} "
          f"(RSS baseline after {warmup:.0f} s)", flush=True)
    sampler = RssSampler(pid)
    sampler.start()
    results, elapsed = asyncio.run(run_load(url, args.minutes * 60, args.concurrency, args.seed))
    sampler.halt.set()
    sampler.join(timeout=10)
    return analyse(results, elapsed, sampler.samples, warmup, args.rss_ratio, sampler.by_role)


def write_result(result: dict, args: argparse.Namespace, started: dt.datetime) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"soak-{started.strftime('%Y%m%d-%H%M%S')}{'-' + args.tag if args.tag else ''}"
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    Path(f"{stem}.md").write_text(markdown(result))
    return stem


def print_summary(a: dict) -> None:
    print(f"soak: {'PASSED' if a['passed'] else 'FAILED'}: {a['requests']} requests, {a['req_per_s']} req/s, "
          f"statuses {a['statuses']}; RSS {a['memory'].get('rss_after_warmup_mb')} -> {a['memory'].get('rss_end_mb')} MB "
          f"(ratio {a['memory'].get('ratio_end_to_warmup')})")
    for name, check in a["checks"].items():
        print(f"  {name}: {'ok' if check['passed'] else 'FAILED'} {({k: v for k, v in check.items() if k != 'passed'})}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warmup = args.warmup if args.warmup is not None else min(60.0, max(30.0, 0.2 * args.minutes * 60))
    started = dt.datetime.now(dt.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp, contextlib.ExitStack() as stack:
        target, url, pid, server = open_target(args, Path(tmp), stack)
        machine = harness.machine()
        analysis = soak(url, pid, args, warmup)
        machine["loadavg_end"] = harness.load_average()
        if server is not None and not analysis["passed"]:
            analysis["server_log_tail"] = server.log()[-6000:]
    result = {
        "started": started.isoformat(timespec="seconds"), "command": harness.command_line(),
        "target": target, "minutes": args.minutes, "concurrency": args.concurrency, "warmup_s": warmup, "seed": args.seed,
        "machine": machine, "versions": harness.versions(("httpx", "bentoml")), "git": harness.git_state(),
        "server_startup_s": round(server.ready_s, 1) if server else None,
        "analysis": analysis,
    }
    stem = write_result(result, args, started)
    print_summary(analysis)
    print(f"soak: wrote {stem}.json and .md")
    return 0 if analysis["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
