"""Bounded parsing of request values: JSON bodies and form fields, before anything trusts them.

Policy (each bound is cheap to check and refuses with :class:`BadValue`, which the API answers with
a 400 in its JSON error shape):

* **Structure before parsing.** A ``/classify_base64`` body is ``{"images": [<= max_images strings],
  "top_k": int}``; base64 and ``data:`` URLs contain no brackets or braces and one comma at most, so
  a body with more than :data:`MAX_CONTAINERS` ``[``/``{`` bytes or more commas than its images
  need cannot be a request. ``bytes.count`` (memchr speed, ~10 GB/s) finds that before the parser
  runs: a 32 MB ``[0,0,0,...]`` would otherwise build 16 million Python ints (~1 s of CPU and
  ~600 MB per request), and 100,000 nested brackets would exhaust the parser's recursion.
* **Numbers.** Integers longer than :data:`MAX_INT_DIGITS` digits are refused while parsing (Python
  otherwise spends quadratic time on them and raises past 4,300 digits); ``NaN``/``Infinity`` are
  not JSON.
* **Echoes.** Error messages quote at most :data:`QUOTE_CHARS` characters of a bad value
  (:func:`quote`), so a 6 MB value never comes back in a 6 MB error.
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional

#: containers (``[`` or ``{``) a request body may hold: the object, its images list and a few
#: unexpected values that deserve a precise "unexpected key" answer rather than a structural one
MAX_CONTAINERS = 8
#: digits in one JSON integer (top_k needs 1-3; 18 still fits an int64)
MAX_INT_DIGITS = 18
#: characters of a client's value quoted back in an error message
QUOTE_CHARS = 40
#: top_k form values: an optionally signed decimal integer of a few digits, nothing else
_FORM_INT = re.compile(r"\s*\+?(\d{1,9})\s*")


class BadValue(ValueError):
    """A request value outside its bounds; ``reason`` is the API's machine-readable error code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters (``...`` and the full length when cut). Containers
    are summarized without building their whole repr."""
    if isinstance(value, (list, dict)) and len(value) > limit:
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise BadValue("bad_json", f"a JSON number has {len(digits)} digits; at most {MAX_INT_DIGITS} are accepted")
    return int(digits)


def _no_constant(name: str) -> Any:
    raise BadValue("bad_json", f"{name} is not valid JSON")


def check_structure(raw: bytes, max_items: int) -> None:
    """Refuse a JSON body whose bracket or comma count no request of ``max_items`` images can have."""
    containers = raw.count(b"[") + raw.count(b"{")
    if containers > MAX_CONTAINERS:
        raise BadValue("bad_json", f"body holds {containers} JSON arrays/objects; a request is one object with one "
                       f"list of base64 strings (at most {MAX_CONTAINERS} containers)")
    commas, allowed = raw.count(b","), 2 * max_items + 8  # between items, in data: URLs, between keys
    if commas > allowed:
        raise BadValue("bad_json", f"body holds {commas} commas; a request of at most {max_items} images has "
                       f"at most {allowed}")


def load_json(raw: bytes, max_items: int) -> Any:
    """``raw`` parsed as JSON within the bounds above; :class:`BadValue` otherwise."""
    check_structure(raw, max_items)
    try:
        return json.loads(raw, parse_int=_bounded_int, parse_constant=_no_constant)
    except BadValue:
        raise
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise BadValue("bad_json", f"body is not valid JSON: {quote(str(err), 120)}") from None


def top_k_value(raw: Any) -> Optional[int]:
    """``top_k`` from a JSON value or a form field's text -> a positive int, or None for "default"
    (absent, empty, ``null``). Text (a form field, or a JSON string such as ``"5"``) is only ever
    matched as a decimal integer, never parsed as JSON: no nesting."""
    if raw is None or raw == "" or raw == "null":
        return None
    if isinstance(raw, str):
        match = _FORM_INT.fullmatch(raw)
        if match is None:
            raise BadValue("bad_top_k", f"top_k must be a positive integer, got {quote(raw)}")
        raw = int(match.group(1))
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise BadValue("bad_top_k", f"top_k must be a positive integer, got {quote(raw)}")
    return raw
