"""Fine-tuning quality on the embedded base: StelLA against every peft neighbour, paired by seed, two recipes.

Two tasks on what the tiny base (stella_diffusion/shapes/assets/tiny-shapes-t2i) never saw, with the data of
data/tiny-demo: ``concept`` (the star shape under the identifier ``sks``) and ``style`` (the outlined style).
Every run is ``train_dreambooth_stella.py --config configs/tiny-demo.yaml`` with a task's folders, an arm (an
adapter and its flags), a recipe, a learning rate and a seed, run in one of ``--jobs`` long-lived worker processes
(one torch thread each) that import the script once. Its post-training evaluation draws
``--num_eval_images`` images on the reference captions and scores them with the shapes classifier (FID on its
features against the 256 held-out reference images, and the share of images showing every prompted attribute),
then draws the 16 base-domain prompts of data/tiny-demo/drift-prompts.txt with the adapter off and on: the drift
(1 − cosine similarity of the pairs' features) says how much the fine-tune changed what the base already drew.

Recipes (``--settings``): ``constant`` (the demo's: constant rate, rank 8, α 8) and ``paper`` (the paper's
text-to-image recipe: cosine schedule, rank 4, α 4); both batch 8, weight decay 0.01, ``--max_train_steps``.

Protocol, per recipe:
1. Sweep: each arm runs every rate of ``--learning_rates`` on every task, pairing tasks and ``--sweep_seeds`` in
   turn (two tasks, seeds 0 1: concept with seed 0, style with seed 1), so each rate is judged on at least two
   seeds and every task. The rate with the lowest geometric-mean FID over those runs is the arm's rate; while it
   is the grid's largest (smallest), twice (half) it is tried too, up to ``--max_grid_extensions`` times.
2. Final: each arm at its rate on every task and every seed of ``--seeds`` (sweep runs at that rate are reused).
   The seed fixes the data order, noise and timesteps, so runs with the same seed are paired across arms.
3. Ablations (recipe ``--ablation_setting``): StelLA's variants at StelLA's rate, every task, ``--ablation_seeds``.
Recipes run in the order given, each finished before the next starts; within one, the arms run side by side.
Statistics: mean ± 95 % t-interval per arm; StelLA minus each other arm, paired by seed, with its 95 % interval,
a paired t-test and the exact sign-flip permutation test (whose smallest two-sided p with 5 pairs is 1/16).

    python benchmarks/quality.py [--jobs 2] [--quick]

Runs live under ``--work_dir`` (outputs/quality, not committed); a run whose eval/report.json exists and whose
command line is unchanged (run.json) is reused, so an interrupted benchmark resumes where it stopped;
``--report_only`` writes the results of the finished runs without training. The results go to ``--output_dir``:
quality.json, quality.md and quality.png.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import itertools
import json
import math
import os
import queue
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from matplotlib.figure import Figure
from scipy import stats

from stella_diffusion.evaluation.comparison import (
    build_fid_metric,
    cycle_prompts,
    evaluate_pipeline,
    read_eval_prompts,
)
from stella_diffusion.evaluation.generation import load_pipeline
from stella_diffusion.files import atomic_path, write_text_atomic

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_dreambooth_stella.py"
CONFIG = REPO / "configs" / "tiny-demo.yaml"
DATA = REPO / "data" / "tiny-demo"
BASE = REPO / "stella_diffusion" / "shapes" / "assets" / "tiny-shapes-t2i"
TASKS = ("concept", "style")
# the attributes reported per task besides `all` (every prompted attribute right)
TASK_ATTRIBUTE = {"concept": "shape", "style": "style"}
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "constant": ("the demo's recipe: constant rate, rank 8, α 8, weight decay 0.01, batch 8",
                 ["--lr_scheduler", "constant", "--rank", "8", "--lora_alpha", "8", "--adam_weight_decay", "0.01"]),
    "paper": ("the paper's text-to-image recipe: cosine schedule, rank 4, α 4, weight decay 0.01, batch 8",
              ["--lr_scheduler", "cosine", "--rank", "4", "--lora_alpha", "4", "--adam_weight_decay", "0.01"]),
}
# peft's PiSSA start takes linear layers only: the demo config's targets without its 1x1 convolutions
LINEAR_TARGETS = ",".join(target for target in yaml.safe_load(CONFIG.read_text())["lora_layers"].split(",")
                          if target not in ("proj_in", "proj_out"))
ARMS: dict[str, list[str]] = {
    "stella": ["--adapter", "stella"],
    "lora": ["--adapter", "lora"],
    "dora": ["--adapter", "dora"],
    "pissa": ["--adapter", "pissa", "--lora_layers", LINEAR_TARGETS],
    "lora-riemannian": ["--adapter", "lora", "--lora_riemannian_preconditioner"],
}
# StelLA's variants (the paper's Tables 5-6), the starts first (they decide the script's default); the default is
# polar, full S, gradient scaling, random orthonormal U, V with S = I
ABLATIONS: dict[str, list[str]] = {
    "stella-zero-init": ["--adapter", "stella", "--stella_init", "zero"],
    "stella-function-preserving": ["--adapter", "stella", "--stella_function_preserving"],
    "stella-qr": ["--adapter", "stella", "--stella_retraction", "qr"],
    "stella-exp": ["--adapter", "stella", "--stella_retraction", "exp"],
    "stella-diag-s": ["--adapter", "stella", "--stella_diag_s"],
    "stella-no-grad-scaling": ["--adapter", "stella", "--stella_grad_scaling", "false"],
}
ARM_FLAGS = {**ARMS, **ABLATIONS}
METRICS = ("fid", "all", "task_attribute", "drift")  # lower, higher, higher, lower is better
QUICK = ["--settings", "paper", "--tasks", "concept", "--arms", "stella", "lora", "--ablations", "stella-zero-init",
         "--learning_rates", "1e-3", "2e-3", "--max_grid_extensions", "1", "--sweep_seeds", "0", "1",
         "--seeds", "0", "1", "2", "--ablation_seeds", "0", "1",
         "--max_train_steps", "2", "--num_eval_images", "4"]


@dataclass(frozen=True)
class Run:
    """One fine-tune of the benchmark."""

    setting: str
    task: str
    arm: str
    learning_rate: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.task}/{self.arm}/lr{self.learning_rate:g}-seed{self.seed}"


def run_argv(run: Run, args: argparse.Namespace, output_dir: Path) -> list[str]:
    """The training script's command line for ``run`` (script, then arguments): the demo config, the task's data,
    recipe, arm and seed."""
    reference = DATA / f"{run.task}-reference"
    return [str(SCRIPT), "--config", str(CONFIG),
            "--instance_data_dir", str(DATA / f"{run.task}-train"), "--eval_reference_dir", str(reference),
            "--eval_prompts", str(reference / "metadata.jsonl"), "--eval_drift_prompts", str(args.drift_prompts),
            *SETTINGS[run.setting][1], *ARM_FLAGS[run.arm], "--output_dir", str(output_dir),
            "--learning_rate", str(run.learning_rate), "--seed", str(run.seed), "--lr_warmup_steps", "0",
            "--max_train_steps", str(args.max_train_steps), "--num_eval_images", str(args.num_eval_images),
            "--num_inference_steps", str(args.num_inference_steps), "--sample_batch_size", "64",
            "--cache_latents", "--pre_compute_text_embeddings",
            "--no-eval_base", "--validation_prompt", "",  # the base is scored once per task; no validation images
            "--checkpointing_steps", str(10**9), "--report_to", "none"]


class Workers:
    """Long-lived training processes, one per job: each imports the training script once and runs one command line
    after another in-process (one torch thread), which saves the ≈ 12 s interpreter and import start-up per run.

    A worker's output goes to the run's train.log. A worker is replaced after `RUNS_PER_WORKER` runs (nothing a
    run leaves behind accumulates) and when it dies.
    """

    RUNS_PER_WORKER = 40

    def __init__(self) -> None:
        self._idle: queue.SimpleQueue[tuple[subprocess.Popen, int]] = queue.SimpleQueue()
        self._all: list[subprocess.Popen] = []

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        worker = subprocess.Popen([sys.executable, __file__, "--serve"], cwd=REPO, env=env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._all.append(worker)
        return worker

    def run(self, argv: list[str], log: Path) -> str | None:
        """Run the training script on ``argv`` (its arguments) in an idle worker; the script's error line or
        ``None``."""
        try:
            worker, runs = self._idle.get_nowait()
        except queue.Empty:
            worker, runs = self._start(), 0
        try:
            worker.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
            worker.stdin.flush()
            reply = worker.stdout.readline()
        except BrokenPipeError:
            reply = ""
        if not reply:  # killed or out of memory: not the run's result, so nothing is recorded and a resume redoes it
            raise RuntimeError(f"a training worker died (exit status {worker.wait()}); its output: {log}")
        if runs + 1 < self.RUNS_PER_WORKER:
            self._idle.put((worker, runs + 1))
        else:
            worker.stdin.close()
            worker.wait()
        return json.loads(reply)["error"]

    def close(self) -> None:
        """End every worker: an idle one at once; one still running a run (after an error) is killed."""
        for worker in self._all:
            if worker.poll() is None:
                worker.stdin.close()
                try:
                    worker.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()


def serve() -> None:
    """A worker's loop (`Workers`): read a command line, run the training script's ``main`` on it with this
    process's output sent to the given log, reply with its error line (``null`` when it finished)."""
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("train_dreambooth_stella", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    reply = os.fdopen(os.dup(1), "w")  # the reply channel, before fd 1 goes to each run's log
    for line in sys.stdin:
        job = json.loads(line)
        error = None
        with open(job["log"], "w") as log:
            sys.stdout.flush()
            sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                script.main(script.parse_args(job["argv"]))
            except (script.TrainingError, script.EvaluationError) as err:
                error = f"error: {err}"
            except (Exception, SystemExit) as err:  # a failed run is a result; the worker goes on
                traceback.print_exc()
                error = f"{type(err).__name__}: {err}"
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
                AcceleratorState._reset_state(reset_partial_state=True)  # the next run builds its own
                GradientState._reset_state()
                gc.collect()
        reply.write(json.dumps({"error": error}) + "\n")
        reply.flush()


def train_and_score(run: Run, args: argparse.Namespace, workers: Workers) -> dict[str, Any] | None:
    """Fine-tune and evaluate one run in a worker; reuse a finished, unchanged one.

    A run the script stops (diverged, non-finite) is recorded as failed, with the script's error line. With
    ``--report_only`` a run not finished yet is not started: ``None``.
    """
    out = Path(args.work_dir, "runs", run.name)
    argv = run_argv(run, args, out)
    report, spec = out / "eval" / "report.json", out / "run.json"
    saved = json.loads(spec.read_text()) if spec.is_file() else {}
    if saved.get("argv") != argv or not (report.is_file() or "error" in saved):
        if args.report_only:
            return None
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        start = time.perf_counter()
        error = workers.run(argv[1:], out / "train.log")
        saved = {"argv": argv, "wall_seconds": round(time.perf_counter() - start, 1)}
        if error is not None:
            saved["error"] = error
        write_text_atomic(spec, json.dumps(saved, indent=1) + "\n")
    record = {**asdict(run), "wall_seconds": saved["wall_seconds"]}
    if "error" in saved:
        print(f"{run.name}: FAILED ({saved['error']})", flush=True)
        return {**record, "error": saved["error"]}
    (result,) = json.loads(report.read_text())["runs"]
    accuracy = result.get("accuracy", {})
    record.update(fid=result["fid"], all=accuracy.get("all"), task_attribute=accuracy.get(TASK_ATTRIBUTE[run.task]),
                  drift=result.get("drift"), drift_fid=result.get("drift_fid"), accuracy=accuracy)
    print(f"{run.name}: FID {record['fid']:.1f}, all {record['all']}, drift {record['drift']}", flush=True)
    return record


def score_base(task: str, args: argparse.Namespace) -> dict[str, Any]:
    """The base model on the task's prompts with the runs' generation settings (seed 0), for reference."""
    torch.set_num_threads(1)
    reference = DATA / f"{task}-reference"
    prompts = cycle_prompts(read_eval_prompts(reference / "metadata.jsonl"), args.num_eval_images)
    settings = json.loads((BASE / "generation_defaults.json").read_text())
    kwargs = {"height": settings["height"], "width": settings["width"], "guidance_scale": settings["guidance_scale"],
              "num_inference_steps": args.num_inference_steps}
    result = evaluate_pipeline(load_pipeline(BASE), "base", prompts, Path(args.work_dir, "base", task), reference,
                               build_fid_metric("domain"), seed=0, batch_size=64, generation_kwargs=kwargs,
                               progress=False)
    accuracy = result.get("accuracy", {})
    return {"task": task, "fid": result["fid"], "all": accuracy.get("all"),
            "task_attribute": accuracy.get(TASK_ATTRIBUTE[task]), "drift": 0.0}


def sweep_runs(setting: str, arm: str, rates: Sequence[float], args: argparse.Namespace) -> list[Run]:
    """Each of ``rates`` on every task, tasks and sweep seeds paired in turn (see the module docstring)."""
    count = max(len(args.tasks), len(args.sweep_seeds))
    pairs = [(args.tasks[k % len(args.tasks)], args.sweep_seeds[k % len(args.sweep_seeds)]) for k in range(count)]
    return [Run(setting, task, arm, lr, seed) for lr in rates for task, seed in pairs]


def next_rate(best: float, scores: dict[float, float], max_extensions: int, extended: int) -> float | None:
    """A rate beyond the grid when the chosen one, ``best``, sits at its edge (×2 above, ÷2 below), else ``None``."""
    if extended >= max_extensions:
        return None
    if not math.isfinite(scores[best]):  # every rate failed: nothing to follow
        return None
    if best == max(scores):
        return best * 2
    if best == min(scores) and len(scores) > 1:
        return best / 2
    return None


def choose_rate(records: Sequence[dict[str, Any]]) -> tuple[float, dict[float, float]]:
    """The rate with the lowest geometric-mean FID over its sweep runs (a failed run counts as infinite FID).

    Returns:
        the chosen rate and the geometric-mean FID of every rate.
    """
    by_rate: dict[float, list[float]] = {}
    for record in records:
        by_rate.setdefault(record["learning_rate"], []).append(record.get("fid", math.inf))
    scores = {lr: math.exp(statistics.fmean(math.log(f) for f in fids)) if math.isfinite(max(fids)) else math.inf
              for lr, fids in by_rate.items()}
    return min(scores, key=lambda lr: (scores[lr], lr)), scores


def mean_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and the half-width of its 95 % t-interval (``None`` with fewer than two values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "n": len(values)}
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": float(half), "n": len(values)}


def sign_flip_p(differences: Sequence[float]) -> float:
    """Exact two-sided sign-flip permutation p-value of the mean of paired differences."""
    observed = abs(statistics.fmean(differences))
    flips = list(itertools.product((1, -1), repeat=len(differences)))
    extreme = sum(abs(statistics.fmean(s * d for s, d in zip(signs, differences, strict=True))) >= observed - 1e-12
                  for signs in flips)
    return extreme / len(flips)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict[str, Any] | None:
    """``a − b`` over the seeds both have: mean, 95 % t-interval, paired t-test and sign-flip p-values."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    differences = [a[s] - b[s] for s in seeds]
    result = {**mean_interval(differences), "seeds": seeds, "sign_flip_p": sign_flip_p(differences)}
    if statistics.pstdev(differences) == 0:
        return {**result, "t_test_p": 1.0 if differences[0] == 0 else 0.0}
    return {**result, "t_test_p": float(stats.ttest_1samp(differences, 0.0).pvalue)}


def summarise(records: Sequence[dict[str, Any]], chosen: dict[tuple[str, str], float],
              args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per (recipe, task, arm) at the arm's rate: each metric's mean ± 95 % interval over the final seeds; and
    StelLA minus every other arm, paired by seed, per metric.

    Returns:
        the summary rows and the paired comparisons.
    """
    finals: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    for record in records:
        key = (record["setting"], record["task"], record["arm"])
        rate = chosen.get((record["setting"], record["arm"]))
        if rate == record["learning_rate"] and record["seed"] in args.seeds:
            finals.setdefault(key, {})[record["seed"]] = record
    rows, comparisons = [], []
    for (setting, task, arm), by_seed in finals.items():
        done = {seed: r for seed, r in by_seed.items() if "error" not in r}
        row = {"setting": setting, "task": task, "arm": arm, "learning_rate": chosen[setting, arm],
               "seeds": sorted(done), "failed_seeds": sorted(set(by_seed) - set(done))}
        for metric in METRICS:
            values = [r[metric] for r in done.values() if r.get(metric) is not None]
            row[metric] = mean_interval(values) if values else None
        rows.append(row)
        stella = finals.get((setting, task, "stella"))
        if arm != "stella" and stella:
            comparison = {"setting": setting, "task": task, "arm": arm}
            for metric in METRICS:
                comparison[metric] = paired_difference(
                    {s: r[metric] for s, r in stella.items() if r.get(metric) is not None},
                    {s: r[metric] for s, r in by_seed.items() if r.get(metric) is not None})
            comparisons.append(comparison)
    return rows, comparisons


def _cell(value: dict[str, Any] | None, digits: int) -> str:
    if value is None:
        return "–"
    half = "" if value["ci95"] is None else f" ± {value['ci95']:.{digits}f}"
    return f"{value['mean']:.{digits}f}{half}"


def _difference_cell(value: dict[str, Any] | None, digits: int) -> str:
    if value is None:
        return "–"
    star = " *" if value["t_test_p"] < 0.05 else ""
    return (f"{value['mean']:+.{digits}f} ± {value['ci95']:.{digits}f} (p {value['t_test_p']:.3f}, "
            f"sign-flip {value['sign_flip_p']:.3f}){star}")


def markdown(result: dict[str, Any]) -> str:
    """The report: per recipe and task, each arm's metrics and StelLA's paired differences; then the sweep."""
    settings = result["settings"]
    lines = ["# Fine-tuning quality on the embedded base", "",
             f"{settings['max_train_steps']} steps, {settings['num_eval_images']} generated images a run "
             f"({settings['num_inference_steps']} DDIM steps, guidance 2), final seeds {settings['seeds']}, rates "
             f"chosen on the sweep (seeds {settings['sweep_seeds']}, grid {settings['learning_rates']}). FID and "
             "attribute accuracy from the shapes classifier against 256 held-out reference images; drift: 1 − "
             "cosine similarity of base / adapted features on 16 base-domain prompts (same seeds). Mean ± 95 % "
             "t-interval over seeds; differences are StelLA minus the arm, paired by seed, with the paired t-test "
             "p (* below 0.05) and the exact sign-flip p.", ""]
    if result["pending"]:
        lines += [f"**Incomplete:** {len(result['pending'])} runs not finished yet (and the final runs of arms whose "
                  "sweep is not finished); rerun without --report_only to complete them.", ""]
    headers = {"fid": ("FID ↓", 1), "all": ("all attributes ↑", 2), "task_attribute": ("task attribute ↑", 2),
               "drift": ("drift ↓", 3)}
    for setting in dict.fromkeys(r["setting"] for r in result["summary"]):
        lines += [f"## Recipe `{setting}`: {SETTINGS[setting][0]}", ""]
        for task in dict.fromkeys(r["task"] for r in result["summary"] if r["setting"] == setting):
            base = result["base"].get(task)
            lines += [f"### {task} (task attribute: {TASK_ATTRIBUTE[task]})", "",
                      "| arm | lr | seeds |" + "".join(f" {h} |" for h, _ in headers.values()),
                      "|---|---:|---:|" + "---:|" * len(headers)]
            if base:
                lines.append("| base (no fine-tune) | – | – |" + "".join(
                    f" {base[m]:.{d}f} |" if base.get(m) is not None else " – |" for m, (_, d) in headers.items()))
            for row in (r for r in result["summary"] if (r["setting"], r["task"]) == (setting, task)):
                failed = f" ({len(row['failed_seeds'])} failed)" if row["failed_seeds"] else ""
                lines.append(f"| {row['arm']} | {row['learning_rate']:g} | {len(row['seeds'])}{failed} |"
                             + "".join(f" {_cell(row[m], d)} |" for m, (_, d) in headers.items()))
            lines += ["", "StelLA minus each arm (paired by seed):", "",
                      "| arm |" + "".join(f" Δ {h} |" for h, _ in headers.values()), "|---|" + "---:|" * len(headers)]
            for comparison in (c for c in result["comparisons"] if (c["setting"], c["task"]) == (setting, task)):
                lines.append(f"| {comparison['arm']} |"
                             + "".join(f" {_difference_cell(comparison[m], d)} |" for m, (_, d) in headers.items()))
            lines.append("")
    rates = sorted({float(lr) for entry in result["sweep"] for lr in entry["scores"]})
    lines += ["## Learning-rate sweep (geometric-mean FID over the sweep runs; chosen rate in bold)", "",
              f"Grid {settings['learning_rates']}, extended ×2 / ÷2 while the best rate sat at its edge (at most "
              f"{settings['max_grid_extensions']} times).", "",
              "| recipe | arm |" + "".join(f" lr {lr:g} |" for lr in rates), "|---|---|" + "---:|" * len(rates)]
    for entry in result["sweep"]:
        scores = {float(lr): score for lr, score in entry["scores"].items()}
        cells = "".join(" – |" if lr not in scores else
                        (" **{:.1f}** |" if lr == entry["chosen"] else " {:.1f} |").format(scores[lr]) for lr in rates)
        edge = " (still at the edge)" if entry["chosen"] in (min(scores), max(scores)) else ""
        lines.append(f"| {entry['setting']} | {entry['arm']}{edge} |{cells}")
    timing = result["timing"]
    lines += ["", f"{timing['runs']} runs, {timing['run_hours']:.2f} h of run time (one torch thread each), "
              f"≈ {timing['run_hours'] / timing['jobs']:.2f} h wall clock on {timing['jobs']} jobs; this call took "
              f"{timing['wall_hours']:.2f} h (finished runs are reused).", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """FID and drift, mean ± 95 % interval, one panel per recipe and task (ablations after the arms)."""
    panels = list(dict.fromkeys((r["setting"], r["task"]) for r in result["summary"]))
    fig = Figure(figsize=(4.2 * max(len(panels), 1), 6.4))
    if not panels:
        fig.text(0.5, 0.5, "no arm finished yet", ha="center")
    axes = fig.subplots(2, len(panels), squeeze=False) if panels else []
    for col, (setting, task) in enumerate(panels):
        rows = [r for r in result["summary"] if (r["setting"], r["task"]) == (setting, task)]
        for ax, metric in zip(axes[:, col], ("fid", "drift"), strict=True):
            rows_with = [r for r in rows if r[metric] is not None]
            means = [r[metric]["mean"] for r in rows_with]
            errors = [r[metric]["ci95"] or 0.0 for r in rows_with]
            colours = ["tab:red" if r["arm"] == "stella" else "tab:orange" if r["arm"] in ABLATIONS else "tab:blue"
                       for r in rows_with]
            ax.bar(range(len(rows_with)), means, yerr=errors, capsize=3, color=colours)
            # Both metrics are non-negative; a 2-seed interval can be wider than every mean, so it is cut at 2x the
            # largest mean rather than squashing the bars.
            ax.set_ylim(0, 2 * max(means, default=0.0) or 1.0)
            ax.set_xticks(range(len(rows_with)), [r["arm"] for r in rows_with], rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{setting} / {task}: {'FID ↓' if metric == 'fid' else 'drift ↓'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"a minutes-long run of the whole protocol: {' '.join(QUICK)} (later flags still win)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["paper", "constant"])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--ablations", nargs="*", choices=list(ABLATIONS), default=list(ABLATIONS))
    parser.add_argument("--ablation_setting", choices=list(SETTINGS), default="paper")
    parser.add_argument("--learning_rates", nargs="+", type=float, default=[2e-3, 4e-3, 8e-3],
                        help="the sweep's grid (the default is centred on the rates a complete run with a "
                             "1e-3 … 4e-3 grid chose: 1e-3 … 1.6e-2)")
    parser.add_argument("--max_grid_extensions", type=int, default=2,
                        help="when an arm's best rate is the grid's largest (smallest), also try twice (half) it, "
                             "up to this many times")
    parser.add_argument("--sweep_seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="the final comparison's")
    parser.add_argument("--ablation_seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--max_train_steps", type=int, default=400)
    parser.add_argument("--num_eval_images", type=int, default=256)
    parser.add_argument("--num_inference_steps", type=int, default=10)
    parser.add_argument("--drift_prompts", default=str(DATA / "drift-prompts.txt"))
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one torch thread each)")
    parser.add_argument("--work_dir", default="outputs/quality", help="the runs' adapters and images")
    parser.add_argument("--output_dir", default="benchmarks/results", help="where quality.{json,md,png} go")
    parser.add_argument("--report_only", action="store_true",
                        help="train nothing: write the results of the finished runs and list the pending ones")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    return parser.parse_args(QUICK + argv) if args.quick else args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done: dict[Run, dict[str, Any]] = {}
    chosen: dict[tuple[str, str], float] = {}
    sweep = []
    pending: list[Run] = []
    workers = Workers()
    with ThreadPoolExecutor(args.jobs) as pool, contextlib.closing(workers):
        def run_all(runs: list[Run]) -> dict[Run, dict[str, Any]] | None:
            """Train what is missing; ``None`` when some run is still pending (``--report_only``)."""
            missing = [run for run in dict.fromkeys(runs) if run not in done]
            records = pool.map(lambda run: train_and_score(run, args, workers), missing)
            for run, record in zip(missing, records, strict=True):
                if record is None:
                    pending.append(run)
                else:
                    done[run] = record
            return None if any(run not in done for run in runs) else {run: done[run] for run in runs}

        def run_arm(setting: str, arm: str) -> None:
            """An arm's sweep (grown at its edge), then its final runs; StelLA's ablations follow its sweep."""
            rates, swept = list(args.learning_rates), run_all(sweep_runs(setting, arm, args.learning_rates, args))
            while swept is not None:
                chosen[setting, arm], scores = choose_rate(list(swept.values()))
                extra = next_rate(chosen[setting, arm], scores, args.max_grid_extensions,
                                  len(rates) - len(args.learning_rates))
                if extra is None:
                    break
                rates.append(extra)
                swept = run_all(sweep_runs(setting, arm, rates, args))
            if swept is None:
                chosen.pop((setting, arm), None)
                return
            sweep.append({"setting": setting, "arm": arm, "chosen": chosen[setting, arm],
                          "scores": {str(lr): score for lr, score in sorted(scores.items())}})
            rate = chosen[setting, arm]
            finals = [Run(setting, task, arm, rate, seed) for task in args.tasks for seed in args.seeds]
            if arm == "stella" and setting == args.ablation_setting:
                chosen.update({(setting, ablation): rate for ablation in args.ablations})
                finals += [Run(setting, task, ablation, rate, seed)
                           for ablation in args.ablations for seed in args.ablation_seeds for task in args.tasks]
            run_all(finals)

        # the arms of a recipe run side by side (one arm's next sweep step waits for its runs, the others' runs
        # keep the jobs busy); the recipes in order, the first finished before the next starts
        for setting in args.settings:
            with ThreadPoolExecutor(len(args.arms)) as arms:
                for future in [arms.submit(run_arm, setting, arm) for arm in args.arms]:
                    future.result()
    wall = time.perf_counter() - start
    bases = {task: score_base(task, args) for task in args.tasks}
    arm_order = [*args.arms, *args.ablations]
    records = sorted(done.values(), key=lambda r: (args.settings.index(r["setting"]), args.tasks.index(r["task"]),
                                                   arm_order.index(r["arm"]), r["learning_rate"], r["seed"]))
    sweep.sort(key=lambda entry: (args.settings.index(entry["setting"]), arm_order.index(entry["arm"])))
    rows, comparisons = summarise(records, chosen, args)
    result = {
        "settings": {k: getattr(args, k) for k in ("settings", "tasks", "arms", "ablations", "ablation_setting",
                                                   "learning_rates", "max_grid_extensions", "sweep_seeds", "seeds",
                                                   "ablation_seeds", "max_train_steps", "num_eval_images",
                                                   "num_inference_steps")},
        "recipes": {name: {"description": SETTINGS[name][0], "flags": SETTINGS[name][1]} for name in args.settings},
        "arms": {name: ARM_FLAGS[name] for name in arm_order},
        "base": bases, "sweep": sweep, "summary": rows, "comparisons": comparisons,
        "timing": {"runs": len(records), "run_hours": sum(r["wall_seconds"] for r in records) / 3600,
                   "jobs": args.jobs, "wall_hours": wall / 3600},
        "pending": sorted(run.name for run in pending),
        "runs": records,
    }
    write_text_atomic(output / "quality.json", json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    write_text_atomic(output / "quality.md", table)
    with atomic_path(output / "quality.png") as path:
        plot(result, path)
    print(table)
    print(f"Wrote {output / 'quality.json'}, {output / 'quality.md'}, {output / 'quality.png'}")
    return result


if __name__ == "__main__":
    serve() if sys.argv[1:] == ["--serve"] else main()
