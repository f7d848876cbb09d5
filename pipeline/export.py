"""Export stage: ONNX with a dynamic batch axis and the model's metadata, behind a parity gate.

    python -m pipeline.export --arch cnn

The gate runs ONNX Runtime and PyTorch over the whole test split; the stage fails (exit 1, no
output) unless max |logit difference| <= export.parity_atol and top-1 agrees on every image. The
metadata keys are the contract the service reads (docs/model-contract.md).
Outputs (`exports/<arch>/`): model.onnx, export.json (parity figures).
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import warnings

import numpy as np
import onnx
import torch

from service.contract import INPUT_NAME, MODEL_FILE, OUTPUT_NAME, metadata_props, normalize, run_logits, write_metadata

from . import atomic, stage, tracking
from .download import load_card, load_prepared
from .modelfile import predict_logits, trained_model_args
from .paths import PREPARED_DIR, arch_dir, export_dir


def export_onnx(model: torch.nn.Module, meta: dict, opset: int) -> onnx.ModelProto:
    """Trace to ONNX (dynamic batch axis), check it, infer shapes and embed the metadata."""
    sample = torch.zeros(2, meta["in_channels"], meta["image_size"], meta["image_size"])
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model.eval(), (sample,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=opset, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    write_metadata(proto, metadata_props(meta))
    proto.producer_name, proto.doc_string = "image-classifier-platform", f"{meta['arch']} trained on {meta['dataset']}"
    return proto


def parity_check(model_bytes: bytes, model: torch.nn.Module, meta: dict, images: np.ndarray, labels: np.ndarray,
                 atol: float) -> dict:
    """ONNX Runtime vs PyTorch on every image: max |logit diff|, top-1 agreement, both accuracies."""
    torch_logits = predict_logits(model, images, meta["mean"], meta["std"]).numpy()
    ort_logits = run_logits(model_bytes, normalize(images, meta["mean"], meta["std"]))
    max_diff = float(np.abs(torch_logits - ort_logits).max())
    agree = torch_logits.argmax(1) == ort_logits.argmax(1)
    report = {
        "max_abs_logit_diff": max_diff, "parity_atol": atol,
        "top1_agreement": float(agree.mean()), "top1_disagreements": int((~agree).sum()),
        "onnx_test_acc": round(float((ort_logits.argmax(1) == labels).mean()), 5),
        "torch_test_acc": round(float((torch_logits.argmax(1) == labels).mean()), 5),
        "images": int(len(labels)),
    }
    report["passed"] = bool(max_diff <= atol and agree.all())
    return report


def main(argv: list[str] | None = None) -> int:
    args, params, model, meta = trained_model_args("Export a trained model to ONNX behind a parity gate.", argv)
    out = export_dir(args.arch)
    eval_metrics = json.loads((arch_dir(args.arch) / "eval" / "metrics.json").read_text())
    tracking.check_reachable()  # a server that is down: fail now, not after MLflow's minutes of retries
    # the ONNX file names the training run (its bytes must not depend on which store logs them)
    run = tracking.open_run(meta["mlflow_run_id"], experiment=params.train.experiment, run_name=args.arch,
                            stage="export", model_file=arch_dir(args.arch) / "model.pt")
    proto = export_onnx(model, meta, params.export.opset)
    model_bytes = proto.SerializeToString()
    test = load_prepared("test", PREPARED_DIR)
    report = parity_check(model_bytes, model, meta, test.images, test.labels, params.export.parity_atol)
    report.update(opset=params.export.opset, onnx_sha256=hashlib.sha256(model_bytes).hexdigest(),
                  evaluate_test_acc=eval_metrics["test_acc"],
                  test_set_sha256=load_card(PREPARED_DIR)["splits"]["test"]["sha256"])
    if report["onnx_test_acc"] != eval_metrics["test_acc"]:
        report["passed"] = False
        report["failure"] = f"ONNX accuracy {report['onnx_test_acc']} != evaluate stage's {eval_metrics['test_acc']}"
    print(f"export: {args.arch}: parity over {report['images']} test images: max |logit diff| "
          f"{report['max_abs_logit_diff']:.2e} (limit {params.export.parity_atol:.0e}), top-1 agreement "
          f"{report['top1_agreement']:.4%}, ONNX test_acc {report['onnx_test_acc']:.4f} "
          f"(evaluate: {eval_metrics['test_acc']:.4f}) -> {'PASS' if report['passed'] else 'FAIL'}")
    run.log_metrics({f"parity_{k}": v for k, v in report.items() if isinstance(v, (int, float))})
    run.set_tags({"parity_passed": str(report["passed"]).lower()})
    if not report["passed"]:
        atomic.remove_tree(out)  # no stale model.onnx for a later stage to pick up (nor half of one)
        print(f"export: error: {args.arch} failed the parity gate; nothing written", file=sys.stderr)
        return stage.EXIT_GATE
    with atomic.atomic_dir(out) as tmp:
        (tmp / MODEL_FILE).write_bytes(model_bytes)
        evaluation = {k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))}
        summary = {**report, "arch": args.arch, "evaluation": evaluation, "metadata": metadata_props(meta)}
        (tmp / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
        parity = {k: report[k] for k in ("max_abs_logit_diff", "top1_agreement", "onnx_test_acc")}
        (tmp / "parity.json").write_text(json.dumps(parity, indent=2) + "\n")  # DVC metrics: scalars only
    run.log_artifacts([out / "export.json"], "export")
    return 0


if __name__ == "__main__":
    sys.exit(stage.run("export", main))
