"""What every `dfdetect` command group shares, the library's and those added through entry points: the
--params option and one way to fail (a red `error:` line naming what was wrong, exit status 2)."""

from __future__ import annotations

from pathlib import Path

import typer

from .config import ParamsError, load_params

PARAMS_OPT = typer.Option(Path("params.yaml"), "--params", "-p", help="The params file (typed schema; see README).")


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def params_or_fail(path: Path):
    """params.yaml validated, or the schema's error and exit status 2."""
    try:
        return load_params(path)
    except ParamsError as exc:
        fail(str(exc))
