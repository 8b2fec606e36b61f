"""Export math and native checkpoints on a small UNet (the full-pipeline checks are in test_diffusers_export)."""

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from stella_diffusion import StellaLayer
from stella_diffusion.integrations.diffusers import (
    LORA_WEIGHT_NAME,
    NATIVE_WEIGHT_NAME,
    add_stella_adapter,
    default_target_modules,
    load_stella_checkpoint,
    load_stella_into_pipeline,
    pipeline_components,
    save_stella_checkpoint,
    stella_lora_state_dict,
)
from stella_diffusion.integrations.lora_formats import save_lora_export


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, norm_num_groups=8, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, StellaLayer):
                for s in m.stella_S.values():
                    s.add_(0.3 * torch.randn_like(s))


def _factors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".stella_" in k}


def test_unet_preset_targets_every_attention_projection():
    unet = _unet()
    assert default_target_modules(unet) == ["to_q", "to_k", "to_v", "to_out.0"]
    add_stella_adapter(unet, r=2)
    adapted = {n for n, m in unet.named_modules() if isinstance(m, StellaLayer)}
    attentions = [n for n, _ in unet.named_modules() if n.endswith((".attn1", ".attn2"))]
    assert attentions
    assert adapted == {f"{a}.{p}" for a in attentions for p in ("to_q", "to_k", "to_v", "to_out.0")}


def test_unknown_model_class_has_no_preset():
    with pytest.raises(ValueError, match="No StelLA target preset"):
        default_target_modules(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("function_preserving", [False, True])
def test_lora_factors_reproduce_delta_weight_exactly(function_preserving):
    unet = _unet()
    add_stella_adapter(unet, r=3, alpha=5, function_preserving=function_preserving, diag_s=function_preserving)
    _perturb(unet)
    state = stella_lora_state_dict(unet)
    for name, layer in unet.named_modules():
        if isinstance(layer, StellaLayer):
            a, b = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
            assert a.shape[0] == b.shape[1] == (6 if function_preserving else 3)
            torch.testing.assert_close(b @ a, layer.get_delta_weight("default"), atol=1e-6, rtol=1e-5)


def test_export_writes_prefixed_keys_and_unit_scale_metadata(tmp_path):
    unet = _unet()
    add_stella_adapter(unet, r=2, alpha=7, rank_pattern={"attn2.to_q": 3})
    path = save_lora_export(tmp_path, StableDiffusionPipeline, {"unet": unet})
    assert path == tmp_path / LORA_WEIGHT_NAME
    keys = load_file(path)
    assert keys and all(k.startswith("unet.") and ".lora_" in k for k in keys)
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == meta["unet.lora_alpha"] == 2
    assert set(meta["unet.rank_pattern"].values()) == {3}
    assert meta["unet.rank_pattern"] == meta["unet.alpha_pattern"]


def test_export_for_a_pipeline_without_lora_loader_is_a_clear_error(tmp_path):
    unet = _unet()
    add_stella_adapter(unet, r=2)
    with pytest.raises(ValueError, match="no LoRA loader"):
        save_lora_export(tmp_path, PixArtAlphaPipeline, {"unet": unet})


def test_native_round_trip_restores_identical_factors(tmp_path):
    unet = _unet()
    add_stella_adapter(unet, r=2, function_preserving=True)
    _perturb(unet)
    save_stella_checkpoint(tmp_path, {"unet": unet})
    fresh = _unet()
    configs = load_stella_checkpoint(tmp_path, {"unet": fresh})
    assert configs["unet"].function_preserving and configs["unet"].r == 2
    saved, loaded = _factors(unet), _factors(fresh)
    assert saved.keys() == loaded.keys()
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), k
    # loading into a model that already has the same adapter overwrites the factors in place
    other = _unet()
    add_stella_adapter(other, r=2, function_preserving=True)
    load_stella_checkpoint(tmp_path, {"unet": other})
    assert all(torch.equal(saved[k], v) for k, v in _factors(other).items())


def test_native_checkpoint_of_another_rank_is_rejected(tmp_path):
    unet = _unet()
    add_stella_adapter(unet, r=2)
    save_stella_checkpoint(tmp_path, {"unet": unet})
    other = _unet()
    add_stella_adapter(other, r=3)
    before = _factors(other)
    with pytest.raises(ValueError, match="checkpoint rank 2, model rank 3"):
        load_stella_checkpoint(tmp_path, {"unet": other})
    assert all(torch.equal(before[k], v) for k, v in _factors(other).items())


def test_native_checkpoint_of_another_target_set_is_rejected(tmp_path):
    unet = _unet()
    add_stella_adapter(unet, r=2, target_modules=["to_q", "to_v"])
    save_stella_checkpoint(tmp_path, {"unet": unet})
    other = _unet()
    add_stella_adapter(other, r=2)
    with pytest.raises(ValueError, match="targets other modules"):
        load_stella_checkpoint(tmp_path, {"unet": other})


def test_missing_corrupt_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No StelLA checkpoint"):
        load_stella_checkpoint(tmp_path, {"unet": _unet()})
    unet = _unet()
    add_stella_adapter(unet, r=2)
    path = save_stella_checkpoint(tmp_path / "ok", {"unet": unet})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / NATIVE_WEIGHT_NAME).write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_stella_checkpoint(tmp_path / "bad", {"unet": _unet()})
    export = save_lora_export(tmp_path / "export", StableDiffusionPipeline, {"unet": unet})
    with pytest.raises(ValueError, match="load_lora_weights"):
        load_stella_checkpoint(export, {"unet": _unet()})


def _text_encoder() -> CLIPTextModel:
    torch.manual_seed(1)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8,
    ))  # fmt: skip


def _damage(path, tmp_path, damage: str):
    """A copy of the checkpoint at ``path`` whose `text_encoder` part (saved after `unet`) does not fit."""
    tensors = load_file(path)
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    configs = json.loads(header["stella_configs"])
    q_proj = sorted(k for k in tensors if k.startswith("text_encoder.") and ".q_proj." in k)
    if damage == "transposed":
        vt = next(k for k in q_proj if k.endswith(".stella_Vt"))
        tensors[vt] = tensors[vt].T.contiguous()
    elif damage == "rank":
        configs["text_encoder"]["r"] = 3
    elif damage == "missing_module":
        for key in q_proj:
            tensors[key.replace(".q_proj.", ".qkv_proj.")] = tensors.pop(key)
    elif damage == "config":
        configs["text_encoder"]["not_a_field"] = 1
    header["stella_configs"] = json.dumps(configs)
    (tmp_path / "damaged").mkdir()
    save_file(tensors, tmp_path / "damaged" / NATIVE_WEIGHT_NAME, metadata=header)
    return tmp_path / "damaged"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("transposed", r"Shape mismatch for `text_encoder\..*q_proj\.stella_Vt`"),
        ("rank", "checkpoint rank 2, model rank 3"),
        ("missing_module", "targets other modules"),
        ("config", "not a valid StellaConfig"),
    ],
)
def test_a_load_that_does_not_fit_leaves_the_pipeline_exactly_as_it_was(tmp_path, damage, message):
    """Every component is checked before any gets an adapter: all components or none."""
    unet, text_encoder = _unet(), _text_encoder()
    add_stella_adapter(unet, r=2)
    add_stella_adapter(text_encoder, r=2)
    path = save_stella_checkpoint(tmp_path, {"unet": unet, "text_encoder": text_encoder})
    pipe = SimpleNamespace(unet=_unet(), text_encoder=_text_encoder())
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in pipeline_components(pipe).items()}
    with pytest.raises(ValueError, match=message):
        load_stella_into_pipeline(pipe, _damage(path, tmp_path, damage))
    for name, model in pipeline_components(pipe).items():
        assert not any(isinstance(m, StellaLayer) for m in model.modules()), name
        after = model.state_dict()
        assert after.keys() == before[name].keys(), name
        assert all(torch.equal(after[k], v) for k, v in before[name].items()), name
    # the undamaged file loads into the same, untouched pipeline
    load_stella_into_pipeline(pipe, path)
    assert all(torch.equal(v, _factors(text_encoder)[k]) for k, v in _factors(pipe.text_encoder).items())


def test_an_existing_adapter_without_the_frozen_start_refuses_a_function_preserving_checkpoint(tmp_path):
    unet = _unet()
    add_stella_adapter(unet, r=2, function_preserving=True)
    save_stella_checkpoint(tmp_path, {"unet": unet})
    other = _unet()
    add_stella_adapter(other, r=2)
    before = _factors(other)
    with pytest.raises(ValueError, match=r"unexpected \['stella_S0', 'stella_U0', 'stella_Vt0'\]"):
        load_stella_checkpoint(tmp_path, {"unet": other})
    assert _factors(other).keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in _factors(other).items())
