"""`pipeline.predict`'s pieces without a model: what a folder, a glob and links expand to, when a folder is
an ImageFolder, the worker processes (order, bad files, a file gone mid-run, a bad provider, a worker killed), and file
names that are not UTF-8. The end-to-end runs are in tests/test_cli.py and tests/service/test_service_predict.py."""
from __future__ import annotations

import csv
import io
import os
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pipeline import predict
from service.contract import PreprocessSpec

SPEC = PreprocessSpec(channels=1, image_size=28, mean=(0.5,), std=(0.25,), resize="bilinear",
                      classes=tuple("0123456789"), input_transform="resize")


def png(path, value: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.effect_noise((28, 28), 40 + value).save(path)  # each image its own answer
    return str(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    for label in ("0", "1"):
        for i in range(3):
            png(root / label / f"{i}.png", 40 * i + int(label))
    (root / "1" / "notes.txt").write_text("skipped: not an image name")
    (root / ".cache").mkdir()
    png(root / ".cache" / "hidden.png", 9)
    return root


def test_folders_globs_links_and_duplicates_expand_to_each_image_once(folder, tmp_path):
    files = predict.collect_inputs([str(folder)])
    assert [os.path.relpath(f, folder) for f in files] == [f"{c}/{i}.png" for c in "01" for i in range(3)]
    assert predict.collect_inputs([str(folder / "*")]) == files  # a glob that matches folders searches them
    assert predict.collect_inputs([str(folder), str(folder / "0" / "1.png")]) == files  # each file once
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "0").symlink_to(folder / "0", target_is_directory=True)
    (linked / "loop").symlink_to(linked, target_is_directory=True)  # a loop is walked once
    assert sorted(os.path.relpath(f, linked) for f in predict.collect_inputs([str(linked)])) == [f"0/{i}.png" for i in range(3)]
    (tmp_path / "empty").mkdir()
    for bad, said in (([str(tmp_path / "nope")], "no such file"), ([str(folder / "*.jpg")], "matches no image file"),
                      ([str(tmp_path / "empty")], "no image files")):
        with pytest.raises(predict.PredictError, match=said):
            predict.collect_inputs(bad)


def test_an_image_folder_is_one_folder_whose_every_file_sits_in_a_class_subfolder(folder):
    files = predict.collect_inputs([str(folder)])
    assert predict.folder_labels([str(folder)], files, SPEC.classes) == ["0"] * 3 + ["1"] * 3
    assert predict.folder_labels([str(folder)], files, ("0", "2")) is None  # "1" is not a class
    assert predict.folder_labels([str(folder / "0")], predict.collect_inputs([str(folder / "0")]), SPEC.classes) is None
    assert predict.folder_labels([str(folder), str(folder)], files, SPEC.classes) is None


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An untrained 1x28x28 -> 10 `cnn`, exported with the contract (answers differ per image all the same)."""
    import torch

    from models.registry import create_model
    from tests import harness

    torch.manual_seed(0)
    net = create_model("cnn", 1, 10, 28).eval()
    return harness.export_with_contract(net, tmp_path_factory.mktemp("model") / "model.onnx", "cnn",
                                        input_transform="resize")


def _answers(model, files, workers, providers="cpu", top_k=3):
    with predict.Runner(model, predict.model_spec(model), workers=workers, providers=providers, batch_size=4,
                        files=len(files)) as runner:
        return list(runner(files, top_k)), runner


def _same(a, b):
    if isinstance(a, tuple):
        return a == b
    return a["label"] == b["label"] and [t["index"] for t in a["top_k"]] == [t["index"] for t in b["top_k"]] and \
        np.allclose([t["score"] for t in a["top_k"]], [t["score"] for t in b["top_k"]], atol=1e-5)


def test_worker_processes_give_the_in_process_answers_in_order(folder, model, monkeypatch):
    monkeypatch.setattr(predict, "POOL_MIN_FILES", 1)
    monkeypatch.setattr(predict, "MIN_TASK_FILES", 3)  # tasks of 6, 4, 3 ... files, run 4 at a time
    for i in range(3, 20):  # enough files for chunks of several (order within a chunk is checked too)
        png(folder / "1" / f"{i}.png", 4 * i)
    (folder / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    files = predict.collect_inputs([str(folder)]) + [str(folder / "gone.png")]  # listed, then gone
    alone, runner = _answers(model, files, 0)
    assert runner.pool is None and runner.threads >= 1
    # CPU: each worker decodes and classifies; "cuda" (here it falls back to CPU): workers only decode
    for providers, sessions in (("cpu", True), ("cuda", False)):
        pooled, runner = _answers(model, files, 2, providers)
        assert runner.pooled_sessions is sessions and (runner.predictor is None) is sessions
        assert len(pooled) == len(files) and all(_same(a, b) for a, b in zip(alone, pooled)), providers
    assert [len(c) for c in runner._chunks(files)] == [6, 4, 3, 3, 3, 3, 3]  # 25 files: tasks shrink to the end
    reasons = {os.path.basename(f): item[0] for f, item in zip(files, pooled) if isinstance(item, tuple)}
    assert reasons == {"broken.png": "not_an_image", "gone.png": "unreadable"}
    assert len({a["top_k"][0]["score"] for a in alone if isinstance(a, dict)}) > 1  # not one answer repeated


def test_providers_that_cannot_start_are_an_error_naming_them(folder, model, monkeypatch):
    from service.engine import cuda_driver_present

    monkeypatch.setattr(predict, "POOL_MIN_FILES", 1)
    files = predict.collect_inputs([str(folder)])
    for setting in ("bogus", "cuda-only")[:1 if cuda_driver_present() else 2]:  # strict CUDA starts on a GPU machine
        with pytest.raises(predict.ProviderError, match=setting):
            _answers(model, files, 2, setting)


def test_a_model_the_workers_cannot_load_is_an_error_naming_it_before_any_work(folder, model, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(predict, "POOL_MIN_FILES", 1)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(model.read_bytes()[:500])  # the contract's metadata may be read, the graph is cut
    with pytest.raises(predict.PredictError, match="broken.onnx.*cannot load it in a worker"):
        predict.Runner(broken, predict.model_spec(model), workers=2, providers="cpu", files=8).__enter__()
    assert "Traceback" not in capfd.readouterr().err  # one message, not a traceback per worker


def test_the_layout_follows_memory_and_an_early_exit_ends_the_workers(folder, model, monkeypatch):
    monkeypatch.setattr(predict, "POOL_MIN_FILES", 1)
    files = predict.collect_inputs([str(folder)])
    monkeypatch.setattr(predict, "available_memory", lambda: 1000 * model.stat().st_size)
    assert predict.Runner(model, predict.model_spec(model), workers=2, providers="cpu", files=8).pooled_sessions
    monkeypatch.setattr(predict, "available_memory", lambda: 10 * model.stat().st_size)  # 2 sessions need ~8x
    assert not predict.Runner(model, predict.model_spec(model), workers=2, providers="cpu", files=8).pooled_sessions
    monkeypatch.setattr(predict, "available_memory", lambda: None)
    monkeypatch.setattr(predict, "_prepare_files", _slow)  # the forked workers run it too
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with predict.Runner(model, predict.model_spec(model), workers=2, providers="cpu", files=len(files)) as runner:
            processes = list(runner.pool._processes.values())
            tasks = [runner.pool.submit(predict._work, files) for _ in range(4)]  # 60 s each
            while sum(t.running() for t in tasks) < 2 and time.monotonic() - started < 10:
                time.sleep(0.05)  # handed to the workers (running), not only queued here
            raise KeyboardInterrupt
    assert time.monotonic() - started < 20  # the workers were ended, not waited for
    assert runner.pool is None and not any(p.is_alive() for p in processes)


def _slow(paths, spec):
    time.sleep(60)
    return []


def _die(paths, spec):
    os._exit(9)


def test_a_killed_worker_stops_the_run_with_a_message_not_a_hang(folder, model, monkeypatch):
    monkeypatch.setattr(predict, "POOL_MIN_FILES", 1)
    monkeypatch.setattr(predict, "_prepare_files", _die)  # the forked workers run it too
    with pytest.raises(predict.WorkerDied, match="worker process died"):
        _answers(model, predict.collect_inputs([str(folder)]), 2)


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
def test_a_file_name_that_is_not_utf8_is_written_with_escapes(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")
    png(tmp_path / name, 100)
    outcome = predict.Outcome(predict._shown(str(tmp_path / name)), reason="no_ink", error="blank")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, predict.CSV_FIELDS)
    writer.writerow(predict.csv_row(outcome))
    assert "caf\\xe9.png" in buffer.getvalue()
    buffer.getvalue().encode("utf-8")  # no lone surrogate left
