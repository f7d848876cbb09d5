"""HTTP fuzzing below the schema (issue 13): raw requests, mutated byte by byte, over a plain TCP socket.

schemathesis (test_service_hostile.py) only sends requests an HTTP client library can build. Here
hypothesis starts from a few valid requests written out by hand (a multipart ``POST /classify`` with a
28x28 PNG, a JSON ``POST /classify_base64``, ``GET``/``POST /metadata``, ``GET /ui``, ``/readyz``,
``/livez``, ``/metrics``) and mutates what goes on the wire, in the spirit of Triton's HTTP fuzz tests:

- the request line: method, target (odd bytes, percent-encoding, very long, other forms), version,
  separators, line endings;
- headers: dropped, duplicated, garbled, without a colon, folded (obs-fold), huge, many, bad names;
  ``Content-Length`` wrong / negative / huge / garbage / duplicated / missing; ``Transfer-Encoding:
  chunked`` with bad chunk sizes, extensions, trailers, no terminator; both framings at once;
  ``Content-Type`` and its ``boundary`` parameter; ``Expect: 100-continue``; upgrades;
- multipart bodies: boundary mismatch, missing CRLFs, unterminated parts, RFC 5987 ``filename*``,
  many parts, odd part headers and fields, preamble/epilogue, nested multipart;
- JSON bodies: deep nesting, huge numbers, wrong types, odd encodings, bad base64;
- bytes: flipped / inserted / deleted / truncated in the body or anywhere in the request, pipelining.

Every request goes out on its own connection. The oracle (``exchange`` + ``problems``): the answer is
read with a socket timeout; a closed or reset connection or any non-5xx status is fine, a 5xx is a
failure (except ``503 {"reason": "overloaded"}`` and ``504``, noted apart: they should not happen at
this load), so is a connection that neither answers nor closes (a hang), a reply that is not HTTP, a
response cut off inside its body (the connection closed before its Content-Length), and a Python
traceback in the server log. A request the server is still waiting on (a Content-Length
larger than the body, a truncated head, a chunked body without its last chunk) is not a hang: when
the server has been quiet for ``QUIET_S`` the client sends what any such request could still be
waiting for (the end of a head, a last chunk, then more body bytes than the size limit allows); only
a server that still neither answers nor closes within ``RESPONSE_TIMEOUT_S`` hangs. After a response
on a connection left open, a ``GET /livez`` with ``Connection: close`` follows, so that whatever the
server made of any bytes left over (pipelining) is answered and checked too.

Each mutation class (``CLASSES``: area and operation) gets its own hypothesis run of an equal share
of the examples (its first, simplest example applies that mutation alone, with its first, most hostile
value); other mutations are stacked on top at random. The run does not stop at the first failure: every failing case is collected, and the test fails
with all of them grouped by kind and mutation class, shortest raw request first (also written to
``fuzz-failures.json`` in the test's tmp_path). Afterwards the server must still be ready, still
classify a valid image, and have restarted no worker.

``FUZZ_MAX_EXAMPLES=3000`` for a longer hunt (default 300: ~6-10 s of requests on 2 CPU cores).
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import select
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import pytest

pytest.importorskip("hypothesis")  # dev extra (pyproject [dev])
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from svc_support import SERVER_ENV

FUZZ_MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "300"))
FUZZ_SETTINGS = settings(
    max_examples=FUZZ_MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
    phases=[Phase.explicit, Phase.generate],  # failures are collected, not raised: nothing to shrink
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.large_base_example, HealthCheck.function_scoped_fixture],
)

#: no byte and no close for this long (after the client has sent all it can) is a hang
RESPONSE_TIMEOUT_S = 10.0
#: a server quiet for this long may be waiting for bytes: the client sends NUDGE
QUIET_S = 0.5
#: no exchange takes longer than this, however the server trickles
EXCHANGE_CAP_S = 40.0
MAX_REQUEST_BYTES = int(SERVER_ENV["CLASSIFIER_MAX_REQUEST_BYTES"])
#: what a request the server is still reading could be waiting for: the end of its head, the last
#: chunk of a chunked body, then more body than the size limit allows (any Content-Length it took)
NUDGE = b"\r\n\r\n0\r\n\r\n" + b"A" * (MAX_REQUEST_BYTES + 1)
PROBE = b"GET /livez HTTP/1.1\r\nHost: fuzz.test\r\nConnection: close\r\n\r\n"
TRACEBACK = "Traceback (most recent call last)"

# --- the oracle: one raw request on its own connection -----------------------------------------------


@dataclass
class Response:
    status: int
    head: bytes
    body: bytes = b""
    complete: bool = False

    @property
    def reason(self) -> str | None:
        try:
            value = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return None
        return value.get("reason") if isinstance(value, dict) else None


class ResponseReader:
    """Incremental HTTP/1.x response parser: status line, headers, then the body by Content-Length,
    chunked coding or the connection's end. Interim 1xx answers (``100 Continue``) are skipped."""

    MAX_HEAD = 256 * 1024

    def __init__(self, first_is_head: bool = False) -> None:
        self.buf = b""
        self.responses: list[Response] = []
        self.bad: bytes | None = None  # bytes that are not an HTTP response
        self.closing = False  # the last response said Connection: close (or was a 101)
        self._state = "head"
        self._need = 0
        self._no_body_next = first_is_head

    @property
    def idle(self) -> bool:
        """Between responses (the last one, if any, was read completely)."""
        return self._state in ("head", "maybe_body") and not self.buf

    def feed(self, data: bytes) -> None:
        self.buf += data
        while self.bad is None and self._step():
            pass

    def eof(self) -> None:
        if self._state in ("until_close", "maybe_body"):
            self.responses[-1].complete = True
            self._state = "head"

    def _line(self) -> bytes | None:
        """The next CRLF-terminated line, taken from the buffer; None until all of it came."""
        end = self.buf.find(b"\r\n")
        if end < 0:
            return None
        line, self.buf = self.buf[:end], self.buf[end + 2:]
        return line

    def _take(self, response, then: str) -> bool:
        """Move the bytes still due, as far as the buffer holds them, into the body (its first 4 KB are
        kept); once all came, go on to state ``then`` (``head``: the response is complete) and say True."""
        take = self.buf[:self._need]
        response.body += take[:max(0, 4096 - len(response.body))]
        self._need -= len(take)
        self.buf = self.buf[len(take):]
        if self._need:
            return False
        response.complete = response.complete or then == "head"
        self._state = then
        return True

    #: states that take a counted number of bytes -> the state after them
    TAKE_THEN = {"body": "head", "chunk_data": "chunk_size"}

    def _step(self) -> bool:
        """Parse what the buffer holds in the current state; True when the state moved on."""
        if self._state == "head":
            return self._on_head()
        if self._state in self.TAKE_THEN:  # bytes counted by Content-Length or a chunk size
            return self._take(self.responses[-1], then=self.TAKE_THEN[self._state])
        return getattr(self, f"_on_{self._state}")(self.responses[-1])

    def _on_head(self) -> bool:
        if not self.buf:
            return False
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > self.MAX_HEAD or not b"HTTP/1."[:len(self.buf)].startswith(self.buf[:7]):
                self.bad = self.buf[:300]
            return False
        head, self.buf = self.buf[:end], self.buf[end + 4:]
        match = re.match(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: [^\r\n]*)?(?:\r\n|$)", head)
        if match is None:
            self.bad = head[:300]
            return False
        status = int(match.group(1))
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), value.strip().lower())
        if 100 <= status < 200 and status != 101:
            return True  # interim
        response = Response(status, head)
        self.responses.append(response)
        if status == 101 or headers.get(b"connection") == b"close":
            self.closing = True
        head_reply, self._no_body_next = self._no_body_next, False
        length = headers.get(b"content-length", b"")
        if status in (101, 204, 304):
            response.complete = True
        elif b"chunked" in headers.get(b"transfer-encoding", b""):
            self._state = "chunk_size"
        elif length.isdigit():
            # the answer to a HEAD has no body, unless the server did not take the request as a
            # HEAD (a 400 for a mangled request line): then what follows is not a response
            self._state, self._need = ("maybe_body" if head_reply else "body"), int(length)
            if self._need == 0:
                response.complete, self._state = True, "head"
        elif head_reply:
            response.complete = True
        else:
            self._state = "until_close"
        return True

    def _on_maybe_body(self, response) -> bool:
        if not self.buf or b"HTTP/"[:len(self.buf)] == self.buf[:5]:
            if len(self.buf) >= 5:  # the next response: this one had no body
                response.complete, self._state = True, "head"
                return True
            return False
        self._state = "body"
        return True

    def _on_chunk_size(self, response) -> bool:
        line = self._line()
        if line is None:
            return False
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            self.bad = b"bad chunk size in the response: " + line[:100]
            return False
        self._state, self._need = ("chunk_data", size + 2) if size else ("trailer", 0)
        return True

    def _on_trailer(self, response) -> bool:
        line = self._line()
        if line is None:
            return False
        if not line:
            response.complete, self._state = True, "head"
        return True

    def _on_until_close(self, response) -> bool:
        response.body += self.buf[:4096]
        self.buf = b""
        return False


@dataclass
class Exchange:
    responses: list[Response]
    end: str  # "closed" | "reset" | "hang" | "refused" | "bad_response" | "capped"
    bad: bytes | None = None
    nudged: bool = False
    probed: bool = False
    seconds: float = 0.0

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]


def exchange(address: tuple[str, int], raw: bytes, *, head: bool = False, quiet_s: float = QUIET_S,
             timeout_s: float = RESPONSE_TIMEOUT_S, nudge: bytes = NUDGE, probe: bytes = PROBE) -> Exchange:
    """Send ``raw`` on a new connection and read every response until the server closes it.

    Reads and writes are interleaved (select), so a server that answers before it has read the
    whole request (413 on a Content-Length) is heard even while the client is still sending."""
    started = time.monotonic()
    try:
        sock = socket.create_connection(address, timeout=timeout_s)
    except OSError as err:
        return Exchange([], "refused", bad=repr(err).encode())
    reader = ResponseReader(first_is_head=head)
    out = bytearray(raw)
    nudged = probed = write_closed = False
    end = None
    with sock:
        sock.setblocking(False)
        last_progress = time.monotonic()
        while end is None:
            now = time.monotonic()
            if now - started > EXCHANGE_CAP_S:
                end = "capped"
                break
            if reader.responses and reader.idle and not reader.closing and not probed and not out:
                out += probe  # leftover bytes, if any, are answered before the probe
                probed = True
            writing = bool(out) and not write_closed
            wait = quiet_s if not nudged else timeout_s
            wait = max(0.0, min(wait - (now - last_progress), EXCHANGE_CAP_S - (now - started)))
            readable, writable, _ = select.select([sock], [sock] if writing else [], [], wait)
            if writable:
                try:
                    sent = sock.send(out[:1 << 16])
                    del out[:sent]
                    last_progress = time.monotonic()
                except (BrokenPipeError, ConnectionResetError):
                    write_closed = True
                    out.clear()
                except BlockingIOError:
                    pass
            if readable:
                try:
                    data = sock.recv(1 << 16)
                except ConnectionResetError:
                    end = "reset"
                    break
                except BlockingIOError:
                    continue
                if not data:
                    reader.eof()
                    end = "closed"
                    break
                last_progress = time.monotonic()
                reader.feed(data)
                if reader.bad is not None:
                    end = "bad_response"
                continue
            if writable:
                continue
            if time.monotonic() - last_progress < (quiet_s if not nudged else timeout_s):
                continue
            if not nudged:  # quiet: the server may be waiting for bytes that will never come
                nudged = True
                if not write_closed:
                    out += nudge
                last_progress = time.monotonic()
                continue
            end = "hang"
    return Exchange(reader.responses, end, bad=reader.bad, nudged=nudged, probed=probed,
                    seconds=time.monotonic() - started)


def problems(result: Exchange) -> tuple[list[str], list[str]]:
    """(failures, notes) for one exchange: 5xx, hangs, non-HTTP replies, an unreachable server are
    failures; 503 overloaded and 504 are notes."""
    failures, notes = [], []
    for response in result.responses:
        if response.status >= 500:
            if response.status == 504 or (response.status == 503 and response.reason == "overloaded"):
                notes.append(f"{response.status} {response.reason}")
            else:
                failures.append(f"status {response.status}")
    if result.end == "hang":
        failures.append(f"hang: no response and no close within {RESPONSE_TIMEOUT_S:g} s"
                        f" (statuses so far {result.statuses}, nudged={result.nudged})")
    elif result.end == "refused":
        failures.append(f"server unreachable: {result.bad.decode(errors='replace')}")
    elif result.end == "bad_response":
        failures.append(f"reply is not HTTP: {result.bad!r}")
    elif result.end == "closed" and result.responses and not result.responses[-1].complete:
        response = result.responses[-1]
        failures.append(f"truncated response: status {response.status}, the connection closed inside its body"
                        f" ({len(response.body)} bytes of it came)")
    elif result.end == "capped":
        failures.append(f"exchange still going after {EXCHANGE_CAP_S:g} s")
    return failures, notes


# --- the seeds -------------------------------------------------------------------------------------

HOST = b"Host: fuzz.test"
BOUNDARY = b"fuzzBoundary7MA4YWxkTrZu0gW"


def png_28() -> bytes:
    pixels = np.random.default_rng(13).integers(0, 256, (28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


PNG = png_28()
PNG_B64 = base64.b64encode(PNG)


def image_part(payload: bytes = PNG, filename: bytes = b"digit.png") -> list:
    return [[b'Content-Disposition: form-data; name="images"; filename="' + filename + b'"',
             b"Content-Type: image/png"], payload]


def multipart_body(parts: list, boundary: bytes = BOUNDARY, eol: bytes = b"\r\n", preamble: bytes = b"",
                   epilogue: bytes = b"", closing: bool = True) -> bytes:
    body = preamble
    for headers, payload in parts:
        body += b"--" + boundary + eol + b"".join(h + eol for h in headers) + eol + payload + eol
    if closing:
        body += b"--" + boundary + b"--" + eol
    return body + epilogue


def http_request(method: bytes, target: bytes, headers: list[bytes], body: bytes = b"",
                 version: bytes = b"HTTP/1.1") -> bytes:
    """A well-formed request (Content-Length added when there is a body)."""
    lines = [method + b" " + target + b" " + version, HOST, *headers]
    if body or method == b"POST":
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def valid_classify_request() -> bytes:
    return http_request(b"POST", b"/classify", [b"Content-Type: multipart/form-data; boundary=" + BOUNDARY],
                        multipart_body([image_part()]))


#: name -> (method, target, extra headers, body kind); weighted by repetition in SEED_NAMES
SEEDS = {
    "classify": (b"POST", b"/classify", [b"User-Agent: fuzz/1", b"Accept: */*"], "multipart"),
    "classify_base64": (b"POST", b"/classify_base64", [b"User-Agent: fuzz/1", b"Accept: application/json"], "json"),
    "metadata_get": (b"GET", b"/metadata", [b"Accept: application/json"], "none"),
    "metadata_post": (b"POST", b"/metadata", [b"Content-Type: application/json"], "empty_json"),
    "ui": (b"GET", b"/ui", [b"Accept: text/html"], "none"),
    "readyz": (b"GET", b"/readyz", [], "none"),
    "livez": (b"GET", b"/livez", [], "none"),
    "metrics": (b"GET", b"/metrics", [], "none"),
}
SEED_NAMES = ["classify"] * 4 + ["classify_base64"] * 3 + ["metadata_get", "metadata_post"] + [
    "ui", "readyz", "livez", "metrics"]

# --- mutation helpers ------------------------------------------------------------------------------

ODD_BYTES = [b"\x00", b"\r", b"\n", b"\r\n", b"\t", b" ", b"\x7f", b"\xff", b"\xc3\x28", b'"', b";", b",", b":",
             b"\\", b"%", b"\x1b[31m", b"\xef\xbb\xbf"]


def mutate_bytes(draw, data: bytes, max_ops: int = 6) -> bytes:
    """Flip / set / insert / delete / duplicate / truncate bytes (as test_service_hostile.mutated)."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, max_ops))):
        if not data:
            data += draw(st.binary(min_size=1, max_size=16))
            continue
        op = draw(st.sampled_from(["flip", "set", "insert", "insert_odd", "delete", "duplicate", "truncate"]))
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x0D, 0x0A, 0x20]))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "insert_odd":
            data[at:at] = draw(st.sampled_from(ODD_BYTES))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif op == "duplicate":
            data[at:at] = data[at:at + draw(st.integers(1, 256))]
        else:
            del data[at:]
    return bytes(data)


def pick_index(draw, items: list) -> int:
    return draw(st.integers(0, len(items) - 1))


def pick_ops(draw, ops: list[str], forced: str | None, gate: int = 3, max_size: int = 2) -> list[str]:
    """The case's forced mutation (its class, if in this area) and, one time in ``gate + 1``, a few more."""
    extra = draw(st.lists(st.sampled_from(ops), max_size=max_size)) if draw(st.integers(0, gate)) == gate else []
    return ([forced] if forced else []) + extra


def deep(depth: int, kind: str = "[") -> bytes:
    if kind == "[":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


TOP_K_TEXT = [deep(3000), b"1" * 5000, b"1", b"3", b"10", b"11", b"0", b"-1", b"", b"null", b"abc", b"true", b"2.0",
              b"1e309", b"NaN", b'"3"', b"[3]", b"99999999999999999999", deep(100, "{"), b"\xff\xfe",
              b"3\x00", b" 3 ", b"\xd9\xa3"]

# --- multipart bodies ------------------------------------------------------------------------------

MP_OPS = ["boundary-mismatch", "boundary-param", "long-boundary", "missing-crlf", "unterminated", "filename-star",
          "many-parts", "many-fields", "top-k", "field", "part-headers", "pre-epilogue", "empty", "lf-only",
          "nested", "boundary-in-data", "payload"]


def draw_multipart(draw, tags: list[str], forced: str | None = None) -> tuple[bytes, bytes]:
    """(body, Content-Type value) of a POST /classify, mutated."""
    boundary = header_boundary = BOUNDARY
    parts = [image_part()]
    eol, preamble, epilogue, closing = b"\r\n", b"", b"", True
    ctype = None
    post: list[Callable[[bytes], bytes]] = []
    ops = pick_ops(draw, MP_OPS, forced)
    for op in ops:
        tags.append("mp:" + op)
        if not parts:  # "empty" dropped them: later ops work on a part
            parts = [image_part()]
        if op == "boundary-mismatch":
            header_boundary = draw(st.sampled_from([BOUNDARY + b"x", BOUNDARY[:-1], BOUNDARY.upper(), b"other",
                                                    b"-" + BOUNDARY, BOUNDARY + b" "]))
        elif op == "boundary-param":
            ctype = draw(st.sampled_from([
                b"multipart/form-data; boundary=\xff\xfe" + BOUNDARY, b"multipart/form-data", b"multipart/form-data;",
                b"multipart/form-data; boundary=",
                b'multipart/form-data; boundary=""', b'multipart/form-data; boundary="' + BOUNDARY + b'"',
                b'multipart/form-data; boundary="' + BOUNDARY, b"multipart/form-data; boundary=" + BOUNDARY + b'"',
                b"multipart/form-data; boundary=" + BOUNDARY + b"; boundary=zzz",
                b"multipart/form-data; boundary=zzz; boundary=" + BOUNDARY,
                b"multipart/form-data;boundary=" + BOUNDARY, b"multipart/form-data ; boundary = " + BOUNDARY,
                b"MULTIPART/FORM-DATA; BOUNDARY=" + BOUNDARY, b"multipart/form-data; boundary=a b",
                b"multipart/form-data; boundary=" + BOUNDARY + b"\x00",
                b"multipart/form-data; charset=utf-8; boundary=" + BOUNDARY,
                b"multipart/form-data; charset=\xff\xfe; boundary=" + BOUNDARY,
                b"multipart/form-data; charset=nope-42; boundary=" + BOUNDARY,
                b"multipart/mixed; boundary=" + BOUNDARY, b"multipart/form-data; boundary=" + BOUNDARY + b"; " + b"x=y; " * 2000,
                b"multipart/form-data; boundary*=UTF-8''" + BOUNDARY,
            ]))
        elif op == "long-boundary":
            boundary = header_boundary = b"B" * draw(st.sampled_from([70, 71, 200, 5000, 60000]))
        elif op == "missing-crlf":
            nth = draw(st.integers(0, 50))
            post.append(lambda body, nth=nth: _drop_nth(body, b"\r\n", nth))
        elif op == "unterminated":
            closing = False
            if draw(st.booleans()):
                frac = draw(st.floats(0, 1))
                post.append(lambda body, frac=frac: body[:int(len(body) * frac)])
        elif op == "filename-star":
            disposition = draw(st.sampled_from([
                b"form-data; name=\"images\"; filename*=UTF-8''%E2%82%AC%20rates.png",
                b"form-data; name=\"images\"; filename*=utf-8''%ZZ%",
                b"form-data; name=\"images\"; filename*=UTF-8'en'%FF%FE%00.png",
                b"form-data; name=\"images\"; filename*=''",
                b"form-data; name=\"images\"; filename*=bogus",
                b"form-data; name=\"images\"; filename*=UTF-8''" + b"%41" * 3000,
                b"form-data; name=\"images\"; filename=\"a.png\"; filename*=UTF-8''b%2F..%2Fc.png",
                b"form-data; name*=UTF-8''images; filename=\"a.png\"",
                b"form-data; name=\"images\"; filename*=iso-8859-1''%E9t%E9.png",
                b"form-data; name=\"images\"; filename*0*=UTF-8''a; filename*1=b.png",
            ]))
            parts[0][0][0] = b"Content-Disposition: " + disposition
        elif op == "many-parts":
            parts = parts[:1] * draw(st.sampled_from([2, 32, 33, 200]))
        elif op == "many-fields":
            n = draw(st.sampled_from([4, 5, 50, 1000]))
            parts = parts + [[[b'Content-Disposition: form-data; name="f%d"' % i], b"v"] for i in range(n)]
        elif op == "top-k":
            value = draw(st.sampled_from(TOP_K_TEXT))
            parts = parts + [[[b'Content-Disposition: form-data; name="top_k"'], value]] * draw(st.sampled_from([1, 1, 2]))
        elif op == "field":
            disposition = draw(st.sampled_from([
                b'form-data; name="model"', b'form-data; name="images"', b"form-data", b'form-data; name=""',
                b'form-data; name="im\\"ages"; filename="a.png"', b'form-data; name="images\x00"; filename="a.png"',
                b"form-data; name=images; filename=a.png", b'form-data; name="top_k"; filename="k.txt"',
                b'attachment; name="images"; filename="a.png"', b'form-data; name="images"; filename=""',
                b'form-data; name="images"; filename="\xff\xfe.png"', b'form-data; name="\xc3\x28"',
            ]))
            parts = parts + [[[b"Content-Disposition: " + disposition], draw(st.sampled_from([PNG, b"3", b""]))]]
        elif op == "part-headers":
            which = draw(st.sampled_from(["no-disposition", "no-colon", "huge", "ctype", "lower", "fold", "cte", "many"]))
            tags.append("mp:part-headers:" + which)
            headers = parts[0][0]
            if which == "no-disposition":
                headers[:] = [b"Content-Type: image/png"]
            elif which == "no-colon":
                headers.insert(draw(st.integers(0, len(headers))), b"Content-Disposition form-data")
            elif which == "huge":
                headers.append(b"X-Pad: " + b"p" * draw(st.sampled_from([4000, 5000, 100_000])))
            elif which == "ctype":
                headers[1] = b"Content-Type: " + draw(st.sampled_from([b"", b"\xff", b"text/plain; charset=\xff",
                                                                        b"image/png; " + b"a=b;" * 1000]))
            elif which == "lower":
                headers[:] = [h.lower() for h in headers]
            elif which == "fold":
                headers.insert(1, b" ; foo=bar")
            elif which == "cte":
                headers.append(b"Content-Transfer-Encoding: base64")
                parts[0][1] = PNG_B64
            else:
                headers.extend(b"X-H%d: v" % i for i in range(draw(st.sampled_from([100, 2000]))))
        elif op == "pre-epilogue":
            preamble = draw(st.sampled_from([b"", b"junk\r\n", b"--" + BOUNDARY[:-2] + b"\r\n", b"\r\n" * 100]))
            epilogue = draw(st.sampled_from([b"", b"junk", b"--" + BOUNDARY + b"\r\n", b"\x00" * 1000]))
        elif op == "empty":
            which = draw(st.sampled_from(["no-parts", "empty-payload", "empty-body", "only-delimiter"]))
            if which == "no-parts":
                parts = []
            elif which == "empty-payload":
                parts[0][1] = b""
            elif which == "empty-body":
                post.append(lambda body: b"")
            else:
                post.append(lambda body: b"--" + BOUNDARY + b"\r\n")
        elif op == "lf-only":
            eol = b"\n"
            parts[0][0] = [h for h in parts[0][0]]
        elif op == "nested":
            inner = multipart_body([image_part()], boundary=b"inner")
            parts = [[[b'Content-Disposition: form-data; name="images"',
                       b"Content-Type: multipart/mixed; boundary=inner"], inner]]
        elif op == "boundary-in-data":
            parts[0][1] = PNG + draw(st.sampled_from([b"\r\n--" + BOUNDARY, b"\r\n--" + BOUNDARY + b"--",
                                                     b"--" + BOUNDARY, b"\r\n--" + BOUNDARY[:10]])) + PNG
        elif op == "payload":
            parts[0][1] = draw(st.sampled_from([b"not an image", PNG[:40], PNG[:-12], b"\x89PNG\r\n\x1a\n",
                                                 b"\x00" * 1000, b"GIF89a" + b"\xff" * 100, mutate_bytes(draw, PNG)]))
    body = multipart_body(parts, boundary, eol, preamble, epilogue, closing)
    for fn in post:
        body = fn(body)
    return body, ctype if ctype is not None else b"multipart/form-data; boundary=" + header_boundary


def _drop_nth(body: bytes, needle: bytes, n: int) -> bytes:
    positions = [m.start() for m in re.finditer(re.escape(needle), body)]
    if not positions:
        return body
    at = positions[n % len(positions)]
    return body[:at] + body[at + len(needle):]


# --- JSON bodies -----------------------------------------------------------------------------------

JSON_OPS = ["deep", "bigint", "float", "types", "keys", "encoding", "base64", "many", "trailing", "top-k"]


def draw_json(draw, tags: list[str], forced: str | None = None) -> bytes:
    """The body of a POST /classify_base64, mutated."""
    item = b'"' + PNG_B64 + b'"'
    images, top_k, extra, whole = [item], None, b"", None
    ops = pick_ops(draw, JSON_OPS, forced)
    for op in ops:
        tags.append("json:" + op)
        if op == "deep":
            depth = draw(st.sampled_from([100_000, 50, 900, 1000, 5000]))
            where = draw(st.sampled_from(["images", "item", "top_k", "top", "object"]))
            tags.append("json:deep:" + where)
            nested = deep(depth, "{" if where == "object" else "[")
            if where == "images":
                whole = b'{"images": ' + nested + b"}"
            elif where == "item":
                images = [item, nested]
            elif where == "top_k":
                top_k = nested
            else:
                whole = nested
        elif op == "bigint":
            digits = b"1" * draw(st.sampled_from([4301, 20, 4300, 100_000]))
            where = draw(st.sampled_from(["top_k", "item", "key"]))
            tags.append("json:bigint:" + where)
            if where == "top_k":
                top_k = digits
            elif where == "item":
                images = [digits]
            else:
                extra = b', "n": ' + digits
        elif op == "float":
            top_k = draw(st.sampled_from([b"1e309", b"-1e309", b"NaN", b"Infinity", b"-0.0", b"3.0", b"1e-400",
                                          b"0." + b"1" * 10_000]))
        elif op == "types":
            which = draw(st.sampled_from([b"{}", b'"x"', b"null", b"5", b"[1]", b"[[]]", b"[null]", b"[{}]", b"true"]))
            if draw(st.booleans()):
                whole = b'{"images": ' + which + b"}"
            else:
                whole = which
        elif op == "keys":
            which = draw(st.sampled_from(["dup", "extra", "nul", "many", "nonstr"]))
            if which == "dup":
                extra = b', "images": [' + item + b"]"
            elif which == "extra":
                extra = b', "model": "/etc/passwd"'
            elif which == "nul":
                extra = b', "im\\u0000ages": 1'
            elif which == "many":
                extra = b"".join(b', "k%d": 1' % i for i in range(10_000))
            else:
                whole = b'{"images": [' + item + b"], 1: 2}"
        elif op == "encoding":
            which = draw(st.sampled_from(["bom", "utf16", "utf32", "bad-utf8", "surrogate", "control", "latin1"]))
            tags.append("json:encoding:" + which)
            if which == "surrogate":
                images = [b'"\\ud800' + PNG_B64[:8] + b'"']
            elif which == "control":
                images = [b'"' + PNG_B64[:8] + b"\x01\n" + PNG_B64[8:] + b'"']
            elif which == "bad-utf8":
                images = [b'"\xff\xfe' + PNG_B64 + b'"']
            elif which == "latin1":
                images = [b'"caf\xe9"']
            else:
                extra = b"\x00" + which.encode()  # marker, replaced below
        elif op == "base64":
            images = [draw(st.sampled_from([
                b'"data:image/png;base64,' + PNG_B64 + b'"', b'"' + base64.urlsafe_b64encode(PNG) + b'"',
                b'"' + PNG_B64.rstrip(b"=") + b'"', b'"' + b"\\n".join(PNG_B64[i:i + 76] for i in range(0, len(PNG_B64), 76)) + b'"',
                b'""', b'"===="', b'"@@@@"', b'"\\u00e9"', b'"' + PNG_B64[:-3] + b'"', b'"data:"', b'"data:,"',
                b'"' + PNG_B64 + b'-_"', b'"' + b"A" * 1_000_000 + b'"', b'" "',
            ]))]
        elif op == "many":
            images = [item] * draw(st.sampled_from([0, 32, 33, 1000]))
        elif op == "trailing":
            post = draw(st.sampled_from(["garbage", "truncate", "empty", "second"]))
            tags.append("json:trailing:" + post)
            extra = b"\x00trailing-" + post.encode()
        elif op == "top-k":
            top_k = draw(st.sampled_from([b"0", b"-1", b"1000000", b'"3"', b"true", b"null", b"[]", b"{}", b"11"]))
    if whole is None:
        body = b'{"images": [' + b", ".join(images) + b"]"
        marker = extra if extra.startswith(b"\x00") else b""
        if not marker:
            body += extra
        if top_k is not None:
            body += b', "top_k": ' + top_k
        body += b"}"
        if marker == b"\x00bom":
            body = b"\xef\xbb\xbf" + body
        elif marker in (b"\x00utf16", b"\x00utf32"):
            body = body.decode("latin-1").encode("utf-16" if marker == b"\x00utf16" else "utf-32")
        elif marker == b"\x00trailing-garbage":
            body += b" }garbage"
        elif marker == b"\x00trailing-truncate":
            body = body[:draw(st.integers(0, len(body) - 1))]
        elif marker == b"\x00trailing-empty":
            body = b""
        elif marker == b"\x00trailing-second":
            body += body
    else:
        body = whole
    return body


# --- framing: Content-Length, Transfer-Encoding, Expect ----------------------------------------------

FRAMING_OPS = ["cl-wrong", "cl-zero", "cl-negative", "cl-huge", "cl-garbage", "cl-duplicate", "cl-missing",
               "chunked", "chunked+cl", "te-variant", "expect"]
CHUNK_OPS = ["bad-size", "ext", "no-terminator", "trailer", "size-mismatch", "lf-only", "zero-first"]


def chunked(draw, body: bytes, tags: list[str], forced: str | None = None) -> bytes:
    size = draw(st.sampled_from([1, 7, 100, 4096, 1 << 20]))
    size = max(size, len(body) // 500 + 1)
    chunks = [body[i:i + size] for i in range(0, len(body), size)]
    ops = pick_ops(draw, CHUNK_OPS, forced, gate=1)
    sizes = [b"%x" % len(c) for c in chunks]
    exts = [b""] * len(chunks)
    eol, terminator, trailers = b"\r\n", True, b""
    for op in ops:
        tags.append("te:" + op)
        if op == "bad-size" and chunks:
            sizes[pick_index(draw, chunks)] = draw(st.sampled_from([
                b"zz", b"-1", b"ffffffffffffffffffff", b"0x10", b" 10", b"10 ", b"1" + b"0" * 100, b"", b"+a",
                b"8000000000000000", b"7fffffffffffffff", b"\xff"]))
        elif op == "size-mismatch" and chunks:
            i = pick_index(draw, chunks)
            sizes[i] = b"%x" % max(0, len(chunks[i]) + draw(st.sampled_from([-2, -1, 1, 2, 1000])))
        elif op == "ext" and chunks:
            exts[pick_index(draw, chunks)] = draw(st.sampled_from([
                b";a=b", b";a", b"; a = b", b';a="unterminated', b";" + b"x" * 10_000, b";\x00", b";a=b" * 1000]))
        elif op == "no-terminator":
            terminator = False
        elif op == "trailer":
            trailers = draw(st.sampled_from([b"X-Trailer: y\r\n", b"Content-Length: 5\r\n", b"bad trailer\r\n",
                                             b"X-Big: " + b"t" * 100_000 + b"\r\n", b"Transfer-Encoding: chunked\r\n"]))
        elif op == "lf-only":
            eol = b"\n"
        elif op == "zero-first":
            sizes.insert(0, b"0")
            exts.insert(0, b"")
            chunks.insert(0, b"")
    out = b"".join(s + e + eol + c + eol for s, e, c in zip(sizes, exts, chunks))
    if terminator:
        out += b"0" + eol + trailers + eol
    return out


def draw_framing(draw, body: bytes, tags: list[str], forced: str | None = None,
                 chunk_op: str | None = None) -> tuple[list[bytes], bytes]:
    """(framing header lines, body as sent)."""
    length = str(len(body)).encode()
    ops = pick_ops(draw, FRAMING_OPS, forced)
    cl: list[bytes] = [length]
    te: list[bytes] = []
    extra: list[bytes] = []
    encode_chunked = False
    for op in ops:
        tags.append("framing:" + op)
        if op == "cl-wrong":
            delta = draw(st.sampled_from([-100, -10, -1, 1, 10, 100, 10_000]))
            cl = [str(max(0, len(body) + delta)).encode()]
        elif op == "cl-zero":
            cl = [b"0"]
        elif op == "cl-negative":
            cl = [draw(st.sampled_from([b"-1", b"-0", b"-" + length]))]
        elif op == "cl-huge":
            cl = [draw(st.sampled_from([str(MAX_REQUEST_BYTES + 1).encode(), b"4294967296", b"9223372036854775807",
                                        b"9223372036854775808", b"18446744073709551616", b"9" * 100, b"9" * 5000]))]
        elif op == "cl-garbage":
            cl = [draw(st.sampled_from([b"abc", b"+" + length, b" " + length + b" ", b"0x10", length + b"," + length,
                                        length + b", 0", b"1_0", b"", b"\xd9\xa3", length + b"\x00", b"1e3", b"0" + length]))]
        elif op == "cl-duplicate":
            cl = cl + [draw(st.sampled_from([cl[0] if cl else length, b"0", str(len(body) + 1).encode()]))]
        elif op == "cl-missing":
            cl = []
        elif op in ("chunked", "chunked+cl"):
            encode_chunked = True
            te = [b"chunked"]
            if op == "chunked":
                cl = []
        elif op == "te-variant":
            te = [draw(st.sampled_from([b"Chunked", b"CHUNKED", b"gzip, chunked", b"chunked, gzip", b"identity",
                                        b"xchunked", b" chunked", b"chunked\x00", b"chunked;q=1", b"deflate", b"",
                                        b"chunked, chunked", b"\tchunked"]))]
            encode_chunked = draw(st.booleans())
            if draw(st.booleans()):
                te = [b"gzip"] + te  # two Transfer-Encoding lines
            if draw(st.booleans()):
                cl = []
        elif op == "expect":
            extra.append(b"Expect: " + draw(st.sampled_from([b"100-continue", b"100-Continue", b"200-ok", b"\xff"])))
    if encode_chunked:
        body = chunked(draw, body, tags, chunk_op)
    lines = [b"Content-Length: " + v for v in cl] + [b"Transfer-Encoding: " + v for v in te] + extra
    return lines, body


# --- headers ---------------------------------------------------------------------------------------

HEADER_OPS = ["drop", "duplicate", "garble", "no-colon", "obs-fold", "huge", "many", "space-before-colon",
              "bad-name", "host", "upgrade", "content-type", "content-encoding", "connection", "random"]
CONTENT_TYPES = [b"application/json; charset=\xff", b"", b"application/json", b"text/plain", b"multipart/form-data", b"application/x-www-form-urlencoded",
                 b"application/json; charset=utf-16", b"application/vnd.x+json",
                 b"image/png", b"*/*", b";", b"\xff\xfe", b"multipart/form-data; boundary=" + BOUNDARY,
                 b"application/json" + b"; a=b" * 2000]


def draw_headers(draw, lines: list[bytes], tags: list[str], forced: str | None = None) -> list[bytes]:
    lines = list(lines)
    ops = pick_ops(draw, HEADER_OPS, forced)
    for op in ops:
        tags.append("hdr:" + op)
        if op == "drop" and lines:
            del lines[pick_index(draw, lines)]
        elif op == "duplicate" and lines:
            i = pick_index(draw, lines)
            lines.insert(draw(st.integers(0, len(lines))), lines[i])
        elif op == "garble" and lines:
            i = pick_index(draw, lines)
            lines[i] = mutate_bytes(draw, lines[i], max_ops=3)
        elif op == "no-colon":
            lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from([b"NoColonHere", b"Content-Length 5",
                                                                                b"X", b" ", b"\x00"])))
        elif op == "obs-fold" and lines:
            i = pick_index(draw, lines)
            lines.insert(i + 1, draw(st.sampled_from([b" folded", b"\tfolded", b" ", b" : x"])))
        elif op == "huge":
            size = draw(st.sampled_from([8 * 1024, 65 * 1024, 1 << 20]))
            lines.append(draw(st.sampled_from([b"X-Huge: ", b"Cookie: a=", b"Content-Type: multipart/form-data; boundary="]))
                         + b"v" * size)
        elif op == "many":
            lines.extend(b"X-Many-%d: %d" % (i, i) for i in range(draw(st.sampled_from([100, 1000, 10_000]))))
        elif op == "space-before-colon":
            names = [i for i, line in enumerate(lines) if b":" in line]
            if names:
                i = names[draw(st.integers(0, len(names) - 1))]
                name, _, value = lines[i].partition(b":")
                lines[i] = name + draw(st.sampled_from([b" ", b"\t", b"  "])) + b":" + value
        elif op == "bad-name":
            lines.append(draw(st.sampled_from([b"X\x00Y: 1", b"X Y: 1", b"\xff\xfe: 1", b": empty-name", b"X(Y): 1",
                                               b"\x7f: 1", b"X-\xc3\xa9: 1"])))
        elif op == "host":
            which = draw(st.sampled_from([b"", b"Host: ", b"Host: a\r\nHost: b", b"Host: \xff", b"Host: [::1",
                                          b"Host: " + b"h" * 10_000, b"Host: a:b:c"]))
            lines = [line for line in lines if line != HOST] + ([which] if which else [])
        elif op == "upgrade":
            lines.extend(draw(st.sampled_from([
                [b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c", b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"],
                [b"Connection: Upgrade", b"Upgrade: websocket", b"Sec-WebSocket-Version: 13",
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="],
                [b"Upgrade: \xff"], [b"Connection: upgrade"]])))
        elif op == "content-type":
            lines = [line for line in lines if not line.lower().startswith(b"content-type:")]
            lines.append(b"Content-Type: " + draw(st.sampled_from(CONTENT_TYPES)))
        elif op == "content-encoding":
            lines.append(b"Content-Encoding: " + draw(st.sampled_from([b"gzip", b"br", b"deflate", b"identity", b"x"])))
        elif op == "connection":
            lines.append(b"Connection: " + draw(st.sampled_from([b"close", b"keep-alive", b"\xff", b"close, keep-alive", b"TE"])))
        elif op == "random":
            name = draw(st.binary(min_size=0, max_size=16))
            lines.append(name + b": " + draw(st.binary(max_size=64)))
    return lines


# --- the request line ------------------------------------------------------------------------------

LINE_OPS = ["method", "target-bytes", "target-percent", "target-long", "target-form", "version", "separators",
            "eol", "leading-crlf", "garbage"]
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT", b"PRI",
           b"get", b"P0ST", b"", b"POST\x00", b"GE T", b"\xff\xfe", b"A" * 10_000, b"M-SEARCH", b"PROPFIND"]
PATHS = [b"/classify", b"/classify_base64", b"/metadata", b"/ui", b"/ui/", b"/livez", b"/readyz", b"/metrics",
         b"/healthz", b"/docs.json", b"/docs", b"/", b"/admin/reload", b"/static/ui.html", b"/static/../service.py"]
TARGET_BYTES = [b"\x00", b"\x7f", b"\xff", b"\t", b"#frag", b"?", b"??", b"\\", b"%", b";a=b", b"\xc3\x28", b"\x1b"]
TARGET_PERCENT = [b"%00", b"%ZZ", b"%", b"%2", b"%2e%2e/", b"%2F", b"%ff", b"%c3%28", b"%u2215", b"%25", b"/..%2f..%2f",
                  b"?a=%zz&&==&%00=%00", b"?top_k=999", b"?" + b"a=1&" * 5000, b"/%2e%2e%2f%2e%2e%2fetc%2fpasswd"]
TARGET_FORMS = [b"*", b"", b"http://fuzz.test/classify", b"https://x/metadata", b"//classify", b"/classify/",
                b"/./classify", b"/x/../classify", b"classify", b"fuzz.test:80", b"/CLASSIFY", b"/classify?x"]
VERSIONS = [b"HTTP/1.0", b"HTTP/0.9", b"", b"HTTP/2.0", b"HTTP/2", b"HTTP/1.2", b"HTTP/9.9", b"http/1.1", b"HTTP/1",
            b"HTTP/1.1 extra", b"HTTP/1.10", b"HTTP/01.1", b"HTTP/1.1\x00", b"HTTPS/1.1", b"HTTP/\xff"]


def draw_request_line(draw, method: bytes, target: bytes, tags: list[str],
                      forced: str | None = None) -> tuple[bytes, bytes, bool]:
    """(request line, head line ending, whether the method is HEAD)."""
    version, sep1, sep2, eol, lead = b"HTTP/1.1", b" ", b" ", b"\r\n", b""
    ops = pick_ops(draw, LINE_OPS, forced, gate=5, max_size=1)
    garbage = None
    for op in ops:
        tags.append("line:" + op)
        if op == "method":
            method = draw(st.sampled_from(METHODS))
        elif op == "target-bytes":
            at = draw(st.integers(0, len(target)))
            target = target[:at] + draw(st.sampled_from(TARGET_BYTES)) + target[at:]
        elif op == "target-percent":
            target = draw(st.sampled_from([target, draw(st.sampled_from(PATHS))])) + draw(st.sampled_from(TARGET_PERCENT))
        elif op == "target-long":
            target = target + b"/" + b"a" * draw(st.sampled_from([2000, 8192, 65_536, 1 << 20]))
        elif op == "target-form":
            target = draw(st.sampled_from(TARGET_FORMS + PATHS))
        elif op == "version":
            version = draw(st.sampled_from(VERSIONS))
        elif op == "separators":
            sep1, sep2 = draw(st.sampled_from([(b"  ", b" "), (b"\t", b" "), (b"", b" "), (b" ", b""), (b" ", b"  "),
                                               (b" ", b" \r\n")]))
        elif op == "eol":
            eol = draw(st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\n\r"]))
        elif op == "leading-crlf":
            lead = draw(st.sampled_from([b"\r\n", b"\r\n" * 100, b"\n", b" "]))
        else:
            garbage = draw(st.binary(min_size=0, max_size=64))
    line = garbage if garbage is not None else method + sep1 + target + sep2 + version
    return lead + line, eol, method == b"HEAD"


# --- a whole request -------------------------------------------------------------------------------


@dataclass
class Case:
    raw: bytes
    tags: list[str]
    seed: str
    head: bool = False

    def short(self, limit: int = 400) -> str:
        text = repr(self.raw) if len(self.raw) <= limit else (
            f"{self.raw[:limit * 3 // 4]!r} ... {self.raw[-limit // 4:]!r} ({len(self.raw)} bytes)")
        return text


RAW_OPS = ["bytes", "truncate", "pipelined"]
BODY_OPS = ["bytes", "unexpected"]
#: every mutation class, (area, op): case i of a run is forced to use class i % len(CLASSES), so each
#: gets its share of the examples, and other mutations are added at random on top
CLASSES = ([("mp", op) for op in MP_OPS] + [("json", op) for op in JSON_OPS]
           + [("framing", op) for op in FRAMING_OPS] + [("te", op) for op in CHUNK_OPS]
           + [("hdr", op) for op in HEADER_OPS] + [("line", op) for op in LINE_OPS]
           + [("raw", op) for op in RAW_OPS] + [("body", op) for op in BODY_OPS])


@st.composite
def fuzz_cases(draw, cls: tuple[str, str] | None = None) -> Case:
    area, op = cls or (None, None)
    forced = lambda name: op if area == name else None
    if area == "mp":
        seed = "classify"
    elif area == "json":
        seed = "classify_base64"
    elif area in ("te", "body") and op != "unexpected":
        seed = draw(st.sampled_from(["classify", "classify_base64"]))
    elif area == "body":
        seed = draw(st.sampled_from([name for name, spec in SEEDS.items() if spec[3] == "none"]))
    else:  # each class's first (simplest) example on another seed
        turn = CLASSES.index(cls) % len(SEED_NAMES) if cls in CLASSES else 0
        seed = draw(st.sampled_from(SEED_NAMES[turn:] + SEED_NAMES[:turn]))
    method, target, headers, kind = SEEDS[seed]
    tags: list[str] = []
    headers = [HOST, *headers]
    body = b""
    if kind == "multipart":
        body, ctype = draw_multipart(draw, tags, forced("mp"))
        headers.append(b"Content-Type: " + ctype)
    elif kind == "json":
        body = draw_json(draw, tags, forced("json"))
        headers.append(b"Content-Type: application/json")
    elif kind == "empty_json":
        body = b"{}"
    elif op == "unexpected" or draw(st.integers(0, 9)) == 9:  # a body where none is expected
        tags.append("body:unexpected")
        body = draw(st.sampled_from([b"x", b"{}", PNG, b"\x00" * 100_000]))
    if body and (forced("body") == "bytes" or draw(st.integers(0, 9)) == 9):
        tags.append("body:bytes")
        body = mutate_bytes(draw, body)
    framing_op = "chunked" if area == "te" else forced("framing")
    framing, body = draw_framing(draw, body, tags, framing_op, forced("te"))
    if method == b"GET" and not body and not any(t.startswith("framing:") for t in tags):
        framing = []  # a plain GET carries no Content-Length
    lines = draw_headers(draw, headers + framing, tags, forced("hdr"))
    line, eol, head = draw_request_line(draw, method, target, tags, forced("line"))
    raw = line + eol + b"".join(h + eol for h in lines) + eol + body
    for raw_op in pick_ops(draw, RAW_OPS, forced("raw"), gate=9, max_size=1):
        tags.append("raw:" + raw_op)
        if raw_op == "bytes":
            raw = mutate_bytes(draw, raw)
        elif raw_op == "truncate":
            raw = raw[:draw(st.integers(0, max(0, len(raw) - 1)))]
        else:
            raw = raw + draw(st.sampled_from([raw, valid_classify_request(), b"GET /metadata HTTP/1.1\r\nHost: x\r\n\r\n",
                                              b"\r\n", b"GARBAGE\r\n\r\n"]))
    return Case(raw, tags or ["none"], seed, head)


# --- the server's log and workers ----------------------------------------------------------------------


class LogTail:
    """The server log's text appended since the last call."""

    def __init__(self, server) -> None:
        self.server = server
        self.seen = len(server.log())

    def read(self) -> str:
        text = self.server.log()
        new, self.seen = text[self.seen:], len(text)
        return new


def worker_pids(server) -> set[int]:
    psutil = pytest.importorskip("psutil")
    try:
        return {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def address_of(server) -> tuple[str, int]:
    parts = urlsplit(server.url)
    return parts.hostname, parts.port


# --- the oracle can fail (a fake server, no service needed) --------------------------------------------



class FakeServer:
    """A one-thread TCP server that answers every connection with ``behaviour(conn)``."""

    def __init__(self, behaviour: Callable[[socket.socket], None]) -> None:
        import threading

        self.behaviour = behaviour
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self.behaviour(conn)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def _read_head(conn: socket.socket) -> bytes:
    data = b""
    conn.settimeout(5)
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _answer(status: bytes, body: bytes = b"{}", extra: bytes = b"") -> Callable[[socket.socket], None]:
    def behaviour(conn: socket.socket) -> None:
        _read_head(conn)
        conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\nConnection: close\r\n" % len(body)
                     + extra + b"\r\n" + body)
    return behaviour


def _hang(conn: socket.socket) -> None:
    _read_head(conn)
    time.sleep(3)


def _wait_for_nudge(conn: socket.socket) -> None:
    """Answers only once it has read more than the size limit (what a server waiting for body does)."""
    conn.settimeout(5)
    got = 0
    while got <= MAX_REQUEST_BYTES:
        chunk = conn.recv(1 << 16)
        if not chunk:
            return
        got += len(chunk)
    conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def _keep_alive_then_probe(conn: socket.socket) -> None:
    _read_head(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    data = _read_head(conn)  # the probe: answered with the 500 a leftover request might get
    if b"/livez" in data:
        conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


FAKE_CASES = {
    "500": (_answer(b"500 Internal Server Error"), ["status 500"], []),
    "502": (_answer(b"502 Bad Gateway"), ["status 502"], []),
    "503 not overloaded": (_answer(b"503 Service Unavailable", b'{"reason": "draining"}'), ["status 503"], []),
    "503 overloaded": (_answer(b"503 Service Unavailable", b'{"reason": "overloaded"}'), [], ["503 overloaded"]),
    "504": (_answer(b"504 Gateway Timeout"), [], ["504 None"]),
    "400": (_answer(b"400 Bad Request"), [], []),
    "100 then 500": (lambda c: (_read_head(c), c.sendall(b"HTTP/1.1 100 Continue\r\n\r\n"),
                                _answer(b"500 Oops")(c)), ["status 500"], []),
    "chunked 200": (lambda c: (_read_head(c), c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                                      b"3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n")), [], []),
    "HEAD 200": (lambda c: (_read_head(c), c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"),
                            _read_head(c), c.sendall(b"HTTP/1.1 503 Nope\r\nContent-Length: 0\r\n\r\n")),
                 ["status 503"], []),
    "close": (lambda c: _read_head(c), [], []),
    "hang": (_hang, ["hang"], []),
    "not HTTP": (lambda c: (_read_head(c), c.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")), ["reply is not HTTP"], []),
    "waits for the nudge": (_wait_for_nudge, [], []),
    "5xx on the probe": (_keep_alive_then_probe, ["status 500"], []),
    "truncated body": (lambda c: (_read_head(c), c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")),
                       ["truncated response"], []),
}


def for_each_case(fn: Callable[[Case], None], per_class: int | None = None) -> None:
    """``fn(case)`` for ``per_class`` generated cases of each mutation class (FUZZ_MAX_EXAMPLES in all):
    one hypothesis run per class, so that every class gets its share."""
    per_class = per_class or max(2, -(-FUZZ_MAX_EXAMPLES // len(CLASSES)))
    for cls in CLASSES:
        @settings(FUZZ_SETTINGS, max_examples=per_class)
        @given(case=fuzz_cases(cls))
        def run(case: Case) -> None:
            fn(case)

        run()


@pytest.mark.parametrize("case", sorted(FAKE_CASES))
def test_oracle_flags_server_errors_and_hangs(case):
    """The checks themselves: a 5xx (also after a 100 Continue, or on the follow-up probe), a hang and a
    non-HTTP reply fail; a 4xx, a close, 503 overloaded and 504 (noted) do not."""
    behaviour, expected_failures, expected_notes = FAKE_CASES[case]
    fake = FakeServer(behaviour)
    try:
        request = b"HEAD /x HTTP/1.1\r\nHost: fuzz.test\r\n\r\n" if case.startswith("HEAD") else b"POST /x HTTP/1.1\r\nHost: fuzz.test\r\nContent-Length: 5\r\n\r\nab"
        result = exchange(fake.address, request, head=case.startswith("HEAD"), quiet_s=0.3, timeout_s=1.5)
    finally:
        fake.close()
    failures, notes = problems(result)
    assert [f.split(":")[0] for f in failures] == expected_failures, (failures, result)
    assert notes == expected_notes, (notes, result)


def test_cases_are_deterministic_and_varied():
    """derandomize=True: the same cases every run; and the generator reaches every mutation area."""
    seen: list[Case] = []
    for_each_case(seen.append)
    first = [c.raw for c in seen]
    seen.clear()
    for_each_case(seen.append)
    assert [c.raw for c in seen] == first
    areas = Counter(tag.split(":")[0] for case in seen for tag in case.tags)
    assert {"mp", "json", "framing", "hdr", "line", "raw", "body", "te"} <= set(areas), areas
    assert {case.seed for case in seen} == set(SEEDS)
    tags = {tag for case in seen for tag in case.tags}
    assert {f"{area}:{op}" for area, op in CLASSES} <= tags, {f"{area}:{op}" for area, op in CLASSES} - tags


# --- the fuzz run against the real server -------------------------------------------------------------


def seed_requests() -> dict[str, bytes]:
    """Each seed, unmutated (these must all succeed)."""
    out = {}
    for name, (method, target, headers, kind) in SEEDS.items():
        if kind == "multipart":
            body = multipart_body([image_part()])
            headers = [*headers, b"Content-Type: multipart/form-data; boundary=" + BOUNDARY]
        elif kind == "json":
            body = b'{"images": ["' + PNG_B64 + b'"], "top_k": 5}'
            headers = [*headers, b"Content-Type: application/json"]
        elif kind == "empty_json":
            body = b"{}"
        else:
            body = b""
        out[name] = http_request(method, target, headers, body)
    return out


@dataclass
class Finding:
    kind: str
    detail: str
    case: Case
    statuses: list[int]
    log: str = ""


def log_summary(text: str) -> str:
    """The exception lines of the tracebacks in ``text`` (else its last line)."""
    errors = re.findall(r"^(?:[\w.]+(?:Error|Exception|Exit|Interrupt)\b.*)$", text, re.MULTILINE)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "; ".join(dict.fromkeys(e[:200] for e in errors)) if errors else (lines[-1][:300] if lines else "")


def report(findings: list[Finding], total: int, tag_totals: Counter, path) -> str:
    by_kind: dict[str, list[Finding]] = defaultdict(list)
    for finding in findings:
        by_kind[finding.kind].append(finding)
    lines = [f"{len({id(f.case) for f in findings})} of {total} fuzz cases failed (details: {path})"]
    failing_tags = Counter(tag for f in {id(f.case): f for f in findings}.values() for tag in f.case.tags)
    lines.append("mutation classes of the failing cases (failing/all): " + ", ".join(
        f"{tag} {n}/{tag_totals[tag]}" for tag, n in failing_tags.most_common()))
    for kind, group in sorted(by_kind.items()):
        group.sort(key=lambda f: len(f.case.raw))
        lines.append(f"\n== {kind}: {len(group)} case(s); shortest first")
        shown: set[tuple] = set()
        for finding in group:
            key = (finding.detail, tuple(sorted(finding.case.tags)))
            if key in shown or len(shown) >= 12:
                continue
            shown.add(key)
            lines.append(f"- {finding.detail}; statuses {finding.statuses}; tags {finding.case.tags}\n"
                         f"  {finding.case.short()}")
            if finding.log:
                lines.append(f"  log: {log_summary(finding.log)}")
    return "\n".join(lines)


@pytest.mark.integration
@pytest.mark.slow
def test_mutated_raw_requests_get_no_server_error(server, tmp_path):
    import httpx

    address = address_of(server)
    for name, raw in seed_requests().items():  # the seeds are valid and the reader understands the answers
        result = exchange(address, raw)
        assert result.statuses[:1] == [200] and result.end == "closed", (name, result)
    pids = worker_pids(server)
    log = LogTail(server)
    findings: list[Finding] = []
    notes: list[tuple[str, Case]] = []
    tag_totals: Counter = Counter()
    count = 0
    started = time.monotonic()

    def run_case(case: Case) -> None:
        nonlocal count
        count += 1
        tag_totals.update(case.tags)
        result = exchange(address, case.raw, head=case.head)
        failures, case_notes = problems(result)
        new_log = log.read()
        for failure in failures:
            findings.append(Finding(failure.split(":")[0].split(" (")[0] if failure.startswith("hang") else
                                    failure.split(":")[0], failure, case, result.statuses, new_log))
        if TRACEBACK in new_log:
            findings.append(Finding("traceback in the server log", f"{new_log.count(TRACEBACK)} traceback(s)", case,
                                    result.statuses, new_log))
        notes.extend((note, case) for note in case_notes)

    for_each_case(run_case)
    elapsed = time.monotonic() - started
    time.sleep(1.0)  # anything the last case made the server log
    late = log.read()
    if TRACEBACK in late and count:
        findings.append(Finding("traceback in the server log", "logged after the run", Case(b"", ["unknown"], "?"), [], late))

    # the server is still healthy
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/readyz").status_code == 200
        resp = client.post("/classify", files=[("images", ("digit.png", PNG, "image/png"))])
        assert resp.status_code == 200 and len(resp.json()) == 1, resp.text
    assert server.proc.poll() is None, "the server exited during the fuzz run"
    assert worker_pids(server) == pids, "a worker died (and was restarted) during the fuzz run"

    path = tmp_path / "fuzz-failures.json"
    path.write_text(json.dumps([{"kind": f.kind, "detail": f.detail, "statuses": f.statuses, "tags": f.case.tags,
                                 "raw": f.case.raw.decode("latin-1"), "log": f.log[-4000:]} for f in findings],
                               indent=1))
    print(f"fuzz: {count} cases in {elapsed:.1f} s; notes (503 overloaded / 504): {len(notes)}")
    for note, case in notes[:10]:
        print(f"  note: {note}: {case.tags} {case.short(200)}")
    assert count >= min(FUZZ_MAX_EXAMPLES, 100)
    if findings:
        pytest.fail(report(findings, count, tag_totals, path), pytrace=False)
