"""Params from elsewhere than params.yaml, through the same schema and errors: `KEY=VALUE` overrides (the
CLI's --param, the benchmarks' --set) and Kubeflow pipeline parameters (sections as dicts, no nulls)."""

from __future__ import annotations

import yaml

from .config import Params, ParamsError, parse_params

SECTIONS = (
    "seed",
    "sample_data",
    "prepare",
    "model",
    "train",
    "evaluate",
    "registry",
    "promotion",
    "serving",
    "monitor",
    "tune",
    "distill",
    "mlflow",
)


def params_from(sections: dict) -> Params:
    """Params from pipeline parameters (sections as dicts); the same schema and errors as params.yaml."""
    return parse_params(sections, "pipeline parameters")


def pipeline_sections(params: Params) -> dict:
    """Params as KFP parameter values: KFP has no null, so unset (None) keys are left to the schema's defaults."""

    def drop_none(value):
        if isinstance(value, dict):
            return {k: drop_none(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):  # e.g. evaluate.datasets: suite sets with unset fields
            return [drop_none(v) for v in value]
        return value

    return drop_none(params.model_dump(mode="json"))


def apply_overrides(params: Params, overrides: list[str]) -> Params:
    """`train.lr=0.0005`-style overrides (values parsed as YAML), validated against the schema."""
    raw = params.model_dump(mode="json")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"--param {item!r}: expected KEY=VALUE, e.g. train.lr=0.0005")
        node, parts = raw, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ParamsError(
                    f"--param {key}: unknown parameter (no section {part!r}); sections are {list(SECTIONS)}"
                )
            node = node[part]
        node[parts[-1]] = yaml.safe_load(value)
    return parse_params(raw, "--param overrides")
