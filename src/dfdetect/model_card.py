"""The model card a registered version carries: intended use, known limits, data, metrics (the generalisation
suite included), training parameters; and its cut to the registry's description limit."""

from __future__ import annotations

import json

from .labels import LABEL_MAP
from .operating_point import describe
from .suite import table_markdown as suite_markdown

DESCRIPTION_LIMIT = 5000  # a version description's column (PostgreSQL enforces it)


def model_card(name: str, version: str, run, metrics: dict, data_report: dict | None) -> str:
    p = run.data.params
    lines = [
        f"# Model card: {name} version {version}",
        "",
        "## Intended use",
        "Flags face images (face crops) that were likely manipulated by face swapping, as a signal for human",
        "review in trust-and-safety workflows. The output is P(fake); the verdict uses the stored threshold.",
        "",
        "## Known limits",
        "- Measured only on the data sets below: expect lower accuracy on other generators, compression levels",
        "  and cameras (deepfake detectors typically lose 0.1-0.2 ROC-AUC across data sets); see Generalisation.",
        "- Not a proof of authenticity or of manipulation; do not use as the sole basis of a decision.",
        "- Scores whole images at the trained size; faces should be cropped as in training.",
        "",
        "## Data",
        f"- data version (DVC md5): `{run.data.tags.get('dfdetect.data_version', 'unknown')}`",
        f"- git commit: `{run.data.tags.get('dfdetect.git_commit', 'unknown')}`",
        f"- label map: {LABEL_MAP}",
    ]
    if data_report:
        for split, c in data_report.get("splits", {}).items():
            lines.append(f"- {split}: {c['real']} real, {c['fake']} fake")
    lines += training_sources_lines(run.data.tags.get("dfdetect.training_sources"))
    lines += lineage_lines(run.data.tags.get("dfdetect.lineage"))
    lines += operating_point_lines(metrics)
    lines += ["", f"## Metrics ({metrics.get('split', '?')} split)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float)]
    if metrics.get("sources"):
        lines += ["", suite_markdown("The same split by training source", metrics["sources"])]
    if metrics.get("datasets"):
        lines += [
            "",
            suite_markdown(
                "Generalisation: data sets it was not trained on (validation threshold)", metrics["datasets"]
            ),
        ]
    else:
        lines += [
            "",
            "## Generalisation",
            "",
            "Not measured: evaluate.datasets was empty, so nothing says how this model does on data of other sources.",
        ]
    lines += ["", "## Training parameters", ""]
    lines += [f"- `{k}`: {p[k]}" for k in sorted(p) if k.startswith(("model.", "train.", "prepare.", "seed"))]
    lines += ["", f"Training run: `{run.info.run_id}`"]
    return "\n".join(lines) + "\n"


def card_description(card: str, artifact_path: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """The card as a version description, cut at a line before the registry's length limit (the full card is
    logged with the run)."""
    if len(card) <= limit:
        return card
    note = f"\n\n(cut here: the full card is `{artifact_path}` in the training run's artifacts)\n"
    return card[: card.rfind("\n", 0, limit - len(note))] + note


def training_sources_lines(tag: str | None) -> list[str]:
    """The model card's list of training sources, from the run's dfdetect.training_sources tag."""
    try:
        sources = json.loads(tag) if tag else {}
    except json.JSONDecodeError:
        sources = {}
    if not sources:
        return []
    lines = [
        "",
        "## Training sources",
        "",
        "| source | DVC version | train real / fake | val real / fake |",
        "|---|---|---|---|",
    ]
    for name, s in sources.items():
        cells = [f"{s[k]['real']} / {s[k]['fake']}" if k in s else "-" for k in ("train", "val")]
        lines.append(f"| {name} | `{s.get('version', 'unknown')}` | {cells[0]} | {cells[1]} |")
    return lines


def lineage_lines(tag: str | None) -> list[str]:
    """Where a compressed model comes from (`dfdetect distill`, `dfdetect prune`), from the run's tag."""
    if not tag:
        return []
    lineage = json.loads(tag)
    lines = ["", "## Lineage", ""]
    if lineage.get("distilled_from"):
        lines.append(
            f"- distilled from {', '.join(f'`{t}`' for t in lineage['distilled_from'])} (soft-target weight "
            f"{lineage.get('alpha')}, temperature {lineage.get('temperature')})"
        )
    if lineage.get("pruned"):
        info = lineage["pruned"]
        lines.append(
            f"- pruned from `{lineage.get('pruned_from')}`: multiply-accumulates {info['macs_before']:,} -> "
            f"{info['macs_after']:,} ({info['mac_speedup']}x), parameters {info['params_before']:,} -> "
            f"{info['params_after']:,}; then fine-tuned"
        )
    return lines


def operating_point_lines(metrics: dict) -> list[str]:
    """What a verdict means: the threshold's policy, its rates on validation and on the evaluated split."""
    point = metrics.get("operating_point")
    lines = ["", "## Operating point", "", f"- {describe(point)}" if point else "- not recorded"]
    if point and "val_fpr" not in point:  # a fixed threshold: nothing measured on validation
        lines[-1] = f"- {point['policy']}: threshold {point['threshold']:.4f}"
    if "fpr" in metrics and "recall" in metrics:
        lines.append(
            f"- on the {metrics.get('split', '?')} split at that threshold: {metrics['fpr']:.2%} of real faces "
            f"flagged, {metrics['recall']:.2%} of fakes caught"
        )
    return lines
