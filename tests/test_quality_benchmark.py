"""benchmarks/quality.py: the sweep, the rate choice, the paired statistics, resuming, and the --quick protocol."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest
from scipy import stats

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


def _quality() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_quality", QUALITY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _record(arm: str, lr: float, seed: int, fid: float, task: str = "concept", setting: str = "paper", **metrics):
    return {"setting": setting, "task": task, "arm": arm, "learning_rate": lr, "seed": seed, "fid": fid,
            "all": metrics.get("all", 0.5), "task_attribute": metrics.get("task_attribute", 0.5),
            "drift": metrics.get("drift", 0.1), "wall_seconds": 1.0}


def test_sweep_pairs_tasks_with_seeds_so_each_rate_sees_two_seeds_and_every_task() -> None:
    quality = _quality()
    args = quality.parse_args(["--tasks", "concept", "style", "--sweep_seeds", "0", "1"])
    runs = quality.sweep_runs("paper", "stella", [1e-3, 2e-3], args)
    assert [(r.task, r.seed, r.learning_rate) for r in runs] == [
        ("concept", 0, 1e-3), ("style", 1, 1e-3), ("concept", 0, 2e-3), ("style", 1, 2e-3)]
    one_task = quality.parse_args(["--tasks", "concept", "--sweep_seeds", "0", "1"])
    assert [(r.task, r.seed) for r in quality.sweep_runs("paper", "lora", [1e-3], one_task)] == [
        ("concept", 0), ("concept", 1)]


def test_rate_is_the_lowest_geometric_mean_fid_and_a_failed_run_disqualifies_its_rate() -> None:
    quality = _quality()
    records = [_record("stella", 1e-3, 0, 400.0), _record("stella", 1e-3, 1, 100.0, task="style"),  # gm 200
               _record("stella", 2e-3, 0, 300.0), _record("stella", 2e-3, 1, 150.0, task="style"),  # gm 212
               _record("stella", 4e-3, 0, 10.0), {**_record("stella", 4e-3, 1, 0.0), "error": "diverged"}]
    del records[-1]["fid"]
    rate, scores = quality.choose_rate(records)
    assert rate == 1e-3
    assert scores[1e-3] == pytest.approx(200.0) and scores[2e-3] == pytest.approx(math.sqrt(300.0 * 150.0))
    assert scores[4e-3] == math.inf
    # an edge winner extends the grid (x2 above, /2 below), at most max_extensions times
    assert quality.next_rate(4e-3, {1e-3: 3.0, 2e-3: 2.0, 4e-3: 1.0}, 2, 0) == 8e-3
    assert quality.next_rate(1e-3, {1e-3: 1.0, 2e-3: 2.0}, 2, 1) == 5e-4
    assert quality.next_rate(2e-3, {1e-3: 2.0, 2e-3: 1.0, 4e-3: 3.0}, 2, 0) is None
    assert quality.next_rate(2e-3, {1e-3: 3.0, 2e-3: 1.0}, 2, 2) is None


def test_intervals_and_paired_tests_match_scipy() -> None:
    quality = _quality()
    values = [3.0, 5.0, 4.5, 6.0, 2.5]
    low, high = stats.t.interval(0.95, len(values) - 1, loc=statistics.fmean(values), scale=stats.sem(values))
    interval = quality.mean_interval(values)
    assert interval["mean"] == pytest.approx((low + high) / 2) and interval["ci95"] == pytest.approx((high - low) / 2)
    a = {0: 10.0, 1: 12.0, 2: 9.0, 3: 14.0, 4: 11.0, 5: 99.0}  # seed 5 has no partner: left out
    b = {0: 11.0, 1: 12.5, 2: 10.5, 3: 14.2, 4: 13.0}
    result = quality.paired_difference(a, b)
    seeds = range(5)
    assert result["seeds"] == list(seeds)
    assert result["t_test_p"] == pytest.approx(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
    assert result["sign_flip_p"] == pytest.approx(2 / 32)  # all five negative: the two extreme sign patterns
    assert quality.sign_flip_p([1.0, -1.0, 2.0, -2.0]) == 1.0
    assert quality.paired_difference({0: 1.0}, {0: 2.0}) is None


def test_summary_pairs_stella_with_each_arm_by_seed_at_the_chosen_rates() -> None:
    quality = _quality()
    args = quality.parse_args(["--seeds", "0", "1", "2"])
    records = [_record("stella", 2e-3, s, fid, drift=d) for s, fid, d in [(0, 100.0, 0.1), (1, 110.0, 0.2),
                                                                          (2, 90.0, 0.3)]]
    records += [_record("stella", 1e-3, 0, 50.0)]  # not the chosen rate: ignored
    records += [_record("lora", 1e-3, s, fid) for s, fid in [(0, 120.0), (1, 125.0), (2, 118.0)]]
    records += [{**_record("lora", 1e-3, 3, 0.0), "error": "diverged"}]  # seed 3 not asked for
    rows, comparisons = quality.summarise(records, {("paper", "stella"): 2e-3, ("paper", "lora"): 1e-3}, args)
    by_arm = {row["arm"]: row for row in rows}
    assert by_arm["stella"]["seeds"] == [0, 1, 2] and by_arm["stella"]["fid"]["mean"] == pytest.approx(100.0)
    assert by_arm["lora"]["learning_rate"] == 1e-3
    (comparison,) = comparisons
    assert comparison["arm"] == "lora"
    assert comparison["fid"]["mean"] == pytest.approx(statistics.fmean([-20.0, -15.0, -28.0]))
    assert comparison["fid"]["t_test_p"] == pytest.approx(stats.ttest_1samp([-20.0, -15.0, -28.0], 0).pvalue)
    sweep = [{"setting": "paper", "arm": "stella", "chosen": 2e-3, "scores": {"0.001": 60.0, "0.002": 50.0}}]
    result = {"settings": {**vars(args), "max_grid_extensions": 2}, "base": {}, "summary": rows,
              "comparisons": comparisons, "pending": [], "sweep": sweep,
              "timing": {"runs": 8, "run_hours": 0.1, "jobs": 2, "wall_hours": 0.05}}
    table = quality.markdown(result)
    assert "| stella | 0.002 | 3 | 100.0 ± " in table
    assert "| lora | -21.0 ± " in table and "(p 0.0" in table
    assert "| paper | stella (still at the edge) | 60.0 | **50.0** |" in table


def _finish(quality: ModuleType, run, args, fid: float) -> None:
    """A finished run on disk, as the training script and train_and_score leave it."""
    out = Path(args.work_dir, "runs", run.name)
    (out / "eval").mkdir(parents=True)
    argv = quality.run_argv(run, args, out)
    (out / "run.json").write_text(json.dumps({"argv": argv, "wall_seconds": 2.0}))
    report = {"runs": [{"fid": fid, "accuracy": {"all": 0.5, "shape": 0.6}, "drift": 0.1}]}
    (out / "eval" / "report.json").write_text(json.dumps(report))


def test_report_only_reuses_finished_runs_and_lists_the_pending_ones(tmp_path: Path) -> None:
    quality = _quality()
    argv = ["--settings", "paper", "--tasks", "concept", "--arms", "stella", "lora", "--ablations",
            "--learning_rates", "1e-3", "2e-3", "--max_grid_extensions", "0", "--sweep_seeds", "0", "1", "--seeds",
            "0", "1", "--num_eval_images", "2", "--work_dir", str(tmp_path / "work"), "--output_dir",
            str(tmp_path / "out"), "--report_only"]
    args = quality.parse_args(argv)
    for run in quality.sweep_runs("paper", "stella", [1e-3, 2e-3], args):
        _finish(quality, run, args, fid=100.0 if run.learning_rate == 2e-3 else 200.0)
    result = quality.main(argv)
    assert result["sweep"] == [{"setting": "paper", "arm": "stella", "chosen": 2e-3,
                                "scores": {"0.001": pytest.approx(200.0), "0.002": pytest.approx(100.0)}}]
    assert result["summary"][0]["arm"] == "stella" and result["summary"][0]["seeds"] == [0, 1]
    assert sorted(result["pending"]) == sorted(r.name for r in quality.sweep_runs("paper", "lora", [1e-3, 2e-3], args))
    assert "**Incomplete:** 4 runs" in (tmp_path / "out" / "quality.md").read_text()
    # a run whose command line changed is not reused
    stale = Path(args.work_dir, "runs", quality.Run("paper", "concept", "stella", 1e-3, 0).name, "run.json")
    stale.write_text(json.dumps({"argv": ["--something", "else"], "wall_seconds": 2.0}))
    assert quality.Run("paper", "concept", "stella", 1e-3, 0).name in quality.main(argv)["pending"]


@pytest.mark.slow
def test_quick_protocol_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    quality = _quality()
    paths = ["--work_dir", str(tmp_path / "work"), "--output_dir", str(tmp_path / "out")]
    result = quality.main(["--quick", *paths])
    assert not result["pending"] and all("error" not in r for r in result["runs"])
    arms = {row["arm"] for row in result["summary"]}
    assert arms == {"stella", "lora", "stella-zero-init"}
    assert {c["arm"] for c in result["comparisons"]} == {"lora", "stella-zero-init"}
    stella = next(r for r in result["summary"] if r["arm"] == "stella")
    assert stella["seeds"] == [0, 1, 2] and stella["fid"]["ci95"] is not None
    assert all(r["drift"] is not None and r["drift"] >= 0 for r in result["runs"])
    # the zero start is the base at step 0: after two tiny steps its drift is far below the default start's
    zero = next(r for r in result["summary"] if r["arm"] == "stella-zero-init")
    assert zero["drift"]["mean"] < stella["drift"]["mean"]
    assert "Recipe `paper`" in (tmp_path / "out" / "quality.md").read_text()
    assert (tmp_path / "out" / "quality.png").stat().st_size > 0
    # finished runs are reused: --report_only trains nothing and gives the same numbers
    again = quality.main(["--quick", *paths, "--report_only"])
    assert not again["pending"]
    assert [r["fid"] for r in again["runs"]] == [r["fid"] for r in result["runs"]]


def test_workers_record_the_scripts_error_line_and_stop_on_a_dead_worker(tmp_path: Path) -> None:
    """A run the script refuses is a result (its `error:` line, the worker goes on); a killed worker is not: the
    benchmark stops without recording the run, so a resume redoes it."""
    quality = _quality()
    workers = quality.Workers()
    try:
        argv = ["--config", str(quality.CONFIG), "--instance_data_dir", str(tmp_path / "missing"), "--output_dir",
                str(tmp_path / "out")]
        first = workers.run(argv, tmp_path / "first.log")
        assert first.startswith("error: ") and "missing" in first
        assert workers.run(argv, tmp_path / "second.log") == first  # the same worker, still serving
        assert len(workers._all) == 1
        workers._all[0].kill()
        with pytest.raises(RuntimeError, match="worker died"):
            workers.run(argv, tmp_path / "third.log")
    finally:
        workers.close()
