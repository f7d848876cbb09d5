"""Real inputs benchmark: the service's accuracy over HTTP on realistic digits, several models side by side.

    .venv/bin/python -m bench.real_inputs --model before=/work/before_models/cnn-b79099e.onnx \\
        --model after=exports/cnn/model.onnx                # 500 per part, the 10,000 MNIST test images
    .venv/bin/python -m bench.real_inputs --model before=... --model after=... --quick   # 100 per part, 1,000 MNIST
    .venv/bin/python -m bench.real_inputs --model m=PATH.onnx --per-part 200 --seed 1 --out /tmp/real

On demand, not a test. The corpus is bench/real_corpus.py (generated here, no downloads; built once
per settings in a work folder, default ``<temp>/real-inputs-<settings>``, and reused):
``handwritten`` (MNIST test digits as pen on paper photos: JPEG/PNG, RGB/grayscale, any size and
place), ``typed`` (0-9 in every font of the machine), ``drawn`` (browser-canvas strokes), ``mnist``
(the raw 28x28 test PNGs) and ``blank`` (no digit). Look at ``contact_sheet.png`` in the corpus folder.

And ``canvas`` (bench/real_canvas.py): ``--canvas`` digits (default 50, 5 per digit) drawn with the
mouse on the /ui page's pad in headless Chromium (Playwright), the ``drawn`` part's jittered strokes,
kept as the PNGs the page itself sent. They are drawn once, on the FIRST model's server after it is
ready and before it is measured (the page's own answers are not used), kept in ``<corpus>/canvas/``
with a manifest of their own (reused while count, seed, strokes, the page and Chromium are the same),
and then sent to every model like the other parts. Without Chromium or playwright (or when drawing
fails) one line says that the part is skipped and why, and the bench goes on without it.

Policy. For each ``--model NAME=PATH.onnx``, in the order given, ONE real ``bentoml serve
service.service:Classifier`` on a free loopback port, with a temporary BENTOML_HOME holding only that
file as the champion (tests/harness.py), default settings except CLASSIFIER_REFUSAL_RATE=0 (the
per-address penalty box would slow a client that gets many 4xx, e.g. blanks refused) and
CLASSIFIER_ACCESS_LOG=0; stopped before the next one starts. Every corpus image is POSTed to
``/classify`` (multipart field ``images``, ``top_k=1``), up to ``BATCH_IMAGES`` files per request
(fewer so that a request stays well under the server's pixel and byte limits, read from /metadata),
over ``CONNECTIONS`` concurrent connections. A request refused because of some of its images (the
service answers the first one's 4xx with every bad image in ``errors``) records those images'
status and reason and sends the others again; 429/503 are retried after Retry-After.

Measured, per model and part: accuracy (correct / all images: a refused image counts as wrong),
images refused by status and reason, mean top-1 confidence of right and of wrong answers; for
``blank``: refused with 422 ``no_ink`` vs answered (a digit), and the answers' mean confidence.

Targets, for the LAST model given (PASS only if all hold): handwritten >= 97 %, typed >= 95 %, and
mnist >= the FIRST model's mnist accuracy (the new normalization must not cost accuracy on MNIST).

Writes bench/results/real_inputs-<date>[-suffix].json and .md (machine, versions, command, git
state, each model's /metadata summary); ``--quick`` writes to the temporary folder unless ``--out``
is given. The last model's misclassified images (wrong or refused digits, blanks answered with a
digit) are listed in the JSON, and the first MISCLASSIFIED_KEPT of them (the parts in turn) copied to
``<work>/misclassified-<name>/`` (file names give part, true and predicted label) for whoever tunes
the preprocessing. Exit status 0 on PASS, 1 on FAIL.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import real_canvas, real_corpus  # noqa: E402
from bench.real_corpus import PARTS, Item  # noqa: E402
from bench.serve import RESULTS_DIR, versions  # noqa: E402
from bench.shadow import start as serve_store  # noqa: E402  (bentoml serve on a store, poll off, /readyz)
from tests import harness  # noqa: E402

#: the parts in report order: the generated ones, the pad's drawings after the imitation of them
REPORT_PARTS = (*PARTS[:PARTS.index("drawn") + 1], real_canvas.PART, *PARTS[PARTS.index("drawn") + 1:])
TARGETS = {"handwritten": 0.97, "typed": 0.95}  # accuracy of the last model; mnist: >= the first model's
SERVER_ENV = {"CLASSIFIER_REFUSAL_RATE": "0", "CLASSIFIER_ACCESS_LOG": "0"}
BATCH_IMAGES = 16
CONNECTIONS = 4
REQUEST_SHARE = 0.5  # a request holds at most this share of the server's pixel and byte limits
REQUEST_TIMEOUT_S = 60.0
TRANSIENT_RETRIES = 8  # 429 / 503 / transport errors per request before its images count as failed
MISCLASSIFIED_KEPT = 40
MIME = {"JPEG": "image/jpeg", "PNG": "image/png"}


# --- sending the corpus ------------------------------------------------------------------------------

def batches(items: list[Item], max_images: int, max_pixels: int, max_bytes: int) -> list[list[int]]:
    """Item indices in requests of at most `max_images` files, `max_pixels` canvas pixels (a JPEG may
    decode smaller: this is the safe side) and `max_bytes` of files, in corpus order."""
    out, current, pixels, size = [], [], 0, 0
    for i, item in enumerate(items):
        p, b = item.width * item.height, item.path.stat().st_size
        if current and (len(current) >= max_images or pixels + p > max_pixels or size + b > max_bytes):
            out.append(current)
            current, pixels, size = [], 0, 0
        current.append(i)
        pixels, size = pixels + p, size + b
    return out + ([current] if current else [])


def retry_after(resp) -> float:
    try:
        return min(10.0, max(0.2, float(resp.headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


async def classify_batch(client, items: list[Item], batch: list[int], answers: list, stats: Counter) -> None:
    """POST `batch`'s images; one answer dict per image into `answers` (status, label, score, reason)."""
    import httpx

    pending, transient = list(batch), 0
    while pending:
        # neutral file names: the corpus' own names must not be what the service sees
        files = [("images", (f"img{i}{items[i].path.suffix}", items[i].path.read_bytes(), MIME[items[i].format]))
                 for i in pending]
        try:
            resp = await client.post("/classify", files=files, data={"top_k": "1"})
        except httpx.HTTPError as err:
            resp, error = None, type(err).__name__
        stats["requests"] += 1
        if resp is not None and resp.status_code == 200:
            preds = resp.json()
            if len(preds) != len(pending):
                raise SystemExit(f"real inputs bench: {len(pending)} images sent, {len(preds)} predictions back")
            for i, p in zip(pending, preds):
                answers[i] = {"status": 200, "label": p["label"], "score": p["score"]}
            return
        if resp is None or resp.status_code in (429, 503):
            stats[f"retried {resp.status_code if resp is not None else error}"] += 1
            transient += 1
            if transient <= TRANSIENT_RETRIES:
                await asyncio.sleep(retry_after(resp) if resp is not None else 1.0)
                continue
            for i in pending:
                answers[i] = {"status": resp.status_code if resp is not None else None,
                              "reason": (safe_json(resp).get("reason") if resp is not None else error) or "unknown"}
            return
        body = safe_json(resp)
        errors = body.get("errors") if isinstance(body.get("errors"), list) else []
        if errors:  # these images are refused; the others are sent again without them
            for e in errors:
                answers[pending[e["index"]]] = {"status": e["status"], "reason": e["reason"], "error": e["error"]}
            pending = [i for i in pending if answers[i] is None]
        elif len(pending) > 1:  # refused as a whole (e.g. 413 too many pixels): halve it
            stats[f"split {resp.status_code} {body.get('reason')}"] += 1
            half = len(pending) // 2
            await classify_batch(client, items, pending[:half], answers, stats)
            pending = pending[half:]
        else:
            answers[pending[0]] = {"status": resp.status_code, "reason": body.get("reason") or "unknown",
                                   "error": body.get("error")}
            return


def safe_json(resp) -> dict:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


async def classify_all(url: str, items: list[Item], limits: dict) -> tuple[list[dict], dict]:
    """Every item's answer, CONNECTIONS requests in flight; (answers, request counts)."""
    import httpx

    todo = batches(items, min(BATCH_IMAGES, limits.get("max_images", BATCH_IMAGES)),
                   int(REQUEST_SHARE * limits.get("max_request_pixels", 16 * 2 ** 20)),
                   int(REQUEST_SHARE * limits.get("max_request_bytes", 32 * 2 ** 20)))
    answers: list = [None] * len(items)
    stats: Counter = Counter()
    queue: asyncio.Queue = asyncio.Queue()
    for b in todo:
        queue.put_nowait(b)
    step, done = max(1, len(todo) // 5), Counter()

    async def worker(client) -> None:
        while not queue.empty():
            batch = queue.get_nowait()
            await classify_batch(client, items, batch, answers, stats)
            done["batches"] += 1
            if done["batches"] % step == 0:
                print(f"real inputs:   {done['batches']}/{len(todo)} batches", flush=True)

    limits_ = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits_) as client:
        await asyncio.gather(*(worker(client) for _ in range(CONNECTIONS)))
    return answers, dict(stats)


def serve_and_classify(name: str, onnx: Path, items: list[Item], workdir: Path, before=None) -> tuple[dict, list[Item]]:
    """Store `onnx` in a fresh BentoML home, serve it, classify every item, stop the server. `before`:
    called with the server's URL once it is ready, before the clock starts; the items it returns are
    classified too (the canvas part, drawn on this server's /ui). Returns (raw result, the items)."""
    home = workdir / f"bentoml_home_{name}"
    shutil.rmtree(home, ignore_errors=True)
    tag = harness.store_in_bento_home(onnx, home)
    import httpx

    with serve_store(home, workdir, SERVER_ENV, name) as server:
        print(f"real inputs: {name}: {tag} served on {server.url}, ready after {server.ready_s:.1f} s", flush=True)
        if before is not None:
            items = items + before(server.url)
        meta = httpx.get(server.url + "/metadata", timeout=30).json()
        started = time.monotonic()
        answers, stats = asyncio.run(classify_all(server.url, items, meta.get("limits") or {}))
        seconds = time.monotonic() - started
        alive = server.proc.poll() is None
        memory = server.tree.stop()
    keys = ("model_tag", "arch", "input_transform", "resize", "image_size", "in_channels", "mlflow_run_id", "num_params")
    return {"name": name, "onnx": str(onnx), "tag": tag, "metadata": {k: meta.get(k) for k in keys},
            "limits": meta.get("limits"), "server": {"env": SERVER_ENV, "ready_s": round(server.ready_s, 2),
                                                     "alive_after": alive, **memory},
            "seconds": round(seconds, 1), "images_per_s": round(len(items) / seconds, 1), "requests": stats,
            "answers": answers}, items


# --- analysis ----------------------------------------------------------------------------------------

def mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def summarize(items: list[Item], answers: list[dict]) -> dict:
    """Per part: n, correct, accuracy, refused (by 'status reason'), mean confidence right / wrong;
    blank: no_ink refusals vs answers; digit parts: accuracy per true label."""
    out = {}
    for part in REPORT_PARTS:
        rows = [(item, a) for item, a in zip(items, answers) if item.part == part]
        if not rows:
            continue
        answered = [(item, a) for item, a in rows if a["status"] == 200]
        refused = Counter(f"{a['status']} {a.get('reason')}" for _, a in rows if a["status"] != 200)
        s = {"n": len(rows), "answered": len(answered), "refused": sum(refused.values()),
             "refused_by_reason": dict(sorted(refused.items()))}
        if part == "blank":
            s.update(no_ink=refused.get("422 no_ink", 0), answers_mean_confidence=mean([a["score"] for _, a in answered]),
                     answered_labels=dict(sorted(Counter(a["label"] for _, a in answered).items())))
        else:
            right = [a["score"] for item, a in answered if a["label"] == item.label]
            wrong = [a["score"] for item, a in answered if a["label"] != item.label]
            per_label = {}
            for label in sorted({item.label for item, _ in rows}):
                of = [(item, a) for item, a in rows if item.label == label]
                per_label[label] = round(sum(a.get("label") == label for _, a in of) / len(of), 4)
            s.update(correct=len(right), accuracy=round(len(right) / len(rows), 4),
                     mean_confidence_correct=mean(right), mean_confidence_wrong=mean(wrong), accuracy_by_label=per_label)
        out[part] = s
    return out


def by_attribute(items: list[Item], answers: list[dict], part: str = "handwritten") -> dict:
    """Accuracy of `part` by the generator's notes (ink, stroke, format, mode): where the failures are."""
    groups: dict[str, list[bool]] = {}
    for item, a in zip(items, answers):
        if item.part != part:
            continue
        ok = a.get("label") == item.label
        words = item.note.split()
        keys = [w for w in words if w in ("black", "blue", "grey", "thin", "thick", "normal", "RGB", "L")]
        keys.append(item.format)
        height = next((int(w[1:]) for w in words if w.startswith("h") and w[1:].isdigit()), None)
        if height is not None:
            keys.append("digit 30-59 px" if height < 60 else "digit 60-149 px" if height < 150 else "digit 150-400 px")
        for key in keys:
            groups.setdefault(key, []).append(ok)
    return {k: {"n": len(v), "accuracy": round(sum(v) / len(v), 4)} for k, v in sorted(groups.items())}


def verdict(models: list[dict]) -> dict:
    first, last = models[0]["summary"], models[-1]["summary"]
    checks = {}
    for part, target in TARGETS.items():
        acc = last.get(part, {}).get("accuracy")
        checks[f"{models[-1]['name']} {part} >= {target:.0%}"] = {"passed": acc is not None and acc >= target,
                                                                 "measured": acc}
    acc, ref = last.get("mnist", {}).get("accuracy"), first.get("mnist", {}).get("accuracy")
    checks[f"{models[-1]['name']} mnist >= {models[0]['name']} mnist ({pct(ref, 2)})"] = {
        "passed": acc is not None and ref is not None and acc >= ref, "measured": acc}
    return {"checks": checks, "passed": all(c["passed"] for c in checks.values())}


def failures(items: list[Item], answers: list[dict]) -> list[dict]:
    """Every wrong or refused digit image and every blank answered with a digit, in corpus order."""
    out = []
    for k, (item, a) in enumerate(zip(items, answers)):
        wrong = a.get("label") != item.label if item.label is not None else a["status"] == 200
        if wrong:
            pred = a.get("label") if a["status"] == 200 else f"{a['status']}-{a.get('reason')}"
            out.append({"k": k, "part": item.part, "file": item.path.name, "label": item.label, "pred": pred,
                        "score": a.get("score"), "note": item.note})
    return out


def save_misclassified(items: list[Item], wrong: list[dict], folder: Path, keep: int = MISCLASSIFIED_KEPT) -> int:
    """Copy `keep` of the `wrong` images (see failures) to `folder`, taking the parts in turn so that
    each part's first failures are there, as NNNNN-<part>-true<L>-pred<P>.<ext>. Returns how many."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    queues = [[w for w in wrong if w["part"] == part] for part in REPORT_PARTS]
    chosen = []
    while len(chosen) < keep and any(queues):
        chosen += [q.pop(0) for q in queues if q][:keep - len(chosen)]
    for w in chosen:
        item = items[w["k"]]
        shutil.copyfile(item.path, folder / f"{w['k']:05d}-{item.part}-true{item.label or 'none'}-pred{w['pred']}"
                                            f"{item.path.suffix}")
    return len(chosen)


# --- report ------------------------------------------------------------------------------------------

def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f} %"


def num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def refused_cell(s: dict) -> str:
    if not s["refused"]:
        return "0"
    return f"{s['refused']} (" + ", ".join(f"{k}: {v}" for k, v in s["refused_by_reason"].items()) + ")"


def table(models: list[dict]) -> list[str]:
    names = [m["name"] for m in models]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]

    def row(label: str, cell) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(m) for m in models) + " |")

    row("input_transform (metadata)", lambda m: str(m["metadata"].get("input_transform")))
    for part in REPORT_PARTS:
        n = next((m["summary"][part]["n"] for m in models if part in m["summary"]), None)
        if n is None:
            continue
        if part == "blank":
            row(f"**blank** (n={n}): refused 422 no_ink", lambda m: str(m["summary"]["blank"]["no_ink"]))
            row("blank: answered with a digit", lambda m: str(m["summary"]["blank"]["answered"]))
            row("blank: other refusals", lambda m: str(m["summary"]["blank"]["refused"] - m["summary"]["blank"]["no_ink"]))
            row("blank: mean confidence of answers", lambda m: num(m["summary"]["blank"]["answers_mean_confidence"]))
            continue
        row(f"**{part}** (n={n}): accuracy", lambda m, p=part: f"**{pct(m['summary'][p]['accuracy'])}**")
        row(f"{part}: refused", lambda m, p=part: refused_cell(m["summary"][p]))
        row(f"{part}: mean confidence right / wrong", lambda m, p=part: (
            f"{num(m['summary'][p]['mean_confidence_correct'])} / {num(m['summary'][p]['mean_confidence_wrong'])}"))
    row("images/s over HTTP (all parts)", lambda m: f"{m['images_per_s']:g}")
    return lines


def markdown(result: dict) -> str:
    m, models, v = result["machine"], result["models"], result["verdict"]
    lines = [f"# Real inputs benchmark ({result['date']})", "", f"- command: `{result['command']}`",
             (f"- machine: {m['cpu_model']}, {m['cpu_count']} CPUs, {m['memory']}; load average at start "
              f"{m['loadavg_start']}"),
             "- versions: " + ", ".join(f"{k} {val}" for k, val in result["versions"].items()),
             f"- git: {result['git']['commit'][:12]}"
             + (" (uncommitted changes in service/ or bench/)" if result["git"]["dirty_files"] else ""),
             (f"- corpus: bench/real_corpus.py, {result['corpus']['per_part']} per part, seed {result['corpus']['seed']}, "
              f"{result['corpus']['sizes']['mnist']} MNIST test images, {result['corpus']['sizes']['blank']} blanks; "
              f"{result['corpus']['fonts']} fonts; folder {result['corpus']['folder']}"),
             f"- canvas: {result['corpus']['canvas']['said']}",
             (f"- each model: its own `bentoml serve` ({json.dumps(SERVER_ENV)}), `POST /classify` with up to "
              f"{BATCH_IMAGES} images per request, {CONNECTIONS} connections; a refused image counts as wrong"), ""]
    lines += [f"- {x['name']}: `{x['onnx']}` ({x['tag']}, arch {x['metadata'].get('arch')}, "
              f"input_transform {x['metadata'].get('input_transform')}); {x['seconds']} s; requests {x['requests']}"
              for x in models]
    lines += ["", "## Accuracy", "", *table(models), "", f"## {models[-1]['name']}: handwritten accuracy by attribute", "",
              "| attribute | n | accuracy |", "|---|---:|---:|"]
    lines += [f"| {k} | {a['n']} | {pct(a['accuracy'])} |" for k, a in models[-1]["handwritten_by_attribute"].items()]
    lines += ["", f"## Targets ({models[-1]['name']})", ""]
    lines += [f"- {name}: {'PASS' if c['passed'] else '**FAIL**'} ({pct(c['measured'], 2)})"
              for name, c in v["checks"].items()]
    lines += ["", f"**{'PASS' if v['passed'] else 'FAIL'}**", ""]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------------

def parse_model(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH.onnx")
    if not name.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"model name {name!r}: letters, digits, - and _ only")
    p = Path(path).expanduser()
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{p} is not a file")
    return name, p.resolve()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=parse_model, action="append", required=True, metavar="NAME=PATH.onnx",
                   help="a model to serve (repeatable, in report order; the targets are checked for the last)")
    p.add_argument("--per-part", type=int, help="images per generated part (default 500; --quick 100)")
    p.add_argument("--mnist-limit", type=int, help="MNIST test images (default 10000, all; --quick 1000)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--canvas", type=int, default=real_canvas.COUNT, metavar="N",
                   help=f"digits drawn on the /ui pad in headless Chromium (default {real_canvas.COUNT}; 0: none)")
    p.add_argument("--work", type=Path, help="work folder: corpus, server logs, misclassified images "
                                             "(default <temp>/real-inputs-<settings>)")
    p.add_argument("--out", type=Path, help="results folder (default bench/results; with --quick the temp folder)")
    p.add_argument("--suffix", default="", help="added to the result files' names")
    p.add_argument("--quick", action="store_true", help="smoke run: 100 per part, 1000 MNIST, results not in bench/results")
    args = p.parse_args(argv)
    names = [name for name, _ in args.model]
    if len(set(names)) != len(names):
        p.error(f"--model names must differ: {names}")
    args.per_part = args.per_part if args.per_part is not None else (100 if args.quick else 500)
    args.mnist_limit = args.mnist_limit if args.mnist_limit is not None else (1000 if args.quick else 10000)
    if args.per_part < 1 or args.mnist_limit < 0 or args.canvas < 0:
        p.error("--per-part must be >= 1, --mnist-limit and --canvas >= 0")
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) if args.quick else RESULTS_DIR
    if args.work is None:
        key = real_corpus.settings_key(args.per_part, args.seed, args.mnist_limit)
        args.work = Path(tempfile.gettempdir()) / f"real-inputs-{key}"
    return args


def canvas_part(args: argparse.Namespace, folder: Path) -> tuple[dict, object]:
    """The canvas part: ({"items": reused drawings or [], "said": one line, ...}, None), or, when it is
    to be drawn, a function drawing it on a server's URL (its items; [] if drawing fails)."""
    info = {"count": args.canvas, "folder": str(folder), "items": []}

    def skip(reason: str) -> tuple[dict, None]:
        info.update(skipped=reason, said=f"skipped: {reason}")
        print(f"real inputs: canvas part skipped: {reason}", flush=True)
        return info, None

    if args.canvas == 0:
        return skip("--canvas 0")
    if (done := real_canvas.cached(folder, args.canvas, args.seed)) is not None:  # playwright not needed then
        info.update(items=done, reused=True, said=f"{len(done)} digits drawn on the /ui pad earlier, reused from {folder}")
        print(f"real inputs: canvas: reusing {len(done)} drawings in {folder}", flush=True)
        return info, None
    if reason := real_canvas.unavailable():
        return skip(reason)

    def draw(url: str) -> list[Item]:
        started = time.monotonic()
        print(f"real inputs: canvas: drawing {args.canvas} digits on {url}/ui in headless Chromium", flush=True)
        try:
            drawn = real_canvas.build(folder, url, args.canvas, args.seed)
        except Exception as err:  # noqa: BLE001  the browser failing is no reason to stop the benchmark
            skip(f"drawing on the pad failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            return []
        seconds = time.monotonic() - started
        info.update(reused=False, seconds=round(seconds, 1),
                    said=f"{len(drawn)} digits drawn on the first model's /ui pad in headless Chromium "
                         f"({seconds:.1f} s), kept in {folder}")
        return drawn

    info["said"] = "to be drawn on the first model's server"
    return info, draw


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import httpx

    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": harness.command_line(),
              "machine": harness.machine(), "versions": {**versions(), "httpx": httpx.__version__},
              "git": harness.git_state()}
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        items = real_corpus.build_corpus(args.work / "corpus", per_part=args.per_part, seed=args.seed,
                                         mnist_limit=args.mnist_limit)
    except harness.MissingData as err:
        raise SystemExit(f"real inputs bench: {err}") from None
    sheet = real_corpus.contact_sheet(items, args.work / "corpus" / "contact_sheet.png")
    sizes = dict(Counter(item.part for item in items))
    result["corpus"] = {"folder": str(args.work / "corpus"), "per_part": args.per_part, "seed": args.seed,
                        "mnist_limit": args.mnist_limit, "sizes": sizes, "fonts": len(real_corpus.font_files()),
                        "contact_sheet": str(sheet)}
    print(f"real inputs: corpus {sizes} in {args.work / 'corpus'}; contact sheet {sheet}", flush=True)
    canvas, draw = canvas_part(args, args.work / "corpus" / real_canvas.PART)
    result["corpus"]["canvas"] = canvas
    items += canvas.pop("items")
    models = []
    for k, (name, onnx) in enumerate(args.model):
        raw, items = serve_and_classify(name, onnx, items, args.work, before=draw if k == 0 else None)
        raw["summary"] = summarize(items, raw["answers"])
        raw["handwritten_by_attribute"] = by_attribute(items, raw["answers"])
        models.append(raw)
    result["corpus"]["sizes"] = dict(Counter(item.part for item in items))
    if result["corpus"]["sizes"].get(real_canvas.PART):  # the sheet again, with the pad's drawings
        real_corpus.contact_sheet(items, sheet, per_part={**real_corpus.SHEET_SAMPLES, real_canvas.PART: 8})
    last = models[-1]
    missed = args.work / f"misclassified-{last['name']}"
    wrong = failures(items, last["answers"])
    kept = save_misclassified(items, wrong, missed)
    result["misclassified"] = {"model": last["name"], "folder": str(missed), "kept": kept, "all": wrong}
    result["models"] = [{k: v for k, v in m.items() if k != "answers"} for m in models]
    result["verdict"] = verdict(models)
    stem = args.out / f"real_inputs-{dt.date.today().isoformat()}{'-' + args.suffix if args.suffix else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print("\n" + markdown(result))
    for name, c in result["verdict"]["checks"].items():
        print(f"{'PASS' if c['passed'] else 'FAIL'}: {name} (measured {pct(c['measured'], 2)})")
    print(f"real inputs: {kept} misclassified images of {last['name']} in {missed}")
    print(f"real inputs: contact sheet {sheet}")
    print(f"real inputs: wrote {stem}.json and .md")
    return 0 if result["verdict"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
