"""dvc.yaml's deps follow the code: each stage lists every module its step imports (so editing one reruns the
stage) and no module it does not (so editing one does not)."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "dfdetect"
# The module each stage's `dfdetect <command>` runs (the CLI only parses arguments and calls it).
STAGE_MODULES = {
    "prepare": "dfdetect.prepare",
    "train": "dfdetect.train",
    "evaluate": "dfdetect.evaluate",
    "register": "dfdetect.registry",
}


def module_file(module: str) -> Path | None:
    path = PACKAGE.joinpath(*module.split(".")[1:])
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None  # a name imported from a module, not a module


def imported_names(path: Path) -> set[str]:
    """Every dfdetect module (or module.name) a file imports, at the top or inside functions."""
    parts = ["dfdetect", *path.relative_to(PACKAGE).with_suffix("").parts]
    package = parts[:-1]  # the package a relative import starts from (for __init__.py: its own)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "dfdetect"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "dfdetect":
                names |= {module} | {f"{module}.{a.name}" for a in node.names}
    return names


def closure(module: str) -> set[Path]:
    """The files of every dfdetect module `module` reaches through imports, itself and package inits included."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parents = [
            ".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)
        ]  # importing a.b runs a/__init__
        for candidate in (name, *parents):
            path = module_file(candidate)
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported_names(path))
    return seen


def code_deps(stage: dict) -> list[Path]:
    return [REPO / d for d in stage.get("deps", []) if (REPO / d).resolve().is_relative_to(PACKAGE)]


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or (d.is_dir() and path.is_relative_to(d)) for d in deps)


def test_each_stage_lists_exactly_the_modules_it_imports():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_MODULES), "a new stage: say which module it runs in STAGE_MODULES"
    problems = []
    for name, stage in stages.items():
        needed, deps = closure(STAGE_MODULES[name]), code_deps(stage)
        missing = sorted(str(p.relative_to(REPO)) for p in needed if not covered(p, deps))
        listed = {p for d in deps for p in ([d] if d.is_file() else d.rglob("*.py"))}
        extra = sorted(str(p.relative_to(REPO)) for p in listed - needed)
        problems += [f"{name}: add {m}" for m in missing] + [f"{name}: remove {e} (not imported)" for e in extra]
    assert not problems, "dvc.yaml deps drifted from the code:\n" + "\n".join(problems)


def test_the_closure_follows_imports_inside_functions_and_relative_ones():
    # the checker itself can fail: a module that imports another lazily still pulls it in
    assert module_file("dfdetect.train") in closure("dfdetect.train")
    assert module_file("dfdetect.ema") in closure("dfdetect.train")  # `from .ema import ...`
    assert module_file("dfdetect.models.architectures") in closure("dfdetect.evaluate")
    assert module_file("dfdetect.http_guard") not in closure("dfdetect.train")  # serving code never retrains
