"""The procedural shapes domain: deterministic, captions that state the attributes, clean held-out splits."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from stella_diffusion.shapes.domain import (
    ATTRIBUTES,
    COLOURS,
    CONCEPT_SHAPE,
    CONCEPT_TOKEN,
    HELD_OUT_STYLE,
    INSTANCE_PROMPT,
    PRETRAIN_SHAPES,
    RESOLUTION,
    ShapeSpec,
    caption,
    render,
    sample_specs,
    vocabulary,
    write_image_folder,
)


def test_same_seed_same_images_other_seed_other_images() -> None:
    a, b = sample_specs(20, seed=3), sample_specs(20, seed=3)
    assert a == b
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(np.asarray(render(x)), np.asarray(render(y)))
    assert sample_specs(20, seed=4) != a
    # Splits draw from their own streams: the same seed gives unrelated concept and pretrain images.
    assert [s.colour for s in sample_specs(20, 3, "concept")] != [s.colour for s in a]


@pytest.mark.parametrize("split", ["pretrain", "concept", "style"])
def test_caption_states_every_attribute(split: str) -> None:
    for spec in sample_specs(50, seed=0, split=split):
        text = caption(spec)
        assert text.startswith(f"a {spec.size} {spec.colour} ")
        assert f" {spec.shape} " in text
        assert text.endswith(f"on a {spec.background} background, {spec.position}")
        assert (HELD_OUT_STYLE in text) == (spec.style == HELD_OUT_STYLE)


def test_caption_example_and_concept_token() -> None:
    spec = ShapeSpec("circle", "red", "large", "top left", "white")
    assert caption(spec) == "a large red circle on a white background, top left"
    assert caption(spec, CONCEPT_TOKEN) == "a large red sks shape on a white background, top left"
    assert INSTANCE_PROMPT == "a photo of sks shape"


def test_held_out_concept_and_style_never_in_pretrain() -> None:
    pretrain = sample_specs(3000, seed=0)
    assert {s.shape for s in pretrain} == set(PRETRAIN_SHAPES)
    assert {s.colour for s in pretrain} == set(COLOURS)
    assert all(s.style != HELD_OUT_STYLE for s in pretrain)
    texts = " ".join(caption(s) for s in pretrain)
    for word in (CONCEPT_SHAPE, HELD_OUT_STYLE, CONCEPT_TOKEN):
        assert word not in texts
    assert {s.shape for s in sample_specs(200, 0, "concept")} == {CONCEPT_SHAPE}
    style = sample_specs(200, 0, "style")
    assert {s.style for s in style} == {HELD_OUT_STYLE} and CONCEPT_SHAPE not in {s.shape for s in style}


def test_vocabulary_covers_captions_and_prompts() -> None:
    words = set(vocabulary())
    texts = [caption(s) for split in ("pretrain", "concept", "style") for s in sample_specs(100, 1, split)]
    texts += [INSTANCE_PROMPT, caption(sample_specs(1, 0)[0], concept_token=CONCEPT_TOKEN)]
    for text in texts:
        assert set(re.findall(r"[a-z]+|,", text)) <= words


def test_render_draws_the_attributes() -> None:
    spec = ShapeSpec("square", "blue", "large", "center", "black")
    pixels = np.asarray(render(spec))
    assert pixels.shape == (RESOLUTION, RESOLUTION, 3)
    assert tuple(pixels[16, 16]) == COLOURS["blue"]
    assert tuple(pixels[0, 0]) == (0, 0, 0)
    outlined = np.asarray(render(ShapeSpec("square", "blue", "large", "center", "black", style="outlined")))
    assert tuple(outlined[16, 16]) == (0, 0, 0)  # the inside stays background
    corner = np.asarray(render(ShapeSpec("circle", "red", "small", "top left", "white")))
    assert tuple(corner[7, 7]) == COLOURS["red"] and tuple(corner[24, 24]) == (255, 255, 255)


def test_invalid_attribute_is_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        ShapeSpec("hexagon", "red")
    with pytest.raises(ValueError, match="split"):
        sample_specs(1, 0, split="test")


def test_labels_follow_attribute_order() -> None:
    spec = ShapeSpec("star", "yellow", "small", "bottom right", "black", style="outlined")
    labels = spec.labels()
    assert {k: ATTRIBUTES[k][v] for k, v in labels.items()} == {
        "shape": "star",
        "colour": "yellow",
        "size": "small",
        "position": "bottom right",
        "background": "black",
        "style": "outlined",
    }


def test_write_image_folder_metadata(tmp_path) -> None:
    folder = write_image_folder(tmp_path / "concept", 5, seed=2, split="concept", concept_token=CONCEPT_TOKEN)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    for row, spec in zip(rows, sample_specs(5, 2, "concept"), strict=True):
        assert row["text"] == caption(spec, concept_token=CONCEPT_TOKEN)
        assert row["shape"] == CONCEPT_SHAPE
        image = Image.open(folder / row["file_name"])
        assert image.mode == "RGB" and image.size == (RESOLUTION, RESOLUTION)
        assert np.array_equal(np.asarray(image), np.asarray(render(spec)))
