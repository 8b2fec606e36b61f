"""`StellaModel`: the peft tuner that puts StelLA layers into a model (peft's config / layer / model split)."""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import StellaConfig
from .layer import Conv2d, Linear, StellaLayer


class StellaModel(BaseTuner):
    """Creates a StelLA model from a base model; used through `peft.get_peft_model(model, StellaConfig(...))`.

    Train it with any torch optimizer made Riemannian by `stella_diffusion.make_riemannian` (or built by
    `stella_diffusion.create_stella_optimizer`).
    """

    prefix: str = "stella_"
    tuner_layer_cls = StellaLayer
    # StelLA goes where LoRA goes: reuse peft's default LoRA targets per architecture
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        config: StellaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), current_key), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), current_key), config.alpha)
        if isinstance(target, StellaLayer):
            target.update_layer(adapter_name, r, alpha, config)
            return
        new_module = self._create_new_module(config, adapter_name, target, r=r, alpha=alpha)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: StellaConfig, adapter_name: str, target: nn.Module, r: int,
                           alpha: float) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Conv2d):
            return Conv2d(target, adapter_name, r=r, alpha=alpha, config=config)
        if isinstance(base, (nn.Linear, Conv1D)):
            return Linear(target, adapter_name, r=r, alpha=alpha, config=config)
        raise TypeError(
            f"Target module {type(base).__name__} is not supported by StelLA: use torch.nn.Linear, "
            "transformers' Conv1D or a 1x1 torch.nn.Conv2d."
        )
