"""Abuse benchmark: ordinary requests' latency and errors with and without hostile clients, in ONE run.

    .venv/bin/python -m bench.abuse                      # 20 s per phase, 50 ordinary req/s
    .venv/bin/python -m bench.abuse --quick              # 5 s per phase, results to the temp folder
    .venv/bin/python -m bench.abuse --duration 30 --rate 100 --workers 2 --out /tmp/abuse

On demand, not a test. One real ``bentoml serve service.service:Classifier`` (default settings;
``--workers`` sets CLASSIFIER_WORKERS) on a free loopback port, with a temporary BENTOML_HOME holding
``--onnx`` (default the trained ``exports/cnn/model.onnx``, else the tests' tiny MNIST CNN,
``tests/harness.build_tiny_onnx_model``), stored like bench/serve.py does (tests/harness.py).

Policy. The ordinary stream is open-loop: single real 28x28 MNIST PNGs POSTed to /classify at a fixed
``--rate`` (send times are scheduled up front and latency is measured from the scheduled time, so a
stalled server cannot hide its stall by slowing the client: no coordinated omission). Phase A runs
it alone; phase B runs it while, from a separate process, these abusers run for the whole phase:

- ``webp_bomb``: 4 clients, each request 30 lossless WebPs of ~2 KB that decode to 6400x6250 (40 MP);
- ``jpeg_bomb``: 2 clients, 16 JPEGs of 6400x6250 (large canvas, ~0.5 MB each);
- ``deep_json``: ``{"images": [[[...]]]}`` nested 100,000 deep, to /classify_base64;
- ``huge_int_top_k``: ``top_k`` a JSON integer of 5000 digits; ``list_top_k``: a 2,000,000-element list;
- ``slow_body``: 64 sockets that send a request's headers, then one body byte a second (slowloris);
- ``disconnect``: 2 clients sending an 8 MB multipart request (8 noise PNGs) and closing at once.

Abusive answers are counted by status (and time to answer) but the verdict is about the ordinary
stream. Target (PASS only if all hold): zero 5xx answers overall (ordinary and abusive), ordinary
p99 in phase B < 3x its phase-A value, zero errors (non-200, transport errors, timeouts) among
ordinary requests in both phases. The load generators share the machine with the server; the abuse
process runs at nice ``ABUSER_NICE`` (remote attackers' CPU is not the server's), the ordinary stream
at normal priority.

Writes bench/results/abuse-<date>.json and .md (machine, versions, command); ``--quick`` writes to
the temporary folder unless ``--out`` is given. Exit status 0 on PASS, 1 on FAIL.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import io
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.serve import RESULTS_DIR, versions  # noqa: E402
from bench.serve_load import MULTIPART, multipart  # noqa: E402
from bench.serve_models import png_bytes  # noqa: E402
from bench.shadow import start as serve_store  # noqa: E402  (bentoml serve on a store, poll off, /readyz)
from bench.soak import percentiles  # noqa: E402
from tests import harness  # noqa: E402

TARGET_P99_RATIO = 3.0
REQUEST_TIMEOUT_S = 30.0
ORDINARY_CONNECTIONS = 16
#: the ordinary stream's source address; the abusers send from 127.0.0.1. Real attackers and users
#: have addresses of their own, and the service's penalty box (service/penalty.py) is per address
ORDINARY_ADDRESS = "127.0.0.2"
ABUSE_RAMP_S = 1.0  # abusers run this long before phase B's ordinary stream starts
SLOW_BYTE_INTERVAL_S = 1.0
JSON = "application/json"


@dataclass(frozen=True)
class Abuse:
    name: str
    clients: int
    route: str
    content_type: str
    mode: str  # post (flood, back to back) | slow (slowloris) | disconnect (send, close before the answer)


ABUSES = [
    Abuse("webp_bomb", 4, "/classify", MULTIPART, "post"),
    Abuse("jpeg_bomb", 2, "/classify", MULTIPART, "post"),
    Abuse("deep_json", 2, "/classify_base64", JSON, "post"),
    Abuse("huge_int_top_k", 2, "/classify_base64", JSON, "post"),
    Abuse("list_top_k", 2, "/classify_base64", JSON, "post"),
    Abuse("slow_body", 64, "/classify", MULTIPART, "slow"),
    Abuse("disconnect", 2, "/classify", MULTIPART, "disconnect"),
]


# --- model, ordinary and abusive request bodies ------------------------------------------------------

def model_and_digits(onnx: Path | None, workdir: Path, n_digits: int = 16) -> tuple[Path, list[bytes], str]:
    """(ONNX model, real MNIST test digits as PNG, a note): --onnx, the trained export, else the tiny CNN."""
    try:
        mnist = harness.load_mnist()
    except harness.MissingData as err:
        raise SystemExit(f"abuse bench: {err}") from None
    digits = [png_bytes(img[None]) for img in mnist.test_images[:n_digits]]
    trained = REPO / "exports" / "cnn" / "model.onnx"
    if onnx is None and trained.is_file():
        onnx = trained
    if onnx is not None:
        return onnx, digits, f"{onnx}"
    print("abuse: no --onnx and no exports/cnn/model.onnx: fitting the tests' tiny MNIST CNN", flush=True)
    path = harness.build_tiny_onnx_model(mnist, workdir / "tiny.onnx")
    return path, digits, "tiny MNIST CNN (tests/harness.build_tiny_onnx_model, 6000 images, 2 passes)"


def encoded(image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def abusive_bodies(folder: Path, digit: bytes) -> dict[str, int]:
    """Write every abuser's request body to folder/<name>.bin; returns their sizes in bytes."""
    from PIL import Image

    canvas = Image.new("L", (6400, 6250), 200)  # 40,000,000 pixels, one colour
    webp = encoded(canvas.convert("RGB"), "WEBP", lossless=True)
    jpeg = encoded(canvas, "JPEG", quality=10)
    rng = np.random.default_rng(0)
    noise = [encoded(Image.fromarray(rng.integers(0, 256, (1024, 1024), dtype=np.uint8)), "PNG") for _ in range(8)]
    image_b64 = base64.b64encode(digit)
    bodies = {
        "webp_bomb": multipart([(f"bomb{i}.webp", webp) for i in range(30)]),
        "jpeg_bomb": multipart([(f"canvas{i}.jpg", jpeg) for i in range(16)]),
        "deep_json": b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "huge_int_top_k": b'{"images": ["' + image_b64 + b'"], "top_k": ' + b"9" * 5000 + b"}",
        "list_top_k": b'{"images": ["' + image_b64 + b'"], "top_k": [' + b",".join([b"1"] * 2_000_000) + b"]}",
        "slow_body": multipart([("digit.png", digit)]),
        "disconnect": multipart([(f"noise{i}.png", png) for i, png in enumerate(noise)]),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in bodies.items():
        (folder / f"{name}.bin").write_bytes(body)
    return {"webp_file_bytes": len(webp), "jpeg_file_bytes": len(jpeg),
            **{f"{name}_body_bytes": len(body) for name, body in bodies.items()}}


# --- the ordinary stream (open loop, fixed rate) ----------------------------------------------------

async def one_ordinary(client, due: float, body: bytes, records: list[dict]) -> None:
    import httpx

    sent = time.monotonic()
    status, error = None, None
    try:
        resp = await client.post("/classify", content=body, headers={"Content-Type": MULTIPART})
        status = resp.status_code
        if status != 200 or len(resp.json()) != 1:
            error = f"HTTP {status}"
    except (httpx.HTTPError, ValueError) as err:
        error = type(err).__name__
    records.append({"ms": 1000 * (time.monotonic() - due), "lag_ms": 1000 * (sent - due),
                    "status": status, "error": error})


async def ordinary_stream(url: str, rate: float, seconds: float, bodies: list[bytes]) -> list[dict]:
    """`rate` requests/s for `seconds`, each sent at its scheduled time whatever the earlier ones do."""
    import httpx

    limits = httpx.Limits(max_connections=ORDINARY_CONNECTIONS, max_keepalive_connections=ORDINARY_CONNECTIONS)
    records: list[dict] = []
    transport = httpx.AsyncHTTPTransport(local_address=ORDINARY_ADDRESS, limits=limits)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, transport=transport) as client:
        t0 = time.monotonic() + 0.05
        tasks = []
        for i in range(max(1, round(seconds * rate))):
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(one_ordinary(client, due, bodies[i % len(bodies)], records)))
        await asyncio.gather(*tasks)
    return records


# --- the abusers (a separate process, so their client work does not delay the ordinary stream) -------

def request_head(abuse: Abuse, port: int, length: int) -> bytes:
    return (f"POST {abuse.route} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {abuse.content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def status_of(data: bytes) -> str:
    parts = data.split(b" ", 2)
    return parts[1].decode(errors="replace") if data.startswith(b"HTTP/") and len(parts) > 1 else "garbled"


async def post_flood(abuse: Abuse, url: str, body: bytes, stop, records: list) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        while not stop.is_set():
            start = time.monotonic()
            try:
                resp = await client.post(abuse.route, content=body, headers={"Content-Type": abuse.content_type})
                outcome = str(resp.status_code)
            except httpx.HTTPError as err:
                outcome = type(err).__name__
                await asyncio.sleep(0.05)  # a refused connection must not become a busy loop
            records.append((abuse.name, outcome, time.monotonic() - start))
            await paced(start, PACE_S)


async def slow_client(abuse: Abuse, port: int, body: bytes, stop, records: list) -> None:
    """Headers, then one body byte every SLOW_BYTE_INTERVAL_S until the phase ends or the server answers."""
    start, outcome = time.monotonic(), "held_open"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_head(abuse, port, len(body)))
        await writer.drain()
        sent = 0
        while not stop.is_set() and sent < len(body):
            try:
                data = await asyncio.wait_for(reader.read(4096), timeout=SLOW_BYTE_INTERVAL_S)
            except asyncio.TimeoutError:
                writer.write(body[sent:sent + 1])
                sent += 1
                await writer.drain()
                continue
            outcome = status_of(data) if data else "closed_by_server"
            break
        writer.close()
    except OSError as err:
        outcome = type(err).__name__
    records.append((abuse.name, outcome, time.monotonic() - start))


async def disconnecter(abuse: Abuse, port: int, body: bytes, stop, records: list) -> None:
    """Send the whole (big) request, then close the socket without reading the answer; repeat."""
    while not stop.is_set():
        start, outcome = time.monotonic(), "disconnected"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_head(abuse, port, len(body)) + body)
            await writer.drain()
            writer.close()
        except OSError as err:
            outcome = type(err).__name__
            await asyncio.sleep(0.05)
        records.append((abuse.name, outcome, time.monotonic() - start))
        await paced(start, PACE_S)


async def paced(started: float, pace_s: float) -> None:
    """With --abuse-rate, wait out the rest of this client's request interval (0: a flood, no wait)."""
    if pace_s > 0:
        await asyncio.sleep(max(0.0, pace_s - (time.monotonic() - started)))


async def run_abusers(url: str, folder: Path, kinds: list[str], ready, stop) -> list:
    port = int(url.rsplit(":", 1)[1])
    records: list = []
    runners = {"post": lambda a, body: post_flood(a, url, body, stop, records),
               "slow": lambda a, body: slow_client(a, port, body, stop, records),
               "disconnect": lambda a, body: disconnecter(a, port, body, stop, records)}
    chosen = [a for a in ABUSES if a.name in kinds]
    bodies = {a.name: (folder / f"{a.name}.bin").read_bytes() for a in chosen}
    tasks = [asyncio.create_task(runners[a.mode](a, bodies[a.name])) for a in chosen for _ in range(a.clients)]
    ready.set()
    done, _ = await asyncio.wait(tasks, timeout=3600)  # ends when `stop` is set and the last answer is in
    for task in done:
        if task.exception() is not None:
            records.append(("client_crash", f"{type(task.exception()).__name__}: {task.exception()}"[:200], 0.0))
    return records


#: nice value of the abuse process: real attackers send from other machines; on one shared machine the
#: abusers' own client CPU (building and sending ~100 requests/s) would otherwise be charged to the server
ABUSER_NICE = 10


PACE_S = 0.0  # seconds between one abusive client's requests (--abuse-rate); 0 = back to back


def abuse_process(url: str, folder: str, kinds: list[str], rate: float, out: str, ready, stop) -> None:
    """The child process: run the abusers until `stop`, then write their records to `out`."""
    global PACE_S
    os.nice(ABUSER_NICE)
    PACE_S = 1.0 / rate if rate > 0 else 0.0
    records = asyncio.run(run_abusers(url, Path(folder), kinds, ready, stop))
    Path(out).write_text(json.dumps(records))


# --- phases ------------------------------------------------------------------------------------------

def phase_a(url: str, args: argparse.Namespace, digits: list[bytes]) -> list[dict]:
    print(f"abuse: phase A, {args.duration} s of {args.rate} ordinary req/s, no abuse", flush=True)
    return asyncio.run(ordinary_stream(url, args.rate, args.duration, digits))


def phase_b(url: str, args: argparse.Namespace, digits: list[bytes], workdir: Path) -> tuple[list[dict], list]:
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    out = workdir / "abuse-records.json"
    child = ctx.Process(target=abuse_process, args=(url, str(workdir / "bodies"), args.kinds, args.abuse_rate, str(out), ready, stop), daemon=True)
    child.start()
    try:
        if not ready.wait(120):
            raise SystemExit("abuse bench: the abuse process did not start")
        time.sleep(ABUSE_RAMP_S)
        print(f"abuse: phase B, {args.duration} s of {args.rate} ordinary req/s while "
              f"{sum(a.clients for a in ABUSES if a.name in args.kinds)} abusive clients run", flush=True)
        ordinary = asyncio.run(ordinary_stream(url, args.rate, args.duration, digits))
    finally:
        stop.set()
        child.join(REQUEST_TIMEOUT_S + 30)
        if child.is_alive():  # the process this function started
            child.terminate()
            child.join(10)
    records = json.loads(out.read_text()) if out.is_file() else [("abuse_process", "no_records", 0.0)]
    return ordinary, records


# --- analysis and report -----------------------------------------------------------------------------

def ordinary_summary(records: list[dict]) -> dict:
    statuses = Counter(str(r["status"]) if r["status"] is not None else r["error"] for r in records)
    lat = percentiles([r["ms"] / 1000 for r in records])
    return {"count": len(records), "p50_ms": lat.get("p50_ms"), "p99_ms": lat.get("p99_ms"), "max_ms": lat.get("max_ms"),
            "errors": sum(r["error"] is not None for r in records),
            "5xx": sum(r["status"] is not None and r["status"] >= 500 for r in records),
            "statuses": dict(sorted(statuses.items())),
            "max_send_lag_ms": round(max((r["lag_ms"] for r in records), default=0.0), 1)}


def abuse_summary(records: list) -> dict:
    out = {}
    for abuse in [*ABUSES, Abuse("client_crash", 0, "", "", ""), Abuse("abuse_process", 0, "", "", "")]:
        rows = [r for r in records if r[0] == abuse.name]
        if not rows and not abuse.clients:
            continue
        lat = percentiles([r[2] for r in rows])
        out[abuse.name] = {"clients": abuse.clients, "count": len(rows),
                           "statuses": dict(sorted(Counter(r[1] for r in rows).items())),
                           "p50_ms": lat.get("p50_ms"), "p99_ms": lat.get("p99_ms"),
                           "5xx": sum(r[1].isdigit() and int(r[1]) >= 500 for r in rows)}
    return out


def verdict(a: dict, b: dict, abuse: dict) -> dict:
    ratio = round(b["p99_ms"] / a["p99_ms"], 2) if a.get("p99_ms") and b.get("p99_ms") else None
    five_xx = a["5xx"] + b["5xx"] + sum(k["5xx"] for k in abuse.values())
    checks = {
        "zero 5xx overall": {"passed": five_xx == 0, "measured": five_xx},
        f"ordinary p99 B/A < {TARGET_P99_RATIO:g}": {"passed": ratio is not None and ratio < TARGET_P99_RATIO,
                                                     "measured": ratio},
        "zero ordinary errors": {"passed": a["errors"] + b["errors"] == 0, "measured": a["errors"] + b["errors"]},
    }
    return {"p99_ratio": ratio, "checks": checks, "passed": all(c["passed"] for c in checks.values())}


def markdown(result: dict) -> str:
    m, a, b, v = result["machine"], result["ordinary"]["A"], result["ordinary"]["B"], result["verdict"]
    lines = [f"# Abuse benchmark ({result['date']})", "", f"- command: `{result['command']}`",
             (f"- machine: {m['cpu_model']}, {m['cpu_count']} CPUs, {m['memory']}; load average at start "
              f"{m['loadavg_start']}, at end {m.get('loadavg_end')} (shared machine; the clients run on it too)"),
             "- versions: " + ", ".join(f"{k} {val}" for k, val in result["versions"].items()),
             f"- git: {result['git']['commit'][:12]}" + (" (uncommitted changes in service/ or bench/)" if result["git"]["dirty_files"] else ""),
             f"- model: {result['model']}; server: {json.dumps(result['server'])}",
             (f"- ordinary stream: {result['rate']} req/s open loop, {result['duration_s']} s per phase, "
              f"{ORDINARY_CONNECTIONS} connections from {ORDINARY_ADDRESS}, latency from the scheduled send time"),
             (f"- abusers (from 127.0.0.1): {', '.join(result['kinds'])}; " + (f"{result['abuse_rate_per_client']:g} requests/s per client"
              if result["abuse_rate_per_client"] else "back to back (a flood: each client sends its next request "
              "as soon as the last is answered)")), "",
             "## Ordinary requests", "", "| | phase A (no abuse) | phase B (abuse) |", "|---|---:|---:|"]
    for key in ("count", "p50_ms", "p99_ms", "max_ms", "errors", "5xx", "max_send_lag_ms"):
        lines.append(f"| {key} | {a[key]} | {b[key]} |")
    lines += [f"| statuses | {a['statuses']} | {b['statuses']} |", "",
              f"p99 B/A: **{v['p99_ratio']}** (limit < {TARGET_P99_RATIO:g})", "",
              "## Abusive requests (phase B)", "", "| kind | clients | count | statuses | p50 ms | p99 ms |",
              "|---|---:|---:|---|---:|---:|"]
    for name, k in result["abuse"].items():
        lines.append(f"| {name} | {k['clients']} | {k['count']} | {k['statuses']} | {k['p50_ms']} | {k['p99_ms']} |")
    lines += ["", "## Verdict", ""]
    lines += [f"- {name}: {'ok' if c['passed'] else '**FAILED**'} ({c['measured']})" for name, c in v["checks"].items()]
    lines += ["", f"**{'PASS' if v['passed'] else 'FAIL'}**", ""]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=20, help="seconds per phase (default 20)")
    p.add_argument("--rate", type=float, default=50, help="ordinary requests per second (default 50)")
    p.add_argument("--workers", type=int, help="CLASSIFIER_WORKERS for the server (default: the service's default)")
    p.add_argument("--onnx", type=Path, help="model to serve (default exports/cnn/model.onnx, else the tiny CNN)")
    p.add_argument("--out", type=Path, help="results folder (default bench/results; with --quick the temp folder)")
    p.add_argument("--quick", action="store_true", help="smoke run: 5 s per phase, results not in bench/results")
    p.add_argument("--abuse-rate", type=float, default=0.0,
                   help="requests per second per abusive client (default 0: back to back, a flood that saturates "
                        "the machine)")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the server, e.g. CLASSIFIER_REFUSAL_RATE=0 (repeatable)")
    p.add_argument("--kinds", default=",".join(a.name for a in ABUSES),
                   help="comma list of abuse kinds to run in phase B (default: all)")
    args = p.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(args.kinds) - {a.name for a in ABUSES})
    if unknown:
        p.error(f"--kinds: unknown {unknown}; choose from {[a.name for a in ABUSES]}")
    bad_env = [item for item in args.server_env if "=" not in item]
    if bad_env:
        p.error(f"--server-env: {bad_env[0]!r} is not NAME=VALUE")
    if args.quick:
        args.duration = 5.0
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) if args.quick else RESULTS_DIR
    return args


def measure(args: argparse.Namespace, workdir: Path) -> dict:
    onnx, digits, note = model_and_digits(args.onnx, workdir)
    home = workdir / "bentoml_home"
    tag = harness.store_in_bento_home(onnx, home)
    sizes = abusive_bodies(workdir / "bodies", digits[0])
    ordinary = [multipart([(f"digit{i}.png", png)]) for i, png in enumerate(digits)]
    env = {"CLASSIFIER_WORKERS": str(args.workers)} if args.workers else {}
    env.update(item.split("=", 1) for item in args.server_env)
    with serve_store(home, workdir, env, "abuse") as server:
        print(f"abuse: {tag} served on {server.url}, ready after {server.ready_s:.1f} s", flush=True)
        asyncio.run(ordinary_stream(server.url, args.rate, 2.0, ordinary))  # warm-up, not recorded
        a = phase_a(server.url, args, ordinary)
        time.sleep(1.0)
        b, abusive = phase_b(server.url, args, ordinary, workdir)
        alive = server.proc.poll() is None
        memory = server.tree.stop()
        log_tail = server.log_path.read_text(errors="replace")[-3000:].splitlines()[-20:]
    return {"model": f"{note} (stored as {tag})", "bodies": sizes, "ordinary_raw": {"A": a, "B": b}, "abuse_raw": abusive,
            "server": {"env": env, "ready_s": round(server.ready_s, 2), "alive_after": alive, **memory},
            "server_log_tail": log_tail}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import httpx

    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": harness.command_line(),
              "machine": harness.machine(), "versions": {**versions(), "httpx": httpx.__version__},
              "git": harness.git_state(), "duration_s": args.duration, "rate": args.rate,
              "abuse_rate_per_client": args.abuse_rate, "kinds": args.kinds}
    with tempfile.TemporaryDirectory(prefix="bench-abuse-") as tmp:
        raw = measure(args, Path(tmp))
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result.update(model=raw["model"], server=raw["server"], bodies=raw["bodies"],
                  ordinary={k: ordinary_summary(v) for k, v in raw["ordinary_raw"].items()},
                  abuse=abuse_summary(raw["abuse_raw"]))
    result["verdict"] = verdict(result["ordinary"]["A"], result["ordinary"]["B"], result["abuse"])
    if not result["verdict"]["passed"]:
        result["server_log_tail"] = raw["server_log_tail"]
    pacing = f"paced-{args.abuse_rate:g}" if args.abuse_rate else "flood"
    pacing += "".join(f"-{k.lower().removeprefix('classifier_')}-{v}" for k, v in result["server"]["env"].items())
    stem = args.out / f"abuse-{dt.date.today().isoformat()}-{pacing}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print("\n" + markdown(result))
    print(f"abuse: wrote {stem}.json and .md")
    return 0 if result["verdict"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
