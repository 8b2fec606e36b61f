"""The offline tokenizers and tiny pipelines that other tests build on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    SanaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from safetensors.torch import load_file
from transformers import CLIPTokenizer, GemmaTokenizer, T5TokenizerFast

from stella_diffusion.testing import (
    PIPELINE_KINDS,
    build_clip_tokenizer,
    build_gemma_tokenizer,
    build_t5_tokenizer,
    build_tiny_pipeline,
    default_generation_kwargs,
)

WORDS = ["circle", "star", "stars", "tar", "outlined", "red-square"]
PROMPT = "a red circle"
PIPELINE_CLASSES = {
    "sd": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
    "sana": SanaPipeline,
}
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
JOINT_ATTENTION = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def test_clip_tokenizer_round_trips_text_character_by_character() -> None:
    tokenizer = build_clip_tokenizer()
    text = "a photo of 3 red circles, outlined!"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.pad_token == "<|endoftext|>"
    # CLIP's decoder puts a space after every end of word, punctuation included.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of 3 red circles , outlined !"
    assert tokenizer.convert_ids_to_tokens(tokenizer("circle", add_special_tokens=False).input_ids) == [
        "c", "i", "r", "c", "l", "e</w>",
    ]  # fmt: skip


def test_clip_tokenizer_words_become_single_tokens(tmp_path: Path) -> None:
    tokenizer = build_clip_tokenizer(tmp_path, words=WORDS, model_max_length=16)
    for word in ["circle", "star", "stars", "tar", "outlined", "red", "square"]:
        assert tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False).input_ids) == [
            word + "</w>"
        ]
    text = "a red star on a large circle"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    batch = tokenizer([text], padding="max_length", max_length=16, truncation=True).input_ids
    assert len(batch[0]) == 16 and batch[0][-1] == tokenizer.pad_token_id

    # The files written by hand give the same tokenizer as the saved tokenizer files.
    from_files = CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    for reloaded in [CLIPTokenizer.from_pretrained(tmp_path), from_files]:
        assert reloaded(text).input_ids == ids
    assert build_clip_tokenizer(words=WORDS).get_vocab() == tokenizer.get_vocab()


def test_t5_tokenizer_round_trips_and_reloads(tmp_path: Path) -> None:
    tokenizer = build_t5_tokenizer(tmp_path)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    text = "A red circle, 3 stars!"
    ids = tokenizer(text).input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert T5TokenizerFast.from_pretrained(tmp_path)(text).input_ids == ids
    padded = tokenizer(text, padding="max_length", max_length=40, truncation=True).input_ids
    assert len(padded) == 40 and padded[-1] == tokenizer.pad_token_id


def test_gemma_tokenizer_round_trips_and_reloads(tmp_path: Path) -> None:
    tokenizer = build_gemma_tokenizer(tmp_path)
    text = "A red circle,\n3 stars!"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert GemmaTokenizer.from_pretrained(tmp_path)(text).input_ids == ids


def test_default_generation_kwargs_rejects_unknown_kinds() -> None:
    assert default_generation_kwargs("sd")["num_inference_steps"] == 2
    with pytest.raises(ValueError, match="unknown pipeline kind"):
        default_generation_kwargs("pixart")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine the threads'
    barriers make each generation 5-20x slower (measured: 0.1 s with one thread, 0.2-2.4 s with two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=PIPELINE_KINDS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(kind, saved folder, pipeline reloaded from it), built once per kind."""
    kind = request.param
    path = build_tiny_pipeline(kind, tmp_path_factory.mktemp(kind))
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return kind, path, pipe


def _generate(kind: str, pipe: DiffusionPipeline) -> np.ndarray:
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **default_generation_kwargs(kind)).images


def _denoiser_name(kind: str) -> str:
    return "unet" if kind in ("sd", "sdxl") else "transformer"


def _targets(kind: str) -> tuple[str, ...]:
    return ATTENTION + JOINT_ATTENTION if kind in ("sd3", "flux") else ATTENTION


def _target_modules(kind: str, pipe: DiffusionPipeline) -> dict[str, torch.nn.Linear]:
    denoiser = getattr(pipe, _denoiser_name(kind))
    return {
        name: module
        for name, module in denoiser.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.endswith(tuple("." + target for target in _targets(kind)))
    }


def test_saved_pipeline_is_small_and_complete(tiny) -> None:
    kind, path, pipe = tiny
    assert type(pipe) is PIPELINE_CLASSES[kind]
    assert callable(getattr(type(pipe), "load_lora_weights", None))
    assert sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) < 5_000_000
    found = {
        target for target in _targets(kind) for name in _target_modules(kind, pipe) if name.endswith(target)
    }
    assert found == set(_targets(kind))


def test_generation_is_deterministic(tiny) -> None:
    kind, _, pipe = tiny
    image = _generate(kind, pipe)
    size = default_generation_kwargs(kind)["height"]
    assert image.shape == (1, size, size, 3)
    assert np.isfinite(image).all()
    np.testing.assert_array_equal(_generate(kind, pipe), image)


def test_build_depends_only_on_seed(tiny, tmp_path: Path) -> None:
    kind, path, _ = tiny
    folder = _denoiser_name(kind)

    def weights(root: Path) -> dict[str, torch.Tensor]:
        return load_file(next((root / folder).glob("*.safetensors")))

    reference = weights(path)
    same = weights(build_tiny_pipeline(kind, tmp_path / "same", seed=0))
    other = weights(build_tiny_pipeline(kind, tmp_path / "other", seed=1))
    assert all(torch.equal(reference[key], same[key]) for key in reference)
    assert not all(torch.equal(reference[key], other[key]) for key in reference)


def test_load_lora_weights_changes_output_and_unload_restores_it(tiny) -> None:
    """A peft-format LoRA on every attention projection loads through the pipeline's own loader."""
    kind, _, pipe = tiny
    before = _generate(kind, pipe)
    generator = torch.Generator().manual_seed(1)
    rank = 2
    state_dict = {}
    for name, module in _target_modules(kind, pipe).items():
        key = f"{_denoiser_name(kind)}.{name}"
        state_dict[f"{key}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator)
        state_dict[f"{key}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.1
    pipe.load_lora_weights(state_dict, adapter_name="random")
    try:
        assert pipe.get_active_adapters() == ["random"]
        assert np.abs(_generate(kind, pipe) - before).max() > 1e-4
    finally:
        pipe.unload_lora_weights()
    np.testing.assert_allclose(_generate(kind, pipe), before, atol=1e-6)
