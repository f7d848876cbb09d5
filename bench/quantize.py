"""Model variants (on demand, not a pipeline stage): INT8 (static, calibrated) and FP16 versions of
an exported model, each behind a gate, optionally benchmarked against FP32 side by side.

    .venv/bin/python -m bench.quantize --arch cnn [--int8] [--fp16] [--out variants] [--bench]

Not in the DVC DAG: nothing downstream uses the variants (the service serves the registry's FP32
model), and INT8 is slower than FP32 for these small CNNs on AVX2 CPUs (README, "Model variants"), so
every `dvc repro` would pay the calibration for files nobody reads.

Reads the export stage's FP32 model ``exports/<arch>/model.onnx`` and the prepared data
(``data/prepared/{train,test}.npz``); with neither ``--int8`` nor ``--fp16`` both variants are made.

- INT8 (CPU): ``onnxruntime.quantization.quant_pre_process`` (shape inference + ORT graph
  optimization, so Conv/BatchNorm/Relu are fused before quantizing), then ``quantize_static``: QDQ
  format, per-channel int8 weights, uint8 activations with 7-bit weights (``reduce_range``: the fast
  and accurate choice on x86 CPUs without VNNI; ``--activation-type int8 --no-reduce-range`` gives
  ORT's S8S8 default), MinMax calibration over ``--calibration-images`` training images normalized
  exactly as served (``service.contract.normalize`` with the model's mean/std).
  Gate: test accuracy (the whole test split) may drop at most ``--max-int8-drop`` (0.005 = 0.5 points)
  below the FP32 model's.
- FP16 (meant for the CUDA provider): ``onnxconverter_common.float16`` (else ONNX Runtime's copy,
  ``onnxruntime.transformers.float16``) with ``keep_io_types=True``, so the input stays float32 and the
  service's contract holds. Gate: top-1 agreement with FP32 over the whole test split
  >= ``--min-fp16-agreement`` (0.999).

Every variant must also pass the service's own contract check (``service.engine.OnnxClassifier``) and
carry the FP32 model's ``metadata_props`` unchanged plus ``precision`` (``int8``/``fp16``) and
``quantization`` (the recipe, JSON). A variant that fails is not written (a stale copy is removed) and
the tool exits 1 naming the failure (the exit codes of pipeline/stage.py). Outputs in
``--out``/<arch>/ (default ``variants/<arch>/``, git-ignored): ``model.int8.onnx``, ``model.fp16.onnx``,
``quantize.json`` (gate figures, numbers only; ``*_passed``
is 1/0) and ``quantize-report.json`` (every figure, the recipe, the failure messages).

``--bench`` also measures FP32, FP32 saved after ORT's full graph optimization, INT8 and FP16 side by
side in this process (accuracy, session load time, images/s at batch 1 and 64, 1 and 2 intra-op
threads) and writes ``bench/results/quantize-<date>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/quantize.py` as well as `python -m bench.quantize`
    sys.path.insert(0, str(REPO))

from pipeline import atomic, stage  # noqa: E402
from pipeline.download import load_prepared  # noqa: E402
from pipeline.paths import PREPARED_DIR, export_dir  # noqa: E402
from pipeline.stage import StageError  # noqa: E402
from service.contract import (INPUT_NAME, MODEL_FILE, OUTPUT_NAME, VARIANT_KEYS, cpu_session,  # noqa: E402
                              missing_keys, normalize, read_metadata, run_logits, write_metadata)
from tests import harness  # noqa: E402

BENCH_DIR = harness.REPO / "bench" / "results"
#: where the variants go, one folder per architecture (not under exports/<arch>/, which the export
#: stage owns and replaces whole)
VARIANTS_DIR = Path("variants")
DISTS = ("onnxruntime-gpu", "onnxruntime", "onnx", "onnxconverter-common", "numpy")
VARIANT_FILES = {"int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}


class QuantizeError(StageError):
    """The tool cannot run (missing inputs, a converter missing); the message says what to do."""


# --- inputs ----------------------------------------------------------------------------------------

def normalized(images_u8: np.ndarray, metadata: dict[str, str]) -> np.ndarray:
    """uint8 [N, C, H, W] -> float32 model input, with the service's own arithmetic and the model's mean/std."""
    return normalize(images_u8, json.loads(metadata["mean"]), json.loads(metadata["std"]))


def check_data(metadata: dict[str, str], images: np.ndarray, what: str) -> None:
    channels, size = int(metadata["in_channels"]), int(metadata["image_size"])
    if images.ndim != 4 or images.shape[1:] != (channels, size, size):
        raise QuantizeError(f"{what} images have shape {images.shape[1:]}, the model takes {(channels, size, size)}: "
                            f"data/prepared is not the dataset this model was trained on (run the pipeline)")


def calibration_sample(images: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`count` training images, a seeded random sample (every class, in practice)."""
    order = np.random.default_rng(seed).permutation(len(images))[: min(count, len(images))]
    return images[np.sort(order)]


# --- ONNX Runtime helpers --------------------------------------------------------------------------

class ImageCalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over normalized images, in batches."""

    def __init__(self, inputs: np.ndarray, batch_size: int = 32) -> None:
        self.inputs, self.batch_size, self._next = inputs, batch_size, 0

    def get_next(self) -> dict | None:
        if self._next >= len(self.inputs):
            return None
        batch = self.inputs[self._next:self._next + self.batch_size]
        self._next += self.batch_size
        return {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self) -> None:
        self._next = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


# --- the variants ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Int8Recipe:
    calibration_images: int = 300
    per_channel: bool = True
    # U8S8 + 7-bit weights (reduce_range): ONNX Runtime's fast int8 path on x86 without VNNI, where
    # full-range U8S8 saturates (vpmaddubsw) and S8S8 is barely faster than FP32 (bench/results/quantize-*)
    activation_type: str = "uint8"  # uint8 (U8S8) | int8 (S8S8, ORT's default for QDQ)
    weight_type: str = "int8"
    reduce_range: bool = True
    calibrate_method: str = "minmax"  # minmax | entropy | percentile
    pre_process: bool = True

    def describe(self) -> dict:
        return {"method": "static", "format": "QDQ", **self.__dict__}


def quantize_int8(fp32: bytes, calibration_inputs: np.ndarray, metadata: dict[str, str], recipe: Int8Recipe) -> bytes:
    """Static INT8 quantization (QDQ, calibrated) of an FP32 model; returns the serialized variant."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}

    class Reader(ImageCalibrationReader, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        source, out = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(fp32)
        if recipe.pre_process:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = Path(tmp) / "fp32.pre.onnx"
            quant_pre_process(str(source), str(pre))
            source = pre
        quantize_static(str(source), str(out), Reader(calibration_inputs), quant_format=QuantFormat.QDQ,
                        per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                        activation_type=types[recipe.activation_type], weight_type=types[recipe.weight_type],
                        calibrate_method=methods[recipe.calibrate_method])
        proto = onnx.load(str(out))
    write_metadata(proto, {**metadata, "precision": "int8", "quantization": json.dumps(recipe.describe())})
    proto.doc_string = (proto.doc_string + " | " if proto.doc_string else "") + "INT8 static quantization (QDQ)"
    return proto.SerializeToString()


def convert_fp16(fp32: bytes, metadata: dict[str, str]) -> tuple[bytes, str]:
    """FP16 weights and compute with float32 inputs/outputs (keep_io_types); returns (bytes, converter)."""
    try:
        from onnxconverter_common import float16

        converter = "onnxconverter_common.float16"
    except ImportError:  # ONNX Runtime ships a copy of the same converter
        try:
            from onnxruntime.transformers import float16
        except ImportError as err:
            raise QuantizeError("FP16 conversion needs onnxconverter-common (pip install onnxconverter-common) "
                                "or onnxruntime's transformers tools") from err
        converter = "onnxruntime.transformers.float16"
    proto = float16.convert_float_to_float16(onnx.load_from_string(fp32), keep_io_types=True)
    write_metadata(proto, {**metadata, "precision": "fp16",
                         "quantization": json.dumps({"method": "fp16", "keep_io_types": True, "converter": converter})})
    return proto.SerializeToString(), converter


# --- the gates -------------------------------------------------------------------------------------

def verify_contract(variant: bytes, fp32_metadata: dict[str, str], precision: str) -> list[str]:
    """Problems that keep a variant from replacing the FP32 model in the service (empty = none)."""
    from service.engine import OnnxClassifier

    problems = []
    metadata = read_metadata(onnx.load_from_string(variant))
    if metadata.get("precision") != precision:
        problems.append(f"metadata precision is {metadata.get('precision')!r}, expected {precision!r}")
    changed = sorted(k for k in set(fp32_metadata) | set(metadata)
                     if k not in VARIANT_KEYS and metadata.get(k) != fp32_metadata.get(k))
    if changed:
        problems.append(f"metadata differs from the FP32 model's in {changed}")
    with tempfile.TemporaryDirectory(prefix="quantize-check-") as tmp:
        path = Path(tmp) / f"model.{precision}.onnx"
        path.write_bytes(variant)
        try:
            OnnxClassifier(path, providers="cpu", intra_op_threads=1)
        except Exception as err:  # the service's contract check: input/output names, dtype, shapes, metadata
            problems.append(f"the service would refuse it: {type(err).__name__}: {err}")
    return problems


def gate(kind: str, variant: bytes | None, fp32_logits: np.ndarray, test_inputs: np.ndarray, labels: np.ndarray,
         fp32_metadata: dict[str, str], max_int8_drop: float, min_fp16_agreement: float) -> dict:
    """Accuracy gate + contract check for one variant: a report with `passed` and, if not, `failure`."""
    fp32_acc = float((fp32_logits.argmax(1) == labels).mean())
    report: dict = {"variant": kind, "test_images": int(len(labels)), "fp32_test_acc": round(fp32_acc, 5)}
    problems = verify_contract(variant, fp32_metadata, kind)
    if problems:
        report.update(passed=False, failure="; ".join(problems))
        return report
    logits = run_logits(variant, test_inputs, batch_size=500)
    acc = float((logits.argmax(1) == labels).mean())
    agreement = float((logits.argmax(1) == fp32_logits.argmax(1)).mean())
    report.update(test_acc=round(acc, 5), acc_drop=round(fp32_acc - acc, 5), top1_agreement=round(agreement, 5),
                  max_abs_logit_diff=round(float(np.abs(logits - fp32_logits).max()), 5),
                  size_bytes=len(variant))
    if kind == "int8":
        report["max_acc_drop"] = max_int8_drop
        ok = fp32_acc - acc <= max_int8_drop + 1e-9
        failure = (f"INT8 test accuracy {acc:.4%} is {100 * (fp32_acc - acc):.2f} points below FP32 {fp32_acc:.4%} "
                   f"(limit {100 * max_int8_drop:.2f})")
    else:
        report["min_top1_agreement"] = min_fp16_agreement
        ok = agreement >= min_fp16_agreement
        failure = f"FP16 top-1 agreement with FP32 {agreement:.4%} < {min_fp16_agreement:.2%}"
    report["passed"] = bool(ok)
    if not ok:
        report["failure"] = failure
    return report


@dataclass
class Outcome:
    reports: dict[str, dict]
    variants: dict[str, bytes]  # the variants that passed

    @property
    def failures(self) -> dict[str, str]:
        return {k: r["failure"] for k, r in self.reports.items() if not r["passed"]}


def make_variants(fp32: bytes, train_images: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray,
                  kinds: list[str], recipe: Int8Recipe = Int8Recipe(), max_int8_drop: float = 0.005,
                  min_fp16_agreement: float = 0.999) -> Outcome:
    """Build and gate the requested variants (nothing is written here)."""
    metadata = read_metadata(onnx.load_from_string(fp32))
    missing = missing_keys(metadata)
    if missing:
        raise QuantizeError(f"the FP32 model lacks metadata {missing} (docs/model-contract.md): re-run the export stage")
    check_data(metadata, train_images, "training")
    check_data(metadata, test_images, "test")
    test_inputs = normalized(test_images, metadata)
    fp32_logits = run_logits(fp32, test_inputs, batch_size=500)
    reports, variants = {}, {}
    for kind in kinds:
        started = time.perf_counter()
        if kind == "int8":
            calibration = normalized(calibration_sample(train_images, recipe.calibration_images), metadata)
            variant = quantize_int8(fp32, calibration, metadata, recipe)
            extra = {"recipe": recipe.describe()}
        else:
            variant, converter = convert_fp16(fp32, metadata)
            extra = {"converter": converter}
        report = gate(kind, variant, fp32_logits, test_inputs, test_labels, metadata, max_int8_drop, min_fp16_agreement)
        report.update(extra, seconds=round(time.perf_counter() - started, 2))
        reports[kind] = report
        if report["passed"]:
            variants[kind] = variant
    return Outcome(reports, variants)


def write_outputs(out_dir: Path, outcome: Outcome, kinds: list[str], fp32: bytes) -> None:
    """Passing variants atomically; a failing variant's stale file is removed; quantize.json always."""
    for kind in kinds:
        path = out_dir / VARIANT_FILES[kind]
        if kind in outcome.variants:
            atomic.write_bytes(path, outcome.variants[kind])
        else:
            path.unlink(missing_ok=True)  # never leave an older variant that no longer matches its FP32 model
    summary: dict = {"fp32_size_bytes": len(fp32)}  # numbers only (passed = 1/0), for comparing runs
    for kind, report in outcome.reports.items():
        summary.setdefault("fp32_test_acc", report["fp32_test_acc"])
        for key in ("test_acc", "acc_drop", "top1_agreement", "max_abs_logit_diff", "size_bytes"):
            if key in report:
                summary[f"{kind}_{key}"] = report[key]
        summary[f"{kind}_passed"] = int(report["passed"])
    atomic.write_json(out_dir / "quantize.json", summary)
    details = {"fp32_sha256": hashlib.sha256(fp32).hexdigest(), "reports": outcome.reports}
    atomic.write_json(out_dir / "quantize-report.json", details)


# --- benchmark -------------------------------------------------------------------------------------

def _throughput(sess, inputs: np.ndarray, batch: int, seconds: float) -> dict:
    x = np.ascontiguousarray(np.resize(inputs, (batch, *inputs.shape[1:])))
    for _ in range(3):
        sess.run([OUTPUT_NAME], {INPUT_NAME: x})
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t0 = time.perf_counter()
        sess.run([OUTPUT_NAME], {INPUT_NAME: x})
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    p50 = float(np.median(times))
    return {"images_per_s": round(batch * len(times) / total, 1), "ms_per_call_p50": round(1000 * p50, 3),
            "images_per_s_at_p50": round(batch / p50, 1)}  # robust to other jobs stealing the CPU now and then


def optimized_fp32(fp32: bytes, workdir: Path) -> Path:
    """FP32 saved after ORT_ENABLE_ALL graph optimization (session.optimized_model_filepath)."""
    path = workdir / "model.fp32.optimized.onnx"
    cpu_session(fp32, optimized_path=path)
    return path


def benchmark(arch: str, fp32: bytes, outcome: Outcome, test_images: np.ndarray, test_labels: np.ndarray,
              threads: list[int], batches: list[int], seconds: float) -> list[dict]:
    metadata = read_metadata(onnx.load_from_string(fp32))
    inputs = normalized(test_images, metadata)
    rows = []
    with tempfile.TemporaryDirectory(prefix="quantize-bench-") as tmp:
        candidates: list[tuple[str, bytes | Path, str]] = [("fp32", fp32, "all"),
                                                           ("fp32 saved-optimized", optimized_fp32(fp32, Path(tmp)), "none")]
        for kind in ("int8", "fp16"):
            if kind in outcome.variants:
                candidates.append((kind, outcome.variants[kind], "all"))
        for name, model, level in candidates:
            size = len(model) if isinstance(model, bytes) else model.stat().st_size
            t0 = time.perf_counter()
            cpu_session(model, threads=1, optimization=level)
            load_s = time.perf_counter() - t0
            data = model if isinstance(model, bytes) else model.read_bytes()
            acc = float((run_logits(data, inputs, batch_size=500).argmax(1) == test_labels).mean())
            for n_threads in threads:
                sess = cpu_session(model, threads=n_threads, optimization=level)
                for batch in batches:
                    row = {"arch": arch, "variant": name, "graph_optimization_at_load": level, "threads": n_threads,
                           "batch": batch, "test_acc": round(acc, 5), "size_kib": round(size / 1024, 1),
                           "session_load_ms": round(1000 * load_s, 1), **_throughput(sess, inputs, batch, seconds)}
                    rows.append(row)
                    print(f"  bench {arch} {name:22s} threads={n_threads} batch={batch:3d}: {row['images_per_s']:10.1f} "
                          f"images/s ({row['ms_per_call_p50']:.3f} ms/call), acc {acc:.4f}", flush=True)
    return rows


def machine() -> dict:
    """The harness' machine record plus the CPU's int8-relevant instruction sets."""
    flags = ""
    with suppress(OSError, StopIteration):
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags]
    return {**harness.machine(), "isa": isa}


def bench_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Quantization benchmark ({result['started']})", "",
             f"- command: `{result['command']}`",
             f"- machine: {m['cpu_model']}, {m['cpu_count']} cores, ISA {', '.join(m['isa'])}; load average at start "
             f"{m['loadavg_start']}, at end {result['loadavg_end']} (a shared machine: other jobs may have run)",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
             "- CPU execution provider only (no CUDA here): FP16 is meant for the CUDA provider; on CPU, ONNX Runtime "
             "inserts casts around ops without FP16 kernels, so its CPU figures are for completeness only.",
             "- `fp32 saved-optimized`: the FP32 model saved after ORT_ENABLE_ALL optimization, loaded with "
             "optimizations disabled (does saving an optimized model help?).", ""]
    for arch, gates in result["gates"].items():
        lines += [f"## {arch}: gates (whole test split)", "", "| variant | test acc | FP32 acc | drop (points) | "
                  "top-1 agreement | max abs logit diff | size KiB | passed |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for kind, r in gates.items():
            lines.append(f"| {kind} | {r.get('test_acc', '-')} | {r['fp32_test_acc']} | "
                         f"{round(100 * r['acc_drop'], 2) if 'acc_drop' in r else '-'} | {r.get('top1_agreement', '-')} | "
                         f"{r.get('max_abs_logit_diff', '-')} | {round(r['size_bytes'] / 1024, 1) if 'size_bytes' in r else '-'} | "
                         f"{'yes' if r['passed'] else 'NO: ' + r.get('failure', '')} |")
        lines.append("")
    lines += ["## Speed (images/s, this process, CPU)", "",
              "| arch | variant | threads | batch | images/s (mean) | images/s at p50 call | ms/call p50 | vs FP32 (p50) "
              "| test acc | size KiB | session load ms |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {(r["arch"], r["threads"], r["batch"]): r["images_per_s_at_p50"] for r in result["speed"] if r["variant"] == "fp32"}
    for r in result["speed"]:
        ref = base.get((r["arch"], r["threads"], r["batch"]))
        lines.append(f"| {r['arch']} | {r['variant']} | {r['threads']} | {r['batch']} | {r['images_per_s']:.0f} | "
                     f"{r['images_per_s_at_p50']:.0f} | {r['ms_per_call_p50']:.3f} | {r['images_per_s_at_p50'] / ref:.2f}x | "
                     f"{r['test_acc']} | {r['size_kib']} | "
                     f"{r['session_load_ms']} |")
    return "\n".join(lines) + "\n"


# --- the tool --------------------------------------------------------------------------------------

def run_arch(args: argparse.Namespace, arch: str, kinds: list[str], recipe: Int8Recipe, speed: list, gates: dict) -> int:
    out_dir = args.out / arch
    fp32_path = export_dir(arch) / MODEL_FILE
    if not fp32_path.is_file():
        raise QuantizeError(f"no FP32 model at {fp32_path}: run the export stage first (python -m pipeline.export --arch {arch})")
    try:
        train, test = load_prepared("train", PREPARED_DIR), load_prepared("test", PREPARED_DIR)
    except FileNotFoundError as err:
        raise QuantizeError(f"no prepared data ({err}): run the download stage first") from err
    fp32 = fp32_path.read_bytes()
    outcome = make_variants(fp32, train.images, test.images, test.labels, kinds, recipe,
                            args.max_int8_drop, args.min_fp16_agreement)
    write_outputs(out_dir, outcome, kinds, fp32)
    gates[arch] = outcome.reports
    for kind, r in outcome.reports.items():
        if r["passed"]:
            print(f"quantize: {arch} {kind}: test_acc {r['test_acc']:.4f} (FP32 {r['fp32_test_acc']:.4f}), top-1 agreement "
                  f"{r['top1_agreement']:.4%}, {r['size_bytes'] / 1024:.0f} KiB -> PASS, wrote {out_dir / VARIANT_FILES[kind]}")
        else:
            print(f"quantize: error: {arch} {kind} failed its gate, not written: {r['failure']}", file=sys.stderr)
    if args.bench:
        speed += benchmark(arch, fp32, outcome, test.images, test.labels, args.bench_threads, args.bench_batches,
                           args.bench_seconds)
    return 1 if outcome.failures else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description="INT8 and FP16 variants of an exported ONNX model, each behind a gate.")
    p.add_argument("--arch", required=True, help="architecture (exports/<arch>/model.onnx); a comma list is allowed")
    p.add_argument("--int8", action="store_true", help="make the INT8 variant (default: both)")
    p.add_argument("--fp16", action="store_true", help="make the FP16 variant (default: both)")
    p.add_argument("--calibration-images", type=int, default=300)
    p.add_argument("--activation-type", choices=("int8", "uint8"), default="uint8",
                   help="uint8 (U8S8, default) or int8 (S8S8) activations; weights are int8")
    p.add_argument("--calibrate-method", choices=("minmax", "entropy", "percentile"), default="minmax")
    p.add_argument("--reduce-range", action=argparse.BooleanOptionalAction, default=True,
                   help="7-bit weights (default on: avoids U8S8 saturation on x86 CPUs without VNNI)")
    p.add_argument("--no-per-channel", action="store_true")
    p.add_argument("--max-int8-drop", type=float, default=0.005, help="largest allowed test-accuracy drop (0.005 = 0.5 points)")
    p.add_argument("--min-fp16-agreement", type=float, default=0.999)
    p.add_argument("--out", type=Path, default=VARIANTS_DIR, help="folder for <arch>/model.int8.onnx, ... (default variants/)")
    p.add_argument("--bench", action="store_true", help="also benchmark the variants, write bench/results/quantize-<date>.*")
    p.add_argument("--bench-threads", type=ints, default=[1, 2])
    p.add_argument("--bench-batches", type=ints, default=[1, 64])
    p.add_argument("--bench-seconds", type=float, default=2.0)
    p.add_argument("--bench-tag", default="")
    args = p.parse_args(argv)
    if args.calibration_images < 1:
        p.error("--calibration-images must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = [k for k in ("int8", "fp16") if getattr(args, k)] or ["int8", "fp16"]
    recipe = Int8Recipe(calibration_images=args.calibration_images, per_channel=not args.no_per_channel,
                        activation_type=args.activation_type, reduce_range=args.reduce_range,
                        calibrate_method=args.calibrate_method)
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    bench_machine = machine() if args.bench else None
    speed: list[dict] = []
    gates: dict = {}
    status = 0
    for arch in [a for a in args.arch.split(",") if a]:
        try:
            status = max(status, run_arch(args, arch, kinds, recipe, speed, gates))
        except QuantizeError as err:
            print(f"quantize: error: {arch}: {err}", file=sys.stderr)
            status = 2
    if args.bench and gates:
        exe = Path(sys.executable)
        with suppress(ValueError):
            exe = exe.relative_to(Path.cwd())
        result = {"benchmark": "quantize", "started": started, "command": shlex.join([str(exe), "-m", "bench.quantize",
                                                                                       *(argv if argv is not None else sys.argv[1:])]),
                  "machine": bench_machine, "loadavg_end": [round(v, 2) for v in os.getloadavg()],
                  "versions": harness.versions(DISTS), "recipe": recipe.describe(), "gates": gates, "speed": speed}
        stem = f"quantize-{dt.date.today().isoformat()}" + (f"-{args.bench_tag}" if args.bench_tag else "")
        atomic.write_json(BENCH_DIR / f"{stem}.json", result)
        report = bench_markdown(result)
        atomic.write_text(BENCH_DIR / f"{stem}.md", report)
        print("\n" + report + f"\nwrote {BENCH_DIR / stem}.json and .md")
    return status


if __name__ == "__main__":
    sys.exit(stage.run("quantize", main))
