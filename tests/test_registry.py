"""Evaluate -> export -> promote on a real MLflow store, with tiny real models trained on MNIST.

The fixture runs the real stages as subprocesses in a temporary project folder; the tests then
exercise the parity gate, the champion/challenger gate, manual promotion and rollback.
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from tests.conftest import clone_project
from tests.stages import run_stage, write_params

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def project(tmp_path_factory, exported_models) -> Path:
    """A project folder with two exported models: a decent `cnn` and a deliberately weak `mlp`."""
    return clone_project(exported_models, tmp_path_factory.mktemp("registry") / "project").path


def promote(project: Path, *args: str, models: dict | None = None, check: bool = True, **params):
    if models is not None or params:
        write_params(project, models or {"cnn": {}}, **params)
    return run_stage(project, "pipeline.promote", *args, check=check)


def registry(project: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    from pipeline import tracking

    return tracking


def test_export_reports_parity_and_matches_evaluate(project):
    for arch in ("cnn", "mlp"):
        report = json.loads((project / "exports" / arch / "export.json").read_text())
        assert report["passed"] is True
        assert report["max_abs_logit_diff"] <= 1e-4
        assert report["top1_agreement"] == 1.0
        eval_metrics = json.loads((project / "outputs" / arch / "eval" / "metrics.json").read_text())
        assert report["onnx_test_acc"] == eval_metrics["test_acc"]
        meta = {p.key: p.value for p in onnx.load(str(project / "exports" / arch / "model.onnx")).metadata_props}
        assert json.loads(meta["classes"]) == [str(i) for i in range(10)]
        assert meta["in_channels"] == "1" and meta["image_size"] == "28" and meta["arch"] == arch
        card = json.loads((project / "data" / "prepared" / "card.json").read_text())
        assert json.loads(meta["mean"]) == card["mean"] and json.loads(meta["std"]) == card["std"]
        assert abs(card["mean"][0] - 0.1307) < 0.005 and meta["mlflow_run_id"]


def test_eval_outputs_and_metrics(project):
    out = project / "outputs" / "cnn" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.8 < metrics["test_acc"] <= metrics["test_top5_acc"] <= 1.0
    per_class = json.loads((out / "per_class.json").read_text())
    assert 0 <= metrics["ece"] < 0.2 and set(per_class) == {str(i) for i in range(10)}
    assert sum(c["support"] for c in per_class.values()) == metrics["test_count"]
    rows = (out / "confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) - 1 == metrics["test_count"]
    for png in ("confusion.png", "misclassified.png", "feature_maps.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tampered_onnx_fails_the_parity_gate(project):
    from pipeline.download import load_prepared
    from pipeline.export import parity_check
    from pipeline.modelfile import load_model_file

    model, meta = load_model_file(project / "outputs" / "cnn" / "model.pt")
    test = load_prepared("test", project / "data" / "prepared")
    proto = onnx.load(str(project / "exports" / "cnn" / "model.onnx"))
    honest = parity_check(proto.SerializeToString(), model, meta, test.images[:500], test.labels[:500], 1e-4)
    assert honest["passed"]
    weight = proto.graph.initializer[0]
    tampered = numpy_helper.to_array(weight).copy()
    tampered.flat[0] += 0.05  # one weight nudged: small, but the gate must see it
    weight.CopyFrom(numpy_helper.from_array(tampered, weight.name))
    report = parity_check(proto.SerializeToString(), model, meta, test.images[:500], test.labels[:500], 1e-4)
    assert not report["passed"] and report["max_abs_logit_diff"] > 1e-4


def test_gate_keeps_a_worse_challenger_out_then_manual_promote_and_rollback(project, monkeypatch):
    tracking = registry(project, monkeypatch)
    name = "image-classifier"
    first = promote(project, models={"cnn": {"epochs": 2, "lr": 0.05}})
    assert "champion" in first.stdout
    champion = tracking.version_by_alias(name, "champion")
    assert champion["tags"]["arch"] == "cnn"

    second = promote(project, models={"mlp": {"epochs": 1, "lr": 0.0002}})
    assert "challenger" in second.stdout, second.stdout
    assert tracking.version_by_alias(name, "champion")["version"] == champion["version"]
    challenger = tracking.version_by_alias(name, "challenger")
    assert challenger["tags"]["arch"] == "mlp" and challenger["tags"]["decision"] == "challenger"
    assert "does not beat" in challenger["tags"]["decision.reason"]
    decision = json.loads((project / "release" / "promotion.json").read_text())
    assert decision["decision"] == "challenger" and decision["champion"]["version"] == champion["version"]

    # re-running the stage registers nothing new (the ONNX file is already a version)
    before = len(tracking.list_versions(name))
    promote(project, models={"mlp": {"epochs": 1, "lr": 0.0002}})
    assert len(tracking.list_versions(name)) == before

    listing = promote(project, "list").stdout
    assert "champion" in listing and "challenger" in listing

    promote(project, "set", challenger["version"], "--reason", "test: manual promotion")
    assert tracking.version_by_alias(name, "champion")["version"] == challenger["version"]
    promote(project, "rollback")
    assert tracking.version_by_alias(name, "champion")["version"] == champion["version"]
    from pipeline.promote import history as audit_history

    history = audit_history(name)
    assert all(h["state"] == "done" for h in history)
    assert [h["action"] for h in history][-2:] == ["promote", "rollback"]
    assert history[-1]["previous"] == challenger["version"] and history[-1]["version"] == champion["version"]
    assert history[-2]["reason"] == "test: manual promotion"


def test_versions_that_failed_parity_are_refused(project, monkeypatch):
    tracking = registry(project, monkeypatch)
    name = "image-classifier"
    promote(project, models={"cnn": {"epochs": 2, "lr": 0.05}})
    victim = tracking.version_by_alias(name, "challenger") or tracking.list_versions(name)[-1]
    tracking.set_version_tags(name, victim["version"], {"parity_passed": "false"})
    out = promote(project, "set", victim["version"], check=False)
    assert out.returncode != 0 and "parity" in out.stderr


def test_gate_logic_margin():
    from pipeline.promote import Candidate, gate, rank_candidates

    a = Candidate("a", "1", 0.990, 2.0, "x")
    b = Candidate("b", "2", 0.990, 1.0, "x")
    c = Candidate("c", "3", 0.980, 0.5, "x")
    assert [x.arch for x in rank_candidates([a, b, c])] == ["b", "a", "c"]
    assert gate(b, None, None, 0.0)[0] == "champion"
    assert gate(b, "7", 0.985, 0.0)[0] == "champion"
    assert gate(b, "7", 0.985, 0.01)[0] == "challenger"  # beats, but not by the margin
    assert gate(b, "7", 0.990, 0.0)[0] == "challenger"  # a tie is not a win
    assert gate(b, "2", 0.990, 0.0)[0] == "champion"


def test_bad_promote_params_fail_fast(project):
    out = promote(project, models={"cnn": {}}, margin=-1, check=False)
    assert out.returncode == 2 and "promote.margin" in out.stderr


def test_stage_entry_points_turn_an_unusable_store_into_exit_3(capsys):
    from pipeline import tracking
    from pipeline.stage import run

    def main(argv):
        raise tracking.TrackingError("tracking server http://127.0.0.1:9 is unreachable")

    assert run("evaluate", main) == 3
    assert capsys.readouterr().err == "evaluate: error: tracking server http://127.0.0.1:9 is unreachable\n"
    assert run("export", lambda argv: 0) == 0


@pytest.mark.parametrize("error, code", [
    ("pipeline.params:ParamsError", 2), ("pipeline.download:DownloadError", 2), ("pipeline.promote:PromotionError", 2),
    ("pipeline.serving:ServingError", 2), ("bench.quantize:QuantizeError", 2), ("builtins:FileNotFoundError", 2),
    ("pipeline.tracking:RegistryBusy", 3), ("builtins:TimeoutError", 3), ("builtins:ConnectionRefusedError", 3),
    ("requests.exceptions:ConnectionError", 3), ("builtins:OSError", 4),
])
def test_every_stage_error_has_its_exit_code_and_one_line(capsys, error, code):
    """The README's exit-code table (pipeline/stage.py): every stage module's error class is one row."""
    import importlib

    from pipeline.stage import run

    module, name = error.split(":")
    cls = getattr(importlib.import_module(module), name)

    def main(argv):
        raise cls("what went wrong")

    assert run("somestage", main) == code
    assert capsys.readouterr().err == "somestage: error: what went wrong\n"


def test_every_stage_module_ends_through_the_one_entry_point():
    from pathlib import Path

    for module in sorted((Path(__file__).resolve().parents[1] / "pipeline").glob("*.py")):
        text = module.read_text()
        if 'if __name__ == "__main__":' in text:
            assert f'sys.exit(stage.run("{module.stem}", main))' in text, module


def test_a_store_moved_while_serving_reads_it_is_a_store_error_not_no_alias(tmp_path, monkeypatch):
    """The race CI found: `pipeline.serving` started just before the SQLite store was moved away;
    MLflow created an empty store in its place, and the version read "no champion alias" (a refusal,
    exit 2) instead of a store error (exit 3, retried)."""
    from pipeline import serving, tracking

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")

    def read_while_moving(name, alias):
        db.rename(tmp_path / "moved.db")
        db.write_bytes(b"")  # what MLflow does at the old path: a new, empty store
        return None

    monkeypatch.setattr(tracking, "version_by_alias", read_while_moving)
    with pytest.raises(tracking.TrackingError, match="replaced"):
        serving._registry_version("image-classifier", "champion")
    monkeypatch.setattr(tracking, "version_by_alias", lambda name, alias: None)
    with pytest.raises(serving.ServingError, match="no 'champion' alias"):  # an unmoved store: a refusal
        serving._registry_version("image-classifier", "champion")
    db.unlink()
    with pytest.raises(tracking.TrackingError, match="no such file"):
        tracking.require_store()


@pytest.mark.parametrize("error, code", [(FileNotFoundError("artifact moved"), 3), (TimeoutError("lock"), 3),
                                         (OSError(28, "No space left on device"), 3)])
def test_serving_retries_on_file_errors_and_refuses_only_unservable_versions(monkeypatch, capsys, error, code):
    """The follower refuses a version for good on exit 2: a file that went missing while syncing is
    a retry (3), not a verdict on the version."""
    from pipeline import serving, tracking

    def sync(name, alias):
        raise error

    monkeypatch.setattr(tracking, "check_reachable", lambda: None)
    monkeypatch.setattr(serving, "sync_alias", sync)
    assert serving.main([]) == code
    monkeypatch.setattr(serving, "sync_alias", lambda name, alias: (_ for _ in ()).throw(serving.ServingError("bad")))
    assert serving.main([]) == 2
