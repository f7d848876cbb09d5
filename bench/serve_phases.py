"""Per-image CPU cost of a request, phase by phase, through the service's own functions (one process).

Each phase is the code ``Classifier._classify`` runs for a ``POST /classify`` of N images, called
directly and timed in turn on one core (the event loop's thread): body parsing
(``ClassifyMultipart.from_http_request`` on a real multipart body), header checks
(``DecodeBudget.headers``), decoding and the input transform (``Classifier._decode``), normalization,
ONNX Runtime (one 1-thread session, the worker's), softmax/top-k dicts (``predictions``) and the JSON
response body. What this leaves out (the HTTP server, BentoML's middleware, the micro-batcher's thread
hand-off) is the difference between bench/serve.py's server CPU per request and the sum here.

    python -m bench.serve_phases                    # cnn and resnet18, 64-image requests, top_k 5
    python -m bench.serve_phases --images 1 --tag single

Results: a table on stdout and bench/results/serve_phases-<date>[-tag].json/.md (machine, versions, command).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from bench import serve_models  # noqa: E402
from pipeline import atomic  # noqa: E402
from tests import harness  # noqa: E402

BOUNDARY = "benchboundary7MA4YWxkTrZu0gW"


def multipart_body(pngs: list[bytes], top_k: int) -> bytes:
    """The body bench/serve.py's clients send: one ``images`` part per file, then ``top_k``."""
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n" for i, png in enumerate(pngs)]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n{top_k}\r\n'.encode())
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def request_for(body: bytes):
    """A Starlette request whose body arrives in 64 KB messages, as uvicorn delivers it."""
    from starlette.requests import Request

    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)] or [b""]
    messages = iter([{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)])

    async def receive():
        return next(messages)

    headers = [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
               (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": "POST", "path": "/classify", "headers": headers}, receive)


def phases(svc, engine, pngs: list[bytes], top_k: int) -> dict:
    """name -> a zero-argument callable running that phase on this request's data (each phase's input
    is computed once, by the phase before it)."""
    from starlette.responses import JSONResponse

    from service.contract import normalize
    from service.decoding import DecodeBudget
    from service.postprocessing import predictions

    spec = engine.spec
    budget = DecodeBudget.for_model(spec)
    response_class = getattr(svc, "PredictionsResponse", JSONResponse)  # the service's (Starlette's before 15f0851)
    body = multipart_body(pngs, top_k)
    parse = svc.ClassifyMultipart.from_http_request
    uploads = asyncio.run(parse(request_for(body), None)).images
    blobs = [u.data for u in uploads]
    arrays, errors = svc.Classifier.inner._decode(None, uploads, spec, budget)
    assert not errors, errors
    batch = normalize(np.stack(arrays), spec.mean, spec.std)
    logits = engine.logits(batch)
    result = predictions(logits, spec.classes, top_k)
    return {
        "body parsing (multipart)": lambda: asyncio.run(parse(request_for(body), None)),
        "header checks": lambda: budget.headers(blobs),
        "decode + input transform": lambda: svc.Classifier.inner._decode(None, uploads, spec, budget),
        "normalize": lambda: normalize(np.stack(arrays), spec.mean, spec.std),
        "ONNX Runtime (1 thread)": lambda: engine.logits(batch),
        "softmax + top-k dicts": lambda: predictions(logits, spec.classes, top_k),
        "JSON response body": lambda: response_class(result, headers={"X-Model-Version": "1"}).body,
    }


def time_phase(call, images: int, seconds: float) -> float:
    """Microseconds per image of the fastest of repeated calls (at least 5, about ``seconds`` in all):
    on a shared machine the minimum is the phase's own cost, the median also other jobs' (±50 % here)."""
    times, _ = serve_models.time_calls(call, seconds)
    return 1e6 * float(np.min(times)) / images


def asyncio_overhead_us() -> float:
    """What ``asyncio.run`` itself costs (subtracted from the body parsing phase)."""
    async def nothing():
        return None

    times, _ = serve_models.time_calls(lambda: asyncio.run(nothing()), 0.5)
    return 1e6 * float(np.min(times))


def measure(bm, images: int, top_k: int, seconds: float) -> list[dict]:
    import service.service as svc
    from service.engine import OnnxClassifier

    engine = OnnxClassifier(bm.onnx, providers="cpu", intra_op_threads=1)
    pngs = (bm.pngs * (images // len(bm.pngs) + 1))[:images]
    loop_cost = asyncio_overhead_us()
    rows = []
    for name, call in phases(svc, engine, pngs, top_k).items():
        us = time_phase(call, images, seconds)
        if name.startswith("body parsing"):
            us -= loop_cost / images
        rows.append({"model": bm.name, "phase": name, "us_per_image": round(us, 2)})
        print(f"  {bm.name:<9} {name:<28} {us:9.2f} us/image", flush=True)
    rows.append({"model": bm.name, "phase": "total", "us_per_image": round(sum(r["us_per_image"] for r in rows), 2)})
    return rows


def table(rows: list[dict], models: list[str]) -> str:
    by = {(r["model"], r["phase"]): r["us_per_image"] for r in rows}
    names = list(dict.fromkeys(r["phase"] for r in rows))
    lines = ["| phase | " + " | ".join(f"{m} us/image" for m in models) + " |",
             "|---|" + "---:|" * len(models)]
    lines += [f"| {n} | " + " | ".join(f"{by.get((m, n), 0):.1f}" for m in models) + " |" for n in names]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=["cnn", "resnet18"], help="cnn,resnet18")
    p.add_argument("--images", type=int, default=64, help="images per request (default 64)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="seconds of calls per phase (default 2)")
    p.add_argument("--tag", default="")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    machine = harness.machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="serve-phases-") as tmp:
        for name in args.models:
            rows += measure(serve_models.prepare(name, Path(tmp)), args.images, args.top_k, args.seconds)
    md = table(rows, args.models)
    print("\n" + md)
    date = dt.date.today().isoformat()
    stem = f"serve_phases-{date}" + (f"-{args.tag}" if args.tag else "")
    info = {"machine": machine, "versions": harness.versions(("numpy", "pillow", "onnxruntime", "starlette",
                                                              "python-multipart", "bentoml")),
            "command": harness.command_line(), "git": harness.git_state(),
            "settings": {"images_per_request": args.images, "top_k": args.top_k, "seconds_per_phase": args.seconds}}
    atomic.write_json(args.out_dir / f"{stem}.json", {**info, "rows": rows})
    atomic.write_text(args.out_dir / f"{stem}.md", "\n".join([
        f"# Request cost by phase ({dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')})", "",
        f"- command: `{info['command']}`", f"- machine: {machine['cpu_model']}, {machine['usable_cores']} cores",
        f"- versions: {info['versions']}", f"- git: {info['git']['commit'][:12]}",
        f"- {args.images} images per request, top_k {args.top_k}; fastest of repeated calls, one core", "", md, ""]))
    print(f"\nwrote {args.out_dir / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
