"""``--optimizer``: the torch optimizers LoRA trainers offer, built over per-component parameter groups.

Whichever is chosen, the script then makes it Riemannian with `make_riemannian` (its hooks work on any torch
optimizer). U and V stay out of weight decay (`stella_parameter_groups`), and text-encoder adapters get
``--text_encoder_lr`` in groups of their own. The peft baselines can instead take peft's Riemannian-preconditioned
LoRA optimizer (``--lora_riemannian_preconditioner``), StelLA's nearest neighbour in the comparisons.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..optim import stella_parameter_groups

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "sgd")
# optimizers from optional packages: the package and how to get it (checked before any weight is read)
OPTIONAL_PACKAGES = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}


def parameter_groups(components: Mapping[str, nn.Module], denoiser: str, weight_decay: float,
                     text_encoder_lr: float | None = None) -> list[dict[str, Any]]:
    """`stella_parameter_groups` of each component; text-encoder groups get ``text_encoder_lr`` when given.

    Args:
        components: pipeline component name → adapted model (unwrapped).
        denoiser: the denoiser's component name (its groups keep the optimizer's learning rate).
        weight_decay: weight decay of everything but StelLA's U and V.
        text_encoder_lr: the learning rate of the text encoders' adapters (``None``: the optimizer's).
    """
    groups = []
    for name, model in components.items():
        for group in stella_parameter_groups(model, weight_decay):
            if name != denoiser and text_encoder_lr is not None:
                group["lr"] = text_encoder_lr
            groups.append(group)
    return groups


def build_optimizer(components: Mapping[str, nn.Module], denoiser: str,
                    args: argparse.Namespace) -> torch.optim.Optimizer:
    """The ``--optimizer`` over the adapters of ``components`` (`parameter_groups`), with the script's learning
    rate, betas, epsilon and weight decay; with ``--lora_riemannian_preconditioner``, peft's
    ``create_riemannian_optimizer`` around it instead (one group: it preconditions every LoRA pair it finds).

    Args:
        components: pipeline component name → adapted model (unwrapped).
        denoiser: the denoiser's component name.
        args: the script's arguments.
    """
    if args.lora_riemannian_preconditioner:
        from peft.optimizers import create_riemannian_optimizer

        kwargs: dict[str, Any] = {"weight_decay": args.adam_weight_decay}
        if args.optimizer == "adamw":
            kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        optimizer_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.SGD
        return create_riemannian_optimizer(nn.ModuleDict(dict(components)), optimizer_cls, lr=args.learning_rate,
                                           **kwargs)
    return torch_optimizer(parameter_groups(components, denoiser, args.adam_weight_decay, args.text_encoder_lr), args)


def torch_optimizer(groups: list[dict[str, Any]], args: argparse.Namespace) -> torch.optim.Optimizer:
    """The ``--optimizer`` over ``groups``, with the script's learning rate, betas, epsilon and weight decay.

    Adafactor is transformers' with a fixed learning rate (``relative_step=False, scale_parameter=False``), as
    LoRA trainers use it; SGD is plain SGD; Prodigy (``prodigyopt``) expects ``--learning_rate 1.0``.
    """
    lr, betas = args.learning_rate, (args.adam_beta1, args.adam_beta2)
    if args.optimizer == "adamw":
        # foreach: one kernel per step for all adapter tensors (torch picks it on GPU; on CPU it halves the step)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=args.adam_epsilon, foreach=True)
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=args.adam_epsilon)
    if args.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=lr, betas=betas, eps=args.adam_epsilon)
    if args.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    raise ValueError(f"Unknown optimizer {args.optimizer!r}; choose one of {OPTIMIZERS}.")
