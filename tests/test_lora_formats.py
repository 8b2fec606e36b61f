"""kohya / BFL / canonical-diffusers LoRA files: exact ΔW, names derived from the base model, stock loading, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stella_diffusion import StellaLayer
from stella_diffusion.integrations.convert import main
from stella_diffusion.integrations.diffusers import (
    TARGET_PRESETS,
    add_stella_adapter,
    lora_metadata,
    save_stella_checkpoint,
    stella_lora_state_dict,
)
from stella_diffusion.integrations.lora_formats import (
    WEIGHT_NAMES,
    canonical_clip_name,
    save_lora_formats,
    supported_formats,
)
from stella_diffusion.testing import build_tiny_pipeline, default_generation_kwargs

from .test_diffusers_export import PROMPT, _train_a_little

STOCK_SCRIPT = Path(__file__).with_name("stock_lora_files_script.py")
CLIP_ENCODERS = {"sd": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"], "flux": ["text_encoder"]}


def _adapted_pipeline(kind: str, base_dir: Path, **unet_kwargs) -> tuple[DiffusionPipeline, dict]:
    """The tiny pipeline of ``kind`` with trained StelLA adapters on its denoiser and CLIP text encoders."""
    pipe = DiffusionPipeline.from_pretrained(build_tiny_pipeline(kind, base_dir))
    pipe.set_progress_bar_config(disable=True)
    denoiser = "unet" if kind in ("sd", "sdxl") else "transformer"
    add_stella_adapter(getattr(pipe, denoiser), r=4, alpha=4, **unet_kwargs)
    for name in CLIP_ENCODERS[kind]:
        add_stella_adapter(getattr(pipe, name), r=4, alpha=4)
    components = {name: getattr(pipe, name) for name in [denoiser, *CLIP_ENCODERS[kind]]}
    _train_a_little(components)
    return pipe, components


def _states(components: dict) -> dict:
    states = {}
    for name, model in components.items():
        state = stella_lora_state_dict(model)
        states[name] = (state, lora_metadata(state))
    return states


def _generate(pipe, kind: str) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    return np.asarray(pipe(PROMPT, generator=generator, **default_generation_kwargs(kind)).images)


def _run_stock(base_dir: Path, files: list[Path], kind: str, out: Path) -> dict[str, np.ndarray]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    # the parent's thread count: float32 sums are ordered by it
    cmd = [sys.executable, str(STOCK_SCRIPT), "--num_threads", str(torch.get_num_threads()),
           "--pipeline", str(base_dir), "--prompt", PROMPT,
           "--generation_kwargs", json.dumps(default_generation_kwargs(kind)), "--out", str(out)]
    for file in files:
        cmd += ["--lora", str(file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def _delta(down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """ΔW as a kohya-style loader computes it: alpha / rank · up @ down (1×1 convs flattened)."""
    return alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1))


def _live_delta(model: torch.nn.Module, name: str) -> torch.Tensor:
    layer = model.get_submodule(name)
    assert isinstance(layer, StellaLayer)
    return layer.get_delta_weight("default").detach().flatten(1)


def test_canonical_clip_names():
    # transformers 5 CLIPTextModel (flat), transformers 4 / CLIPTextModelWithProjection, projection, T5
    assert canonical_clip_name("encoder.layers.0.self_attn.q_proj") == "text_model.encoder.layers.0.self_attn.q_proj"
    assert canonical_clip_name("text_model.encoder.layers.1.mlp.fc1") == "text_model.encoder.layers.1.mlp.fc1"
    assert canonical_clip_name("embeddings.token_embedding") == "text_model.embeddings.token_embedding"
    assert canonical_clip_name("text_projection") == "text_projection"
    assert canonical_clip_name("encoder.block.0.layer.0.SelfAttention.q") == "encoder.block.0.layer.0.SelfAttention.q"


def test_supported_formats_and_refusals(tmp_path):
    assert supported_formats(StableDiffusionPipeline) == ("diffusers", "kohya")
    assert supported_formats(StableDiffusion3Pipeline) == ("diffusers",)
    state = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
             "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 2)}
    states = {"transformer": (state, lora_metadata(state))}
    with pytest.raises(ValueError, match=r"no kohya LoRA format.*supports \['diffusers'\]"):
        save_lora_formats(tmp_path / "sd3", StableDiffusion3Pipeline, states, ["diffusers", "kohya"])
    with pytest.raises(ValueError, match="Unknown LoRA format"):
        save_lora_formats(tmp_path / "sd3", StableDiffusion3Pipeline, states, ["comfy"])
    assert not (tmp_path / "sd3").exists()

    # DoRA: one clear error, and nothing written even with the diffusers file asked for first
    dora = {"down_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 8),
            "down_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(8, 2),
            "down_blocks.0.attn1.to_q.lora_magnitude_vector.weight": torch.ones(8)}
    meta = {**lora_metadata(dora), "use_dora": True}
    with pytest.raises(ValueError, match=r"DoRA .* renormalises W \+ ΔW per output row .* Use the diffusers file"):
        save_lora_formats(tmp_path / "dora", StableDiffusionPipeline, {"unet": (dora, meta)}, ["diffusers", "kohya"])
    assert not any((tmp_path / "dora").iterdir())


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_kohya_names_derive_from_the_base_model(kind, tmp_path):
    pipe, components = _adapted_pipeline(kind, tmp_path / "base")
    training = {"ss_learning_rate": "0.0001", "ss_num_train_images": "4"}
    paths = save_lora_formats(tmp_path / "out", type(pipe), _states(components), ["kohya"],
                              training_metadata=training)
    assert set(paths) == {"kohya"} and paths["kohya"].name == WEIGHT_NAMES["kohya"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == [WEIGHT_NAMES["kohya"]]  # no temporary left

    # the names a kohya loader expects, from a FRESH base model's own module names (no adapter code involved)
    base = DiffusionPipeline.from_pretrained(tmp_path / "base")
    prefixes = {"sd": {"unet": "lora_unet", "text_encoder": "lora_te"},
                "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}[kind]
    expected = {}
    for component, prefix in prefixes.items():
        model = getattr(base, component)
        targets = TARGET_PRESETS[type(model).__name__]
        for name, _ in model.named_modules():
            if any(name.endswith("." + t) for t in targets):
                # transformers 5 flattened CLIPTextModel; kohya / ComfyUI / A1111 name it as transformers 4 did
                path = name if component == "unet" or hasattr(model, "text_model") else f"text_model.{name}"
                expected[f"{prefix}_{path.replace('.', '_')}"] = (component, name)
    assert any(k.startswith("lora_te") for k in expected) and any(k.startswith("lora_unet") for k in expected)

    tensors = load_file(paths["kohya"])
    suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha")
    assert set(tensors) == {name + s for name in expected for s in suffixes}
    for name, (component, module) in expected.items():
        down, up, alpha = (tensors[name + s] for s in suffixes)
        assert alpha.dtype == torch.float32 and alpha.ndim == 0 and alpha.item() == down.shape[0] == 4
        live = _live_delta(components[component], module)
        torch.testing.assert_close(_delta(down, up, alpha), live, rtol=0, atol=1e-6)
    with safe_open(paths["kohya"], framework="pt") as handle:
        header = handle.metadata()
    assert header == {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0",
                      "ss_base_model_version": {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0"}[kind], **training}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "sdxl", "flux"])
def test_stock_diffusers_loads_every_format_with_the_same_images(kind, tmp_path):
    # Flux: diffusers' kohya/BFL loader hard-codes FLUX.1's widths for single_blocks.N.linear1, so the tiny
    # model's single blocks stay unadapted here; their exact fusion is checked in the next test.
    extra = {"exclude_modules": r".*single_transformer_blocks.*"} if kind == "flux" else {}
    pipe, components = _adapted_pipeline(kind, tmp_path / "base", **extra)
    stella_images = _generate(pipe, kind)
    paths = save_lora_formats(tmp_path / "out", type(pipe), _states(components), supported_formats(type(pipe)))
    assert set(paths) == ({"diffusers", "kohya", "bfl"} if kind == "flux" else {"diffusers", "kohya"})

    # the diffusers file names CLIP as transformers 4 did, its metadata without `text_model.` (peft suffix match)
    with safe_open(paths["diffusers"], framework="pt") as handle:
        te_keys = [k for k in handle.keys() if k.startswith("text_encoder")]
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert te_keys and all(k.split(".", 2)[1] == "text_model" for k in te_keys)
    assert all(not m.startswith("text_model.") for m in metadata["text_encoder.target_modules"])

    files = [paths[f] for f in sorted(paths)]
    stock = _run_stock(tmp_path / "base", files, kind, tmp_path / "stock.npz")
    assert np.abs(stock["base"] - stella_images).max() > 1e-3, "the adapter must change the images"
    for i, file in enumerate(files):
        assert json.loads(str(stock[f"{i}_adapters"])) == {c: [f"file{i}"] for c in components}, file.name
        for stage in ("loaded", "fused"):
            err = np.abs(stock[f"{i}_{stage}"] - stella_images).max()
            assert err <= 1e-5, f"{file.name} ({stage}): max |Δ| = {err}"


def test_flux_bfl_file_fuses_qkv_exactly(tmp_path):
    targets = TARGET_PRESETS["FluxTransformer2DModel"] + [
        "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        "norm1.linear", "norm1_context.linear", "norm.linear", "x_embedder", "context_embedder",
        "linear_1", "linear_2",
    ]
    pipe, components = _adapted_pipeline("flux", tmp_path / "base", target_modules=targets)
    states = _states(components)
    paths = save_lora_formats(tmp_path / "out", type(pipe), states, ["bfl", "kohya"])
    bfl, kohya = load_file(paths["bfl"]), load_file(paths["kohya"])
    model = components["transformer"]
    d = model.config.num_attention_heads * model.config.attention_head_dim

    def delta(name):
        return _live_delta(model, name)

    double, single = "transformer_blocks.0.", "single_transformer_blocks.0."
    expected = {  # BFL module → its ΔW from the diffusers modules, in the BFL weight's row order
        "double_blocks.0.img_attn.qkv": torch.cat([delta(double + f"attn.to_{p}") for p in "qkv"]),
        "double_blocks.0.txt_attn.qkv": torch.cat([delta(double + f"attn.add_{p}_proj") for p in "qkv"]),
        "double_blocks.0.img_attn.proj": delta(double + "attn.to_out.0"),
        "double_blocks.0.txt_attn.proj": delta(double + "attn.to_add_out"),
        "double_blocks.0.img_mlp.0": delta(double + "ff.net.0.proj"),
        "double_blocks.0.img_mlp.2": delta(double + "ff.net.2"),
        "double_blocks.0.txt_mlp.0": delta(double + "ff_context.net.0.proj"),
        "double_blocks.0.txt_mlp.2": delta(double + "ff_context.net.2"),
        "double_blocks.0.img_mod.lin": delta(double + "norm1.linear"),
        "double_blocks.0.txt_mod.lin": delta(double + "norm1_context.linear"),
        "single_blocks.0.linear1": torch.cat([delta(single + f"attn.to_{p}") for p in "qkv"]
                                             + [delta(single + "proj_mlp")]),
        "single_blocks.0.linear2": delta(single + "proj_out"),
        "single_blocks.0.modulation.lin": delta(single + "norm.linear"),
        "img_in": delta("x_embedder"),
        "txt_in": delta("context_embedder"),
        "final_layer.linear": delta("proj_out"),
        **{f"{bfl_name}.{layer}": delta(f"time_text_embed.{emb}.linear_{i}")
           for bfl_name, emb in (("time_in", "timestep_embedder"), ("guidance_in", "guidance_embedder"),
                                 ("vector_in", "text_embedder"))
           for layer, i in (("in_layer", 1), ("out_layer", 2))},
    }
    assert expected["single_blocks.0.linear1"].shape[0] == 3 * d + 4 * d  # BFL linear1: q, k, v, MLP in
    te = components["text_encoder"]
    for name, _ in te.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
            expected[f"te:{name}"] = _live_delta(te, name)

    def key(fmt, name):
        if name.startswith("te:"):
            path = f"text_model.{name[3:]}"  # the tiny Flux CLIP is a (flat, transformers 5) CLIPTextModel
            return f"text_encoders.clip_l.transformer.{path}" if fmt == "bfl" else f"lora_te1_{path.replace('.', '_')}"
        return f"diffusion_model.{name}" if fmt == "bfl" else f"lora_unet_{name.replace('.', '_')}"

    for fmt, tensors in (("bfl", bfl), ("kohya", kohya)):
        assert set(tensors) == {key(fmt, n) + s for n in expected for s in (".lora_down.weight", ".lora_up.weight",
                                                                               ".alpha")}
        for name, want in expected.items():
            k = key(fmt, name)
            down, up, alpha = tensors[k + ".lora_down.weight"], tensors[k + ".lora_up.weight"], tensors[k + ".alpha"]
            assert alpha.item() == down.shape[0]
            # exact: the fused up is block diagonal, so no other part's factors leak in
            torch.testing.assert_close(_delta(down, up, alpha), want, rtol=0, atol=1e-6, msg=f"{fmt} {name}")
    qkv_up = bfl["diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"]
    assert qkv_up.shape == (3 * d, 12) and not qkv_up[:d, 4:].any() and not qkv_up[d:, :4].any()
    linear1_up = bfl["diffusion_model.single_blocks.0.linear1.lora_up.weight"]
    assert linear1_up.shape == (7 * d, 16) and not linear1_up[3 * d :, :12].any()


def test_cli_converts_a_native_checkpoint_and_an_export(tmp_path, capsys):
    # a function-preserving start (rank 2r in the export) and alpha != r on the UNet
    pipe = DiffusionPipeline.from_pretrained(build_tiny_pipeline("sd", tmp_path / "base"))
    add_stella_adapter(pipe.unet, r=4, alpha=8, function_preserving=True)
    add_stella_adapter(pipe.text_encoder, r=2, alpha=2)
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    _train_a_little(components)
    save_stella_checkpoint(tmp_path / "run", components)
    reference = save_lora_formats(tmp_path / "ref", type(pipe), _states(components), ["diffusers", "kohya"])
    reference_kohya = load_file(reference["kohya"])
    assert reference_kohya["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha"].item() == 8

    out = tmp_path / "out"
    out.mkdir()
    assert main(["--to", "kohya", str(tmp_path / "run"), str(out / "from_native.safetensors")]) == 0
    assert main(["--to", "kohya", str(reference["diffusers"]), str(out)]) == 0
    assert main(["--to", "diffusers", str(tmp_path / "run" / "stella_adapter.safetensors"), str(out)]) == 0
    for converted in (out / "from_native.safetensors", out / WEIGHT_NAMES["kohya"]):
        tensors = load_file(converted)
        assert tensors.keys() == reference_kohya.keys()
        for k, v in reference_kohya.items():
            torch.testing.assert_close(tensors[k], v, rtol=0, atol=1e-7, msg=k)
    diffusers_ref, diffusers_new = load_file(reference["diffusers"]), load_file(out / WEIGHT_NAMES["diffusers"])
    assert diffusers_new.keys() == diffusers_ref.keys()
    assert all(torch.allclose(diffusers_new[k], v, rtol=0, atol=1e-7) for k, v in diffusers_ref.items())
    assert capsys.readouterr().out.splitlines() == [str(out / "from_native.safetensors"),
                                                    str(out / WEIGHT_NAMES["kohya"]),
                                                    str(out / WEIGHT_NAMES["diffusers"])]

    save_file({"weight": torch.zeros(2)}, tmp_path / "not_lora.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage")
    bad_runs = [
        (["--to", "kohya", str(tmp_path / "missing"), str(out)], "No LoRA file at"),
        (["--to", "kohya", str(tmp_path / "not_lora.safetensors"), str(out)], "is not a diffusers LoRA export"),
        (["--to", "kohya", str(tmp_path / "corrupt.safetensors"), str(out)], "is not a readable safetensors file"),
        (["--to", "bfl", str(tmp_path / "run"), str(out)], "StableDiffusionPipeline has no bfl LoRA format"),
        (["--to", "kohya", str(tmp_path / "run"), str(tmp_path / "nowhere" / "x.safetensors")], "does not exist"),
        (["--to", "kohya", str(tmp_path / "run"), str(out), "--base_pipeline", str(tmp_path)],
         "is not a diffusers pipeline folder"),
    ]
    for argv, message in bad_runs:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    with pytest.raises(SystemExit) as exit_info:
        main(["--to", "comfy", str(tmp_path / "run"), str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")


def test_cli_as_a_module_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "stella_diffusion.integrations.convert", "--to", "kohya",
                           str(tmp_path / "missing.safetensors"), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: No LoRA file at") and "Traceback" not in proc.stderr
