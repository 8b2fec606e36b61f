"""FID / KID reports: one JSON, one Markdown table and one bar plot PNG for one run or several side by side.

A run is a result record of :func:`stella_diffusion.evaluation.metrics.compute_fid` with a ``name``. Numbers from
different feature extractors or resize conventions are not comparable; the report says so when runs differ.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # not pyplot: no global backend, no display needed

KID_SCALE = 1e3  # KID is reported ×10³, as usual in papers


def load_runs(specs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read result JSON files; ``name=path`` names a run, otherwise its ``name`` field or the file stem."""
    runs = []
    for spec in map(str, specs):
        name, sep, path = ("", "", spec) if Path(spec).is_file() else spec.partition("=")
        run = json.loads(Path(path).read_text(encoding="utf-8"))
        run["name"] = name if sep else run.get("name") or Path(path).stem
        runs.append(run)
    return runs


def _comparable(runs: Sequence[Mapping[str, Any]]) -> bool:
    return len({json.dumps(run.get("convention", {}), sort_keys=True) for run in runs}) <= 1


def _kid_cell(run: Mapping[str, Any]) -> str:
    if "kid_mean" not in run:
        return "–"
    return f"{run['kid_mean'] * KID_SCALE:.2f} ± {run['kid_std'] * KID_SCALE:.2f}"


def markdown_table(runs: Sequence[Mapping[str, Any]], title: str = "FID / KID") -> str:
    """A Markdown section: one row per run (with attribute accuracy when runs have it), then the convention."""
    attributes = list(dict.fromkeys(k for run in runs for k in run.get("accuracy", {})))
    lines = [
        f"## {title}",
        "",
        "| run | FID ↓ | KID ×10³ ↓ | generated | reference |" + "".join(f" {a} ↑ |" for a in attributes),
        "|---|---:|---:|---:|---:|" + "---:|" * len(attributes),
    ]
    for run in runs:
        accuracy = run.get("accuracy", {})
        cells = "".join(f" {accuracy[a]:.2f} |" if a in accuracy else " – |" for a in attributes)
        lines.append(
            f"| {run['name']} | {run['fid']:.3f} | {_kid_cell(run)} | {run.get('num_generated', '?')} "
            f"| {run.get('num_reference', '?')} |{cells}"
        )
    lines.append("")
    if attributes:
        lines.append("Attribute columns: share of generated images whose attribute the domain classifier reads as "
                     "the prompt asks (`all`: every attribute right).")
    references = {run.get("reference") for run in runs}
    if len(references) == 1 and None not in references:
        lines.append(f"Reference: `{references.pop()}`.")
    if _comparable(runs):
        convention = runs[0].get("convention", {}) if runs else {}
        if convention:
            size = convention.get("image_size")
            lines.append(
                f"Features: {convention.get('feature_extractor')} ({convention.get('num_features')}-d). "
                f"Images: {convention.get('resize')}, {size}×{size}."
            )
    else:
        lines.append(
            "**Warning:** the runs used different feature extractors or image conventions; not comparable."
        )
    return "\n".join(lines) + "\n"


def plot_runs(runs: Sequence[Mapping[str, Any]], path: str | Path, title: str = "FID / KID") -> Path:
    """Bar plot PNG: FID and (when present) KID ×10³ with its std, side by side, one bar per run."""
    names = [str(run["name"]) for run in runs]
    with_kid = any("kid_mean" in run for run in runs)
    panels = 2 if with_kid else 1
    fig = Figure(figsize=(2.5 + 0.9 * len(runs) * panels, 3.5))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    axes[0].bar_label(axes[0].bar(names, [run["fid"] for run in runs], color="tab:blue"), fmt="%.2f")
    axes[0].set_title("FID ↓")
    if with_kid:
        kid = [run.get("kid_mean", float("nan")) * KID_SCALE for run in runs]
        std = [run.get("kid_std", 0.0) * KID_SCALE for run in runs]
        axes[1].bar_label(axes[1].bar(names, kid, yerr=std, capsize=4, color="tab:orange"), fmt="%.2f")
        axes[1].set_title("KID ×10³ ↓")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def write_report(
    runs: Sequence[Mapping[str, Any]], out_dir: str | Path, title: str = "FID / KID"
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` under ``out_dir``; returns their paths."""
    if not runs:
        raise ValueError("No runs to report.")
    comparable = _comparable(runs)
    if not comparable:
        warnings.warn("Runs used different feature extractors or image conventions.", stacklevel=2)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "report.json",
        "markdown": out_dir / "report.md",
        "plot": out_dir / "report.png",
    }
    report = {"title": title, "comparable": comparable, "runs": [dict(run) for run in runs]}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown_table(runs, title), encoding="utf-8")
    plot_runs(runs, paths["plot"], title)
    return paths
