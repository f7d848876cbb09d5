"""Register exported models in the MLflow Model Registry and promote the best by alias.

    python -m pipeline.promote                 # the DVC stage: register every export, run the gate
    python -m pipeline.promote list            # versions with metrics and aliases
    python -m pipeline.promote set 3 [--alias champion]   # promote a version by hand
    python -m pipeline.promote rollback        # champion back to the previous champion
    python -m pipeline.promote history         # every alias change (the audit trail)

A running service follows its alias (service/follower.py): a promotion or rollback here is served
within CLASSIFIER_REGISTRY_POLL_S seconds, no package run needed.

Champion/challenger gate: the best candidate (promote.metric, higher is better; tie-break
promote.tie_break, lower is better) becomes `champion` only if it beats the current champion by more
than promote.margin on the same test set; otherwise it becomes `challenger`. Every decision and
alias change is recorded as tags (on the version, and an audit trail on the registered model: one
`audit.<time>` tag per change, so concurrent writers never overwrite each other's entries). Changes
hold `tracking.registry_lock`; an entry is written `pending` before its alias moves and `done` after,
and the next change settles what a killed run left pending. Versions that failed the parity gate
are refused.
"""
from __future__ import annotations

import argparse
import getpass
import json
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from service import mlflow_model
from service.contract import MODEL_FILE, PreprocessSpec, normalize, read_metadata, run_logits

from . import atomic, stage, tracking
from .download import load_card, load_prepared
from .model_card import model_card
from .params import PromoteParams, load_params
from .paths import PREPARED_DIR, RELEASE_DIR, arch_dir, experiments_may_promote, export_dir, isolated_experiment
from .serving import CHALLENGER, CHAMPION, utc_now as _now
from .stage import StageError


class PromotionError(StageError):
    pass


@dataclass
class Candidate:
    arch: str
    version: str
    metric: float
    tie_break: float
    test_set_sha256: str


# --- pure decision logic ----------------------------------------------------------------------------

def rank_candidates(candidates: list[Candidate]) -> list[Candidate]:
    """Best first: highest metric, then lowest tie-break value."""
    return sorted(candidates, key=lambda c: (-c.metric, c.tie_break))


def gate(best: Candidate, champion_version: str | None, champion_metric: float | None, margin: float) -> tuple[str, str]:
    """(alias for `best`, the reason): champion only if it beats the champion by more than `margin`."""
    if champion_version is None:
        return CHAMPION, "no champion yet"
    if champion_version == best.version:
        return CHAMPION, f"version {best.version} is already the champion"
    if best.metric > champion_metric + margin:
        return CHAMPION, (f"{best.metric:.5f} beats champion v{champion_version}'s {champion_metric:.5f} "
                          f"by more than the margin {margin}")
    return CHALLENGER, (f"{best.metric:.5f} does not beat champion v{champion_version}'s {champion_metric:.5f} "
                        f"by more than the margin {margin}")


def dataset_conflict(name: str, versions: list[dict], dataset: str) -> str | None:
    """Why a `dataset` model may not join registered model `name`, if its versions are of another
    dataset: the gate would compare accuracies on different test sets and the service would serve a
    CIFAR-10 model to digit clients. None when they agree (or there are no versions yet)."""
    others = sorted({v["tags"]["dataset"] for v in versions if v["tags"].get("dataset", dataset) != dataset})
    if not others:
        return None
    return (f"registered model {name!r} holds {', '.join(others)} models; this {dataset} model needs its own: "
            f"set promote.registered_model to another name (as cifar10/params.yaml does)")


def champion_stack(entries: list[dict]) -> list[str]:
    """The champions a rollback walks back through, replayed from the audit trail (so the trail is
    the only state: nothing can disagree with it): a promotion pushes, a rollback pops."""
    stack: list[str] = []
    for entry in entries:
        if entry.get("alias") != CHAMPION or entry.get("state", "done") != "done":
            continue
        version = str(entry["version"])
        if entry.get("action") == "rollback":
            while stack and stack[-1] != version:
                stack.pop()
            stack = stack or [version]
        else:
            stack = [v for v in stack if v != version] + [version]
    return stack


def settle_pending(entry: dict, current_version: str | None) -> dict:
    """A change interrupted (kill -9) after its audit entry was written: done if the alias did move,
    aborted if it did not."""
    moved = current_version == str(entry["version"])
    return {**entry, "state": "done" if moved else "aborted",
            "settled": f"{_now()}: interrupted {'after' if moved else 'before'} the alias moved"}


# --- registry side effects --------------------------------------------------------------------------

AUDIT_PREFIX = "audit."  # one registered-model tag per alias change: concurrent writers never clobber


def history(name: str) -> list[dict]:
    """Every alias change, oldest first (entries of the earlier single-tag trail first)."""
    tags = tracking.model_tags(name)
    legacy = json.loads(tags.get("alias_history", "[]"))
    entries = [{**json.loads(value), "key": key} for key, value in sorted(tags.items()) if key.startswith(AUDIT_PREFIX)]
    return legacy + entries


def reconcile(name: str) -> list[dict]:
    """Settle the entries that an interrupted change left pending (call under the registry lock)."""
    settled = []
    for entry in history(name):
        if entry.get("state") == "pending":
            current = tracking.version_by_alias(name, entry["alias"])
            fixed = settle_pending(entry, current["version"] if current else None)
            tracking.set_model_tag(name, entry["key"], json.dumps({k: v for k, v in fixed.items() if k != "key"}))
            settled.append(fixed)
    return settled


def record_alias_change(name: str, alias: str, version: str, reason: str, action: str) -> dict:
    """Move `alias` to `version` and record who, when, why and what it replaced (under the registry
    lock). The entry is written `pending` before the alias moves and `done` after, so an interrupted
    change is recognisable and `reconcile` settles it."""
    previous = tracking.version_by_alias(name, alias)
    entry = {"time": _now(), "action": action, "alias": alias, "version": str(version),
             "previous": previous["version"] if previous else None, "reason": reason, "by": getpass.getuser(),
             "state": "pending"}
    key = f"{AUDIT_PREFIX}{time.time_ns():020d}.{uuid.uuid4().hex[:6]}"
    tracking.set_model_tag(name, key, json.dumps(entry))
    tracking.set_alias(name, alias, version)
    tracking.set_version_tags(name, version, {f"{alias}.since": entry["time"], f"{alias}.reason": reason})
    entry["state"] = "done"
    tracking.set_model_tag(name, key, json.dumps(entry))
    return entry


def require_parity(name: str, version: str) -> dict:
    try:
        info = tracking.get_version(name, version)
    except Exception as err:  # noqa: BLE001  (MLflow's RESOURCE_DOES_NOT_EXIST and friends)
        raise PromotionError(f"registered model {name!r} has no version {version!r}") from err
    if info["tags"].get("parity_passed") != "true":
        raise PromotionError(f"version {version} of {name!r} did not pass the ONNX parity gate; refusing to promote it")
    return info


def promote_version(name: str, version: str, alias: str = CHAMPION, reason: str = "manual promotion") -> dict:
    """Point `alias` at `version` by hand (refused for versions that failed the parity gate)."""
    with tracking.registry_lock(name):
        reconcile(name)
        require_parity(name, version)
        return record_alias_change(name, alias, version, reason, "promote")


def rollback(name: str) -> dict:
    """Champion back to the champion before the current one."""
    with tracking.registry_lock(name):
        reconcile(name)
        stack = champion_stack(history(name))
        current = tracking.version_by_alias(name, CHAMPION)
        if current is not None and stack and stack[-1] == current["version"]:
            stack = stack[:-1]
        if not stack:
            raise PromotionError(f"{name!r} has no previous champion to roll back to")
        target = stack[-1]
        require_parity(name, target)
        return record_alias_change(name, CHAMPION, target,
                                   f"rollback from v{current['version'] if current else '?'}", "rollback")


def register_export(name: str, export_json: Path, experiment: str) -> tuple[str, dict]:
    """Log one export as the MLflow pyfunc model (`log_served_model`) and register it, its model card
    (`pipeline.model_card`) as the version's description (idempotent: an ONNX file already
    registered is not added twice)."""
    report = json.loads(export_json.read_text())
    if not report.get("passed"):
        raise PromotionError(f"{export_json}: the export did not pass its parity gate")
    meta = report["metadata"]
    versions = tracking.list_versions(name)
    if conflict := dataset_conflict(name, versions, meta["dataset"]):
        raise PromotionError(conflict)
    for v in versions:
        if v["tags"].get("onnx_sha256") == report["onnx_sha256"]:
            return v["version"], report
    run_id = meta["mlflow_run_id"]
    training = tracking.run_metrics(run_id)
    if not tracking.run_exists(run_id):  # the export came from DVC's cache, made against another store
        run_id = tracking.open_run(run_id, experiment=experiment, run_name=report["arch"], stage="promote",
                                   model_file=arch_dir(report["arch"]) / "model.pt").run_id
    evaluation = report["evaluation"]
    tags = {"arch": report["arch"], "dataset": meta["dataset"], "onnx_sha256": report["onnx_sha256"],
            "test_set_sha256": report["test_set_sha256"], "parity_passed": "true",
            "parity_max_abs_logit_diff": report["max_abs_logit_diff"], "onnx_test_acc": report["onnx_test_acc"],
            **{f"metric.{k}": v for k, v in evaluation.items()}, **tracking.context_tags()}
    uri, model_id = log_served_model(run_id, export_json.parent / MODEL_FILE, meta)
    card = load_card(PREPARED_DIR) if (PREPARED_DIR / "card.json").is_file() else {}
    description = model_card(report, card, training=training, registered_model=name,
                             max_chars=tracking.MAX_DESCRIPTION_CHARS)
    version = tracking.register_version(name, uri, run_id, tags, model_id, description=description)
    return version, report


def log_served_model(run_id: str, onnx_file: Path, meta: dict[str, str]) -> tuple[str, str]:
    """Log `onnx_file` into run `run_id` as the MLflow pyfunc model `service.mlflow_model` serves
    (image bytes in, labels and scores out; `mlflow models serve` and `mlflow.pyfunc.load_model`
    work offline), with a stroke image of the model's size as its input example, which the model
    must answer. Returns (model URI, logged-model id)."""
    spec = PreprocessSpec.from_metadata(meta)
    example = {mlflow_model.INPUT_COLUMN: [mlflow_model.example_image(spec)]}
    answer = mlflow_model.ImageClassifierPyfunc(onnx_file, providers="cpu", threads=1).predict(example)
    if answer["reason"][0] is not None:
        raise PromotionError(f"{onnx_file}: the model refuses its own input example ({answer['reason'][0]}: "
                             f"{answer['error'][0]})")
    return tracking.log_pyfunc_model(
        run_id, onnx_file, loader_module=mlflow_model.__name__, code_dir=Path(mlflow_model.__file__).parent,
        signature=mlflow_model.SIGNATURE, input_example=example, params_example={"top_k": min(3, len(spec.classes))},
        model_config=mlflow_model.DEFAULT_CONFIG, requirements=mlflow_model.REQUIREMENTS, metadata=meta)


def champion_metric_on(name: str, champion: dict, metric: str, test_sha: str) -> float:
    """The champion's metric on the current test set: its tag when measured on it, else re-measured."""
    tags = champion["tags"]
    if tags.get("test_set_sha256") == test_sha and f"metric.{metric}" in tags:
        return float(tags[f"metric.{metric}"])
    if metric != "test_acc":
        raise PromotionError(f"champion v{champion['version']} was measured on another test set and only "
                             f"test_acc can be re-measured; cannot compare {metric!r}")
    test = load_prepared("test", PREPARED_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        model = tracking.download_version(name, champion["version"], tmp) / MODEL_FILE
        meta = read_metadata(model)
        logits = run_logits(model, normalize(test.images, json.loads(meta["mean"]), json.loads(meta["std"])))
    prepared_with = load_card(PREPARED_DIR).get("input_transform", "resize")
    if meta.get("input_transform", "resize") != prepared_with:  # e.g. a champion from before the key
        print(f"promote: champion v{champion['version']} declares input_transform "
              f"{meta.get('input_transform', 'resize')}; re-measured on the test split as prepared now "
              f"({prepared_with}, at the model's size, where resize and crop leave pixels as they are)",
              file=sys.stderr)
    return float((logits.argmax(1) == test.labels).mean())


def register_candidates(name: str, p: PromoteParams, archs: list[str], experiment: str) -> tuple[list[Candidate], dict]:
    """Every architecture's export as a registry version (idempotent), with its gate metrics."""
    candidates, reports = [], {}
    for arch in archs:
        version, report = register_export(name, export_dir(arch) / "export.json", experiment)
        evaluation = report["evaluation"]
        for key in (p.metric, p.tie_break):
            if key not in evaluation:
                raise PromotionError(f"params: promote metric {key!r} is not one of the evaluation metrics "
                                     f"({', '.join(sorted(evaluation))})")
        candidates.append(Candidate(arch, version, float(evaluation[p.metric]), float(evaluation[p.tie_break]),
                                    report["test_set_sha256"]))
        reports[arch] = {"version": version, p.metric: evaluation[p.metric], p.tie_break: evaluation[p.tie_break]}
    return candidates, reports


def auto_promote(p: PromoteParams, archs: list[str], experiment: str = "image-classifier") -> dict:
    """The DVC stage: register every export, pick the best, run the champion/challenger gate. Inside
    a --temp/--queue experiment the candidates are registered and the decision recorded, but no
    alias moves (PROMOTE_IN_EXPERIMENTS=1 lets them): experiments never change what is served."""
    name = p.registered_model
    isolated = isolated_experiment() if not experiments_may_promote() else None
    test_sha = load_card(PREPARED_DIR)["splits"]["test"]["sha256"]
    # registration holds the lock too: two queued experiments sharing an unchanged export must not
    # both find it unregistered and register it twice
    with tracking.registry_lock(name, timeout_s=300):
        candidates, reports = register_candidates(name, p, archs, experiment)
        best = rank_candidates(candidates)[0]
        reconcile(name)
        champion = tracking.version_by_alias(name, CHAMPION)
        champ_metric = champion_metric_on(name, champion, p.metric, test_sha) if champion else None
        alias, reason = decide(name, best, champion, champ_metric, p.margin, isolated)
        final_champion = tracking.version_by_alias(name, CHAMPION)
    return {"registered_model": name, "metric": p.metric, "margin": p.margin, "candidates": reports,
            "best": {"arch": best.arch, "version": best.version, p.metric: best.metric},
            "previous_champion": {"version": champion["version"], p.metric: champ_metric} if champion else None,
            "decision": alias, "reason": reason,
            "champion": {"version": final_champion["version"], "arch": final_champion["tags"].get("arch"),
                         "run_id": final_champion["run_id"]} if final_champion else None}


def decide(name: str, best: Candidate, champion: dict | None, champ_metric: float | None, margin: float,
           isolated: str | None) -> tuple[str, str]:
    """The gate for `best`, once per version in the workspace (the stage runs on every `dvc repro`,
    and a later re-run must not undo a manual promotion or rollback); in an isolated experiment it is
    recorded but moves nothing. Call under the registry lock."""
    prior = tracking.get_version(name, best.version)["tags"]
    if prior.get("decision") and prior.get("decision.isolated") != "true":
        return prior["decision"], prior.get("decision.reason", "")
    alias, reason = gate(best, champion["version"] if champion else None, champ_metric, margin)
    if isolated:
        reason = f"{reason} (experiment {isolated!r}: aliases left alone; PROMOTE_IN_EXPERIMENTS=1 to move them)"
    tracking.set_version_tags(name, best.version, {"decision": alias, "decision.reason": reason,
                                                   "decision.time": _now(), "decision.isolated": str(bool(isolated)).lower()})
    if not isolated and not (champion and champion["version"] == best.version):
        record_alias_change(name, alias, best.version, reason, "gate")
    return alias, reason


def format_versions(versions: list[dict], metric: str) -> str:
    lines = [f"{'version':>7}  {'arch':<10} {metric:>9}  {'latency ms':>10}  {'parity':<6}  aliases"]
    for v in versions:
        t = v["tags"]
        lines.append(f"{v['version']:>7}  {t.get('arch', '?'):<10} {t.get('metric.' + metric, '?'):>9}  "
                     f"{t.get('metric.latency_ms_batch1', '?'):>10}  {t.get('parity_passed', '?'):<6}  "
                     f"{', '.join(v['aliases'])}")
    return "\n".join(lines)


def format_history(entries: list[dict]) -> str:
    lines = [f"{'time':<20}  {'action':<8} {'alias':<10} {'version':>7}  {'from':>4}  {'state':<7}  by / reason"]
    for e in entries:
        lines.append(f"{e.get('time', '?'):<20}  {e.get('action', '?'):<8} {e.get('alias', '?'):<10} "
                     f"{e.get('version', '?'):>7}  {e.get('previous') or '-':>4}  {e.get('state', 'done'):<7}  "
                     f"{e.get('by', '?')}: {e.get('reason', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("auto", help="register the exports and run the champion/challenger gate (default)")
    sub.add_parser("list", help="versions with metrics and aliases")
    set_cmd = sub.add_parser("set", help="point an alias at a version")
    set_cmd.add_argument("version")
    set_cmd.add_argument("--alias", default=CHAMPION)
    set_cmd.add_argument("--reason", default="manual promotion")
    sub.add_parser("rollback", help="champion back to the previous champion")
    sub.add_parser("history", help="every alias change: when, who, what, why")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    name = params.promote.registered_model
    tracking.check_reachable()  # a server that is down: fail now, not after MLflow's minutes of retries
    if args.command in (None, "auto"):
        result = auto_promote(params.promote, list(params.models), params.train.experiment)
        atomic.write_json(RELEASE_DIR / "promotion.json", result)
        champion = result["champion"]
        served = f"v{champion['version']} ({champion['arch']})" if champion else "not set"
        print(f"promote: {name}: best {result['best']['arch']} v{result['best']['version']} "
              f"({params.promote.metric} {result['best'][params.promote.metric]:.5f}) -> {result['decision']}: "
              f"{result['reason']}; champion is {served}")
    elif args.command == "list":
        print(format_versions(tracking.list_versions(name), params.promote.metric))
    elif args.command == "set":
        entry = promote_version(name, args.version, args.alias, args.reason)
        print(f"promote: {name}: {args.alias} -> v{entry['version']} (was v{entry['previous']})")
    elif args.command == "rollback":
        entry = rollback(name)
        print(f"promote: {name}: champion rolled back to v{entry['version']} (was v{entry['previous']})")
    elif args.command == "history":
        print(format_history(history(name)))
    return 0


if __name__ == "__main__":
    sys.exit(stage.run("promote", main))
