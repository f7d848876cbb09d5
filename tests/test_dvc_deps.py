"""dvc.yaml's code dependencies are each stage's import closure (issue 14).

For every stage in dvc.yaml (foreach and matrix stages expanded from params.yaml), the module its
`cmd` runs (`python -m pipeline.train ...`) is followed through every import of the repo's own
packages (pipeline, models, service), at any depth in a file (function-level and lazy imports
count: they run when the stage runs), including the package __init__ files an import executes.
Each file of that closure must be a dep of the stage, either itself or through a folder dep
(`service` covers every file under service/). A .py dep that no longer exists is an error; a .py
dep outside the closure only warns (it makes `dvc repro` re-run the stage for nothing).

Pure Python, no DVC: it parses dvc.yaml and params.yaml with yaml and the sources with ast.
"""
from __future__ import annotations

import ast
import itertools
import re
import shlex
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
OWN_PACKAGES = ("pipeline", "models", "service")

# --------------------------------------------------------------------------------------- closure


def module_file(root: Path, module: str) -> Path | None:
    """The file `import module` executes last (a module's .py or a package's __init__.py), if ours."""
    parts = module.split(".")
    if not parts or parts[0] not in OWN_PACKAGES:
        return None
    base = root.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def module_files(root: Path, module: str) -> list[Path]:
    """Every file `import module` executes: each parent package's __init__.py, then the module."""
    parts = module.split(".")
    found = []
    for i in range(1, len(parts) + 1):
        path = module_file(root, ".".join(parts[:i]))
        if path is None:
            break  # not ours, or not a module (an attribute, e.g. `from . import atomic` of a name)
        found.append(path)
    return found


def _package_of(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1])  # a module's package, and __init__'s own package


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import in the file, at any depth, except under `if TYPE_CHECKING:` (never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported_modules(root: Path, path: Path) -> set[str]:
    """Dotted names of the modules (and candidate submodules) that `path` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _package_of(root, path)
    modules: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
            continue
        if node.level:  # relative: `from . import x`, `from .x import y`, `from ..x import y`
            parts = package.split(".") if package else []
            if node.level - 1 > len(parts):
                continue
            base = ".".join(parts[:len(parts) - (node.level - 1)])
            base = ".".join(p for p in (base, node.module) if p)
        else:
            base = node.module or ""
        if not base:
            continue
        modules.add(base)
        # `from pkg import name`: name may be a submodule (pipeline/atomic.py) or an attribute
        modules.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return modules


def import_closure(root: Path, module: str) -> set[str]:
    """Repo-relative posix paths of every own file that running `python -m module` imports."""
    todo = module_files(root, module)
    if module_file(root, module) is not None and module_file(root, module).name == "__init__.py":
        main = module_file(root, module).parent / "__main__.py"  # `python -m package`
        if main.is_file():
            todo.append(main)
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(root, path):
            todo.extend(p for p in module_files(root, name) if p not in seen)
    return {p.relative_to(root).as_posix() for p in seen}


# ------------------------------------------------------------------------------------- dvc.yaml

_INTERP = re.compile(r"\$\{\s*([^}]+?)\s*\}")


def _lookup(context: dict, dotted: str) -> Any:
    value: Any = context
    for part in dotted.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(dotted)
    return value


def _interpolate(value: Any, context: dict) -> Any:
    """DVC's ${...} templating, as far as this test needs it (unknown names are left as they are)."""
    if isinstance(value, dict):
        return {_interpolate(k, context): _interpolate(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, context) for v in value]
    if not isinstance(value, str):
        return value
    whole = _INTERP.fullmatch(value)
    if whole:
        try:
            return _lookup(context, whole.group(1))
        except KeyError:
            return value

    def one(match: re.Match) -> str:
        try:
            return str(_lookup(context, match.group(1)))
        except KeyError:
            return match.group(0)
    return _INTERP.sub(one, value)


def _global_vars(root: Path, dvc: dict) -> dict:
    context: dict = {}
    sources = dvc.get("vars") or ["params.yaml"]
    if "params.yaml" not in sources and (root / "params.yaml").is_file():
        sources = ["params.yaml", *sources]
    for source in sources:
        if isinstance(source, dict):
            context.update(source)
            continue
        name, _, keys = str(source).partition(":")
        path = root / name
        if not path.is_file():
            continue
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if keys:
            data = {k: data[k] for k in keys.split(",") if k in data}
        context.update(data)
    return context


def expand_stages(root: Path) -> Iterator[tuple[str, str, dict]]:
    """(stage name in dvc.yaml, expanded name, expanded stage definition) for every stage."""
    dvc = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    context = _global_vars(root, dvc)
    for name, stage in (dvc.get("stages") or {}).items():
        if "foreach" in stage:
            items = _interpolate(stage["foreach"], context)
            if isinstance(items, dict):
                pairs = list(items.items())
            elif isinstance(items, list):
                pairs = [(str(i if not isinstance(i, (dict, list)) else n), i) for n, i in enumerate(items)]
            else:
                pairs = [("${key}", "${item}")]  # unresolvable: check the template as written
            for key, item in pairs:
                yield name, f"{name}@{key}", _interpolate(stage["do"], {**context, "key": key, "item": item})
        elif "matrix" in stage:
            matrix = {k: _interpolate(v, context) for k, v in stage["matrix"].items()}
            matrix = {k: (v if isinstance(v, list) else [v]) for k, v in matrix.items()}
            template = {k: v for k, v in stage.items() if k != "matrix"}
            for combo in itertools.product(*matrix.values()):
                item = dict(zip(matrix, combo))
                key = "-".join(str(v) for v in combo)
                yield name, f"{name}@{key}", _interpolate(template, {**context, "item": item, "key": key})
        else:
            yield name, name, _interpolate(stage, context)


def cmd_modules(root: Path, cmd: Any) -> list[str]:
    """The own modules a stage's cmd runs: `python -m pipeline.x ...` or `python pipeline/x.py`."""
    modules = []
    for line in cmd if isinstance(cmd, list) else [cmd]:
        for part in re.split(r"&&|\|\||;|\|", str(line)):
            try:
                words = shlex.split(part)
            except ValueError:
                words = part.split()
            for i, word in enumerate(words):
                if word == "-m" and i + 1 < len(words):
                    modules.append(words[i + 1])
                elif word.endswith(".py") and Path(word).parts and Path(word).parts[0] in OWN_PACKAGES:
                    modules.append(".".join(Path(word).with_suffix("").parts))
    return [m for m in modules if module_file(root, m) is not None]


def dep_paths(stage: dict) -> list[str]:
    paths = []
    for dep in stage.get("deps") or []:
        path = next(iter(dep)) if isinstance(dep, dict) else dep
        paths.append(str(path).strip().rstrip("/").removeprefix("./"))
    return paths


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep + "/") for dep in deps)


def check(root: Path) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """(errors, warnings, closure per stage) for the dvc.yaml under root."""
    errors: dict[str, list[str]] = {}  # message -> expanded stage names (grouped per foreach)
    notes: dict[str, list[str]] = {}
    closures: dict[str, list[str]] = {}
    for name, expanded, stage in expand_stages(root):
        deps = dep_paths(stage)
        modules = cmd_modules(root, stage.get("cmd", ""))
        if not modules:
            errors.setdefault(f"cmd {stage.get('cmd')!r} runs no module of {', '.join(OWN_PACKAGES)}", []).append(expanded)
            continue
        closure = sorted(set().union(*(import_closure(root, m) for m in modules)))
        closures.setdefault(name, closure)
        missing = [p for p in closure if not covered(p, deps)]
        if missing:
            errors.setdefault("deps miss files its code imports: " + ", ".join(missing), []).append(expanded)
        gone = [d for d in deps if d.endswith(".py") and "${" not in d and not (root / d).is_file()]
        if gone:
            errors.setdefault("deps list .py files that do not exist: " + ", ".join(gone), []).append(expanded)
        extra = [d for d in deps if d.endswith(".py") and (root / d).is_file() and d not in closure]
        if extra:
            notes.setdefault(".py deps outside its import closure (needless re-runs): " + ", ".join(extra),
                             []).append(expanded)

    def named(grouped: dict[str, list[str]]) -> list[str]:
        out = []
        for message, stages in grouped.items():
            keys: dict[str, list[str]] = {}  # stage in dvc.yaml -> its foreach/matrix keys
            for expanded in stages:
                base, _, key = expanded.partition("@")
                keys.setdefault(base, []).extend([key] if key else [])
            label = ", ".join(f"{base} ({', '.join(k)})" if k else base for base, k in keys.items())
            out.append(f"stage {label}: {message}")
        return out
    return named(errors), named(notes), closures


# --------------------------------------------------------------------------------------- tests


def test_dvc_code_deps_are_the_import_closure():
    errors, notes, _ = check(REPO_ROOT)
    for note in notes:
        warnings.warn(note, stacklevel=1)
    if errors:
        pytest.fail("dvc.yaml code deps are wrong (issue 14; fix the stage's deps):\n  " + "\n  ".join(errors),
                    pytrace=False)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_closure_follows_every_kind_of_import(tmp_path):
    """The walker itself, on a synthetic repo: lazy, relative, absolute, __init__, not TYPE_CHECKING."""
    _write(tmp_path, {
        "pipeline/__init__.py": "",
        "pipeline/stage.py": "from . import helper\nfrom .params import load\n"
                             "def run():\n    from service.prep import f\n    import pipeline.lazy\n",
        "pipeline/helper.py": "import os\n",
        "pipeline/params.py": "def load():\n    from models import names\n",
        "pipeline/lazy.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import typed\n",
        "pipeline/typed.py": "",
        "pipeline/unused.py": "",
        "models/__init__.py": "from .zoo import names\n",
        "models/zoo.py": "from .registry import register as names\n",
        "models/registry.py": "",
        "models/__main__.py": "",
        "service/__init__.py": "",
        "service/prep.py": "from ..pipeline import helper\n",  # beyond the top: ignored, no crash
    })
    assert import_closure(tmp_path, "pipeline.stage") == {
        "pipeline/__init__.py", "pipeline/stage.py", "pipeline/helper.py", "pipeline/params.py",
        "pipeline/lazy.py", "models/__init__.py", "models/zoo.py", "models/registry.py",
        "service/__init__.py", "service/prep.py"}


def test_check_names_the_stage_and_each_missing_file(tmp_path):
    _write(tmp_path, {
        "params.yaml": "models: {cnn: {}, vgg: {}}\n",
        "pipeline/__init__.py": "",
        "pipeline/train.py": "from . import paths\n",
        "pipeline/paths.py": "",
        "pipeline/other.py": "",
        "dvc.yaml": yaml.safe_dump({"stages": {
            "train": {"foreach": "${models}", "do": {
                "cmd": "python -m pipeline.train --arch ${key}",
                "deps": ["data/prepared", "pipeline/train.py", "pipeline/gone.py", "pipeline/other.py"]}},
            "ok": {"cmd": "python -m pipeline.train", "deps": ["pipeline"]},
        }}),
    })
    errors, notes, closures = check(tmp_path)
    assert errors == [
        "stage train (cnn, vgg): deps miss files its code imports: pipeline/__init__.py, pipeline/paths.py",
        "stage train (cnn, vgg): deps list .py files that do not exist: pipeline/gone.py"]
    assert notes == ["stage train (cnn, vgg): .py deps outside its import closure (needless re-runs): pipeline/other.py"]
    assert closures["ok"] == ["pipeline/__init__.py", "pipeline/paths.py", "pipeline/train.py"]


if __name__ == "__main__":  # `python tests/test_dvc_deps.py`: each stage's closure, then the check
    errs, warns, per_stage = check(REPO_ROOT)
    for stage_name, files in per_stage.items():
        print(f"{stage_name}:\n  " + "\n  ".join(files))
    print("\n".join(["", *errs, *warns]) or "ok")
    raise SystemExit(1 if errs else 0)
