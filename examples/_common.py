"""What the StelLA-vs-LoRA example scripts share: YAML configs, the two adapters, a timed Trainer run, the table.

Both methods train through the transformers `Trainer` with the same arguments; StelLA's run uses `StellaTrainer`
(the Trainer's own optimizer made Riemannian, U and V out of weight decay), LoRA's the stock `Trainer`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import LoraConfig, PeftConfig, get_peft_model
from torch import nn
from transformers import (
    AutoConfig,
    PretrainedConfig,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)

from stella_diffusion import RETRACTIONS, StellaConfig, orthonormality_error, stiefel_factors
from stella_diffusion.integrations.presets import target_modules_for
from stella_diffusion.integrations.transformers import StellaTrainer
from stella_diffusion.training.config import parse_args_with_config

METHODS = ("stella", "lora")


def comma_list(value: str) -> list[str]:
    """argparse type of a list flag, ``q_proj,v_proj`` (the form a YAML list in ``--config`` arrives in)."""
    return [item.strip() for item in value.split(",") if item.strip()]


def mapping(value: str) -> dict[str, Any]:
    """argparse type of ``--model_config``: a JSON or YAML mapping (a YAML mapping in ``--config`` arrives as one)."""
    loaded = yaml.safe_load(value)
    if not isinstance(loaded, dict):
        raise argparse.ArgumentTypeError(f'expected a mapping such as \'{{"model_type": "llama"}}\', got {value!r}')
    return loaded


def add_comparison_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of every comparison script; optimisation flags keep `TrainingArguments`' names."""
    parser.add_argument("--config", default=None, help="YAML file of argument defaults; command-line flags win.")
    parser.add_argument("--output_dir", default="outputs/stella-vs-lora", help="Where results.json is written.")
    parser.add_argument("--methods", type=comma_list, default=list(METHODS), help=f"Comma-separated: {METHODS}.")
    parser.add_argument("--seed", type=int, default=0)

    model = parser.add_argument_group("base model (exactly one of the first two)")
    model.add_argument("--model_name_or_path", default=None, help="Hub id (needs the hub) or local folder.")
    model.add_argument(
        "--model_config", type=mapping, default=None,
        help='Offline base with random weights: config kwargs, e.g. \'{"model_type": "llama", "hidden_size": 64}\'.',
    )  # fmt: skip
    model.add_argument("--dtype", default="float32", help="dtype of pretrained base weights (adapters stay fp32).")

    adapter = parser.add_argument_group("adapter (the same rank, alpha and targets for both methods)")
    adapter.add_argument("--rank", type=int, default=8)
    adapter.add_argument("--alpha", type=float, default=16.0, help="Scale numerator: s = alpha / rank.")
    adapter.add_argument(
        "--target_modules", type=comma_list, default=None, help="Comma-separated; default: the model type's preset."
    )
    adapter.add_argument("--dropout", type=float, default=0.0)
    adapter.add_argument("--diag_s", action=argparse.BooleanOptionalAction, default=False, help="Diagonal S.")
    adapter.add_argument("--retraction", choices=RETRACTIONS, default="polar")

    optim = parser.add_argument_group("optimisation (AdamW through the Trainer)")
    optim.add_argument("--learning_rate", type=float, default=5e-4, help="StelLA's learning rate.")
    optim.add_argument("--lora_learning_rate", type=float, default=None, help="LoRA's (default: --learning_rate).")
    optim.add_argument("--weight_decay", type=float, default=0.0, help="Never applied to U and V.")
    optim.add_argument("--lr_scheduler_type", default="linear")
    optim.add_argument("--warmup_steps", type=float, default=0, help="Steps, or a fraction of training if < 1.")
    optim.add_argument("--num_train_epochs", type=float, default=1.0)
    optim.add_argument("--max_steps", type=int, default=-1, help="Overrides --num_train_epochs when > 0.")
    optim.add_argument("--per_device_train_batch_size", type=int, default=16)
    optim.add_argument("--per_device_eval_batch_size", type=int, default=64)
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--logging_steps", type=int, default=10)
    optim.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False)
    optim.add_argument("--use_cpu", action=argparse.BooleanOptionalAction, default=False)
    optim.add_argument(
        "--save_adapter",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Save each trained adapter to <output_dir>/<method>.",
    )


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` over the ``--config`` YAML (the project's `parse_args_with_config`: flags win, every YAML
    value goes through the parser, unknown keys are errors), then check what argparse cannot."""
    args = parse_args_with_config(parser, argv)
    if (args.model_name_or_path is None) == (args.model_config is None):
        parser.error("give exactly one of --model_name_or_path and --model_config")
    if not args.methods or set(args.methods) - set(METHODS):
        parser.error(f"--methods: choose from {METHODS}, got {args.methods}")
    return args


def build_config(args: argparse.Namespace, **config_kwargs: Any) -> PretrainedConfig:
    """The base model's config: the pretrained one, or one built from ``--model_config``."""
    if args.model_name_or_path:
        return AutoConfig.from_pretrained(args.model_name_or_path, **config_kwargs)
    return AutoConfig.for_model(**args.model_config, **config_kwargs)


def build_model(model_cls: type, args: argparse.Namespace, config: PretrainedConfig, **kwargs: Any) -> nn.Module:
    """``model_cls`` (an ``AutoModelFor...``) with pretrained weights, or random ones for ``--model_config``."""
    if args.model_name_or_path:
        return model_cls.from_pretrained(
            args.model_name_or_path, config=config, dtype=getattr(torch, args.dtype), **kwargs
        )
    return model_cls.from_config(config)


def adapter_config(method: str, args: argparse.Namespace, **peft_kwargs: Any) -> PeftConfig:
    """The StelLA or LoRA config of one run: same rank, alpha, targets and dropout, so only the method differs."""
    common = {"r": args.rank, "target_modules": args.target_modules, **peft_kwargs}
    if method == "stella":
        return StellaConfig(
            alpha=args.alpha, dropout=args.dropout, diag_s=args.diag_s, retraction=args.retraction, **common
        )
    return LoraConfig(lora_alpha=args.alpha, lora_dropout=args.dropout, **common)


class StepTimer(TrainerCallback):
    """Wall time of each optimisation step and of the optimizer's ``step()`` alone (where StelLA's cost sits).

    The batch is fetched before ``on_step_begin``, so data loading is not counted.
    """

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.optimizer_times: list[float] = []
        self._step_start = self._optimizer_start = 0.0

    @staticmethod
    def _now(args: TrainingArguments) -> float:
        if args.device.type == "cuda":
            torch.cuda.synchronize()  # CUDA kernels run asynchronously: time them, not their launch
        return time.perf_counter()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._step_start = self._now(args)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._optimizer_start = self._now(args)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.optimizer_times.append(self._now(args) - self._optimizer_start)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.step_times.append(self._now(args) - self._step_start)


def preset_target_modules(model_cls: type, config: PretrainedConfig) -> list[str]:
    """The `llm_presets` targets of the model ``config`` describes, read off a copy on the meta device (no weights
    allocated or loaded)."""
    with torch.device("meta"):
        return target_modules_for(model_cls.from_config(config))


def max_orthonormality_error(model: nn.Module) -> float:
    """``max |XᵀX − I|`` over every StelLA U and V of ``model`` (``Vt`` is read transposed)."""
    return max(float(orthonormality_error(f.tall().detach())) for f in stiefel_factors(model))


def run_method(
    method: str,
    args: argparse.Namespace,
    model_cls: type,
    config: PretrainedConfig,
    *,
    model_kwargs: dict[str, Any] | None = None,
    peft_kwargs: dict[str, Any] | None = None,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """Add the ``method`` adapter to a fresh base model, train and evaluate it with the Trainer, and time it.

    The base is built after the seed is set, so both methods start from the same weights. ``model_kwargs`` go to
    ``from_pretrained``, ``peft_kwargs`` to the adapter config, ``trainer_kwargs`` (datasets, collator, metrics) to
    the Trainer.
    """
    set_seed(args.seed)
    base = build_model(model_cls, args, config, **(model_kwargs or {}))
    model = get_peft_model(base, adapter_config(method, args, **(peft_kwargs or {})))
    lr = args.lora_learning_rate if method == "lora" and args.lora_learning_rate is not None else args.learning_rate
    training_args = TrainingArguments(
        output_dir=str(Path(args.output_dir) / method),
        learning_rate=lr,
        weight_decay=args.weight_decay,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_steps,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        logging_steps=args.logging_steps,
        bf16=args.bf16,
        use_cpu=args.use_cpu,
        seed=args.seed,
        save_strategy="no",
        report_to=[],
    )
    timer = StepTimer()
    trainer_cls = StellaTrainer if method == "stella" else Trainer
    trainer = trainer_cls(model=model, args=training_args, callbacks=[timer], **trainer_kwargs)
    trainer.train()
    metrics = trainer.evaluate()
    if args.save_adapter:
        trainer.save_model()
    train_losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    result = {
        "method": method,
        "learning_rate": lr,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": trainer.state.global_step,
        "first_train_loss": train_losses[0],
        "final_train_loss": train_losses[-1],
        "eval_loss": metrics["eval_loss"],
        "eval_accuracy": metrics["eval_accuracy"],
        "step_time_s": statistics.median(timer.step_times),
        "optimizer_step_time_s": statistics.median(timer.optimizer_times),
    }
    if method == "stella":
        result["orthonormality_error"] = max_orthonormality_error(model)
    return result


def report(results: list[dict[str, Any]], args: argparse.Namespace, accuracy_name: str) -> dict[str, Any]:
    """Print the StelLA-vs-LoRA table (markdown, ready for the README) and write ``results.json``."""
    by_method = {r["method"]: r for r in results}
    ratio = None
    if {"stella", "lora"} <= by_method.keys():
        ratio = by_method["stella"]["step_time_s"] / by_method["lora"]["step_time_s"]
    lines = [
        f"| method | trainable params | train loss (first → final) | eval loss | {accuracy_name} | step (ms) "
        "| optimizer step (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {r['first_train_loss']:.3f} → {r['final_train_loss']:.3f} "
            f"| {r['eval_loss']:.3f} | {r['eval_accuracy']:.3f} | {1e3 * r['step_time_s']:.1f} "
            f"| {1e3 * r['optimizer_step_time_s']:.1f} |"
        )
    if ratio is not None:
        lines.append(f"\nStep-time ratio StelLA / LoRA: {ratio:.2f}")
    table = "\n".join(lines)
    print(table)
    summary = {
        "config": vars(args),
        "results": results,
        "step_time_ratio_stella_over_lora": ratio,
        "table": table,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary
