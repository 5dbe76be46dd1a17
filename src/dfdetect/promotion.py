"""Promotion: the gate a challenger passes to become champion. It re-scores the challenger and the champion
on the same split (and the challenger on the suite sets of promotion.dataset_floors), checks the floors and
the required gain, and moves the aliases under the registry lock; every decision is reported (MLflow and
`promotion.md`). The registry itself (versions, aliases, loading, rollback) is `registry.py`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .config import LOWER_IS_BETTER, Params
from .io_utils import atomic_write_json, atomic_write_text
from .registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS_TAG,
    LoadedModel,
    RegistryError,
    alias_version,
    client_for,
    load_version,
    now_iso,
    record_alias,
    registry_lock,
)
from .suite import table_markdown as suite_markdown

log = logging.getLogger(__name__)


def _better(metric: str, challenger: float, champion: float, margin: float) -> bool:
    gain = champion - challenger if metric in LOWER_IS_BETTER else challenger - champion
    return gain >= margin - 1e-12


def _floor_holds(metric: str, value: float, floor: float) -> bool:
    return value <= floor if metric in LOWER_IS_BETTER else value >= floor


def _evaluate_version(loaded: LoadedModel, prepared_dir: Path, split: str) -> dict:
    from .evaluate import score_model, split_for
    from .metrics import compute_all

    data = split_for(prepared_dir, split, loaded.preprocess)
    scores, labels, _ = score_model(loaded.model, loaded.preprocess, data)
    return {k: round(v, 6) for k, v in compute_all(labels, scores, loaded.threshold).items()}


def floor_sets(params: Params) -> list:
    """The suite sets that promotion.dataset_floors names; refused at once when one is not in evaluate.datasets
    or its folder is missing."""
    from .evaluate import suite_sets

    floors = params.promotion.dataset_floors
    sets = {s.label: s for s in suite_sets(params)}
    unknown = sorted(set(floors) - set(sets))
    if unknown:
        raise RegistryError(
            f"promotion.dataset_floors names {unknown}, which evaluate.datasets does not list (it has {sorted(sets)})"
        )
    missing = [f"{n}: {sets[n].path}" for n in floors if not Path(sets[n].path).is_dir()]
    if missing:
        raise RegistryError(f"promotion.dataset_floors: data set folders not found: {missing}")
    return [sets[n] for n in floors]


def _suite_rows(loaded: LoadedModel, params: Params, sets: list) -> dict[str, dict]:
    """The version scored on the suite sets of the floors (at its own threshold)."""
    from .evaluate import score_model
    from .suite import score_suite

    return score_suite(
        sets,
        lambda data: score_model(loaded.model, loaded.preprocess, data)[0],
        loaded.preprocess.image_size,
        params.prepare.faces.with_margin(loaded.preprocess.face_margin),
        loaded.threshold,
    )


# group metrics: (the key of each attribute's spread in suite.group_rates, which attribute's value counts)
_GROUP_METRICS = {
    "real_fpr_ratio": ("real_fpr_ratio", max),
    "worst_group_real_fpr": ("real_fpr_max", max),
    "fake_recall_ratio": ("fake_recall_ratio", max),
    "worst_group_fake_recall": ("fake_recall_min", min),
}


def _suite_value(row: dict, metric: str) -> float | None:
    """A suite row's value of `metric`; for the group metrics, the worst attribute's (None: not measured, e.g.
    no attribute groups, or a ratio with no finite value, which fails its floor)."""
    if metric in _GROUP_METRICS:
        key, worst = _GROUP_METRICS[metric]
        values = [g.get(key) for g in row.get("groups", {}).values() if key in g]
        return None if not values or None in values else worst(values)
    return row.get(metric)


def decide(
    params: Params, challenger: dict, champion: dict | None, challenger_suite: dict[str, dict] | None = None
) -> tuple[str, list[str]]:
    """The gate: 'promoted' or 'rejected', with one line per check."""
    rule = params.promotion
    checks, ok = [], True
    for set_name, floors in rule.dataset_floors.items():
        row = (challenger_suite or {}).get(set_name, {})
        for metric, floor in floors.items():
            value = _suite_value(row, metric)
            holds = value is not None and _floor_holds(metric, value, floor)
            ok &= holds
            shown = "not measured" if value is None else f"{value:.4f}"
            checks.append(
                f"floor {set_name} {metric} {'<=' if metric in LOWER_IS_BETTER else '>='} {floor}: "
                f"{shown} {'holds' if holds else 'FAILS'}"
            )
    for metric, floor in rule.floors.items():
        holds = _floor_holds(metric, challenger[metric], floor)
        ok &= holds
        checks.append(
            f"floor {metric} {'<=' if metric in LOWER_IS_BETTER else '>='} {floor}: "
            f"{challenger[metric]:.4f} {'holds' if holds else 'FAILS'}"
        )
    if champion is not None:
        beats = _better(rule.metric, challenger[rule.metric], champion[rule.metric], rule.min_improvement)
        ok &= beats
        checks.append(
            f"{rule.metric}: challenger {challenger[rule.metric]:.4f} vs champion {champion[rule.metric]:.4f}, "
            f"needs an improvement of at least {rule.min_improvement}: {'yes' if beats else 'NO'}"
        )
    else:
        checks.append("no champion yet: the floors alone decide")
    return ("promoted" if ok else "rejected"), checks


def report_markdown(report: dict) -> str:
    lines = [
        f"# Promotion of {report['name']} version {report['challenger']['version']}: **{report['verdict']}**",
        "",
        f"At {report['at']}, on the '{report['split']}' split of {report['prepared_dir']}.",
        "",
        f"Rule: beat the champion on `{report['rule']['metric']}` by at least {report['rule']['min_improvement']}, "
        f"and hold every floor {report['rule']['floors']}.",
        "",
        "| metric | challenger | champion |",
        "|---|---|---|",
    ]
    champ = report["champion"]["metrics"] if report["champion"] else {}
    for k, v in report["challenger"]["metrics"].items():
        lines.append(f"| {k} | {v:.4f} | {champ[k]:.4f} |" if k in champ else f"| {k} | {v:.4f} | - |")
    if report.get("challenger_suite"):
        lines += [
            "",
            suite_markdown("The challenger on the suite sets of promotion.dataset_floors", report["challenger_suite"]),
        ]
    lines += ["", "## Checks"] + [f"- {c}" for c in report["checks"]]
    return "\n".join(lines) + "\n"


def promote(
    params: Params, prepared_dir: str | Path, out_dir: str | Path | None = None, expected_challenger: str | None = None
) -> dict:
    """Move `champion` to the `challenger` if it wins on the same data and holds every floor.

    `expected_challenger` (a pipeline's own registration) refuses to promote a challenger registered since.
    """
    from .evaluate import choose_split

    prepared_dir = Path(prepared_dir)
    client = client_for(params)
    name = params.registry.model_name
    split, notes = choose_split(prepared_dir, "test")
    gate_sets = floor_sets(params)
    suite, suite_version = None, None
    if gate_sets:  # scored before the lock (face crops of whole sets take minutes); checked under it below
        pending = alias_version(client, name, CHALLENGER)
        if pending is not None:
            suite_version = str(pending.version)
            suite = _suite_rows(load_version(client, name, suite_version), params, gate_sets)
    with registry_lock(client, name, params.promotion.lock_timeout_s, params.promotion.lock_lease_s):
        challenger_mv = alias_version(client, name, CHALLENGER)
        if challenger_mv is None:
            raise RegistryError(f"registered model '{name}' has no '{CHALLENGER}'; run `dfdetect register` first")
        if expected_challenger is not None and str(challenger_mv.version) != str(expected_challenger):
            raise RegistryError(
                f"'{CHALLENGER}' of '{name}' is version {challenger_mv.version}, not {expected_challenger}: "
                "another registration came in between; promote it deliberately"
            )
        if gate_sets and suite_version != str(challenger_mv.version):
            raise RegistryError(
                f"'{CHALLENGER}' of '{name}' moved to version {challenger_mv.version} while version "
                f"{suite_version} was scored on the suite; promote again"
            )
        champion_mv = alias_version(client, name, CHAMPION)
        report = {
            "name": name,
            "at": now_iso(),
            "split": split,
            "notes": notes,
            "prepared_dir": str(prepared_dir),
            "rule": params.promotion.model_dump(exclude={"lock_timeout_s", "lock_lease_s"}),
        }
        if champion_mv is not None and str(champion_mv.version) == str(challenger_mv.version):
            report.update(
                verdict="already champion",
                checks=[f"version {challenger_mv.version} is already '{CHAMPION}'"],
                challenger={"version": str(challenger_mv.version), "metrics": {}},
                champion=None,
            )
            return _write_report(report, out_dir)
        challenger = _evaluate_version(load_version(client, name, str(challenger_mv.version)), prepared_dir, split)
        champion = (
            _evaluate_version(load_version(client, name, str(champion_mv.version)), prepared_dir, split)
            if champion_mv is not None
            else None
        )
        verdict, checks = decide(params, challenger, champion, suite)
        if suite:
            report["challenger_suite"] = suite
        report.update(
            verdict=verdict,
            checks=checks,
            challenger={"version": str(challenger_mv.version), "metrics": challenger},
            champion={"version": str(champion_mv.version), "metrics": champion} if champion_mv else None,
        )

        prefix = "dfdetect.promotion."
        common = {
            prefix + "at": report["at"],
            prefix + "verdict": verdict,
            prefix + "rule": json.dumps(report["rule"], sort_keys=True),
        }
        for key, value in {
            **common,
            prefix + "compared_with": str(champion_mv.version) if champion_mv else "none",
            prefix + params.promotion.metric: str(challenger[params.promotion.metric]),
        }.items():
            client.set_model_version_tag(name, str(challenger_mv.version), key, value)
        if champion_mv is not None:
            for key, value in {
                **common,
                prefix + "challenged_by": str(challenger_mv.version),
                prefix + params.promotion.metric: str(champion[params.promotion.metric]),
            }.items():
                client.set_model_version_tag(name, str(champion_mv.version), key, value)
        if verdict == "promoted":
            client.set_model_version_tag(
                name, str(challenger_mv.version), PREVIOUS_TAG, str(champion_mv.version) if champion_mv else ""
            )
            client.set_registered_model_alias(name, CHAMPION, str(challenger_mv.version))
            record_alias(
                client,
                name,
                {
                    "alias": CHAMPION,
                    "version": str(challenger_mv.version),
                    "from": str(champion_mv.version) if champion_mv else None,
                    "at": report["at"],
                    "by": "promote",
                    "reason": "; ".join(checks),
                },
            )
        client.log_text(challenger_mv.run_id, json.dumps(report, indent=2), f"promotion/report-{report['at']}.json")
        client.log_text(challenger_mv.run_id, report_markdown(report), f"promotion/report-{report['at']}.md")
    log.info("promotion of %s v%s: %s", name, challenger_mv.version, verdict)
    return _write_report(report, out_dir)


def _write_report(report: dict, out_dir) -> dict:
    if out_dir:
        atomic_write_json(Path(out_dir) / "promotion.json", report)
        atomic_write_text(Path(out_dir) / "promotion.md", report_markdown(report))
    return report


# --- rollback and listing ---------------------------------------------------------------------------------
