"""The StelLA adapter as a peft method: layer math, merge, save/load, patterns, several adapters."""

import math
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from stella_diffusion import StellaConfig, StellaLayer
from stella_diffusion.manifold import orthonormality_error


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.conv = Conv1D(16, 24)  # GPT-2 layout: weight (in=24, out=16)
        self.pw = nn.Conv2d(16, 20, kernel_size=1)
        self.head = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(torch.relu(self.fc1(x))))  # (B, 16)
        h = self.pw(h[:, :, None, None].expand(-1, -1, 2, 2)).mean((2, 3))
        return self.head(torch.relu(h))


def _stella(config: StellaConfig | None = None, **kwargs) -> nn.Module:
    config = config or StellaConfig(target_modules=["fc1", "conv", "pw"], **kwargs)
    return get_peft_model(Toy(), config)


def _perturb(model: nn.Module) -> None:
    """Move every factor away from its initial value (so tests see a non-trivial adapter)."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, StellaLayer):
                for name in layer.stella_S:
                    layer.stella_S[name].add_(0.3 * torch.randn_like(layer.stella_S[name]))


def _layers(model: nn.Module) -> list[StellaLayer]:
    return [m for m in model.modules() if isinstance(m, StellaLayer)]


@pytest.mark.parametrize("diag_s", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_linear_forward_equals_formula(diag_s, use_rslora):
    model = _stella(r=4, alpha=6, diag_s=diag_s, use_rslora=use_rslora)
    _perturb(model)
    layer = model.base_model.model.fc1
    u, s, vt = layer.stella_U["default"], layer.stella_S["default"], layer.stella_Vt["default"]
    assert s.shape == ((4,) if diag_s else (4, 4))
    scale = 6 / math.sqrt(4) if use_rslora else 6 / 4
    x = torch.randn(7, 12)
    s_matrix = torch.diag(s) if diag_s else s
    expected = layer.base_layer(x) + scale * x @ (u @ s_matrix @ vt).T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("diag_s", [False, True])
@pytest.mark.parametrize("alpha", [3, 5])  # α = r skips the scaling, α ≠ r folds it into S
def test_folded_forward_has_the_gradients_of_the_three_factor_formula(diag_s, alpha):
    """S (and s) are folded into Vᵀ before the input is touched; outputs and U, S, Vt gradients are unchanged."""
    model = _stella(r=3, alpha=alpha, diag_s=diag_s)
    _perturb(model)
    x, img = torch.randn(5, 12), torch.randn(2, 16, 3, 3)
    for layer, inputs in ((model.base_model.model.fc1, x), (model.base_model.model.pw, img)):
        factors = [layer.stella_U["default"], layer.stella_S["default"], layer.stella_Vt["default"]]
        got = torch.autograd.grad(layer(inputs).square().sum(), factors)
        u, s, vt = factors
        delta = layer.scaling["default"] * u @ (torch.diag(s) if diag_s else s) @ vt  # (out, in)
        if inputs.ndim == 2:
            expected = layer.base_layer(inputs) + inputs @ delta.T
        else:
            expected = layer.base_layer(inputs) + nn.functional.conv2d(inputs, delta[:, :, None, None])
        torch.testing.assert_close(layer(inputs), expected, atol=1e-5, rtol=1e-5)
        for g, e in zip(got, torch.autograd.grad(expected.square().sum(), factors), strict=True):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-5)


def test_conv1d_and_1x1_conv2d_equal_their_merged_weights():
    model = _stella(r=3)
    _perturb(model)
    conv1d, conv2d = model.base_model.model.conv, model.base_model.model.pw
    x = torch.randn(5, 24)
    w = conv1d.base_layer.weight + conv1d.get_delta_weight("default")  # stored (in, out)
    torch.testing.assert_close(conv1d(x), x @ w + conv1d.base_layer.bias, atol=1e-5, rtol=1e-5)
    img = torch.randn(2, 16, 3, 3)
    w2 = conv2d.base_layer.weight + conv2d.get_delta_weight("default")
    torch.testing.assert_close(conv2d(img), nn.functional.conv2d(img, w2, conv2d.base_layer.bias),
                               atol=1e-5, rtol=1e-5)


def test_non_pointwise_conv_is_rejected():
    net = nn.Sequential(nn.Conv2d(3, 8, kernel_size=3))
    with pytest.raises(ValueError, match="1x1"):
        get_peft_model(net, StellaConfig(target_modules=["0"], r=2))


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_must_be_positive(rank):
    with pytest.raises(ValueError, match="positive integer"):
        StellaConfig(r=rank)


def test_rank_above_layer_dimensions_is_rejected():
    with pytest.raises(ValueError, match="exceeds"):
        _stella(r=13)  # fc1 has in_features 12


def test_orthonormal_init_is_on_the_manifold_with_identity_s():
    model = _stella(r=4)
    for layer in _layers(model):
        assert orthonormality_error(layer.stella_U["default"]) < 1e-6
        assert orthonormality_error(layer.stella_Vt["default"].T) < 1e-6
        torch.testing.assert_close(layer.stella_S["default"], torch.eye(4))
        assert layer.get_delta_weight("default").abs().max() > 0  # ΔW ≠ 0 at step 0, as in the paper


@pytest.mark.parametrize("init", ["svd_major", "svd_minor"])
def test_svd_inits_use_singular_vectors_of_the_base_weight(init):
    model = _stella(r=3, init_weights=init)
    layer = model.base_model.model.fc1
    left, _, right_t = torch.linalg.svd(layer.base_layer.weight.detach(), full_matrices=False)
    chosen = slice(0, 3) if init == "svd_major" else slice(-3, None)
    # singular vectors are unique up to sign: compare |Uᵀ U_ref| to I
    torch.testing.assert_close((layer.stella_U["default"].T @ left[:, chosen]).abs(), torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close((layer.stella_Vt["default"] @ right_t[chosen].T).abs(), torch.eye(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("diag_s", [False, True])
def test_zero_start_is_the_base_model_without_buffers_and_then_trains(diag_s):
    """The paper's "Zero" ablation: orthonormal U, V, S = 0 — ΔW = 0 exactly, no frozen start; S moves first."""
    from stella_diffusion import create_stella_optimizer

    model = _stella(r=3, init_weights="zero", diag_s=diag_s)
    x = torch.randn(4, 12)
    with model.disable_adapter():
        base_out = model(x)
    torch.testing.assert_close(model(x), base_out, atol=0, rtol=0)
    for layer in _layers(model):
        assert orthonormality_error(layer.stella_U["default"]) < 1e-6 and not layer.stella_U0
        assert layer.get_delta_weight("default").abs().max() == 0
    optimizer = create_stella_optimizer(model, torch.optim.AdamW, lr=1e-2)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    layer = _layers(model)[0]
    assert layer.stella_S["default"].abs().max() > 0 and layer.get_delta_weight("default").abs().max() > 0
    assert optimizer.stella.orthonormality_error() < 1e-5


def test_function_preserving_start_equals_base_model_and_exports_the_difference():
    model = _stella(r=3, function_preserving=True)
    x = torch.randn(4, 12)
    with model.disable_adapter():
        base_out = model(x)
    torch.testing.assert_close(model(x), base_out, atol=1e-6, rtol=0)
    _perturb(model)
    layer = model.base_model.model.fc1
    u, s, vt = layer.stella_U["default"], layer.stella_S["default"], layer.stella_Vt["default"]
    u0, s0, vt0 = layer.stella_U0["default"], layer.stella_S0["default"], layer.stella_Vt0["default"]
    expected = layer.scaling["default"] * (u @ s @ vt - u0 @ s0 @ vt0)
    torch.testing.assert_close(layer.get_delta_weight("default"), expected, atol=1e-6, rtol=0)
    assert not any(b.requires_grad for b in (u0, s0, vt0))


def test_merge_then_forward_equals_unmerged_and_unmerge_restores_weights():
    model = _stella(r=4)
    _perturb(model)
    x = torch.randn(6, 12)
    unmerged = model(x)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    model.merge_adapter()
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=0)


def test_merge_and_unload_and_unload():
    model = _stella(r=4)
    _perturb(model)
    x = torch.randn(6, 12)
    adapted = model(x)
    with model.disable_adapter():
        base = model(x)
    merged = model.merge_and_unload()
    assert not _layers(merged)
    torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-5)

    model = _stella(r=4)
    _perturb(model)
    with model.disable_adapter():
        base = model(x)
    unloaded = model.unload()
    assert not _layers(unloaded)
    torch.testing.assert_close(unloaded(x), base, atol=0, rtol=0)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(3)
    base = Toy()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, StellaConfig(r=4, diag_s=True, target_modules=["fc1", "conv", "pw"]))
    _perturb(model)
    x = torch.randn(3, 12)
    expected = model(x)
    model.save_pretrained(tmp_path)

    fresh = Toy()
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)
    assert loaded.peft_config["default"].diag_s is True


def test_patterns_exclusions_and_modules_to_save():
    config = StellaConfig(
        r=2, alpha=2, target_modules=["fc1", "conv", "pw"], exclude_modules=["pw"],
        rank_pattern={"conv": 5}, alpha_pattern={"conv": 10}, modules_to_save=["head"],
    )
    model = get_peft_model(Toy(), config)
    inner = model.base_model.model
    assert not isinstance(inner.pw, StellaLayer)
    assert inner.fc1.r["default"] == 2 and inner.fc1.scaling["default"] == 1.0
    assert inner.conv.r["default"] == 5 and inner.conv.scaling["default"] == 2.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("head.modules_to_save" in n for n in trainable)
    assert all("base_layer" not in n for n in trainable)


def test_several_adapters_one_trained_at_a_time_and_disable():
    model = _stella(r=2)
    model.add_adapter("other", StellaConfig(r=3, target_modules=["fc1", "conv", "pw"]))
    layer = model.base_model.model.fc1
    assert set(layer.stella_U) == {"default", "other"}
    assert layer.stella_U["default"].requires_grad and not layer.stella_U["other"].requires_grad
    x = torch.randn(2, 12)
    out_default = model(x)
    model.set_adapter("other")
    assert layer.stella_U["other"].requires_grad and not layer.stella_U["default"].requires_grad
    out_other = model(x)
    assert not torch.allclose(out_default, out_other)
    with model.disable_adapter():
        base = model(x)
    model.base_model.disable_adapter_layers()
    torch.testing.assert_close(model(x), base, atol=0, rtol=0)
    model.base_model.enable_adapter_layers()
    torch.testing.assert_close(model(x), out_other, atol=0, rtol=0)


def test_layer_hands_out_its_stiefel_factors_and_native_state():
    model = _stella(r=3, function_preserving=True, diag_s=True)
    _perturb(model)
    for layer in _layers(model):
        u, vt = layer.stiefel_factors("default")
        assert u.shape == (layer.out_features, 3) and not u.transposed and u.param is layer.stella_U["default"]
        assert vt.shape == (3, layer.in_features) and vt.transposed and vt.param is layer.stella_Vt["default"]
        assert all(orthonormality_error(f.tall()) < 1e-6 for f in (u, vt))
        state = layer.native_state("default")
        assert {k: tuple(v.shape) for k, v in state.items()} == layer.native_shapes("default")
        assert set(state) == {"stella_U", "stella_S", "stella_Vt", "stella_U0", "stella_S0", "stella_Vt0"}

    other = _stella(r=3, function_preserving=True, diag_s=True)
    for mine, theirs in zip(_layers(model), _layers(other), strict=True):
        theirs.load_native_state("default", mine.native_state("default"))
        for key, value in mine.native_state("default").items():
            assert torch.equal(theirs.native_state("default")[key], value), key
        assert torch.equal(theirs.get_delta_weight("default"), mine.get_delta_weight("default"))


def test_load_native_state_checks_every_shape_before_writing():
    model, other = _stella(r=3), _stella(r=3)
    layer, target = model.base_model.model.fc1, other.base_model.model.fc1
    before = {k: v.clone() for k, v in target.native_state("default").items()}
    state = dict(layer.native_state("default"))
    state["stella_Vt"] = state["stella_Vt"].T  # (in, r) instead of (r, in); U and S in front of it are fine
    with pytest.raises(ValueError, match=r"Shape mismatch for `fc1.stella_Vt`: checkpoint \(12, 3\), model \(3, 12\)"):
        target.load_native_state("default", state, where="fc1")
    with pytest.raises(ValueError, match=r"unexpected \['stella_U0'\]"):
        target.load_native_state("default", {**layer.native_state("default"), "stella_U0": state["stella_U"]})
    assert all(torch.equal(target.native_state("default")[k], v) for k, v in before.items())


def test_function_preserving_with_dropout_is_the_base_model_in_train_mode():
    """The frozen start sees the same dropped-out input as the live factors, so step 0 is the base model."""
    model = _stella(r=3, function_preserving=True, dropout=0.5).train()
    x = torch.randn(64, 12)
    with model.disable_adapter():
        base_out = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(model(x), base_out, atol=1e-6, rtol=0)


class Linear4bit(nn.Linear):
    """Stand-in for bitsandbytes' Linear4bit (a subclass of nn.Linear), without importing bitsandbytes."""


class Linear8bitLt(nn.Linear):
    """Stand-in for bitsandbytes' Linear8bitLt."""


def _int8_linear() -> nn.Linear:
    layer = nn.Linear(12, 24)
    layer.weight = nn.Parameter(torch.zeros(24, 12, dtype=torch.int8), requires_grad=False)
    return layer


@pytest.mark.parametrize(
    ("make", "type_name"),
    [
        (lambda: Linear4bit(12, 24), "Linear4bit"),
        (lambda: Linear8bitLt(12, 24), "Linear8bitLt"),
        (_int8_linear, "Linear"),  # integer weights, whatever the class
    ],
)
def test_quantized_layers_are_refused_with_one_clear_error(make, type_name):
    net = Toy()
    net.fc1 = make()
    with pytest.raises(TypeError, match=rf"cannot adapt the quantized layer `fc1` \(.*{type_name}\)"):
        get_peft_model(net, StellaConfig(r=2, target_modules=["fc1", "conv"]))


def test_mixed_adapter_batches_are_refused():
    model = _stella(r=2).eval()
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        model(torch.randn(2, 12), adapter_names=["default", "default"])


def test_peft_loads_a_saved_adapter_once_stella_diffusion_is_imported(tmp_path):
    """peft has no hook for a method it does not know: without the import its bare KeyError is all one gets, so the
    README says to import stella_diffusion first."""
    base = nn.Sequential(nn.Linear(4, 4))
    torch.save(base.state_dict(), tmp_path / "base.pt")
    get_peft_model(base, StellaConfig(r=2, target_modules=["0"])).save_pretrained(tmp_path / "adapter")
    script = f"""
import torch
from peft import PeftModel
def load():
    base = torch.nn.Sequential(torch.nn.Linear(4, 4))
    base.load_state_dict(torch.load({str(tmp_path / "base.pt")!r}))
    return PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r})
try:
    load()
except KeyError as err:
    print("without import:", err)
import stella_diffusion
print("with import:", type(load().peft_config["default"]).__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "without import: 'STELLA'" in out and "with import: StellaConfig" in out
