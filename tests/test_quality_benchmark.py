"""benchmarks/quality.py: the learning-rate choice and the mean ± std summary, and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


def _quality() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_quality", QUALITY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _record(adapter: str, lr: float, seed: int, fid: float, shape: float) -> dict:
    accuracy = {"shape": shape, "colour": 1.0, "all": shape}
    return {"task": "concept", "adapter": adapter, "learning_rate": lr, "seed": seed, "fid": fid,
            "accuracy": accuracy}


def test_best_rate_is_chosen_at_the_first_seed_and_summarised_over_seeds() -> None:
    quality = _quality()
    records = [
        _record("stella", 1e-3, 0, 300.0, 0.2), _record("stella", 2e-3, 0, 200.0, 0.5),
        _record("stella", 2e-3, 1, 220.0, 0.4), _record("stella", 2e-3, 2, 180.0, 0.6),
        _record("stella", 1e-3, 1, 100.0, 0.9),  # another seed: never used to choose
        _record("lora", 1e-3, 0, 250.0, 0.3), _record("lora", 2e-3, 0, 260.0, 0.3),
    ]
    best = quality.best_learning_rates(records, seed=0)
    assert best == {("concept", "stella"): 2e-3, ("concept", "lora"): 1e-3}
    rows = {row["adapter"]: row for row in quality.summarise(records, best)}
    assert rows["stella"]["seeds"] == [0, 1, 2]
    assert rows["stella"]["fid"] == pytest.approx((200.0, statistics.stdev([200.0, 220.0, 180.0])))
    assert rows["stella"]["shape"] == pytest.approx((0.5, 0.1))
    assert rows["lora"]["fid"] == (250.0, 0.0)
    table = quality.markdown(list(rows.values()), records, {}, {"max_train_steps": 10, "rank": 4,
                                                                "num_eval_images": 8, "seeds": [0, 1, 2]})
    assert "| stella | 0.002 | 200.0 ± 20.0 | 0.50 ± 0.10 |" in table
    assert "| concept | stella | 300.0 | 200.0 |" in table


@pytest.mark.slow
def test_quality_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    quality = _quality()
    result = quality.main(["--tasks", "concept", "--adapters", "stella", "--learning_rates", "1e-3", "--seeds",
                           "0", "1", "--max_train_steps", "1", "--num_eval_images", "2", "--jobs", "2",
                           "--work_dir", str(tmp_path / "work"), "--output_dir", str(tmp_path / "out")])
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    assert all(r["wall_seconds"] > 0 for r in result["runs"])
    saved = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert saved["summary"][0]["adapter"] == "stella" and len(saved["summary"][0]["fid"]) == 2
    assert "base (no fine-tune)" in (tmp_path / "out" / "quality.md").read_text()
    assert (tmp_path / "out" / "quality.png").stat().st_size > 0
    # finished runs are reused: a second call trains nothing and gives the same numbers
    again = quality.main(["--tasks", "concept", "--adapters", "stella", "--learning_rates", "1e-3", "--seeds",
                          "0", "1", "--max_train_steps", "1", "--num_eval_images", "2",
                          "--work_dir", str(tmp_path / "work"), "--output_dir", str(tmp_path / "out")])
    assert [r["fid"] for r in again["runs"]] == [r["fid"] for r in result["runs"]]
