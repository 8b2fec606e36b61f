"""Data-parallel StelLA: two CPU ranks end bit-identical; a factor that is not whole on its rank is refused."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from peft import get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from stella_diffusion import StellaConfig, StellaLayer, create_stella_optimizer

from ._train_fixtures import run_launcher

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_cpu_ranks_keep_identical_factors(tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (several CPU processes need
    # --mpirun_hostfile); `--multi_gpu` is the torchrun launcher and, with the script's use_cpu, gives gloo ranks.
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", "1",
        str(ROOT / "examples" / "ddp_check.py"), "--config", str(ROOT / "configs" / "llm-tiny-cpu.yaml"),
        "--use_cpu", "--max_steps", "20", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}  # no user accelerate config
    proc = run_launcher(cmd, env, ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["num_processes"] == 2 and r["distributed_type"].endswith("MULTI_CPU") for r in ranks)
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank trained on its own batches
    for r in ranks:
        assert len(r["losses"]) == 20 and r["losses"][-1] < r["losses"][0]
        assert r["orthonormality_error"] <= 1e-5


def _tiny_stella_llama() -> tuple[nn.Module, StellaLayer]:
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=16)  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(config), StellaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layer = next(m for m in model.modules() if isinstance(m, StellaLayer))
    return model, layer


def _flat_shard(u: torch.Tensor) -> nn.Parameter:
    # FSDP1 / ZeRO-style flattening: this rank holds a 1-D slice of the factor
    return nn.Parameter(u.detach().flatten()[: u.numel() // 2].clone())


def _zero3_partition(u: torch.Tensor) -> nn.Parameter:
    # DeepSpeed ZeRO-3 empties partitioned parameters and tags them with ds_id / ds_shape
    param = nn.Parameter(torch.empty(0))
    param.ds_id, param.ds_shape = 0, u.shape
    return param


@pytest.mark.parametrize("shard", [_flat_shard, _zero3_partition], ids=["flat_shard", "deepspeed_zero3"])
def test_sharded_factor_is_refused(shard):
    model, layer = _tiny_stella_llama()
    layer.stella_U["default"] = shard(layer.stella_U["default"])
    with pytest.raises(RuntimeError, match="sharded"):
        create_stella_optimizer(model, torch.optim.AdamW, lr=1e-3)


@pytest.fixture
def single_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_dtensor_factor_is_refused(single_process_group):
    # FSDP2 / tensor parallel turn parameters into DTensors; even a full-shaped one is not whole on every rank
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model, layer = _tiny_stella_llama()
    mesh = init_device_mesh("cpu", (1,))
    layer.stella_Vt["default"] = nn.Parameter(distribute_tensor(layer.stella_Vt["default"].detach(), mesh, [Shard(1)]))
    with pytest.raises(RuntimeError, match="sharded"):
        create_stella_optimizer(model, torch.optim.AdamW, lr=1e-3)
