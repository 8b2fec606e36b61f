"""transformers `Trainer` integration: the Trainer's own optimizer, made Riemannian."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import Trainer

from ..optim import make_riemannian, stiefel_parameters


class StellaTrainerMixin:
    """Mix into any `Trainer` subclass (e.g. TRL's ``SFTTrainer``): ``class T(StellaTrainerMixin, SFTTrainer)``.

    The optimizer is whatever ``TrainingArguments.optim`` selects; U and V leave the weight-decay group and the
    optimizer's ``step()`` becomes Riemannian.
    """

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        constrained = {id(p) for p in stiefel_parameters(model)}
        decayed = set(super().get_decay_parameter_names(model))
        return [n for n, p in model.named_parameters() if n in decayed and id(p) not in constrained]

    def create_optimizer(self, model: nn.Module | None = None) -> Any:
        optimizer = super().create_optimizer(model)
        if getattr(optimizer, "stella", None) is None:
            make_riemannian(optimizer, self.model if model is None else model)
        return optimizer


class StellaTrainer(StellaTrainerMixin, Trainer):
    """`transformers.Trainer` for StelLA adapters (see `StellaTrainerMixin`)."""
