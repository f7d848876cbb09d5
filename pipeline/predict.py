"""Batch prediction: classify folders, files and globs offline, with the service's own steps.

    imgcls predict PATH... [--model models:/image-classifier@champion | FILE.onnx] [-o out.csv|out.jsonl]
                   [--top-k K] [--batch-size N] [--workers N] [--metrics metrics.json]
    python -m pipeline.predict ...          # the same

Every image goes through ``service.predictor.Predictor``: the decoding, ``input_transform``,
normalization, ONNX Runtime session and answer shape of the HTTP service, so a file gets the label and
score it gets over HTTP, with the service's default size limit for the model (a file the service
refuses with 413 is refused here too). Folders (also those a glob matches) are searched recursively
for image files by extension, following linked folders, each real folder once; files named on the
command line are always tried. A file that cannot be used (not an image, truncated, a blank page for a
digit model) is reported on stderr and in the output with its reason, and skipped: the run goes on.
Names that are not UTF-8 are written with backslash escapes.

When the input is one folder shaped like an ImageFolder (every image in a class subfolder named after
one of the model's classes), the labels are the folder names and the run also prints accuracy and a
confusion matrix (and writes them with ``--metrics``).

Speed: on CPU, ``--workers`` processes (from POOL_MIN_FILES files on; default the CPUs the process
may use, ``service.cpus``) each decode and classify a share of the files with their own one-thread
session (``--threads``); on a GPU, one session in this process is fed by ``--workers`` decoding
processes (:class:`Runner`). At most two chunks per worker are in flight (bounded memory).
Output is written atomically; without ``-o`` the CSV goes to stdout; a reader that leaves (``| head``)
ends the run quietly; Ctrl-C ends it with exit 130 and writes nothing. Exit codes: the stages' table
(``pipeline.stage``): 0 done (skipped files included, counted in the summary), 2 bad arguments (a path
that does not exist, no image file found, a bad model reference) or not one file could be classified
(the output, listing each file's reason, is written all the same), 3 the MLflow store is unusable.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import concurrent.futures.process
import csv
import glob
import io
import itertools
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.contract import MODEL_FILE, PreprocessSpec, read_metadata
from service.cpus import usable_cpus
from service.engine import CPU, ProviderError, resolve_providers
from service.postprocessing import predictions
from service.predictor import ImageError, Predictor, prepare

from . import atomic, stage

#: what a folder search picks up (files named on the command line are tried whatever their name)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})
GLOB_CHARS = frozenset("*?[")
#: files per worker task, at most (or --batch-size if larger) and at least: at 256 files a task's
#: overhead (pickling, two pipe messages: ~0.1-0.2 ms) is ~1 % of its decoding (32x32 JPEG ~60-70 us,
#: 28x28 PNG with ``digit`` ~250 us); tasks shrink towards the end of a run (a share of what is left)
TASK_FILES = 256
MIN_TASK_FILES = 8
#: below this many files everything runs in this process (starting workers, each loading a session, ~0.1-0.5 s)
POOL_MIN_FILES = 512
#: a session's memory per byte of its model file: ONNX Runtime's library, the weights and its optimized
#: copy of the graph (measured: CIFAR ResNet-18, a 43 MiB file, +164 MiB resident with the session)
SESSION_BYTES_PER_MODEL_BYTE = 4
#: seconds for every worker to load its session
STARTUP_TIMEOUT_S = 600


class PredictError(stage.StageError):
    """A bad argument: the message names it (exit 2)."""


# --- inputs ----------------------------------------------------------------------------------------

def _image_files(root: str) -> list[str]:
    """Image files under ``root``, depth first, names sorted; hidden files and folders skipped; linked
    folders followed, each real folder once (strings and os.walk: pathlib's per-file objects cost more
    than a 32x32 JPEG's decoding)."""
    found, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link loop, or a folder linked twice
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found += [os.path.join(folder, n) for n in sorted(names)
                  if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES]
    return found


def _expand(arg: str) -> list[str]:
    if os.path.isdir(arg):
        return _image_files(arg)
    if os.path.isfile(arg):
        return [arg]
    if GLOB_CHARS & set(arg):
        found = [f for p in sorted(glob.glob(arg, recursive=True))
                 for f in (_image_files(p) if os.path.isdir(p) else [p] if os.path.isfile(p) else [])]
        if found:
            return found
        raise PredictError(f"{arg!r}: the pattern matches no image file")
    raise PredictError(f"{arg!r}: no such file or folder")


def collect_inputs(args: Sequence[str]) -> list[str]:
    """Every file the arguments name (folders recursively, globs expanded), in order, each once (by
    absolute path)."""
    seen, files = set(), []
    for arg in args:
        for path in _expand(arg):
            key = os.path.abspath(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    if not files:
        raise PredictError(f"no image files in {', '.join(map(repr, args))} (searched for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def folder_labels(args: Sequence[str], files: Sequence[str], classes: Sequence[str]) -> list[str | None] | None:
    """The class-subfolder name of each file when the input is one ImageFolder-shaped folder (every file in
    a subfolder named after one of the model's classes), else None."""
    if len(args) != 1 or not os.path.isdir(args[0]):
        return None
    root = os.path.join(args[0], "")
    tops = [f[len(root):].split(os.sep)[0] if os.sep in f[len(root):] else None for f in files]
    return tops if all(top in classes for top in tops) else None


# --- decoding and classifying in worker processes ---------------------------------------------------

@dataclass(frozen=True)
class WorkerSetup:
    """What each worker process starts with. ``model`` set: the worker classifies too, with its own
    ONNX Runtime session of ``threads`` threads; None: it only decodes."""

    spec: PreprocessSpec
    model: str | None = None
    providers: str = "cpu"
    threads: int = 1
    batch_size: int = 256


@dataclass
class _Worker:
    """A worker process's state: its setup, its session (or why it has none), the start barrier."""

    setup: WorkerSetup
    started: Any
    predictor: Predictor | None = None
    failed: Exception | None = None


_WORKER: _Worker | None = None


def _init_worker(setup: WorkerSetup, started) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: one message, not one per worker
    _WORKER = _Worker(setup, started)
    if setup.model is not None:
        try:
            _WORKER.predictor = Predictor(setup.model, providers=setup.providers, threads=setup.threads)
        except Exception as err:  # noqa: BLE001  (raised by the first task, so the parent can say it:
            _WORKER.failed = err  # an initializer's exception only breaks the pool, with a traceback per worker)


def _started() -> None:
    """Held until every worker runs it (each has taken one such task, so each has its session), or
    the worker's session failure."""
    if _WORKER.failed is not None:
        raise _WORKER.failed
    _WORKER.started.wait(timeout=STARTUP_TIMEOUT_S)


def _prepare_files(paths: Sequence[str], spec: PreprocessSpec) -> list:
    """Each file -> ``uint8 [C, H, W]`` or ``(reason, message)``, with the service's default size limit."""
    out = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            out.append(("unreadable", f"cannot read: {err.strerror or err}"))
            continue
        item = prepare(data, spec)
        out.append((item.reason, item.message) if isinstance(item, ImageError) else item)
    return out


def _work(paths: Sequence[str]) -> "list | tuple[np.ndarray, list]":
    """A worker's task, what crosses the process boundary: the decoded files (a decoding worker), or
    ``(logits [files decoded, K], [None or (reason, message) per file])`` (a classifying worker)."""
    worker = _WORKER
    items = _prepare_files(paths, worker.setup.spec)
    return items if worker.predictor is None else _classified(items, worker.predictor, worker.setup.batch_size)


def _classified(items: list, predictor: Predictor, batch_size: int) -> tuple[np.ndarray, list]:
    """Prepared files -> ``(logits [files decoded, K], [None or (reason, message) per file])``."""
    logits = predictor.logits([a for a in items if not isinstance(a, tuple)], batch_size)
    return logits, [a if isinstance(a, tuple) else None for a in items]


class WorkerDied(stage.StageError):
    """A worker process died (killed, out of memory): the run stops, naming the files it was on."""


def available_memory() -> int | None:
    """Bytes the kernel can give without swapping (Linux ``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def sessions_fit(model: Path, sessions: int) -> bool:
    """``sessions`` copies of the model's session fit in half the available memory (a session holds
    about SESSION_BYTES_PER_MODEL_BYTE x the file's size), or the memory is unknown."""
    free = available_memory()
    return free is None or sessions * SESSION_BYTES_PER_MODEL_BYTE * model.stat().st_size <= free / 2


class Runner:
    """Files -> each file's answer (the service's dict) or ``(reason, message)``, in file order.

    How the work is split (``workers`` > 0 and at least POOL_MIN_FILES files):

    - CPU: each of ``workers`` processes decodes a task of files and classifies it with its own
      session of ``threads`` threads (default 1): a one-thread session wastes no time at the
      barriers of each operator, and an image is decoded on the core that classifies it. Measured on
      2 cores (bench/predict.py, CIFAR-10 JPEGs): resnet20 2,267 images/s against 1,479 for one
      two-thread session fed by decoding processes, the 10.8 k-parameter cnn 11,896 against 5,556.
    - GPU (the providers start with a GPU one), or when a session per worker would not fit in
      memory (:func:`sessions_fit`): one session in this process, ``threads`` threads (default: the
      usable CPUs), fed by ``workers`` decoding processes.

    Otherwise one session in this process does everything. At most ``AHEAD`` tasks per worker are in
    flight (memory stays bounded whatever the folder's size); the processes are forked (Linux;
    spawned elsewhere) before this process opens any session, so none inherits a live session.
    """

    AHEAD = 2

    def __init__(self, model: Path, spec: PreprocessSpec, *, workers: int, threads: int | None = None,
                 providers: str = "auto", batch_size: int = 256, files: int = 0) -> None:
        self.model, self.spec, self.providers, self.batch_size = model, spec, providers, batch_size
        self.workers = workers if files >= POOL_MIN_FILES else 0
        on_cpu = resolve_providers(providers)[0][0] == CPU  # a bad setting is a ProviderError here, before any fork
        self.pooled_sessions = self.workers > 0 and on_cpu and sessions_fit(model, self.workers)
        self.threads = threads or (1 if self.pooled_sessions else usable_cpus())
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.predictor: Predictor | None = None

    def __enter__(self) -> "Runner":
        try:
            if self.workers > 0:
                self._start_pool()
            if not self.pooled_sessions:
                self.predictor = Predictor(self.model, providers=self.providers, threads=self.threads)
        except BaseException:
            self._stop(now=True)
            raise
        return self

    def __exit__(self, kind, *exc) -> None:
        self._stop(now=kind is not None)

    def _start_pool(self) -> None:
        setup = WorkerSetup(self.spec, model=str(self.model) if self.pooled_sessions else None,
                            providers=self.providers, threads=self.threads, batch_size=self.batch_size)
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.pool = concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=_init_worker, initargs=(setup, context.Barrier(self.workers)))
        # every worker started, with its session (images/s then counts no model load)
        for future in [self.pool.submit(_started) for _ in range(self.workers)]:
            try:
                self._result(future, "starting")
            except threading.BrokenBarrierError:
                raise WorkerDied(f"the worker processes did not all start within {STARTUP_TIMEOUT_S} s") from None
            except (ProviderError, WorkerDied):
                raise
            except Exception as err:  # noqa: BLE001  (ONNX Runtime's own errors: a file it cannot load)
                raise PredictError(f"--model {str(self.model)!r}: ONNX Runtime cannot load it in a worker "
                                   f"({type(err).__name__}: {err})") from None

    def _stop(self, now: bool) -> None:
        """Wait for the workers, or (an error, Ctrl-C, a reader gone) end them at once: their queued
        tasks would otherwise run to the end, a 256-file task of a large model for many seconds."""
        if self.pool is None:
            return
        if now:
            for process in list(getattr(self.pool, "_processes", {}).values()):  # no public way before Python 3.14
                process.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = None

    def __call__(self, files: Sequence[str], top_k: int = 1) -> Iterator:
        chunks = self._chunks(files)
        results = self._pooled(chunks) if self.pool is not None else (_prepare_files(c, self.spec) for c in chunks)
        for result in results:
            yield from self._answers(result, top_k)

    def _chunks(self, files: Sequence[str]) -> Iterator[Sequence[str]]:
        """Batches of files in this process; worker tasks of a share of what is left (guided: the
        workers finish within a few images of each other), at most ``max(TASK_FILES, batch_size)``."""
        start, largest = 0, max(TASK_FILES, self.batch_size)
        while start < len(files):
            left = len(files) - start
            size = min(largest, max(MIN_TASK_FILES, left // (self.AHEAD * self.workers))) if self.workers else self.batch_size
            yield files[start:start + size]
            start += size

    def _answers(self, result: "list | tuple[np.ndarray, list]", top_k: int) -> Iterator:
        """One task's answers and errors, in order (decoded files are classified here first)."""
        logits, errors = result if isinstance(result, tuple) else _classified(result, self.predictor, self.batch_size)
        answers = iter(predictions(logits, self.spec.classes, top_k))
        return (error if error is not None else next(answers) for error in errors)

    @staticmethod
    def _result(future: concurrent.futures.Future, doing: str):
        try:
            return future.result()
        except concurrent.futures.process.BrokenProcessPool:
            raise WorkerDied(f"a worker process died (killed, or out of memory?) while {doing}; "
                             f"nothing was written") from None

    def _pooled(self, chunks: Iterator[Sequence[str]]) -> Iterator:
        window = collections.deque((c, self.pool.submit(_work, c))
                                   for c in itertools.islice(chunks, self.AHEAD * self.workers))
        while window:
            chunk, future = window.popleft()
            result = self._result(future, f"on {_shown(chunk[0])} .. {_shown(chunk[-1])}")
            if (following := next(chunks, None)) is not None:
                window.append((following, self.pool.submit(_work, following)))
            yield result


# --- the run ---------------------------------------------------------------------------------------

def _shown(path: str) -> str:
    """A path as text: a name that is not UTF-8 keeps its bytes as backslash escapes (CSV and JSON stay valid)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass
class Outcome:
    """One row of the output: a prediction or the file's error."""

    path: str
    answer: dict | None = None
    reason: str | None = None
    error: str | None = None
    truth: str | None = None


@dataclass
class Summary:
    classified: int = 0
    skipped: int = 0
    seconds: float = 0.0
    confusion: dict = field(default_factory=dict)  # true class -> predicted class -> images

    @property
    def images_per_s(self) -> float:
        return self.classified / self.seconds if self.seconds else 0.0

    @property
    def labelled(self) -> int:
        return sum(sum(row.values()) for row in self.confusion.values())

    @property
    def correct(self) -> int:
        return sum(row.get(truth, 0) for truth, row in self.confusion.items())


def outcomes(results: Iterator, files: Sequence[str], progress=None) -> Iterator[Outcome]:
    """A :class:`Runner`'s results for ``files`` as output rows."""
    for path, item in zip(files, results):
        if progress is not None:
            progress.update(1)
        if isinstance(item, tuple):
            yield Outcome(_shown(path), reason=item[0], error=item[1])
        else:
            yield Outcome(_shown(path), answer=item)


def tally(summary: Summary, outcome: Outcome) -> None:
    if outcome.answer is None:
        summary.skipped += 1
        return
    summary.classified += 1
    if outcome.truth is not None:
        row = summary.confusion.setdefault(outcome.truth, {})
        row[outcome.answer["label"]] = row.get(outcome.answer["label"], 0) + 1


def format_confusion(confusion: dict, classes: Sequence[str]) -> str:
    """Rows: true class (folder); columns: predicted class."""
    rows = [c for c in classes if c in confusion]
    width = max(6, *(len(c) for c in classes))
    lines = [f"{'true/pred':>{width}} " + " ".join(f"{c[:width]:>{width}}" for c in classes)]
    for truth in rows:
        lines.append(f"{truth:>{width}} " + " ".join(f"{confusion[truth].get(c, 0):>{width}}" for c in classes))
    return "\n".join(lines)


def metrics_of(summary: Summary, classes: Sequence[str]) -> dict:
    per_class = {c: {"images": sum(row.values()), "acc": row.get(c, 0) / sum(row.values())}
                 for c, row in summary.confusion.items()}
    return {"images": summary.classified + summary.skipped, "classified": summary.classified,
            "skipped": summary.skipped, "images_per_s": round(summary.images_per_s, 1),
            **({"accuracy": summary.correct / summary.labelled, "labelled": summary.labelled, "per_class": per_class,
                "confusion": {t: [summary.confusion[t].get(c, 0) for c in classes] for t in summary.confusion},
                "classes": list(classes)} if summary.labelled else {})}


# --- output ----------------------------------------------------------------------------------------

CSV_FIELDS = ("path", "label", "index", "score", "top_k", "error", "reason", "true_label")


def csv_row(outcome: Outcome) -> dict:
    a = outcome.answer or {}
    top = ";".join(f"{t['label']}:{t['score']:.6f}" for t in a.get("top_k", [])) if a else ""
    return {"path": outcome.path, "label": a.get("label", ""), "index": a.get("index", ""),
            "score": f"{a['score']:.6f}" if a else "", "top_k": top, "error": outcome.error or "",
            "reason": outcome.reason or "", "true_label": outcome.truth or ""}


def json_row(outcome: Outcome) -> dict:
    row = {"path": outcome.path, **(outcome.answer or {"error": outcome.error, "reason": outcome.reason})}
    if outcome.truth is not None:
        row["true_label"] = outcome.truth
    return row


class Writer:
    """CSV or JSON Lines rows to a file (atomically: a temporary beside it, renamed at the end) or stdout."""

    SUFFIXES = (".csv", ".jsonl", ".ndjson")

    def __init__(self, output: str | None) -> None:
        self.output = Path(output) if output and output != "-" else None
        self.jsonl = self.output is not None and self.output.suffix.lower() != ".csv"
        self.buffer = io.StringIO() if self.output is not None else sys.stdout
        self.csv = None if self.jsonl else csv.DictWriter(self.buffer, CSV_FIELDS, lineterminator="\n")
        if self.csv is not None:
            self.csv.writeheader()

    def write(self, outcome: Outcome) -> None:
        if self.csv is not None:
            self.csv.writerow(csv_row(outcome))
        else:
            self.buffer.write(json.dumps(json_row(outcome)) + "\n")

    def close(self) -> None:
        if self.output is not None:
            atomic.write_text(self.output, self.buffer.getvalue())


# --- the model -------------------------------------------------------------------------------------

def default_model_ref(params_file: str = "params.yaml") -> str:
    name = "image-classifier"
    if Path(params_file).is_file():
        from .params import load_params

        name = load_params(params_file).promote.registered_model
    return f"models:/{name}@champion"


def resolve_model(ref: str, workdir: Path) -> Path:
    """An ONNX file, or ``models:/<name>@<alias>`` / ``models:/<name>/<version>`` from the MLflow registry
    (downloaded under ``workdir``)."""
    if not ref.startswith("models:/"):
        path = Path(ref)
        if not path.is_file():
            raise PredictError(f"--model {ref!r}: no such file (give an .onnx file or models:/<name>@<alias>)")
        return path
    from . import tracking

    tracking.require_store()  # a missing SQLite store is an error, not a new empty one
    name, _, rest = ref.removeprefix("models:/").partition("@")
    if rest:
        found = tracking.version_by_alias(name, rest)
        if found is None:
            raise PredictError(f"--model {ref!r}: registered model {name!r} has no alias {rest!r} in {tracking.tracking_uri()}")
        version = found["version"]
    else:
        name, _, version = name.partition("/")
        if not version.isdigit():
            raise PredictError(f"--model {ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
        if not tracking.version_exists(name, version):
            raise PredictError(f"--model {ref!r}: registered model {name!r} has no version {version} in {tracking.tracking_uri()}")
    folder = tracking.download_version(name, version, workdir)
    found = sorted(folder.rglob(MODEL_FILE))
    if not found:
        raise PredictError(f"--model {ref!r}: version {version} holds no {MODEL_FILE}")
    return found[0]


# --- command line ----------------------------------------------------------------------------------

def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs")
    parser.add_argument("--model", help="an .onnx file, or models:/<name>@<alias> or models:/<name>/<version> "
                        "(default: models:/<promote.registered_model of params.yaml>@champion)")
    parser.add_argument("-o", "--output", help="predictions.csv or predictions.jsonl (default: CSV on stdout)")
    parser.add_argument("--top-k", type=_positive, default=1, help="entries in each top_k list (default 1)")
    parser.add_argument("--batch-size", type=_positive, default=256, help="images per ONNX Runtime call (default 256)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"processes that decode and (on CPU) classify, each with its own session (default: the "
                             f"usable CPUs; 0, or fewer than {POOL_MIN_FILES} files: all in this process)")
    parser.add_argument("--threads", type=_positive, default=None,
                        help="ONNX Runtime threads per session (default: 1 per worker; the usable CPUs for a session "
                             "in this process)")
    parser.add_argument("--providers", default="auto", help="ONNX Runtime providers, as CLASSIFIER_PROVIDERS (default auto)")
    parser.add_argument("--metrics", help="write counts, images/s and (ImageFolder input) accuracy and confusion here (.json)")
    parser.add_argument("--params", default="params.yaml", help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        parser.error(f"argument --workers: expected 0 or more, got {args.workers}")
    if args.output not in (None, "-") and Path(args.output).suffix.lower() not in Writer.SUFFIXES:
        parser.error(f"argument -o/--output: {args.output!r}: the name must end in .csv or .jsonl")
    return args


def model_spec(model: Path) -> PreprocessSpec:
    try:
        return PreprocessSpec.from_metadata(read_metadata(model))
    except Exception as err:  # noqa: BLE001  (not ONNX, or not our contract: say which file)
        raise PredictError(f"--model {str(model)!r}: not a classifier this project can run ({type(err).__name__}: {err})") from err


def classify_all(runner: Runner, files: Sequence[str], truths: list | None, writer: "Writer",
                 args: argparse.Namespace) -> Summary:
    from tqdm import tqdm

    summary, started = Summary(), time.perf_counter()
    # on a terminal only (None), unless --no-progress: images/s as it goes
    with tqdm(total=len(files), unit="img", disable=True if args.no_progress else None, file=sys.stderr,
              smoothing=0.1) as bar:
        for i, outcome in enumerate(outcomes(runner(files, args.top_k), files, progress=bar)):
            outcome.truth = truths[i] if truths else None
            if outcome.answer is None:
                bar.write(f"predict: skipped {outcome.path}: {outcome.reason}: {outcome.error}", file=sys.stderr)
            tally(summary, outcome)
            writer.write(outcome)
    summary.seconds = time.perf_counter() - started
    return summary


def run(args: argparse.Namespace) -> Summary:
    files = collect_inputs(args.paths)
    with tempfile.TemporaryDirectory(prefix="imgcls-predict-") as workdir:
        model = resolve_model(args.model or default_model_ref(args.params), Path(workdir))
        spec = model_spec(model)
        truths = folder_labels(args.paths, files, spec.classes)
        try:
            with Runner(model, spec, workers=usable_cpus() if args.workers is None else args.workers,
                        threads=args.threads, providers=args.providers, batch_size=args.batch_size,
                        files=len(files)) as runner:
                writer = Writer(args.output)
                summary = classify_all(runner, files, truths, writer, args)
        except ProviderError as err:
            raise PredictError(f"--providers {args.providers!r}: {err}") from None
    writer.close()
    report(summary, spec.classes, args)
    if not summary.classified:
        raise PredictError(f"none of the {summary.skipped} files could be classified (each is listed above, with its reason)")
    return summary


def report(summary: Summary, classes: Sequence[str], args: argparse.Namespace) -> None:
    out = sys.stderr if args.output in (None, "-") else sys.stdout  # stdout holds the CSV when there is no -o
    print(f"predict: {summary.classified} classified, {summary.skipped} skipped, {summary.seconds:.2f} s "
          f"({summary.images_per_s:,.0f} images/s){f' -> {args.output}' if args.output not in (None, '-') else ''}",
          file=out)
    if summary.labelled:
        print(f"predict: accuracy {summary.correct / summary.labelled:.4f} ({summary.correct}/{summary.labelled} "
              f"images whose folder names a class)\n{format_confusion(summary.confusion, classes)}", file=out)
    if args.metrics:
        atomic.write_json(args.metrics, metrics_of(summary, classes))


def main(argv: list[str] | None = None) -> int:
    try:  # a reader that leaves (`| head`) ends the run quietly: pipeline.stage.run
        run(parse_args(argv))
    except KeyboardInterrupt:
        print("predict: interrupted; nothing written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(stage.run("predict", main))
