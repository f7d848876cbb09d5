"""bench/seeds.py: the rows are the zoo's tutorial nets, the verdict is strict, and a quick run writes
its results (real MNIST from the data mirror, both recipes, a small subset)."""
from __future__ import annotations

import json

import pytest

from bench import seeds
from models import list_models


def test_every_row_is_a_registered_model_with_the_issues_figure():
    assert {r.model for r in seeds.ROWS} <= set(list_models()) and len(seeds.ROWS) == 9
    rows = {r.model: r for r in seeds.ROWS}
    assert (rows["cnn"].lr, rows["cnn"].momentum, rows["cnn"].batch_size, rows["cnn"].epochs) == (0.01, 0.5, 64, 10)
    assert rows["cnn_dropout"].momentum == 0 and rows["cnn_dropout"].reported == 0.9672
    assert (rows["cnn_3x3"].batch_size, rows["cnn_3x3"].reported) == (32, 0.976)


def run(acc: float, epochs: int = 10) -> dict:
    return {"test_acc": acc, "epochs": epochs, "epoch_seconds": 6.0}


def test_the_project_beats_a_row_only_above_both_tutorial_figures():
    row = seeds.Row("two-conv CNN", "cnn", 0.9849)
    assert seeds.compare(row, run(0.985), run(0.9920))["beats"]
    assert not seeds.compare(row, run(0.9930), run(0.9920))["beats"]  # the tutorial's recipe did better here
    assert not seeds.compare(row, run(0.9800), run(0.9849))["beats"]  # a tie with the reported figure is no win
    line = seeds.compare(row, run(0.9800), run(0.9900))
    assert line["margin"] == 0.0051 and line["tutorial_minutes"] == 1.0
    assert "| two-conv CNN | `cnn` | SGD 0.01 m0.5, bs 64 | 10 | 98.49 % | 98.00 % |" in seeds.table([line])


def test_bad_rows_are_refused(capsys):
    with pytest.raises(SystemExit):
        seeds.parse_args(["--rows", "cnn,nope"])
    assert "no row for nope" in capsys.readouterr().err


@pytest.mark.slow
def test_a_quick_run_trains_both_recipes_and_writes_its_results(data_mirror, tmp_path):
    assert seeds.main(["--rows", "cnn", "--limit", "600", "--epochs", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "seeds-limit600-1ep.json").read_text())
    (line,) = result["rows"]
    tutorial, project = line["runs"]
    assert (tutorial["loop"], project["loop"]) == ("tutorial", "project")
    images = result["data"]["train_images"]
    assert tutorial["train_images"] == images > 0  # the tutorial's loop keeps the short last batch
    batch = project["config"]["batch_size"]  # the project's drops it: the same images, bar under one batch
    assert images - batch < project["train_images"] <= images and project["train_images"] % batch == 0
    assert 0.1 < tutorial["test_acc"] <= 1 and 0.1 < project["test_acc"] <= 1
    assert tutorial["config"]["momentum"] == 0.5 and project["config"]["schedule"] == "onecycle"
    md = (tmp_path / "seeds-limit600-1ep.md").read_text()
    assert "| two-conv CNN | `cnn` |" in md and "command:" in md and "machine:" in md
