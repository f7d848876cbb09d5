"""`imgcls`: every step of the platform from one command (installed by `pip install -e .`).

    imgcls download                        prepare the dataset of params.yaml (the download stage)
    imgcls train --arch cnn                train one architecture          (python -m pipeline.train)
    imgcls evaluate --arch cnn             test-set metrics                (python -m pipeline.evaluate)
    imgcls export --arch cnn               ONNX behind the parity gate     (python -m pipeline.export)
    imgcls promote [list|set V|rollback|history]   the registry's champion (python -m pipeline.promote)
    imgcls package                         champion -> BentoML store + Bento (python -m pipeline.package)
    imgcls predict PATH... [-o out.csv]    batch prediction, no server      (python -m pipeline.predict)
    imgcls serve [--port 3000]             the HTTP service (bentoml serve service.service:Classifier)
    imgcls models                          the model zoo: parameters and MACs

Each subcommand is the stage module's own `main`, so `imgcls <cmd> --help` is that stage's help and
`dvc.yaml`'s `python -m pipeline.<stage>` commands behave exactly alike. Exit codes (``pipeline.stage``):
0 done, 1 a gate refused (parity, promotion), 2 bad input named in the message (also an unknown
subcommand or option), 3 a store is unusable (MLflow, a lock), 4 the file system refused a write.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from . import stage

#: subcommand -> (module whose ``main(argv)`` it runs, one line of help)
COMMANDS = {
    "download": ("pipeline.download", "prepare the dataset of params.yaml (download, verify, transform, split)"),
    "train": ("pipeline.train", "train one architecture (--arch NAME) of params.yaml's models"),
    "evaluate": ("pipeline.evaluate", "test-set metrics, confusion matrix and plots of a trained model"),
    "export": ("pipeline.export", "export a trained model to ONNX behind the parity gate"),
    "promote": ("pipeline.promote", "registry: auto (the gate) | list | set VERSION | rollback | history"),
    "package": ("pipeline.package", "the champion into the BentoML store, and a Bento pinned to it"),
    "predict": ("pipeline.predict", "classify image files, folders and globs offline (CSV / JSON Lines)"),
    "serve": (None, "serve the HTTP API (bentoml serve service.service:Classifier)"),
    "models": (None, "list the model zoo: parameters and MACs per input shape"),
}
SERVICE_TARGET = "service.service:Classifier"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return ("usage: imgcls <command> [options]   (imgcls <command> --help for its options)\n\n"
            "commands:\n" + "\n".join(lines) + "\n\n" + __doc__.split("\n\n")[-1].strip())


def serve(argv: list[str]) -> int:
    """`bentoml serve` of the service, in place of this process (signals and exit code are the server's)."""
    parser = argparse.ArgumentParser(prog="imgcls serve", description=COMMANDS["serve"][1],
                                     epilog="Other options are passed to `bentoml serve` (see bentoml serve --help); "
                                            "settings: CLASSIFIER_* environment variables (docs/deployment.md).")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=os.environ.get("PORT", "3000"), help="default $PORT, else 3000")
    parser.add_argument("--target", default=SERVICE_TARGET, help="a service import path or a built Bento's tag")
    args, rest = parser.parse_known_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"argument --port: {args.port} is not a TCP port")
    from .bento_store import bentoml_executable

    bentoml = bentoml_executable()
    if bentoml is None:
        raise stage.StageError("the `bentoml` command is not installed in this environment (pip install -e .)")
    cmd = [bentoml, "serve", args.target, "--host", args.host, "--port", str(args.port), *rest]
    if args.target == SERVICE_TARGET:
        cmd += ["--working-dir", str(Path(__file__).resolve().parents[1])]
    sys.stdout.flush()
    os.execv(bentoml, cmd)
    return 0  # not reached


def models(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="imgcls models", description=COMMANDS["models"][1]).parse_args(argv)
    from models.__main__ import main as list_models

    list_models()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return stage.EXIT_OK if argv else stage.EXIT_INPUT
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"imgcls: error: unknown command {command!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return stage.EXIT_INPUT
    module, _ = COMMANDS[command]
    if module is None:
        return stage.run(command, {"serve": serve, "models": models}[command], rest)
    sys.argv[0] = f"imgcls {command}"  # the stage's argparse names itself after it: "usage: imgcls train ..."
    return stage.run(command, importlib.import_module(module).main, rest)

