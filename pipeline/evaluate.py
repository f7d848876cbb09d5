"""Evaluate stage: a trained model on the held-back test split.

    python -m pipeline.evaluate --arch cnn

Outputs (`outputs/<arch>/eval/`): metrics.json (accuracy, top-k, per-class precision/recall/F1,
expected calibration error, latency), confusion.csv (a DVC confusion plot), confusion.png,
misclassified.png, feature_maps.png. All are logged to the model's MLflow training run.
"""
from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from service.contract import softmax

from . import atomic, stage, tracking
from .download import load_card, load_prepared
from .modelfile import normalize, predict_logits, trained_model_args
from .paths import PREPARED_DIR, arch_dir


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """[actual, predicted] counts."""
    return np.bincount(labels * num_classes + preds, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def per_class_scores(cm: np.ndarray, classes: list[str]) -> dict:
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(axis=0), out=np.zeros_like(tp), where=cm.sum(axis=0) > 0)
    recall = np.divide(tp, cm.sum(axis=1), out=np.zeros_like(tp), where=cm.sum(axis=1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    return {name: {"precision": round(float(p), 5), "recall": round(float(r), 5), "f1": round(float(f), 5),
                   "support": int(n)} for name, p, r, f, n in zip(classes, precision, recall, f1, cm.sum(axis=1))}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Guo et al. 2017: sum over confidence bins of |accuracy - confidence|, weighted by bin size."""
    confidence, preds = probs.max(axis=1), probs.argmax(axis=1)
    correct = preds == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


@torch.no_grad()
def measure_latency_ms(model, sample_u8: np.ndarray, mean, std, batch_size: int, repeats: int = 50) -> float:
    """Mean milliseconds per forward pass of `batch_size` images (PyTorch eager, CPU)."""
    x = normalize(torch.as_tensor(sample_u8[:batch_size]), mean, std)
    for _ in range(5):
        model(x)
    start = time.perf_counter()
    for _ in range(repeats):
        model(x)
    return (time.perf_counter() - start) / repeats * 1000


def evaluate_model(model, meta: dict, images: np.ndarray, labels: np.ndarray, top_k: int = 5) -> dict:
    """Every test metric of one model; pure (no files)."""
    logits = predict_logits(model, images, meta["mean"], meta["std"]).numpy()
    probs, preds = softmax(logits), logits.argmax(axis=1)
    cm = confusion_matrix(labels, preds, meta["num_classes"])
    scores = per_class_scores(cm, meta["classes"])
    return {
        "test_acc": round(float((preds == labels).mean()), 5),
        f"test_top{top_k}_acc": round(topk_accuracy(logits, labels, top_k), 5),
        "macro_f1": round(float(np.mean([s["f1"] for s in scores.values()])), 5),
        "ece": round(expected_calibration_error(probs, labels), 5),
        "latency_ms_batch1": round(measure_latency_ms(model, images, meta["mean"], meta["std"], 1), 4),
        "latency_ms_batch256": round(measure_latency_ms(model, images, meta["mean"], meta["std"], 256, 10), 3),
        "test_count": int(len(labels)),
        "per_class": scores,
        "_confusion": cm, "_preds": preds, "_probs": probs,
    }


# --- pictures ---------------------------------------------------------------------------------------

def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show(image_u8: np.ndarray):
    """[C, H, W] uint8 -> what imshow takes."""
    return image_u8[0] if image_u8.shape[0] == 1 else image_u8.transpose(1, 2, 0)


def confusion_png(cm: np.ndarray, classes: list[str], title: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.imshow(np.log1p(cm), cmap="Blues")
    for (i, j), count in np.ndenumerate(cm):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color="black" if i != j else "white")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="actual", title=title)
    ax.set_xticklabels(classes, rotation=90)
    ax.set_yticklabels(classes)
    return _figure_bytes(fig)


def misclassified_png(images, labels, preds, probs, classes, title: str, limit: int = 36) -> bytes:
    plt = _plt()
    wrong = np.flatnonzero(preds != labels)
    wrong = wrong[np.argsort(-probs[wrong, preds[wrong]])][:limit]  # the most confident mistakes first
    cols = 6
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.8))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, i in zip(np.ravel(axes), wrong):
        ax.imshow(_show(images[i]), cmap="gray")
        ax.set_title(f"{classes[labels[i]]}->{classes[preds[i]]}\n{probs[i, preds[i]]:.2f}", fontsize=7)
    fig.suptitle(f"{title}: most confident mistakes (actual->predicted, score)", fontsize=9)
    return _figure_bytes(fig)


@torch.no_grad()
def feature_maps_png(model, image_u8: np.ndarray, mean, std, title: str, limit: int = 16) -> bytes:
    """The first conv layer's output maps for one test image (what the tutorials looked at)."""
    plt = _plt()
    first_conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    captured = {}
    if first_conv is not None:
        hook = first_conv.register_forward_hook(lambda _m, _i, out: captured.setdefault("maps", out))
        model(normalize(torch.as_tensor(image_u8[None]), mean, std))
        hook.remove()
    maps = captured["maps"][0].numpy() if captured else np.zeros((0, 1, 1))
    n = min(limit, len(maps))
    fig, axes = plt.subplots(1, n + 1, figsize=((n + 1) * 1.2, 1.6))
    axes = np.ravel(axes)
    axes[0].imshow(_show(image_u8), cmap="gray")
    axes[0].set_title("input", fontsize=7)
    for k in range(n):
        axes[k + 1].imshow(maps[k], cmap="viridis")
        axes[k + 1].set_title(f"map {k}", fontsize=7)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{title}: first conv layer feature maps", fontsize=9)
    return _figure_bytes(fig)


def write_outputs(out: Path, result: dict, meta: dict, images: np.ndarray, labels: np.ndarray, model) -> list[Path]:
    classes = meta["classes"]
    preds, probs = result["_preds"], result["_probs"]
    metrics = {k: v for k, v in result.items() if not k.startswith("_") and k != "per_class"}
    with atomic.atomic_dir(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")  # DVC metrics: scalars only
        (tmp / "per_class.json").write_text(json.dumps(result["per_class"], indent=2) + "\n")
        rows = "\n".join(f"{classes[a]},{classes[p]}" for a, p in zip(labels, preds))
        (tmp / "confusion.csv").write_text(f"actual,predicted\n{rows}\n")
        (tmp / "confusion.png").write_bytes(confusion_png(result["_confusion"], classes, meta["arch"]))
        (tmp / "misclassified.png").write_bytes(misclassified_png(images, labels, preds, probs, classes, meta["arch"]))
        (tmp / "feature_maps.png").write_bytes(
            feature_maps_png(model, images[0], meta["mean"], meta["std"], meta["arch"]))
    return [out / name for name in ("metrics.json", "per_class.json", "confusion.csv", "confusion.png", "misclassified.png",
                                    "feature_maps.png")]


def main(argv: list[str] | None = None) -> int:
    args, params, model, meta = trained_model_args("Evaluate a trained model on the test split.", argv)
    tracking.check_reachable()  # a server that is down: fail now, not after MLflow's minutes of retries
    torch.set_num_threads(max(1, torch.get_num_threads()))
    test = load_prepared("test", PREPARED_DIR)
    result = evaluate_model(model, meta, test.images, test.labels, params.evaluate.top_k)
    files = write_outputs(arch_dir(args.arch) / "eval", result, meta, test.images, test.labels, model)
    card = load_card(PREPARED_DIR)
    print(f"evaluate: {args.arch}: test_acc {result['test_acc']:.4f}  top{params.evaluate.top_k} "
          f"{result[f'test_top{params.evaluate.top_k}_acc']:.4f}  macro_f1 {result['macro_f1']:.4f}  "
          f"ece {result['ece']:.4f}  latency {result['latency_ms_batch1']:.3f} ms (batch 1), "
          f"{result['latency_ms_batch256']:.2f} ms (batch 256) on {result['test_count']} test images")
    run = tracking.open_run(meta["mlflow_run_id"], experiment=params.train.experiment, run_name=args.arch,
                            stage="evaluate", model_file=arch_dir(args.arch) / "model.pt")
    run.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float)) and not k.startswith("_")})
    run.set_tags({"test_set_sha256": card["splits"]["test"]["sha256"]})
    run.log_artifacts(files, "eval")
    return 0


if __name__ == "__main__":
    sys.exit(stage.run("evaluate", main))
