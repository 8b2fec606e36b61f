#!/usr/bin/env python
"""Check that StelLA's Riemannian step keeps U, S and V bit-identical on every data-parallel rank.

Runs the StelLA side of `train_llm_stella.py` (same arguments and configs) as a plain accelerate loop: each rank
trains on its own batches of the copy task, DDP averages the gradients, and every rank then retracts its own
full copy of U and V. At the end each rank writes ``<output_dir>/rank<k>.json`` with the sha256 of all its U, S, V
bytes; identical digests mean identical factors.

    accelerate launch --multi_gpu --num_processes 2 --num_cpu_threads_per_process 1 \
        examples/ddp_check.py --config configs/llm-tiny-cpu.yaml --use_cpu --max_steps 20

``--multi_gpu`` is accelerate's torchrun launcher; with ``--use_cpu`` the ranks run on CPU over gloo. (accelerate
1.x's ``--cpu --num_processes 2`` starts a single process unless an MPI hostfile is given.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from _common import (
    adapter_config,
    build_config,
    build_model,
    max_orthonormality_error,
    parse_args,
    preset_target_modules,
)
from accelerate import Accelerator
from peft import get_peft_model
from torch import nn
from torch.utils.data import DataLoader
from train_llm_stella import build_parser, copy_task
from transformers import AutoModelForCausalLM, set_seed

from stella_diffusion import StellaLayer, create_stella_optimizer


def factor_digest(model: nn.Module) -> str:
    """sha256 over the bytes of every StelLA adapter's native state (U, S, Vt), in module and adapter order."""
    digest = hashlib.sha256()
    for name, layer in sorted((n, m) for n, m in model.named_modules() if isinstance(m, StellaLayer)):
        for adapter in sorted(layer.stella_adapters):
            for key, tensor in layer.native_state(adapter).items():
                digest.update(f"{name}.{key}.{adapter}".encode())
                digest.update(tensor.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.max_steps <= 0:
        parser.error("--max_steps must be positive: the run is that many steps on every rank")
    accelerator = Accelerator(cpu=args.use_cpu)
    config = build_config(args)
    args.target_modules = args.target_modules or preset_target_modules(AutoModelForCausalLM, config)
    set_seed(args.seed)  # the same base and adapter on every rank (DDP would broadcast rank 0's anyway)
    model = get_peft_model(build_model(AutoModelForCausalLM, args, config), adapter_config("stella", args))
    optimizer = create_stella_optimizer(
        model, torch.optim.AdamW, lr=args.learning_rate, weight_decay=args.weight_decay
    )
    # each rank draws its own batches, so the ranks agree only if the averaged gradients and the retraction do
    n = args.max_steps * args.per_device_train_batch_size
    data = copy_task(n, args.copy_length, config.vocab_size, seed=args.seed + 1 + accelerator.process_index)
    model, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    for batch in DataLoader(data, batch_size=args.per_device_train_batch_size):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    unwrapped = accelerator.unwrap_model(model)
    result = {
        "rank": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "digest": factor_digest(unwrapped),
        "orthonormality_error": max_orthonormality_error(unwrapped),
        "losses": losses,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
