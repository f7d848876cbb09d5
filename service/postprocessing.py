"""Logits -> response objects (numpy only): softmax probabilities and top-k, vectorized over a batch."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .contract import softmax

__all__ = ["predictions"]


def predictions(logits: np.ndarray, classes: Sequence[str], k: int) -> list[dict]:
    """One ``{"label", "index", "score", "top_k": [{"label", "index", "score"}, ...]}`` per row.

    ``score`` is the softmax probability; ``top_k`` is sorted by descending probability (ties: lower
    index first) and holds ``min(k, K)`` entries; the top-level fields repeat ``top_k[0]``.
    """
    probs = softmax(logits)
    if not np.isfinite(probs).all():  # a broken model; json.dumps refused NaN, orjson would write null
        raise ValueError("the model returned non-finite scores (NaN or inf logits)")
    n, num_classes = probs.shape
    if len(classes) != num_classes:
        raise ValueError(f"model returned {num_classes} logits but has {len(classes)} class names")
    k = max(1, min(int(k), num_classes))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(probs, order, axis=1)
    out = []
    for i in range(n):
        top = [
            {"label": classes[j], "index": int(j), "score": float(s)}
            for j, s in zip(order[i].tolist(), top_scores[i].tolist())
        ]
        out.append({**top[0], "top_k": top})
    return out
