"""StelLA against peft's conformance checks (in the style of peft's ``tests/test_custom_models.py``).

Every config of ``CASES`` runs through the same checks on a tiny model: save / load (also with
``low_cpu_mem_usage``), merge / unmerge / safe merge, disabled adapter, delete_adapter, unload /
merge_and_unload, and peft's ``convert_to_lora`` (exact, or refused where it cannot be).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from peft import (
    LoraConfig,
    PeftModel,
    convert_to_lora,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    save_as_lora,
    set_peft_model_state_dict,
)
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from stella_diffusion import StellaConfig, StellaLayer


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class GPT2Like(nn.Module):
    """transformers' Conv1D stores its weight as (in, out)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.head = Conv1D(8, 6), Conv1D(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class PointwiseConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.head = nn.Conv2d(6, 8, 1), nn.Conv2d(8, 8, 1), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = x[:, :, None, None].expand(-1, -1, 2, 2)
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(img)))).mean((2, 3)))


MODELS = {"linear": MLP, "conv1d": GPT2Like, "conv2d": PointwiseConv}
TARGETS = ["lin0", "lin1"]

# (test id, model, StellaConfig kwargs)
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("full-s", "linear", {"r": 2, "alpha": 3}),
    ("diag-s", "linear", {"r": 2, "diag_s": True}),
    ("rslora", "linear", {"r": 3, "alpha": 5, "use_rslora": True}),
    ("svd-major", "linear", {"r": 2, "init_weights": "svd_major"}),
    ("svd-minor", "linear", {"r": 2, "init_weights": "svd_minor", "diag_s": True}),
    ("function-preserving", "linear", {"r": 2, "alpha": 4, "function_preserving": True}),
    ("dropout", "linear", {"r": 2, "dropout": 0.3}),
    ("fp-dropout-diag", "linear", {"r": 2, "dropout": 0.3, "function_preserving": True, "diag_s": True}),
    ("patterns", "linear", {"r": 2, "rank_pattern": {"lin1": 3}, "alpha_pattern": {"lin1": 6}}),
    ("modules-to-save", "linear", {"r": 2, "modules_to_save": ["head"]}),
    ("conv1d", "conv1d", {"r": 2, "alpha": 3}),
    ("conv1d-fp", "conv1d", {"r": 2, "function_preserving": True, "diag_s": True}),
    ("conv2d", "conv2d", {"r": 2, "alpha": 3}),
    ("conv2d-fp", "conv2d", {"r": 2, "function_preserving": True, "use_rslora": True}),
]


@pytest.fixture(params=CASES, ids=[case[0] for case in CASES])
def case(request: pytest.FixtureRequest) -> tuple[nn.Module, nn.Module, StellaConfig]:
    """(an untouched base, the adapted model with moved factors in eval mode, its config)."""
    _, model_name, kwargs = request.param
    base = MODELS[model_name]()
    config = StellaConfig(target_modules=TARGETS, **kwargs)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # move the factors off their start, so ΔW (or ΔW − ΔW₀) is not trivial
        for layer in _stella_layers(model):
            for s in layer.stella_S.values():
                s.add_(0.3 * torch.randn_like(s))
        for wrapper in model.modules():
            if isinstance(wrapper, ModulesToSaveWrapper):
                for p in wrapper.modules_to_save.parameters():
                    p.add_(0.1)
    return base, model.eval(), config


def _stella_layers(model: nn.Module) -> list[StellaLayer]:
    return [m for m in model.modules() if isinstance(m, StellaLayer)]


def _x() -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(1))


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


@pytest.mark.parametrize("how", ["from_pretrained", "low_cpu_mem_usage", "inject_low_cpu_mem_usage"])
def test_save_and_load_give_identical_outputs(case, how, tmp_path):
    base, model, config = case
    expected = model(_x())
    model.save_pretrained(tmp_path)
    if how == "inject_low_cpu_mem_usage":
        if config.modules_to_save:
            # peft's set_peft_model_state_dict misses modules_to_save after inject_adapter_in_model (LoRA's too)
            pytest.skip("peft: modules_to_save are not restored into an inject_adapter_in_model model")
        loaded = inject_adapter_in_model(copy.deepcopy(config), copy.deepcopy(base), low_cpu_mem_usage=True)
        set_peft_model_state_dict(loaded, get_peft_model_state_dict(model), low_cpu_mem_usage=True)
    else:
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=how != "from_pretrained")
    assert not any(t.is_meta for t in loaded.state_dict().values())
    torch.testing.assert_close(loaded.eval()(_x()), expected, atol=0, rtol=0)


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_equals_unmerged_and_unmerge_restores_the_base(case, safe_merge):
    _, model, _ = case
    unmerged, weights = model(_x()), _base_weights(model)
    model.base_model.merge_adapter(safe_merge=safe_merge)
    assert all(layer.merged for layer in _stella_layers(model))
    torch.testing.assert_close(model(_x()), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for name, p in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(p.detach(), weights[name], atol=1e-6, rtol=0)


def test_disabled_adapter_is_the_base_model(case):
    base, model, _ = case
    with model.disable_adapter():
        out = model(_x())
    torch.testing.assert_close(out, base(_x()), atol=0, rtol=0)


def test_delete_adapter_removes_every_trace(case):
    _, model, config = case
    expected = model(_x())
    model.add_adapter("other", copy.deepcopy(config))
    model.delete_adapter("other")
    for layer in _stella_layers(model):
        for attr in layer.adapter_layer_names + layer.other_param_names:
            assert "other" not in getattr(layer, attr), attr
    assert not any(".other" in key for key in model.state_dict())
    torch.testing.assert_close(model(_x()), expected, atol=0, rtol=0)


def test_unload_and_merge_and_unload(case):
    base, model, _ = case
    adapted = model(_x())
    merged = copy.deepcopy(model).merge_and_unload(safe_merge=True)
    assert not _stella_layers(merged)
    torch.testing.assert_close(merged(_x()), adapted, atol=1e-5, rtol=1e-5)
    trained = {k: v.clone() for k, v in model.state_dict().items() if ".modules_to_save.default." in k}
    unloaded = model.unload()
    assert not _stella_layers(unloaded)
    # the base weights come back untouched; peft's unload keeps the trained copy of a module in modules_to_save
    for key, value in base.state_dict().items():
        owner = key.rpartition(".")[0]
        kept = trained.get(f"base_model.model.{owner}.modules_to_save.default.{key.rpartition('.')[2]}", value)
        assert torch.equal(unloaded.state_dict()[key], kept), key
    if not trained:
        torch.testing.assert_close(unloaded(_x()), base(_x()), atol=0, rtol=0)


def test_convert_to_lora_is_exact_or_refused(case, tmp_path):
    base, model, config = case
    if isinstance(model.base_model.model.lin0.get_base_layer(), nn.Conv2d):
        with pytest.raises(TypeError, match="do not support LoRA conversion.*Conv2d"):
            convert_to_lora(model, rank=2 * config.r)
        return
    rank = 2 * max([config.r, *config.rank_pattern.values()])  # ΔW − ΔW₀ of a function-preserving start has rank 2r
    lora_config, state = convert_to_lora(model, rank=rank)
    assert isinstance(lora_config, LoraConfig)
    for name, layer in model.named_modules():
        if isinstance(layer, StellaLayer):
            product = state[f"{name}.lora_B.weight"] @ state[f"{name}.lora_A.weight"]  # (out, in)
            delta = layer.get_delta_weight("default")
            expected = delta.T if isinstance(layer.get_base_layer(), Conv1D) else delta
            torch.testing.assert_close(product, expected, atol=1e-5, rtol=0)
    save_as_lora(tmp_path, model, rank=rank)
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(lora(_x()), model(_x()), atol=1e-5, rtol=1e-5)
