"""`StellaModel`: the peft tuner that puts StelLA layers into a model (peft's config / layer / model split)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .config import StellaConfig
from .factors import layer_dims
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
        r, alpha = config.rank_and_alpha(current_key)
        if isinstance(target, StellaLayer):
            target.update_layer(adapter_name, r, alpha, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        layer_dims(base, current_key)  # an unsupported or quantized layer: one error that names it
        layer_cls = Conv2d if isinstance(base, nn.Conv2d) else Linear
        new_module = layer_cls(target, adapter_name, r=r, alpha=alpha, config=config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        # peft calls this around every forward; LoRA uses it for mixed-adapter batches, which StelLA does not have
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "StelLA does not support mixed-adapter batches (`adapter_names=`): every sample goes through the "
                "active adapter(s). Choose them with `set_adapter`, or convert the adapters to LoRA "
                "(`stella_diffusion.pipelines.stella_lora_state_dict`)."
            )
        yield
