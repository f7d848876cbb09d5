"""service.spread: a large model call cut into chunks over the idle cores, on one ONNX Runtime session.

The policy (chunk_count) and the shared busy board are tested directly; the Spreader on a real ONNX
Runtime session (the chunks' answers are the whole call's, bit for bit); and a real two-worker
``bentoml serve``: a lone request's call runs on both cores (``classifier_call_cores`` on /metrics)
and answers exactly what the same server answers with splitting off.
"""
from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

from service.engine import OnnxClassifier
from service.spread import BOARD_SLOTS, BusyBoard, Spreader, chunk_count
from service.cpus import usable_cpus
from svc_images import encode
from svc_support import serve, store_test_model


# --- the policy -------------------------------------------------------------------------------------

@pytest.mark.parametrize("images, idle, per_image, min_chunk, expected", [
    (64, 2, 0.006, 0.002, 2),     # ResNet-18-like: both cores
    (2, 2, 0.006, 0.002, 2),      # even two images are worth it
    (64, 16, 0.006, 0.002, 16),   # as many chunks as idle cores
    (5, 16, 0.006, 0.002, 5),     # never more chunks than images
    (64, 2, 0.00001, 0.002, 1),   # a tiny model: 64 images are 0.6 ms, not worth a thread
    (400, 2, 0.00001, 0.002, 2),  # ... unless the call is long enough
    (300, 4, 0.00001, 0.002, 1),  # 3 ms in all: only one 2 ms chunk fits
    (64, 1, 0.006, 0.002, 1),     # no idle core besides this one
    (64, 0, 0.006, 0.002, 1),     # the other workers hold every core
    (1, 2, 0.006, 0.002, 1),      # one image cannot be cut
    (64, 2, None, 0.002, 1),      # not timed yet: run whole
    (64, 2, 0.006, 0.0, 1),       # CLASSIFIER_SPLIT_MIN_MS=0: never split
])
def test_chunk_count(images, idle, per_image, min_chunk, expected):
    assert chunk_count(images, idle, per_image, min_chunk) == expected


# --- the busy board ---------------------------------------------------------------------------------

def test_board_workers_see_each_others_calls(tmp_path):
    path = tmp_path / "busy"
    one, two = BusyBoard(path, 1), BusyBoard(path, 2)
    assert one.others() == two.others() == 0
    one.hold(2)
    assert two.others() == 2 and one.others() == 0  # a worker does not count its own call
    two.hold(1)
    assert one.others() == 1 and two.others() == 2
    one.hold(1)  # a second call in the same worker (a model swap): the counts add up
    assert two.others() == 3
    one.hold(-2)
    assert two.others() == 1
    one.hold(-1)
    assert two.others() == 0
    one.remove()
    assert not path.exists()


def test_a_restarted_worker_clears_what_its_predecessor_held(tmp_path):
    path = tmp_path / "busy"
    BusyBoard(path, 1).hold(3)  # killed mid-call: its byte stays set
    other = BusyBoard(path, 2)
    assert other.others() == 3
    BusyBoard(path, 1)  # the replacement, same index
    assert other.others() == 0


def test_board_refuses_an_index_it_has_no_room_for(tmp_path):
    with pytest.raises(ValueError, match="worker index"):
        BusyBoard(tmp_path / "busy", BOARD_SLOTS)
    assert BusyBoard.for_service("x", None) is None  # not a numbered worker: no board


# --- the Spreader on a real session -----------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_onnx_model):
    return OnnxClassifier(tiny_onnx_model, providers="cpu", intra_op_threads=1)


def test_chunks_answer_exactly_what_the_whole_call_answers(engine):
    calls = []
    spreader = Spreader(engine, cpus=4, seconds_per_image=0.01, min_chunk_s=0.002, on_call=calls.append)
    batch = np.random.default_rng(0).normal(size=(37, *engine.spec.input_shape)).astype(np.float32)
    assert np.array_equal(spreader.logits(batch), engine.logits(batch))
    assert calls == [4]
    spreader.close()


class Recorder:
    """An engine that records which threads ran its chunks (the attributes a CPU session has)."""

    intra_op_threads = 1
    active_providers = ["CPUExecutionProvider"]

    def __init__(self):
        self.threads, self.sizes = set(), []

    def logits(self, batch):
        self.threads.add(threading.get_ident())
        self.sizes.append(len(batch))
        time.sleep(0.002 * len(batch))  # 2 ms per image
        return np.asarray(batch).reshape(len(batch), -1)[:, :3]


def test_calls_split_only_onto_cores_no_other_worker_holds(tmp_path):
    path = tmp_path / "busy"
    mine, other = BusyBoard(path, 1), BusyBoard(path, 2)
    engine = Recorder()
    spreader = Spreader(engine, cpus=2, board=mine, seconds_per_image=0.002, min_chunk_s=0.002)
    batch = np.arange(8 * 3, dtype=np.float32).reshape(8, 3, 1, 1)
    assert np.array_equal(spreader.logits(batch), batch.reshape(8, 3))
    assert sorted(engine.sizes) == [4, 4] and len(engine.threads) == 2
    engine.sizes.clear()
    other.hold(1)  # the other worker's call holds one of the two cores
    spreader.logits(batch)
    assert engine.sizes == [8]
    assert other.others() == 0  # this worker's byte is back to 0 once its call ended


def test_sessions_that_must_not_be_split_run_whole():
    gpu, threaded, fake = Recorder(), Recorder(), Recorder()
    gpu.active_providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    threaded.intra_op_threads = 2
    del_attrs = type("Bare", (), {"logits": fake.logits})()  # a test double without a session's attributes
    for engine in (gpu, threaded, del_attrs):
        assert not Spreader(engine, cpus=8, seconds_per_image=0.01).splits
    assert not Spreader(fake, cpus=1, seconds_per_image=0.01).splits  # one CPU
    assert not Spreader(fake, cpus=8, seconds_per_image=0.01, min_chunk_s=0).splits  # switched off


# --- a real two-worker server -----------------------------------------------------------------------

def _call_cores(metrics: str) -> dict[str, float]:
    """classifier_call_cores bucket -> count, summed over the workers."""
    out: dict[str, float] = {}
    for le, value in re.findall(r'classifier_call_cores_bucket\{[^}]*le="([^"]+)"[^}]*\} ([0-9.e+]+)', metrics):
        out[le] = out.get(le, 0.0) + float(value)
    return out


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(usable_cpus() < 2, reason="needs two usable CPUs")
def test_a_lone_request_runs_on_both_cores_with_the_same_answers(tiny_onnx_model, mnist, tmp_path):
    httpx = pytest.importorskip("httpx")
    tag = store_test_model(tiny_onnx_model, tmp_path / "bentoml")
    from PIL import Image

    files = [("images", (f"{i}.png", encode(Image.fromarray(mnist.test_images[i]), "PNG"), "image/png"))
             for i in range(32)]  # SERVER_ENV's CLASSIFIER_MAX_IMAGES and _MAX_BATCH_SIZE
    answers = {}
    # the tiny model is ~10 us per image: a 1 us chunk makes its 32-image call worth splitting here
    for split_ms in ("0.001", "0"):
        env = {"CLASSIFIER_WORKERS": "2", "CLASSIFIER_SPLIT_MIN_MS": split_ms}
        with serve(tmp_path / "bentoml", tmp_path / f"serve-{split_ms}.log", tag, env=env) as srv:
            for _ in range(3):  # the first call is timed by the warm-up already; all three are lone
                r = httpx.post(f"{srv.url}/classify", files=files, timeout=30)
                assert r.status_code == 200, r.text
            answers[split_ms] = r.json()
            cores = _call_cores(httpx.get(f"{srv.url}/metrics", timeout=10).text)
            boards = list((tmp_path / "bentoml").rglob("imgcls-*.busy"))
            assert len(boards) == 1, boards  # both workers on one board, in the home's metrics folder
        if split_ms == "0":
            assert cores.get("1.0") == cores.get("+Inf") >= 3, cores  # every call whole
        else:
            assert cores.get("+Inf", 0) - cores.get("1.0", 0) >= 3, cores  # every lone call on 2 cores
    assert answers["0.001"] == answers["0"]


class Failing(Recorder):
    """Its first chunk raises after the others started; they must end before the cores are given back."""

    def __init__(self):
        super().__init__()
        self.finished = []

    def logits(self, batch):
        if batch[0, 0, 0, 0] == 0:
            raise RuntimeError("model bug")
        time.sleep(0.05)
        self.finished.append(len(batch))
        return np.asarray(batch).reshape(len(batch), -1)[:, :3]


def test_a_failing_chunk_fails_the_call_only_after_every_chunk_ended(tmp_path):
    mine, other = BusyBoard(tmp_path / "busy", 1), BusyBoard(tmp_path / "busy", 2)
    engine = Failing()
    spreader = Spreader(engine, cpus=4, board=mine, seconds_per_image=0.01, min_chunk_s=0.002)
    with pytest.raises(RuntimeError, match="model bug"):
        spreader.logits(np.arange(8 * 3, dtype=np.float32).reshape(8, 3, 1, 1))
    assert engine.finished == [2, 2, 2] and other.others() == 0


def test_the_overload_guess_counts_a_split_call_as_the_core_seconds_it_took():
    import asyncio

    from service.batcher import MicroBatcher

    def infer(batch):
        time.sleep(0.02)
        return batch

    async def one_call(cores):
        batcher = MicroBatcher(infer, 8, 1000, call_cores=lambda: cores)
        await batcher.submit(np.zeros((4, 1), np.float32))
        batcher.close()
        return batcher.predicted_wait_ms(4)

    whole, split = asyncio.run(one_call(1)), asyncio.run(one_call(2))
    assert split == pytest.approx(2 * whole, rel=0.3)  # under load the call runs whole again


def test_non_finite_scores_are_an_error_not_null():
    from service.postprocessing import predictions

    with pytest.raises(ValueError, match="non-finite"):
        predictions(np.array([[0.0, np.nan, 1.0]], np.float32), ["a", "b", "c"], 2)
