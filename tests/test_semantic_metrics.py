"""CLIP-T, CLIP-I, DINO subject fidelity, CMMD and drift: the maths against independent float64 references, the
metrics against torchmetrics and transformers on tiny random models saved locally, drift on a tiny pipeline."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from PIL import Image
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPVisionConfig,
    Dinov2Config,
    Dinov2Model,
)

from stella_diffusion.evaluation.embedders import (
    ClipEmbedder,
    ModelNotFoundError,
    VisionEmbedder,
    check_model_source,
    load_clip_embedder,
    load_vision_embedder,
)
from stella_diffusion.evaluation.generation import generate_images
from stella_diffusion.evaluation.images import load_images
from stella_diffusion.evaluation.semantic_metrics import (
    CMMD,
    Drift,
    ReferenceSimilarity,
    SemanticScorer,
    build_clip_score,
    clip_score,
    cmmd,
    embed_folder,
    evaluate_drift,
    folder_drift,
    mean_pairwise_cosine,
    paired_drift,
)
from stella_diffusion.shapes.classifier import domain_feature_extractor
from stella_diffusion.shapes.domain import write_image_folder
from stella_diffusion.testing import build_clip_tokenizer, build_tiny_pipeline, clip_text_config

SIDE = 32  # input side of the tiny encoders


def save_tiny_clip(path: Path) -> Path:
    """A randomly initialised 2-layer CLIP (32-px images, 16-d embeddings) with tokenizer and processor."""
    tokenizer = build_clip_tokenizer(words=["photo", "red", "blue", "circle", "square", "star"])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=SIDE, patch_size=8)
    config = CLIPConfig(text_config=clip_text_config(tokenizer, 32).to_dict(), vision_config=vision.to_dict(),
                        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def save_tiny_dino(path: Path) -> Path:
    """A randomly initialised 2-layer DINOv2 with its (Bit) image processor."""
    torch.manual_seed(1)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                             image_size=SIDE, patch_size=8)).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def clip(clip_dir) -> ClipEmbedder:
    return load_clip_embedder(clip_dir, offline=True)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("shapes") / "ref", 12, seed=0, split="concept")


def _numpy_mmd2(x: np.ndarray, y: np.ndarray, sigma: float, unbiased: bool) -> float:
    """An independent MMD²: explicit pairwise squared distances in float64, loops over the pairs' kernels."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)

    def mean_kernel(a: np.ndarray, b: np.ndarray, skip_diagonal: bool) -> float:
        total, count = 0.0, 0
        for i in range(len(a)):
            for j in range(len(b)):
                if skip_diagonal and i == j:
                    continue
                total += np.exp(-np.sum((a[i] - b[j]) ** 2) / (2 * sigma**2))
                count += 1
        return total / count

    return mean_kernel(x, x, unbiased) + mean_kernel(y, y, unbiased) - 2 * mean_kernel(x, y, False)


def test_cmmd_equals_an_independent_float64_implementation() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 24))
    y = rng.normal(size=(30, 24)) + 0.4  # another distribution: a clearly positive CMMD
    for unbiased in (True, False):
        expected = 1000 * _numpy_mmd2(x, y, 10.0, unbiased)
        assert cmmd(x, y, unbiased=unbiased) == pytest.approx(expected, rel=1e-6)
    assert cmmd(x, y) > 0
    assert cmmd(x, x, unbiased=False) == pytest.approx(0.0, abs=1e-12)
    # streamed in batches of float32 features, through the metric
    metric = CMMD(num_features=24)
    for start in range(0, 40, 16):
        metric.update(torch.from_numpy(x[start : start + 16]).float(), real=False)
    metric.update(torch.from_numpy(y).float(), real=True)
    assert float(metric.compute()) == pytest.approx(1000 * _numpy_mmd2(x, y, 10.0, True), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        cmmd(x[:1], y)


def test_reference_similarity_and_drift_maths() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(25, 8)), rng.normal(size=(9, 8)) + 0.5
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    brute = float((unit(x) @ unit(y).T).mean())
    assert mean_pairwise_cosine(x, y) == pytest.approx(brute, rel=1e-12)
    metric = ReferenceSimilarity(num_features=8)
    for start in range(0, 25, 10):  # running sums over batches
        metric.update(torch.from_numpy(x[start : start + 10]), real=False)
    metric.update(torch.from_numpy(y), real=True)
    assert float(metric.compute()) == pytest.approx(brute, rel=1e-12)

    assert paired_drift(x, x) == pytest.approx(0.0, abs=1e-12)
    assert paired_drift(x, -x) == pytest.approx(2.0)
    drift = Drift(num_features=8)
    drift.update(torch.from_numpy(x[:9]), torch.from_numpy(y))
    assert float(drift.compute()) == pytest.approx(1 - float(np.sum(unit(x[:9]) * unit(y), axis=1).mean()))
    with pytest.raises(ValueError, match="expected 8"):
        metric.update(torch.zeros(2, 5), real=True)
    with pytest.raises(ValueError, match="no feature module"):
        metric.update(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), real=True)


def test_clip_t_is_torchmetrics_clip_score_on_the_given_model(clip, clip_dir, shapes) -> None:
    images = load_images(sorted(shapes.glob("*.png"))[:4], clip.image_size)
    prompts = ["a photo of a red circle", "a blue square", "a star", "a red star"]
    metric = build_clip_score(clip)
    metric.update(images[:2], prompts[:2])
    metric.update(images[2:], prompts[2:])  # accumulated over batches
    # independently: transformers' own CLIP forward (normalised embeds) with the stock processor
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=list(images), return_tensors="pt", padding=True))
    assert float(metric.compute()) == pytest.approx(clip_score(out.image_embeds, out.text_embeds), rel=1e-5)
    cos = (out.image_embeds * out.text_embeds).sum(1)
    assert float(metric.compute()) == pytest.approx(max(100 * float(cos.mean()), 0.0), rel=1e-5)


def test_vision_embedders_and_the_shapes_classifier_stand_in(tmp_path, clip, clip_dir, shapes) -> None:
    dino = load_vision_embedder(save_tiny_dino(tmp_path / "dino"), offline=True)
    assert isinstance(dino, VisionEmbedder) and dino.image_size == SIDE
    images = load_images(sorted(shapes.glob("*.png"))[:3], SIDE)
    model = Dinov2Model.from_pretrained(tmp_path / "dino").eval()
    with torch.no_grad():
        pixels = BitImageProcessor.from_pretrained(tmp_path / "dino")(images=list(images), return_tensors="pt")
        expected = model(**pixels).last_hidden_state[:, 0]
    assert torch.allclose(dino(images), expected, atol=1e-5)  # same-size images: the processor only normalises
    assert isinstance(load_vision_embedder(clip_dir, offline=True), ClipEmbedder)  # a CLIP gives its image tower
    with pytest.raises(ValueError, match=f"uint8 N×3×{SIDE}×{SIDE}"):
        dino(load_images(sorted(shapes.glob("*.png"))[:1], 48))

    # the whole scorer: CLIP-T / CMMD / CLIP-I with the tiny CLIP, DINO with the shapes classifier as stand-in
    generated = tmp_path / "generated"
    generated.mkdir()
    rows = []
    for i, path in enumerate(sorted(shapes.glob("*.png"))[:6]):
        Image.open(path).save(generated / f"{i:06d}.png")
        rows.append(f'{{"file_name": "{i:06d}.png", "prompt": "a red circle"}}')
    (generated / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    scorer = SemanticScorer(clip, domain_feature_extractor(), reference=shapes, subject=shapes)
    record = scorer.score(generated)
    assert set(record) >= {"clip_t", "cmmd", "clip_i", "dino", "num_subject", "num_reference_cmmd"}
    assert 0 <= record["clip_t"] <= 100 and -1 <= record["clip_i"] <= 1 and -1 <= record["dino"] <= 1
    domain = domain_feature_extractor()
    assert record["dino"] == pytest.approx(mean_pairwise_cosine(embed_folder(generated, domain),
                                                                embed_folder(shapes, domain)), rel=1e-6)
    assert record["semantic_convention"]["dino_model"] == "DomainFeatures" and record["num_subject"] == 12


def test_missing_models_fail_before_loading(tmp_path, monkeypatch) -> None:
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        check_model_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        check_model_source(tmp_path / "empty")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        load_clip_embedder("openai/clip-vit-large-patch14", offline=True)


def test_drift_is_zero_for_identical_sets_and_rises_with_the_adapter_scale(tmp_path) -> None:
    pipe = DiffusionPipeline.from_pretrained(build_tiny_pipeline("sd", tmp_path / "pipe"))
    torch.manual_seed(3)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False), adapter_name="lora")
    feature = domain_feature_extractor()
    prompts = ["a red circle", "a blue square", "a green star", "a small triangle"]
    kwargs = {"num_inference_steps": 2, "guidance_scale": 1.0, "height": 32, "width": 32}
    drifts = []
    for weight in (0.0, 0.5, 1.0):
        pipe.set_adapters(["lora"], [weight])
        drifts.append(evaluate_drift(pipe, prompts, tmp_path / f"drift{weight}", feature, generation_kwargs=kwargs)
                      ["drift"])
    assert drifts[0] == pytest.approx(0.0, abs=1e-9)  # weight 0 draws the base's images
    assert drifts[0] < drifts[1] < drifts[2], drifts
    assert pipe.get_active_adapters() == ["lora"]  # switched back on
    same = folder_drift(tmp_path / "drift1.0" / "adapted", tmp_path / "drift1.0" / "adapted", feature)
    assert same["drift"] == pytest.approx(0.0, abs=1e-12) and same["num_drift"] == 4
    generate_images(pipe, prompts[:3], tmp_path / "short", generation_kwargs=kwargs, progress=False)
    with pytest.raises(ValueError, match="same image files"):
        folder_drift(tmp_path / "short", tmp_path / "drift1.0" / "adapted", feature)
