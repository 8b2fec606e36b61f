"""Tiny, randomly initialised but complete diffusers pipelines, built fully offline.

Tests (and the embedded tiny base) need real pipelines that ``DiffusionPipeline.from_pretrained`` loads and
whose ``load_lora_weights`` works, without a model hub: the tokenizers are written from scratch here and
every model is built from a small config with a fixed seed.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers.models import BPE
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_END_OF_WORD = "</w>"
# CLIP lower-cases its input, so upper-case letters are never looked up.
CLIP_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation


def _bpe_pieces(vocab: dict[str, int], merges: list[tuple[str, str]], piece: str) -> list[str]:
    """How CLIP's BPE model splits one pre-tokenised piece with the current vocabulary and merges."""
    model = BPE(
        vocab=vocab,
        merges=merges,
        continuing_subword_prefix="",
        end_of_word_suffix=_END_OF_WORD,
        unk_token=EOS_TOKEN,
    )
    return [token.value for token in model.tokenize(piece)]


def _add_word(vocab: dict[str, int], merges: list[tuple[str, str]], piece: str) -> None:
    """Append merges until ``piece`` is one token.

    New merges go last (lowest priority), so words made single tokens earlier keep their tokenisation;
    checking with the real BPE model makes words that share prefixes or suffixes safe.
    """
    pieces = _bpe_pieces(vocab, merges, piece)
    while len(pieces) > 1:
        merges.append((pieces[0], pieces[1]))
        vocab.setdefault(pieces[0] + pieces[1], len(vocab))
        pieces = _bpe_pieces(vocab, merges, piece)


def build_clip_tokenizer(
    save_dir: str | Path | None = None,
    words: Iterable[str] | None = None,
    model_max_length: int = 77,
) -> CLIPTokenizer:
    """A CLIP BPE tokenizer written from scratch (no hub download).

    Without merges every word is spelt character by character, so the vocabulary holds each character of
    :data:`CLIP_ALPHABET` alone and followed by ``</w>``. ``words`` (e.g. a domain's vocabulary) become
    single ``word</w>`` tokens through merges appended for them; a word the CLIP pre-tokenizer splits
    (``red-circle``, digits) becomes one token per letter run. The vocabulary and merges depend only on
    ``words`` and their order, so the same call always gives the same ids. When ``save_dir`` is given,
    ``vocab.json``, ``merges.txt`` and the tokenizer's own files are written there.
    """
    symbols = list(CLIP_ALPHABET) + [char + _END_OF_WORD for char in CLIP_ALPHABET]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    merges: list[tuple[str, str]] = []
    if words is not None:
        base = CLIPTokenizer(vocab={**vocab, BOS_TOKEN: len(vocab), EOS_TOKEN: len(vocab) + 1}, merges=[])
        backend = base.backend_tokenizer
        for word in words:
            for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(word)):
                if len(piece) > 1 and all(char in CLIP_ALPHABET for char in piece):
                    _add_word(vocab, merges, piece)
    # Like CLIP, the special tokens take the last ids.
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n")
        lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
        (save_dir / "merges.txt").write_text("\n".join(lines) + "\n")
        tokenizer.save_pretrained(save_dir)
    return tokenizer


# T5 and Gemma do not lower-case, so their character vocabularies hold both cases (and Gemma a newline, which
# Sana's default instruction prompt contains).
_CASED_ALPHABET = string.ascii_letters + string.digits + string.punctuation
_SPACE = "\u2581"  # sentencepiece's word-boundary marker


def _save_tokenizer(tokenizer: T5TokenizerFast | GemmaTokenizer, save_dir: str | Path | None) -> None:
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(save_dir)


def build_t5_tokenizer(save_dir: str | Path | None = None) -> T5TokenizerFast:
    """A character-level T5 tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), for SD3's and Flux's T5.

    A unigram model over single characters and the word-boundary marker needs no trained sentencepiece file.
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (_SPACE, -1.0)]
    pieces += [(char, -2.0) for char in _CASED_ALPHABET]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
    _save_tokenizer(tokenizer, save_dir)
    return tokenizer


def build_gemma_tokenizer(save_dir: str | Path | None = None) -> GemmaTokenizer:
    """A character-level Gemma tokenizer (no merges; ``<bos>`` first, like Gemma's), for Sana's Gemma 2."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    symbols = specials + [_SPACE, "\n"] + list(_CASED_ALPHABET)
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True)
    _save_tokenizer(tokenizer, save_dir)
    return tokenizer


PIPELINE_KINDS = ("sd", "sdxl", "sd3", "flux", "sana")

# Image side in pixels: the denoisers see 8x8 latents (Sana 16x16, as its pipeline wants multiples of 32).
_IMAGE_SIZE = {"sd": 16, "sdxl": 16, "sd3": 16, "flux": 16, "sana": 32}
_TEXT_WIDTH = 32
_MAX_SEQUENCE_LENGTH = 16


def default_generation_kwargs(kind: str) -> dict:
    """Keyword arguments for ``pipe(prompt, **kwargs)`` that every test uses for a tiny pipeline of ``kind``.

    Two steps at the tiny native size, classifier-free guidance on (so the negative branch runs too), short
    T5 / Gemma sequences to stay fast, numpy output.
    """
    _check_kind(kind)
    kwargs: dict = {
        "height": _IMAGE_SIZE[kind],
        "width": _IMAGE_SIZE[kind],
        "num_inference_steps": 2,
        "guidance_scale": 3.5 if kind == "flux" else 5.0,
        "output_type": "np",
    }
    if kind in ("sd3", "flux", "sana"):
        kwargs["max_sequence_length"] = _MAX_SEQUENCE_LENGTH
    if kind == "sana":
        # Sana's resolution binning only knows its real sample sizes; its long default instruction prompt
        # would dominate the run time.
        kwargs["use_resolution_binning"] = False
        kwargs["complex_human_instruction"] = None
    return kwargs


def _check_kind(kind: str) -> None:
    if kind not in PIPELINE_KINDS:
        raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {PIPELINE_KINDS}")


def clip_text_config(tokenizer: CLIPTokenizer, width: int = _TEXT_WIDTH) -> CLIPTextConfig:
    """A 2-layer CLIP text encoder config matching ``tokenizer`` (shared by the tiny and the embedded bases)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(tokenizer: T5TokenizerFast, width: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // 4,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _vae(**kwargs) -> AutoencoderKL:
    """Two-level KL autoencoder (factor 2, 4 latent channels); kwargs: the family's factors, quant convs."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        **kwargs,
    )


def _unet(cross_attention_dim: int, **kwargs) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=32,
        **kwargs,
    )


_LDM_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


def _build_sd() -> DiffusionPipeline:
    tokenizer = build_clip_tokenizer()
    return StableDiffusionPipeline(
        vae=_vae(scaling_factor=0.18215),
        text_encoder=CLIPTextModel(clip_text_config(tokenizer)),
        tokenizer=tokenizer,
        unet=_unet(cross_attention_dim=_TEXT_WIDTH),
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **_LDM_BETAS),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl() -> DiffusionPipeline:
    tokenizer = build_clip_tokenizer()
    time_embed_dim = 8
    return StableDiffusionXLPipeline(
        vae=_vae(scaling_factor=0.13025),
        text_encoder=CLIPTextModel(clip_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(tokenizer)),
        tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(),
        # The UNet attends to both encoders' hidden states side by side and embeds six size / crop numbers
        # next to the second encoder's pooled projection.
        unet=_unet(
            cross_attention_dim=2 * _TEXT_WIDTH,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + _TEXT_WIDTH,
        ),
        scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **_LDM_BETAS),
        add_watermarker=False,
    )


def _build_sd3() -> DiffusionPipeline:
    tokenizer = build_clip_tokenizer()
    # SD3 pads the two CLIP encoders' concatenated hidden states to the T5 width, so T5 is twice as wide.
    t5_width = 2 * _TEXT_WIDTH
    t5_tokenizer = build_t5_tokenizer()
    return StableDiffusion3Pipeline(
        # Two joint blocks: the last one is context-pre-only (no to_add_out), the first has every projection.
        transformer=SD3Transformer2DModel(
            sample_size=8,
            patch_size=1,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=t5_width,
            caption_projection_dim=_TEXT_WIDTH,
            pooled_projection_dim=2 * _TEXT_WIDTH,
            pos_embed_max_size=16,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModelWithProjection(clip_text_config(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(tokenizer)),
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=_t5_encoder(t5_tokenizer, t5_width),
        tokenizer_3=t5_tokenizer,
    )


def _build_flux() -> DiffusionPipeline:
    tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=16,
            max_image_seq_len=256,
        ),
        vae=_vae(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModel(clip_text_config(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(t5_tokenizer, _TEXT_WIDTH),
        tokenizer_2=t5_tokenizer,
        # Latents are packed 2x2, hence 4 x 4 input channels; the rope axes add up to the head width.
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_TEXT_WIDTH,
            pooled_projection_dim=_TEXT_WIDTH,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        ),
    )


def _build_sana() -> DiffusionPipeline:
    tokenizer = build_gemma_tokenizer()
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=_TEXT_WIDTH,
            intermediate_size=2 * _TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    )
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    transformer = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=_TEXT_WIDTH,
        sample_size=16,
        patch_size=1,
    )
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


_BUILDERS = {
    "sd": _build_sd,
    "sdxl": _build_sdxl,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "sana": _build_sana,
}


def build_tiny_pipeline(kind: str, save_dir: str | Path, seed: int = 0) -> Path:
    """Build a randomly initialised pipeline of ``kind`` (see :data:`PIPELINE_KINDS`) and save it.

    Every component is real and saved with ``save_pretrained``, so ``DiffusionPipeline.from_pretrained``
    and ``load_lora_weights`` work on the result as on a hub checkpoint. The weights depend only on ``seed``
    (the global torch RNG is left untouched). Returns ``save_dir``.
    """
    _check_kind(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipeline = _BUILDERS[kind]()
    save_dir = Path(save_dir)
    pipeline.save_pretrained(save_dir)
    return save_dir
