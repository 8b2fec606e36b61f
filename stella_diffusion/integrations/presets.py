"""StelLA target presets for causal language models and vision transformers, by ``config.model_type``.

peft's own LoRA defaults adapt only q/v (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``); these presets
adapt every projection of the attention and MLP blocks (QLoRA's convention). The StelLA paper's commonsense setting
uses q/k/v/up/down only: `configs/llm-commonsense-llama3-8b.yaml` lists those explicitly.
"""

from __future__ import annotations

from torch import nn

# Llama, Mistral and Qwen2 share the same projection names.
_DECODER_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LLM_TARGET_MODULES: dict[str, list[str]] = {
    "llama": _DECODER_PROJECTIONS,
    "mistral": _DECODER_PROJECTIONS,
    "qwen2": _DECODER_PROJECTIONS,
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # transformers' Conv1D (weight stored as in x out)
}

# q/k/v, the attention output and both MLP layers of every encoder block; the classifier head is left out (train
# it in full with ``modules_to_save=["classifier"]``). transformers 4 names them query/key/value and
# attention.output.dense / intermediate.dense / output.dense (all matched by "dense"); transformers 5 renamed
# them q_proj/k_proj/v_proj/o_proj/fc1/fc2 (its ViT checkpoint conversion maps the old names). Both spellings are
# listed: peft matches names by suffix and ignores those a model does not have.
VIT_TARGET_MODULES: list[str] = [
    "query", "key", "value", "dense",  # transformers 4
    "q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2",  # transformers 5
]  # fmt: skip

_PRESETS: dict[str, list[str]] = {**LLM_TARGET_MODULES, "vit": VIT_TARGET_MODULES}


def target_modules_for(model: nn.Module) -> list[str]:
    """The preset for ``model.config.model_type``, keeping only the names that occur in ``model``.

    Works on a bare transformers model and on a `PeftModel` (whose ``config`` is the base model's).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _PRESETS:
        raise ValueError(
            f"No StelLA target preset for model_type {model_type!r} (presets: {sorted(_PRESETS)}); pass "
            "`target_modules` explicitly, e.g. 'all-linear'."
        )
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [t for t in _PRESETS[model_type] if t in leaves]
