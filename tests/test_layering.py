"""The house's layers: the library (src/dfdetect) imports none of the packages built on it (the Kubeflow
pipelines and components, the service, the benchmarks), so there is no package-level import loop; the
`dfdetect pipeline` commands reach the CLI through an entry point instead."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABOVE_THE_LIBRARY = {"pipelines", "components", "serving", "benchmarks", "tests"}


def top_level_imports(path: Path) -> set[str]:
    """The first part of every absolute import in a file, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_library_imports_nothing_built_on_it():
    offending = {
        path.relative_to(REPO).as_posix(): sorted(top_level_imports(path) & ABOVE_THE_LIBRARY)
        for path in (REPO / "src" / "dfdetect").rglob("*.py")
    }
    assert not {k: v for k, v in offending.items() if v}


def test_the_checker_sees_a_function_level_import(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from pipelines.runner import submit\n")
    assert "pipelines" in top_level_imports(sample)


def test_dfdetect_pipeline_is_found_through_the_entry_point():
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dfdetect"), "pipeline", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "compile" in out.stdout and "submit" in out.stdout
