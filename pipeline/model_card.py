"""The model card of a registry version (its MLflow description): data, metrics, parity, use, limits.

``model_card(report, card)`` is pure: the export report (``exports/<arch>/export.json``: parity
figures, the evaluation metrics, the ONNX metadata) and the dataset card (``data/prepared/card.json``)
in, Markdown out, at most ``max_chars`` characters (MLflow stores a version's description in a
VARCHAR(5000)). ``pipeline.promote.register_export`` puts it on every version it registers.
"""
from __future__ import annotations

import json
from typing import Any

MAX_CHARS = 5000

#: what each input_transform expects of a picture (docs/model-contract.md)
_USE = {
    "digit": ("handwritten or typed digits, one per image: dark ink on light paper or light on dark, scans, "
              "canvas drawings, photos of a page; an image with nothing on it (blank paper, a flat colour, "
              "noise) is refused with reason `no_ink`, not guessed"),
    "crop": ("photos of the classes below, any aspect ratio: the short side is scaled to the model's size and "
             "the centre square kept, so the subject should be in the middle"),
    "resize": "images like the training set's, squashed to the model's square size (the aspect ratio is not kept)",
}
_LIMITS = {
    "digit": [
        "a page photographed on a desk is read inside the page only while the page fills at least ~60 % of "
        "the picture (below ~50 % the desk passes for the paper): crop to the page first",
        "a 1 drawn with a long flag at the top is often read as 7 (MNIST's writers rarely draw one)",
        "one digit per image: a number of several digits gets one answer",
    ],
    "crop": ["a subject off-centre may be cut away by the centre crop"],
    "resize": ["a picture far from square is distorted by the squash"],
}


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _classes(meta: dict) -> list[str]:
    raw = meta.get("classes", "[]")
    try:
        return [str(c) for c in (json.loads(raw) if isinstance(raw, str) else raw)]
    except ValueError:
        return []


def _class_list(classes: list[str], shown: int) -> str:
    text = ", ".join(f"`{c}`" for c in classes[:shown])
    return text + (f" and {len(classes) - shown} more" if len(classes) > shown else "")


def model_card(report: dict, card: dict, *, training: dict | None = None, registered_model: str = "image-classifier",
               max_chars: int = MAX_CHARS) -> str:
    """Markdown for a version's description. ``training``: the training run's metrics, when known
    (``final_val_acc``, ``final_val_loss``, ``train_seconds``)."""
    for shown in (20, 5, 0):
        text = _card(report, card, training or {}, registered_model, shown)
        if len(text) <= max_chars:
            return text
    note = "\n\n... (cut to fit MLflow's description limit: the export report is in the run's artifacts)"
    return text[:max_chars - len(note)] + note


def _card(report: dict, card: dict, training: dict, registered_model: str, shown: int) -> str:
    meta = report.get("metadata", {})
    arch, dataset = report.get("arch", meta.get("arch", "?")), meta.get("dataset", card.get("dataset", "?"))
    transform = meta.get("input_transform", card.get("input_transform", "resize"))
    classes = _classes(meta) or [str(c) for c in card.get("classes", [])]
    size, channels = meta.get("image_size", card.get("image_size", "?")), meta.get("in_channels", card.get("channels", "?"))
    evaluation = report.get("evaluation", {})
    splits = card.get("splits", {})
    test_count = evaluation.get("test_count", splits.get("test", {}).get("count", "?"))
    lines = [
        f"# {arch} on {dataset}: {len(classes)}-class image classifier (ONNX)",
        "",
        f"Exported by the DVC pipeline from MLflow run `{meta.get('mlflow_run_id', '?')}`; ONNX SHA-256 "
        f"`{report.get('onnx_sha256', '?')}`; {_fmt(meta.get('num_params', '?'))} parameters.",
        "",
        "## Intended use",
        f"- Input: one encoded image per row (PNG, JPEG, WebP, BMP, TIFF, GIF: first frame), any size, turned "
        f"into {channels}x{size}x{size} by `input_transform` **{transform}**: {_USE.get(transform, transform)}.",
        f"- Output: one of {len(classes)} classes" + (f" ({_class_list(classes, shown)})" if shown else "")
        + ", its softmax score and the top-k; a file that cannot be read gets `reason` and `error` instead.",
        "",
        "## Limits",
        f"- It always answers one of its {len(classes)} classes: not for other kinds of pictures (letters, other "
        f"objects). The score is no \"unknown\" detector (calibration error ECE {_fmt(evaluation.get('ece'))} on the "
        f"test split).",
        *(f"- {limit[0].upper()}{limit[1:]}." for limit in _LIMITS.get(transform, [])),
        f"- Measured on the {dataset} test split only ({test_count} images): pictures unlike it may score lower.",
        "- ONNX Runtime on CPU or CUDA (setting `providers`); results agree with PyTorch within the parity "
        "tolerance below.",
        "",
        "## Data",
        f"Dataset `{card.get('dataset', dataset)}` from `{card.get('source', '?')}`, prepared with `input_transform` "
        f"{card.get('input_transform', transform)}; normalization mean {card.get('mean', meta.get('mean'))}, "
        f"std {card.get('std', meta.get('std'))}.",
        "",
        "| split | images | SHA-256 |",
        "|---|---:|---|",
        *(f"| {name} | {info.get('count', '?')} | `{info.get('sha256', '?')}` |" for name, info in splits.items()),
        "",
        "Validation images are carved out of the train split (params `train.val_fraction`, `train.seed`).",
        *(["", f"Note: the data was prepared again since this export (test split SHA-256 "
               f"`{report['test_set_sha256']}` then): the table above is of the data as prepared at registration."]
          if report.get("test_set_sha256") and report["test_set_sha256"] != splits.get("test", {}).get("sha256") else []),
        "",
        "## Metrics",
        "| metric | value |",
        "|---|---:|",
        *(f"| {key} | {_fmt(value)} |" for key, value in evaluation.items() if isinstance(value, (int, float))),
        *(f"| {key} (training run) | {_fmt(training[key])} |" for key in ("final_val_acc", "final_val_loss", "train_seconds")
          if key in training),
        "",
        "## Parity (ONNX Runtime against PyTorch on every test image)",
        f"max abs logit difference {_fmt(report.get('max_abs_logit_diff'))} (limit {_fmt(report.get('parity_atol'))}), "
        f"top-1 agreement {_fmt(100 * float(report.get('top1_agreement', 0)), 2)} % "
        f"({report.get('top1_disagreements', '?')} disagreements over {report.get('images', '?')} images), ONNX test "
        f"accuracy {_fmt(report.get('onnx_test_acc'))} (PyTorch {_fmt(report.get('torch_test_acc'))}), opset "
        f"{report.get('opset', '?')}: {'passed' if report.get('passed') else 'FAILED'}.",
        "",
        "## Serving",
        f"- `mlflow models serve -m \"models:/{registered_model}@champion\" --env-manager local -p 5001`, then POST "
        "`/invocations` with `{\"dataframe_split\": {\"columns\": [\"image\"], \"data\": [[\"<base64 file>\"]]}, "
        "\"params\": {\"top_k\": 3}}`: one row per image (`label`, `index`, `score`, `top_k`, `reason`, `error`).",
        f"- `mlflow.pyfunc.load_model(\"models:/{registered_model}@champion\").predict(pd.DataFrame({{\"image\": "
        "[png_bytes]}))`; the ONNX file is `model.onnx` in the model folder.",
        "- Production: the BentoML service follows the `champion` alias (README, docs/model-contract.md).",
    ]
    return "\n".join(lines) + "\n"
