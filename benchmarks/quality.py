"""Fine-tuning quality on the embedded base: StelLA vs LoRA vs DoRA, same rank, steps and learning-rate sweep.

Two tasks on what the tiny base (stella_diffusion/shapes/assets/tiny-shapes-t2i) never saw, with the data of
data/tiny-demo: ``concept`` (the star shape, captioned with the identifier ``sks``) and ``style`` (the
outlined style). Every run is ``train_dreambooth_stella.py --config configs/tiny-demo.yaml`` with the task's
folders, the adapter, a learning rate and a seed; its post-training evaluation draws images on the reference
captions and scores them with the shapes classifier: FID / KID on its features against the held-out
reference set, and the share of images showing the prompted shape, colour, style (``all``: every attribute).

Protocol: each learning rate of ``--learning_rates`` is tried with the first seed; the one with the lowest
FID is then run with the other seeds; the table gives mean ± std over the seeds at that learning rate, for
every adapter alike. The base model is scored once per task on the same prompts.

    python benchmarks/quality.py [--jobs 2] [--max_train_steps 400] [--output_dir benchmarks/results]

Runs live under ``--work_dir`` (outputs/quality: adapters and images, not committed); finished ones (their
eval/report.json exists) are reused, so an interrupted benchmark resumes where it stopped. The results go to
``--output``: quality.json, quality.md and quality.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from stella_diffusion.evaluation.comparison import (
    build_fid_metric,
    cycle_prompts,
    evaluate_pipeline,
    read_eval_prompts,
)
from stella_diffusion.evaluation.generation import load_pipeline

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_dreambooth_stella.py"
CONFIG = REPO / "configs" / "tiny-demo.yaml"
DATA = REPO / "data" / "tiny-demo"
BASE = REPO / "stella_diffusion" / "shapes" / "assets" / "tiny-shapes-t2i"
TASKS = ("concept", "style")
ADAPTERS = ("stella", "lora", "dora")
REPORTED_ACCURACY = {"concept": ("shape", "colour", "all"), "style": ("style", "shape", "colour", "all")}


@dataclass(frozen=True)
class Run:
    """One fine-tune of the benchmark."""

    task: str
    adapter: str
    learning_rate: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task}-{self.adapter}-lr{self.learning_rate:g}-seed{self.seed}"


def task_flags(task: str) -> list[str]:
    """The data of a task: training folder, reference folder and its captions as evaluation prompts."""
    reference = DATA / f"{task}-reference"
    return ["--instance_data_dir", str(DATA / f"{task}-train"), "--eval_reference_dir", str(reference),
            "--eval_prompts", str(reference / "metadata.jsonl")]


def train_and_score(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune and evaluate one run in a subprocess (one torch thread); reuse a finished one."""
    out = Path(args.work_dir, "runs", run.name)
    report = out / "eval" / "report.json"
    if not report.is_file():
        argv = [sys.executable, str(SCRIPT), "--config", str(CONFIG), *task_flags(run.task),
                "--output_dir", str(out), "--adapter", run.adapter, "--rank", str(args.rank),
                "--lora_alpha", str(args.rank), "--learning_rate", str(run.learning_rate), "--seed", str(run.seed),
                "--max_train_steps", str(args.max_train_steps), "--num_eval_images", str(args.num_eval_images),
                "--no-eval_base", "--validation_prompt", "",  # no validation images
                "--checkpointing_steps", str(10**9), "--report_to", "none"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{run.name} failed:\n{proc.stderr[-3000:]}")
        (out / "wall_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    (result,) = json.loads(report.read_text())["runs"]
    seconds = out / "wall_seconds.txt"
    wall = float(seconds.read_text()) if seconds.is_file() else None
    print(f"{run.name}: FID {result['fid']:.1f}, accuracy {result.get('accuracy')}", flush=True)
    return {**asdict(run), "fid": result["fid"], "kid_mean": result.get("kid_mean"),
            "accuracy": result.get("accuracy", {}), "wall_seconds": wall}


def score_base(task: str, args: argparse.Namespace) -> dict[str, Any]:
    """The base model on the same prompts and generation settings (seed 0), for reference."""
    torch.set_num_threads(1)
    reference = DATA / f"{task}-reference"
    prompts = cycle_prompts(read_eval_prompts(reference / "metadata.jsonl"), args.num_eval_images)
    settings = json.loads((BASE / "generation_defaults.json").read_text())
    kwargs = {k: settings[k] for k in ("height", "width", "num_inference_steps", "guidance_scale")}
    result = evaluate_pipeline(load_pipeline(BASE), "base", prompts, Path(args.work_dir, "base", task), reference,
                               build_fid_metric("domain"), seed=0, batch_size=16, generation_kwargs=kwargs,
                               progress=False)
    return {"task": task, "fid": result["fid"], "kid_mean": result.get("kid_mean"),
            "accuracy": result.get("accuracy", {})}


def best_learning_rates(records: Sequence[dict[str, Any]], seed: int) -> dict[tuple[str, str], float]:
    """Per (task, adapter): the learning rate with the lowest FID among the sweep runs of ``seed``."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        key = (record["task"], record["adapter"])
        if record["seed"] == seed and (key not in best or record["fid"] < best[key]["fid"]):
            best[key] = record
    return {key: record["learning_rate"] for key, record in best.items()}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(records: Sequence[dict[str, Any]], best: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
    """Mean ± std over seeds at each (task, adapter)'s chosen learning rate."""
    rows = []
    for (task, adapter), lr in best.items():
        chosen = [r for r in records if (r["task"], r["adapter"], r["learning_rate"]) == (task, adapter, lr)]
        row = {"task": task, "adapter": adapter, "learning_rate": lr, "seeds": sorted(r["seed"] for r in chosen),
               "fid": _mean_std([r["fid"] for r in chosen])}
        for attribute in REPORTED_ACCURACY[task]:
            row[attribute] = _mean_std([r["accuracy"][attribute] for r in chosen])
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]], bases: dict[str, dict[str, Any]],
             settings: dict[str, Any]) -> str:
    """The result tables: mean ± std per task at the chosen rates, then the sweep (FID at the first seed)."""
    lines = ["# Fine-tuning quality on the embedded base", "",
             f"{settings['max_train_steps']} steps, batch 8, rank {settings['rank']}, "
             f"{settings['num_eval_images']} evaluation images per run, seeds {settings['seeds']}; "
             "FID / accuracy from the shapes classifier. Mean ± std over seeds at each adapter's best "
             "learning rate (lowest FID at the first seed).", ""]
    for task in dict.fromkeys(row["task"] for row in rows):
        attributes = REPORTED_ACCURACY[task]
        lines += [f"## {task}", "", "| adapter | lr | FID ↓ |" + "".join(f" {a} ↑ |" for a in attributes),
                  "|---|---:|---:|" + "---:|" * len(attributes)]
        base = bases.get(task)
        if base:
            cells = "".join(f" {base['accuracy'].get(a, float('nan')):.2f} |" for a in attributes)
            lines.append(f"| base (no fine-tune) | – | {base['fid']:.1f} |{cells}")
        for row in (r for r in rows if r["task"] == task):
            cells = "".join(f" {row[a][0]:.2f} ± {row[a][1]:.2f} |" for a in attributes)
            fid_mean, fid_std = row["fid"]
            lines.append(f"| {row['adapter']} | {row['learning_rate']:g} | {fid_mean:.1f} ± {fid_std:.1f} |{cells}")
        lines.append("")
    lrs = sorted({r["learning_rate"] for r in records})
    first = settings["seeds"][0]
    lines += [f"## Learning-rate sweep (FID, seed {first})", "",
              "| task | adapter |" + "".join(f" lr {lr:g} |" for lr in lrs), "|---|---|" + "---:|" * len(lrs)]
    for task, adapter in dict.fromkeys((r["task"], r["adapter"]) for r in records):
        fids = {r["learning_rate"]: r["fid"] for r in records
                if (r["task"], r["adapter"], r["seed"]) == (task, adapter, first)}
        lines.append(f"| {task} | {adapter} |" + "".join(f" {fids[lr]:.1f} |" if lr in fids else " – |" for lr in lrs))
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """FID and ``all``-attribute accuracy, mean ± std, one group of bars per task."""
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    adapters = list(dict.fromkeys(row["adapter"] for row in rows))
    fig = Figure(figsize=(9, 3.6))
    axes = fig.subplots(1, 2)
    width = 0.8 / len(adapters)
    for k, adapter in enumerate(adapters):
        for ax, metric in zip(axes, ("fid", "all"), strict=True):
            xs, means, stds = [], [], []
            for t, task in enumerate(tasks):
                row = next((r for r in rows if (r["task"], r["adapter"]) == (task, adapter)), None)
                if row is not None:
                    xs.append(t + (k - (len(adapters) - 1) / 2) * width)
                    means.append(row[metric][0])
                    stds.append(row[metric][1])
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=adapter)
    for ax, title in zip(axes, ("FID (shapes classifier) ↓", "prompted attributes all right ↑"), strict=True):
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--adapters", nargs="+", choices=ADAPTERS, default=list(ADAPTERS))
    parser.add_argument("--learning_rates", nargs="+", type=float, default=[5e-4, 1e-3, 2e-3, 4e-3, 8e-3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_train_steps", type=int, default=400)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--num_eval_images", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one torch thread each)")
    parser.add_argument("--work_dir", default="outputs/quality", help="the runs' adapters and images")
    parser.add_argument("--output_dir", default="benchmarks/results", help="where quality.{json,md,png} go")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    sweep = [Run(t, a, lr, args.seeds[0]) for t in args.tasks for a in args.adapters for lr in args.learning_rates]
    with ThreadPoolExecutor(args.jobs) as pool:
        records = list(pool.map(lambda run: train_and_score(run, args), sweep))
        best = best_learning_rates(records, args.seeds[0])
        repeats = [Run(t, a, best[t, a], seed) for t, a in best for seed in args.seeds[1:]]
        records += list(pool.map(lambda run: train_and_score(run, args), repeats))
    bases = {task: score_base(task, args) for task in args.tasks}
    rows = summarise(records, best)
    settings = {k: getattr(args, k) for k in ("max_train_steps", "rank", "num_eval_images", "seeds",
                                              "learning_rates")}
    result = {"settings": settings, "summary": rows, "base": bases, "runs": records}
    (output / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(rows, records, bases, settings)
    (output / "quality.md").write_text(table)
    plot(rows, output / "quality.png")
    print(table)
    print(f"Wrote {output / 'quality.json'}, {output / 'quality.md'}, {output / 'quality.png'}")
    return result


if __name__ == "__main__":
    main()
