"""FID / KID reports: one JSON, one Markdown table and one bar plot PNG for one run or several side by side.

A run is a result record of :func:`stella_diffusion.evaluation.metrics.compute_fid` with a ``name``, optionally
with the scores of :mod:`stella_diffusion.evaluation.semantic_metrics` (CLIP-T, CLIP-I, DINO, CMMD, drift), which get
their own columns. Numbers from different feature extractors or resize conventions are not comparable; the report
says so when runs differ, and always states the extractor, the resize convention and the image counts.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # not pyplot: no global backend, no display needed

KID_SCALE = 1e3  # KID on Inception features is reported ×10³, as usual in papers
_INCEPTION_MARK = "InceptionV3"  # in the names of both Inception extractors (stella_diffusion.inception)
# (record key, column header, format): shown when any run has the key
SEMANTIC_COLUMNS = (
    ("clip_t", "CLIP-T ↑", "{:.2f}"),
    ("clip_i", "CLIP-I ↑", "{:.3f}"),
    ("dino", "DINO ↑", "{:.3f}"),
    ("cmmd", "CMMD ↓", "{:.3f}"),
    ("drift", "drift ↓", "{:.4f}"),
    ("drift_fid", "drift FID", "{:.2f}"),
)


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


def kid_scale(runs: Sequence[Mapping[str, Any]]) -> float:
    """×10³ when every run's features are Inception's (KID ~ 10⁻³ there), else 1: other features have other scales."""
    names = [str(run.get("convention", {}).get("feature_extractor", "")) for run in runs]
    return KID_SCALE if names and all(_INCEPTION_MARK in name for name in names) else 1.0


def _kid_label(scale: float) -> str:
    return "KID ×10³" if scale == KID_SCALE else "KID"


def _kid_cell(run: Mapping[str, Any], scale: float) -> str:
    if "kid_mean" not in run:
        return "–"
    if scale == KID_SCALE:
        return f"{run['kid_mean'] * scale:.2f} ± {run['kid_std'] * scale:.2f}"
    return f"{run['kid_mean']:.4g} ± {run['kid_std']:.2g}"  # unscaled: significant digits, whatever the scale


def _semantic_columns(runs: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    return [column for column in SEMANTIC_COLUMNS if any(column[0] in run for run in runs)]


def _features_line(convention: Mapping[str, Any]) -> str:
    size = convention.get("image_size")
    return (f"{convention.get('feature_extractor')} ({convention.get('num_features')}-d); "
            f"images: {convention.get('resize')}, {size}×{size}.")


def _notes(runs: Sequence[Mapping[str, Any]], scale: float) -> list[str]:
    """What the numbers were measured with: extractor, resize, KID scale, semantic models and image counts."""
    lines = []
    if _comparable(runs):
        convention = runs[0].get("convention", {}) if runs else {}
        if convention:
            lines.append("FID / KID features: " + _features_line(convention))
    else:
        lines.append(
            "**Warning:** the runs used different feature extractors or image conventions; not comparable."
        )
        lines += [f"- `{run['name']}`: " + _features_line(run.get("convention", {})) for run in runs]
    if any("kid_mean" in run for run in runs):
        lines.append(f"KID is shown {'×10³ (Inception features)' if scale != 1 else 'as computed (not scaled)'}, "
                     "mean ± std over subsets.")
    semantic = next((run["semantic_convention"] for run in runs if "semantic_convention" in run), None)
    if semantic:
        models = [f"CLIP `{semantic['clip_model']}` ({semantic['clip_image_size']} px)" if semantic.get("clip_model")
                  else "", f"DINO `{semantic['dino_model']}` ({semantic['dino_image_size']} px)"
                  if semantic.get("dino_model") else ""]
        lines.append("Semantic scores: " + ", ".join(m for m in models if m) + f"; images: {semantic['resize']}. "
                     f"CMMD: σ = {semantic['cmmd']['sigma']:g}, ×{semantic['cmmd']['scale']:g}, "
                     f"{semantic['cmmd']['estimator']} estimator.")
    counts = {key: {run.get(key) for run in runs} - {None} for key in ("num_subject", "num_reference_cmmd",
                                                                        "num_drift")}
    labels = {"num_subject": "subject images", "num_reference_cmmd": "reference images (CMMD)",
              "num_drift": "drift pairs"}
    described = [f"{labels[key]}: {', '.join(map(str, sorted(values)))}" for key, values in counts.items() if values]
    if described:
        lines.append("Counts: " + "; ".join(described) + ".")
    drift = next((run.get("drift_feature") for run in runs if run.get("drift_feature")), None)
    if drift:
        lines.append(f"Drift: 1 − mean cosine similarity of base / adapted image pairs (same prompts and seeds) in "
                     f"`{drift}` features; drift FID: between the two sets.")
    return lines


def markdown_table(runs: Sequence[Mapping[str, Any]], title: str = "FID / KID") -> str:
    """A Markdown section: one row per run (attribute accuracy and semantic scores when runs have them), then
    what the numbers were measured with."""
    attributes = list(dict.fromkeys(k for run in runs for k in run.get("accuracy", {})))
    semantic = _semantic_columns(runs)
    scale = kid_scale(runs)
    header = f"| run | FID ↓ | {_kid_label(scale)} ↓ | generated | reference |"
    lines = [
        f"## {title}",
        "",
        header + "".join(f" {label} |" for _, label, _ in semantic) + "".join(f" {a} ↑ |" for a in attributes),
        "|---|---:|---:|---:|---:|" + "---:|" * (len(semantic) + len(attributes)),
    ]
    for run in runs:
        accuracy = run.get("accuracy", {})
        cells = "".join(f" {fmt.format(run[key])} |" if key in run else " – |" for key, _, fmt in semantic)
        cells += "".join(f" {accuracy[a]:.2f} |" if a in accuracy else " – |" for a in attributes)
        lines.append(
            f"| {run['name']} | {run['fid']:.3f} | {_kid_cell(run, scale)} | {run.get('num_generated', '?')} "
            f"| {run.get('num_reference', '?')} |{cells}"
        )
    lines.append("")
    if attributes:
        lines.append("Attribute columns: share of generated images whose attribute the domain classifier reads as "
                     "the prompt asks (`all`: every attribute right).")
    references = {run.get("reference") for run in runs}
    if len(references) == 1 and None not in references:
        lines.append(f"Reference: `{references.pop()}`.")
    lines += _notes(runs, scale)
    return "\n".join(lines) + "\n"


def plot_runs(runs: Sequence[Mapping[str, Any]], path: str | Path, title: str = "FID / KID") -> Path:
    """Bar plot PNG, one bar per run: FID, KID (with its std; ×10³ on Inception features) when present, and
    each semantic score some run has."""
    names = [str(run["name"]) for run in runs]
    scale = kid_scale(runs)
    panels: list[tuple[str, list[float], list[float] | None]] = [("FID ↓", [run["fid"] for run in runs], None)]
    if any("kid_mean" in run for run in runs):
        panels.append((f"{_kid_label(scale)} ↓", [run.get("kid_mean", float("nan")) * scale for run in runs],
                       [run.get("kid_std", 0.0) * scale for run in runs]))
    for key, label, _ in _semantic_columns(runs):
        panels.append((label, [run.get(key, float("nan")) for run in runs], None))
    fig = Figure(figsize=(2.5 + 0.9 * len(runs) * len(panels), 3.5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")
    for ax, (label, values, errors), colour in zip(axes, panels, colours, strict=False):
        bars = ax.bar(names, values, yerr=errors, capsize=4 if errors else 0, color=colour)
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(label)
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
