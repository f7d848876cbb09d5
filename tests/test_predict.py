"""`pipeline.predict`'s pieces without a model: what a folder, a glob and links expand to, when a folder is
an ImageFolder, the decode processes (order, bad files, a file gone mid-run, a worker killed), and file
names that are not UTF-8. The end-to-end runs are in tests/test_cli.py and tests/service/test_service_predict.py."""
from __future__ import annotations

import csv
import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline import predict
from service.contract import PreprocessSpec

SPEC = PreprocessSpec(channels=1, image_size=28, mean=(0.5,), std=(0.25,), resize="bilinear",
                      classes=tuple("0123456789"), input_transform="resize")


def png(path, value: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (28, 28), value).save(path)
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


def _prepared(files, workers):
    with predict.Decoder(SPEC, workers, len(files)) as decode:
        return list(decode(files))


def test_decode_processes_give_the_in_process_answers_in_order(folder, monkeypatch):
    monkeypatch.setattr(predict, "POOL_MIN_FILES", 1)
    monkeypatch.setattr(predict, "CHUNK", 2)
    (folder / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    files = predict.collect_inputs([str(folder)]) + [str(folder / "gone.png")]  # listed, then gone
    alone, pooled = _prepared(files, 0), _prepared(files, 2)
    assert len(pooled) == len(files)
    for a, b in zip(alone, pooled):
        assert (isinstance(a, tuple) and a == b) or np.array_equal(a, b)
    reasons = {os.path.basename(f): item[0] for f, item in zip(files, pooled) if isinstance(item, tuple)}
    assert reasons == {"broken.png": "not_an_image", "gone.png": "unreadable"}


def _die(paths, spec=None):
    os._exit(9)


def test_a_killed_decode_worker_stops_the_run_with_a_message_not_a_hang(folder, monkeypatch):
    monkeypatch.setattr(predict, "POOL_MIN_FILES", 1)
    monkeypatch.setattr(predict, "_prepare_files", _die)  # the forked workers run it too
    with pytest.raises(predict.DecodeWorkerDied, match="decode worker process died"):
        _prepared(predict.collect_inputs([str(folder)]), 2)


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
