#!/usr/bin/env python3
"""Smoke-test a deployed image classifier: ``python bench/smoke.py URL [--image PATH] [--timeout S]``.

Checks, in order: ``GET /livez``, ``GET /readyz``, ``GET /metadata`` (model name, version, classes,
input shape) and ``POST /classify`` with one image: a generated digit-like PNG sized for the model
(a "1" stroke, in the model's channels) or the file given with ``--image``. Prints a short report
and exits 0 when every check passes, 1 when one fails, 2 on a usage error.

Standard library only (urllib), Python 3.8+, so it runs on any host that can reach the service:
copy this one file. ``URL`` may include a path prefix (``https://lb.example.com/classifier``).

Examples::

    python bench/smoke.py http://localhost:3000
    python bench/smoke.py https://classifier.internal --image digit.png --expect-label 7 --timeout 5
    python bench/smoke.py http://10.0.0.5:3000 --wait 120      # poll /readyz for up to 2 min first
"""
from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import struct
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from typing import Any, Dict, List, Optional, Tuple

USER_AGENT = "image-classifier-smoke/1"


class CheckFailed(Exception):
    pass


class Response:
    def __init__(self, status: int, headers: Dict[str, str], body: bytes, ms: float) -> None:
        self.status, self.headers, self.body, self.ms = status, headers, body, ms

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise CheckFailed(f"HTTP {self.status}: response is not JSON: {self.body[:200]!r}") from None

    def error_text(self) -> str:
        """The API's JSON error ``{"error", "reason", "file"}`` as one line, else the body's start."""
        try:
            body = json.loads(self.body)
        except ValueError:
            body = None
        if isinstance(body, dict) and "error" in body:
            parts = [f"HTTP {self.status}"]
            if body.get("reason"):
                parts.append(f"reason={body['reason']}")
            if body.get("file"):
                parts.append(f"file={body['file']}")
            return " ".join(parts) + f": {body['error']}"
        return f"HTTP {self.status}: {self.body[:200].decode('utf-8', 'replace').strip()}"


def request(url: str, timeout: float, data: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None) -> Response:
    req = urllib.request.Request(url, data=data, headers={"User-Agent": USER_AGENT, **(headers or {})},
                                 method="POST" if data is not None else "GET")
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (the user's URL)
            body = resp.read()
            return Response(resp.status, dict(resp.headers.items()), body, (time.perf_counter() - started) * 1000)
    except urllib.error.HTTPError as err:  # 4xx/5xx: keep the body, the API explains itself in JSON
        body = err.read() if err.fp is not None else b""
        return Response(err.code, dict(err.headers.items()) if err.headers else {}, body, (time.perf_counter() - started) * 1000)
    except urllib.error.URLError as err:
        raise CheckFailed(f"cannot reach {url}: {err.reason}") from None
    except http.client.HTTPException as err:  # a reply that is not HTTP (wrong port, broken proxy)
        raise CheckFailed(f"{url}: bad HTTP response: {type(err).__name__}: {err}") from None
    except (TimeoutError, OSError) as err:  # socket.timeout is a TimeoutError/OSError
        kind = "timed out" if isinstance(err, TimeoutError) or "timed out" in str(err) else str(err)
        raise CheckFailed(f"{url}: {kind} (--timeout {timeout:g} s)") from None


# --- a generated digit-like image (PNG written with zlib; no Pillow) -------------------------------

def digit_pixels(size: int) -> List[List[int]]:
    """A white "1" on black, MNIST style: a slightly slanted stroke with soft edges, ``size x size``."""
    rows = []
    top, bottom = 0.18 * size, 0.82 * size
    half_width = max(0.6, 0.07 * size)
    for y in range(size):
        row = []
        for x in range(size):
            if top <= y + 0.5 <= bottom:
                t = (y + 0.5 - top) / (bottom - top)
                center = size * (0.56 - 0.10 * t)  # leans like a handwritten 1
                d = abs(x + 0.5 - center)
                value = 255 * max(0.0, min(1.0, half_width + 0.5 - d))
            else:
                value = 0
            row.append(int(round(value)))
        rows.append(row)
    return rows


def png_bytes(pixels: List[List[int]], channels: int) -> bytes:
    """Grayscale (1 channel) or RGB (3) 8-bit PNG of ``pixels`` (rows of 0..255)."""
    color_type = 0 if channels == 1 else 2
    raw = bytearray()
    for row in pixels:
        raw.append(0)  # filter: none
        for v in row:
            raw.extend([v] * (1 if channels == 1 else 3))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    height, width = len(pixels), len(pixels[0])
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + chunk(b"IEND", b"")


def multipart(fields: List[Tuple[str, str]], files: List[Tuple[str, str, bytes, str]]) -> Tuple[bytes, str]:
    boundary = "smoke-" + uuid.uuid4().hex
    out = bytearray()
    for name, value in fields:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, filename, data, mime in files:
        safe = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{safe}"\r\n'
                f"Content-Type: {mime}\r\n\r\n").encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def guess_mime(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".bmp": "image/bmp",
            ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff"}.get(ext, "application/octet-stream")


# --- the checks ------------------------------------------------------------------------------------

class Smoke:
    def __init__(self, base: str, timeout: float, out=sys.stdout) -> None:
        self.base, self.timeout, self.out = base.rstrip("/"), timeout, out
        self.failures = 0

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def line(self, ok: bool, name: str, detail: str) -> None:
        mark = "PASS" if ok else "FAIL"
        self.out.write(f"  {mark}  {name:<16} {detail}\n")
        self.out.flush()
        if not ok:
            self.failures += 1

    def probe(self, path: str) -> Response:
        resp = request(self.url(path), self.timeout)
        if resp.status != 200:
            raise CheckFailed(resp.error_text())
        return resp

    def wait_ready(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        last = ""
        while True:
            try:
                if request(self.url("/readyz"), min(self.timeout, max(1.0, deadline - time.monotonic()))).status == 200:
                    return
                last = "not ready"
            except CheckFailed as err:
                last = str(err)
            if time.monotonic() >= deadline:
                self.out.write(f"  ....  still not ready after --wait {wait_s:g} s ({last})\n")
                return
            time.sleep(1.0)

    def check(self, name: str, fn) -> Any:
        try:
            result = fn()
        except CheckFailed as err:
            self.line(False, name, str(err))
            return None
        return result


def check_probes(smoke: Smoke) -> None:
    for path, name in (("/livez", "GET /livez"), ("/readyz", "GET /readyz")):
        resp = smoke.check(name, lambda p=path: smoke.probe(p))
        if resp is not None:
            smoke.line(True, name, f"200 in {resp.ms:.0f} ms")


def fetch_metadata(smoke: Smoke) -> dict:
    resp = smoke.probe("/metadata")
    meta = resp.json()
    problems = []
    if not isinstance(meta, dict):
        raise CheckFailed(f"expected a JSON object, got {type(meta).__name__}")
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes:
        problems.append("no 'classes'")
    if not meta.get("model_name"):
        problems.append("no 'model_name'")
    shape = meta.get("input_shape")
    if not (isinstance(shape, list) and len(shape) == 4):
        problems.append(f"bad 'input_shape' {shape!r}")
    if problems:
        raise CheckFailed("; ".join(problems))
    meta["_ms"] = resp.ms
    return meta


def report_metadata(smoke: Smoke, meta: dict) -> None:
    providers = meta.get("execution_providers") or meta.get("active_providers") or ["?"]
    smoke.line(True, "GET /metadata", f"{meta['model_name']} version {meta.get('registry_version') or meta.get('model_version')} "
               f"alias {meta.get('registry_alias') or '-'} ({meta.get('model_tag', '?')}), {len(meta['classes'])} classes, "
               f"input {'x'.join(str(d) for d in meta['input_shape'][1:])}, on {providers[0]} in {meta['_ms']:.0f} ms")
    if meta.get("provider_warning"):
        smoke.out.write(f"  WARN  {'':<16} execution provider fallback: {meta['provider_warning']}\n")


def request_image(args: argparse.Namespace, meta: Optional[dict]) -> Tuple[bytes, str, str, str]:
    """(bytes, filename, MIME type, a description): --image, else a generated digit sized for the model."""
    if args.image:
        try:
            with open(args.image, "rb") as f:
                data = f.read()
        except OSError as err:
            raise CheckFailed(f"cannot read --image {args.image}: {err.strerror or err}") from None
        return data, os.path.basename(args.image), guess_mime(args.image), args.image
    size, channels = 28, 1
    if meta is not None:
        size = int(meta.get("image_size") or meta["input_shape"][-1] or 28)
        channels = int(meta.get("in_channels") or meta["input_shape"][1] or 1)
    return (png_bytes(digit_pixels(size), channels), "smoke-digit-1.png", "image/png",
            f"a generated {size}x{size} {'gray' if channels == 1 else 'RGB'} digit '1'")


def check_prediction(preds: Any, meta: Optional[dict], k: int, expect_label: Optional[str]) -> Dict[str, Any]:
    """The one prediction of a /classify answer, or CheckFailed saying what is wrong with it."""
    if not (isinstance(preds, list) and len(preds) == 1 and isinstance(preds[0], dict)):
        raise CheckFailed(f"expected a list with one prediction, got {str(preds)[:200]}")
    p = preds[0]
    top = p.get("top_k") or []
    problems = []
    score = p.get("score")
    if not isinstance(score, (int, float)) or not (0.0 <= score <= 1.0) or math.isnan(score):
        problems.append(f"score {score!r} is not a probability")
    if meta is not None and p.get("label") not in meta["classes"]:
        problems.append(f"label {p.get('label')!r} is not one of the model's classes")
    if len(top) != k or any(a["score"] < b["score"] for a, b in zip(top, top[1:])):
        problems.append(f"top_k is not {k} entries in descending order: {top}")
    if expect_label is not None and str(p.get("label")) != expect_label:
        problems.append(f"label {p.get('label')!r}, expected {expect_label!r}")
    if problems:
        raise CheckFailed("; ".join(problems))
    return p


def classify(smoke: Smoke, args: argparse.Namespace, meta: Optional[dict]) -> None:
    data, filename, mime, what = request_image(args, meta)
    k = 3 if meta is None else max(1, min(3, len(meta["classes"])))
    body, content_type = multipart([("top_k", str(k))], [("images", filename, data, mime)])
    resp = request(smoke.url("/classify"), args.timeout, data=body, headers={"Content-Type": content_type, "Accept": "application/json"})
    if resp.status != 200:
        raise CheckFailed(resp.error_text())
    p = check_prediction(resp.json(), meta, k, args.expect_label)
    server = resp.headers.get("Server-Timing") or resp.headers.get("server-timing") or ""
    server_ms = ""
    if "dur=" in server:
        server_ms = f", server {server.split('dur=', 1)[1].split(',')[0].split(';')[0]} ms"
    alts = ", ".join(f"{t['label']} {t['score']:.3f}" for t in (p.get("top_k") or [])[1:])
    smoke.line(True, "POST /classify", f"{what} -> {p['label']} ({p['score']:.3f}){'; then ' + alts if alts else ''}; "
               f"{resp.ms:.0f} ms{server_ms}")


def run(args: argparse.Namespace, out=sys.stdout) -> int:
    smoke = Smoke(args.url, args.timeout, out)
    out.write(f"smoke test of {smoke.base} (timeout {args.timeout:g} s per request)\n")
    if args.wait > 0:
        smoke.wait_ready(args.wait)
    check_probes(smoke)
    meta = smoke.check("GET /metadata", lambda: fetch_metadata(smoke))
    if meta is not None:
        report_metadata(smoke, meta)
    smoke.check("POST /classify", lambda: classify(smoke, args, meta))
    checks = 4
    if smoke.failures:
        out.write(f"FAILED: {smoke.failures} of {checks} checks failed\n")
        return 1
    out.write(f"OK: {checks} checks passed\n")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="smoke.py", description="Smoke-test a deployed image classifier (/livez, /readyz, /metadata, /classify).")
    parser.add_argument("url", help="the service's base URL, e.g. http://localhost:3000 (a path prefix is kept)")
    parser.add_argument("--image", help="classify this image file instead of a generated digit")
    parser.add_argument("--expect-label", help="fail unless the predicted label is this")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    parser.add_argument("--wait", type=float, default=0.0,
                        help="first poll /readyz for up to this many seconds (a service still starting); default 0")
    args = parser.parse_args(argv)
    if not args.url.startswith(("http://", "https://")):
        parser.error(f"URL must start with http:// or https://, got {args.url!r}")
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
