"""The benchmark scripts run end to end with tiny settings and write sane JSON (their numbers are not checked:
timings on a shared CI machine mean nothing at this size)."""

import importlib.util
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def _keep_threads() -> Iterator[None]:
    """The benchmark sets torch's thread count for the whole process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


@pytest.mark.slow
@pytest.mark.usefixtures("_keep_threads")
def test_optimizer_overhead_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "results" / "optimizer_overhead.json"
    result = _load("optimizer_overhead").main(["--quick", "--device", "cpu", "--output_dir", str(output.parent)])

    assert json.loads(output.read_text(encoding="utf-8")) == json.loads(json.dumps(result))
    assert result["config"]["quick"] and result["config"]["device"] == "cpu"
    assert "| model | batch |" in capsys.readouterr().out

    [point] = result["points"]  # --quick measures the tiny UNet only
    assert point["stiefel_factors"] == 2 * 56  # U and V on q, k, v, out of 14 attention blocks
    assert sum(point["factor_shapes"].values()) == point["stiefel_factors"]
    assert point["trainable_parameters"]["StelLA"] > point["trainable_parameters"]["LoRA"]  # S is r × r more
    assert all(_positive(point[key][v]) for key in ("step_ms", "step_wall_ms") for v in ("StelLA", "LoRA"))
    assert all(_positive(ms) for phases in point["phase_ms"].values() for ms in phases.values())
    assert _positive(point["step_time_ratio"]) and _positive(point["step_time_ratio_paired_median"])
    hooks = point["hook_ms"]
    assert 0 < hooks["pre_finite_grad_check"] <= hooks["pre"] and hooks["post"] > 0
    assert 0 < point["hook_share"] < 1
    for memory in point["memory"].values():
        assert 0 < memory["kept_mib"] < memory["peak_mib"]
        assert memory["peak_mib"] == pytest.approx(memory["kept_mib"] + memory["step_peak_mib"])
    assert 0.9 < point["peak_memory_ratio"] < 1.5  # same model and activations; StelLA adds S and its moments

    assert [row["set"] for row in result["retraction"]] == [f"{point['point']} adapters", "paper case"]
    for row in result["retraction"]:
        assert row["matrices"] == sum(row["shapes"].values())
        assert _positive(row["batched_ms"]) and _positive(row["one_by_one_ms"])
        assert row["speedup"] == pytest.approx(row["one_by_one_ms"] / row["batched_ms"])
    assert result["retraction"][1]["shapes"] == {"256x32": 8}

    assert len(result["targets"]) == 2 + len(result["retraction"])
    assert all(isinstance(check["met"], bool) and math.isfinite(check["value"]) for check in result["targets"])
