"""The harness shared by the tests and the benchmarks (``import tests.harness`` from the repo root).

- data: ``mirror_path()`` (THE reader of DATA_MIRROR for tests and benches), ``mnist_dir()``,
  ``read_idx`` / ``load_mnist`` (the MNIST IDX files as numpy arrays);
- servers: ``free_port()``, ``start`` (a command in a process group of its own, output to a log),
  ``running`` (start, wait until a path answers 200, stop the whole group on exit), ``stop``,
  ``bentoml_command`` / ``bentoml_env`` (``bentoml serve`` of this checkout on a BentoML home);
- models: ``run_in_bento_home``, ``store_in_bento_home`` (an ONNX file in a BentoML home, the
  serving alias pointing at it), ``build_tiny_onnx_model`` (a small real MNIST classifier exported by
  ``pipeline.export.export_onnx``) and ``export_with_contract``;
- records: ``machine()``, ``versions(dists)``, ``command_line()``, ``git_state()``.
- Chromium: ``chromium_path()``, ``CHROMIUM_ARGS`` (+ ``CHROMIUM_FAST_INPUT_ARGS``),
  ``chromium_unavailable()`` (the skip's reason, or None), ``launch_chromium``.

Standard library and numpy at import time; everything else (httpx, torch, onnx) is imported where
it is used, so a bench that never starts a server or fits a model does not need them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
TEST_RUN_ID = "test-run-0000"  # the MLflow run id the tests' models name
SERVICE_TARGET = "service.service:Classifier"


# --- data --------------------------------------------------------------------------------------------

class MissingData(FileNotFoundError):
    """The offline data is not where the harness looks (the tests skip, the benches exit)."""


def mirror_path() -> Path:
    """The offline data folder: $DATA_MIRROR when set (read by the pipeline's own ``data_mirror``,
    the one reader of the variable), else ../shared/data beside the checkout."""
    from pipeline.paths import data_mirror

    mirror = data_mirror()
    return mirror.resolve() if mirror is not None else (REPO.parent / "shared" / "data").resolve()


def mnist_dir() -> Path:
    """The MNIST IDX files: $MNIST_DIR when set, else <mirror_path()>/mnist."""
    value = os.environ.get("MNIST_DIR", "").strip()
    return Path(value).expanduser() if value else mirror_path() / "mnist"


def read_idx(path: Path, header: int) -> np.ndarray:
    """A gzipped IDX file's bytes after its `header` (16 for images, 8 for labels), read-only uint8."""
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


@dataclass(frozen=True)
class Mnist:
    train_images: np.ndarray  # uint8 [N, 28, 28]
    train_labels: np.ndarray  # int64 [N]
    test_images: np.ndarray
    test_labels: np.ndarray


def load_mnist(directory: Path | None = None) -> Mnist:
    """The four MNIST IDX files of `directory` (default ``mnist_dir()``); MissingData when one is absent."""
    directory = mnist_dir() if directory is None else Path(directory)
    missing = [name for name in MNIST_FILES.values() if not (directory / name).is_file()]
    if missing:
        raise MissingData(f"MNIST IDX files {missing} not found in {directory} "
                          "(set DATA_MIRROR to a folder laid out like ../shared/data, or MNIST_DIR)")
    out = {}
    for key, name in MNIST_FILES.items():
        if key.endswith("images"):
            out[key] = read_idx(directory / name, 16).reshape(-1, 28, 28)
        else:
            out[key] = read_idx(directory / name, 8).astype(np.int64)
    return Mnist(**out)


def mnist_image_folder(mnist: Mnist, root: Path, per_class: int) -> Path:
    """The first ``per_class`` MNIST test digits of each class as 28x28 PNGs in class folders
    (``root/<label>/<index>.png``: an ImageFolder), for the batch-prediction tests."""
    from PIL import Image

    counts: dict[int, int] = {}
    for index, (image, label) in enumerate(zip(mnist.test_images, mnist.test_labels)):
        label = int(label)
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            (root / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / str(label) / f"{index:05d}.png")
    return root


# --- servers -----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A server process started by `running`; callers may add attributes of their own."""

    url: str
    proc: subprocess.Popen
    log_path: Path
    command: list[str]
    env: dict  # what the caller added to os.environ
    ready_s: float = 0.0  # seconds from start to the first 200 of the ready path
    tag: str = ""  # the model tag it serves, where the caller knows it

    @property
    def startup_s(self) -> float:
        return self.ready_s

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start(cmd: list[str], env: dict, log_path: Path, cwd: Path = REPO) -> subprocess.Popen:
    """`cmd` with os.environ + PYTHONPATH=REPO + `env`, in a new session (its own process group),
    stdout and stderr to `log_path`. Stop it with `stop`."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    with log_path.open("wb") as log:
        return subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process started by `start`: SIGTERM to its process group (nothing else), SIGKILL after
    `timeout` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, started: float, timeout: float = 120,
               poll_s: float = 0.2) -> float:
    """Poll `url` until it answers 200; seconds since `started` (time.monotonic()). RuntimeError,
    ending with the log's tail, when the process exits or `timeout` passes first."""
    import httpx

    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-5000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"server not ready after {timeout} s:\n{log_path.read_text(errors='replace')[-5000:]}")
        time.sleep(poll_s)


@contextlib.contextmanager
def running(cmd: list[str], port: int, env: dict, log_path: Path, ready_path: str = "/readyz",
            timeout: float = 120, poll_s: float = 0.2, stop_timeout: float = 20,
            server_type: type[Server] = Server) -> Iterator[Server]:
    """Start `cmd` (listening on `port`, see `start`), wait until `ready_path` answers 200, yield a
    `server_type` and stop the process group when the block exits (or readiness fails)."""
    url = f"http://127.0.0.1:{port}"
    for attempt in range(START_ATTEMPTS):
        started = time.monotonic()
        proc = start(cmd, env, log_path)
        try:
            ready_s = wait_ready(url + ready_path, proc, log_path, started, timeout, poll_s)
            break
        except RuntimeError:
            stop(proc, stop_timeout)
            if attempt + 1 == START_ATTEMPTS or PORT_TAKEN not in log_path.read_text(errors="replace"):
                raise
    try:
        yield server_type(url=url, proc=proc, log_path=log_path, command=cmd, env=env, ready_s=ready_s)
    finally:
        stop(proc, stop_timeout)


#: `bentoml serve` picks its process manager's (circus) control port as a free port and binds it later:
#: another process can take it in between, and the server exits with this in its log (seen once in a
#: full run, 2026-12-02); such a start is retried, any other failure is the test's
PORT_TAKEN = "Address already in use"
START_ATTEMPTS = 3


def bentoml_command(port: int, target: str = SERVICE_TARGET, working_dir: Path = REPO) -> list[str]:
    """`bentoml serve <target>` (the source tree's service, or a built Bento's tag) on 127.0.0.1:port."""
    return [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port),
            "--working-dir", str(working_dir)]


def bentoml_env(home: Path) -> dict[str, str]:
    """What a BentoML process of the harness runs with: its home, no tracking, this checkout importable."""
    return {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "PYTHONPATH": str(REPO)}


# --- models in a BentoML home -----------------------------------------------------------------------

def run_in_bento_home(home: Path, code: str, timeout: float = 180) -> str:
    """Run python ``code`` with BENTOML_HOME=home in a subprocess (this process' BentoML configuration
    stays untouched); its stdout. RuntimeError with its output when it fails."""
    env = {**os.environ, **bentoml_env(home)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def store_in_bento_home(onnx_path: Path, home: Path, alias: str = "champion", version: str | None = None,
                        run_id: str | None = None) -> str:
    """``onnx_path`` as ``image-classifier`` in `home`'s store (``pipeline.bento_store.store_serving``:
    registry version `version`, MLflow run `run_id`) with `alias` pointing at it, as the package stage
    leaves a store; its tag."""
    code = ("from pipeline.bento_store import store_serving\n"
            f"print(store_serving({str(onnx_path)!r}, alias={alias!r}, registry_version={version!r}, "
            f"mlflow_run_id={run_id!r}))")
    try:
        out = run_in_bento_home(home, code)
    except RuntimeError as err:
        raise RuntimeError(f"storing {onnx_path} in {home} failed: {err}") from None
    return out.strip().splitlines()[-1]


def contract_meta(arch: str, num_params: int, input_transform: str | None = None) -> dict:
    """The model file metadata (pipeline.modelfile's keys) of a 1x28x28 -> 10-class MNIST model of the
    tests' run; pipeline.export.export_onnx writes the ONNX contract (docs/model-contract.md) from it.
    ``input_transform`` None: a model file from before the key (the ONNX file says ``resize``)."""
    meta = {"classes": [str(i) for i in range(10)], "in_channels": 1, "image_size": 28, "mean": [MNIST_MEAN],
            "std": [MNIST_STD], "arch": arch, "dataset": "mnist", "mlflow_run_id": TEST_RUN_ID,
            "num_params": num_params}
    return meta if input_transform is None else {**meta, "input_transform": input_transform}


def export_with_contract(model, path: Path, arch: str, opset: int = 17, input_transform: str | None = None) -> Path:
    """Export a 1x28x28 -> 10-class torch model to `path` with the export stage's own function."""
    from pipeline.export import export_onnx

    meta = contract_meta(arch, sum(p.numel() for p in model.parameters()), input_transform)
    path.write_bytes(export_onnx(model, meta, opset=opset).SerializeToString())
    return path


def build_tiny_onnx_model(mnist: Mnist, path: Path, *, n_train: int = 6000, seed: int = 0,
                          input_transform: str | None = None) -> Path:
    """Fit a tiny CNN on `n_train` MNIST images (two passes, ~4 s on 2 CPU cores, >90 % accurate) and
    export it per docs/model-contract.md. ``input_transform="digit"``: trained on the digits as the
    download stage prepares them (service.preprocessing.transform_array), and declared so."""
    import torch

    torch.manual_seed(seed)
    # one thread: on a small shared machine OpenMP threads contending with another job (e.g. a
    # training run) slow this down ten-fold; restored below
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if input_transform is not None:
            from service.preprocessing import transform_array

            images = transform_array(mnist.train_images[:n_train, None], 28, transform=input_transform)[:, 0]
            mnist = dataclasses.replace(mnist, train_images=images)
        return export_with_contract(_fit_tiny_cnn(torch, mnist, n_train), path, "tinycnn",
                                    input_transform=input_transform)
    finally:
        torch.set_num_threads(threads)


def _fit_tiny_cnn(torch, mnist: Mnist, n_train: int):
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )
    from service.contract import normalize

    x = torch.from_numpy(normalize(mnist.train_images[:n_train, None], [MNIST_MEAN], [MNIST_STD]))
    y = torch.from_numpy(mnist.train_labels[:n_train].copy())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(2):
        perm = torch.randperm(n_train)
        for i in range(0, n_train, 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


# --- records: machine, versions, command line, git ---------------------------------------------------

def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """The CPUs this process may use (service.cpus: affinity and cgroup quota)."""
    from service.cpus import usable_cpus

    return usable_cpus()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine() -> dict:
    """The machine a result was measured on; other work on it skews every figure: check the load."""
    mem = ""
    with contextlib.suppress(OSError, IndexError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "usable_cores": usable_cores(), "memory": mem,
            "platform": platform.platform(), "loadavg_start": load_average()}


def versions(dists: Iterable[str]) -> dict[str, str]:
    """Python's version and those of the installed distributions among `dists`."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in dists:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def command_line() -> str:
    """This process' command line, the interpreter relative to the checkout where it lies inside."""
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(REPO)
    return shlex.join([str(exe), *sys.argv])


def git_state(paths: Iterable[str] = ("service", "bench", ":!bench/results")) -> dict:
    """HEAD's commit and the files under `paths` with uncommitted changes ('' where git is absent)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "dirty_files": git("status", "--porcelain", "--", *paths).splitlines()}



# --- Chromium: where it is and how we launch it (the browser tests, bench/real_canvas.py) ----------

# Playwright drives Debian's Chromium (``executable_path``), so ``playwright install`` is never needed
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    # the machines are offline: no traffic but the page's own (and no waiting on it)
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# each mouse event waits for a frame: at 60 Hz a digit's ~30 moves take 0.5 s, unthrottled ~0.15 s
CHROMIUM_FAST_INPUT_ARGS = ["--disable-frame-rate-limit", "--disable-gpu-vsync"]


def chromium_path() -> Path:
    """Debian's ``/usr/bin/chromium``, or ``$CHROMIUM``; read at each call, as tests point it elsewhere."""
    return Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))


def chromium_unavailable() -> str | None:
    """Why a browser cannot be driven here (no playwright, no Chromium), or None: the skip's reason."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; no `playwright install` needed)"
    path = chromium_path()
    if not (path.is_file() and os.access(path, os.X_OK)):
        return f"Chromium not found at {path} (apt-get install -y chromium, or set CHROMIUM)"
    return None


def launch_chromium(playwright, *, fast_input: bool = False):
    """Headless Chromium from a ``sync_playwright()`` handle; `fast_input`: mouse events unthrottled
    (CHROMIUM_FAST_INPUT_ARGS), for drawing many digits."""
    args = CHROMIUM_ARGS + (CHROMIUM_FAST_INPUT_ARGS if fast_input else [])
    return playwright.chromium.launch(executable_path=str(chromium_path()), headless=True, args=args,
                                      timeout=60_000)


@dataclass
class OfflinePage:
    """A Playwright page that may talk to one origin only (the service's page fetches nothing else):
    other requests are aborted and listed in ``foreign``; console errors and page errors in ``problems``."""

    page: Any
    foreign: list[str]
    problems: list[str]


def offline_page(context, origin_url: str, timeout_ms: int = 30_000) -> OfflinePage:
    """A new page of `context` confined to `origin_url`'s scheme://host:port (and blob:/data: URLs)."""
    from urllib.parse import urlsplit

    origin = "{0.scheme}://{0.netloc}".format(urlsplit(origin_url))
    page = context.new_page()
    page.set_default_timeout(timeout_ms)
    out = OfflinePage(page, [], [])

    def gate(route) -> None:
        url = route.request.url
        if url.startswith((origin, "blob:", "data:")):
            route.continue_()
        else:
            out.foreign.append(url)
            route.abort()

    page.route("**/*", gate)
    page.on("console", lambda msg: out.problems.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda err: out.problems.append(f"page error: {err}"))
    return out
