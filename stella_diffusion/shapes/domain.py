"""A procedural captioned image domain: flat coloured shapes on plain backgrounds.

No real Stable Diffusion weights can be had offline, so the project pretrains its own tiny text-to-image
base on this domain and judges generations with a classifier trained on it. Everything is deterministic
from a seed. The pretrain split never contains the held-out concept (the ``star`` shape, for DreamBooth
with the token ``sks``) nor the held-out style (``outlined`` rendering, for captioned fine-tuning).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

RESOLUTION = 32
_SUPERSAMPLE = 4  # draw at 4× and box-downsample: smooth edges, still flat colours

PRETRAIN_SHAPES = ("circle", "square", "triangle", "cross")
CONCEPT_SHAPE = "star"
SHAPES = PRETRAIN_SHAPES + (CONCEPT_SHAPE,)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 210, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
SIZES: dict[str, float] = {"small": 0.36, "large": 0.62}  # shape extent as a fraction of the image side
POSITIONS = ("center", "top left", "top right", "bottom left", "bottom right")
PRETRAIN_STYLE = "filled"
HELD_OUT_STYLE = "outlined"
STYLES = (PRETRAIN_STYLE, HELD_OUT_STYLE)
SPLITS = ("pretrain", "concept", "style")

CONCEPT_TOKEN = "sks"
INSTANCE_PROMPT = f"a photo of {CONCEPT_TOKEN} shape"

# Every attribute a classifier head predicts, in label order.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
    "style": STYLES,
}


@dataclass(frozen=True)
class ShapeSpec:
    """One image's attributes; ``jitter`` is a small pixel offset that keeps images from repeating exactly."""

    shape: str
    colour: str
    size: str = "large"
    position: str = "center"
    background: str = "white"
    style: str = PRETRAIN_STYLE
    jitter: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        for name, values in ATTRIBUTES.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {values}")

    def labels(self) -> dict[str, int]:
        """Class index per attribute (the classifier's targets)."""
        return {name: values.index(getattr(self, name)) for name, values in ATTRIBUTES.items()}


def vocabulary() -> list[str]:
    """Every word a caption or the standard prompts can use (for building the tokenizer)."""
    words = {"a", "on", "background", "photo", "of", "shape", CONCEPT_TOKEN, ","}
    for values in ATTRIBUTES.values():
        for value in values:
            words.update(value.split())
    return sorted(words)


def caption(spec: ShapeSpec, concept_token: str | None = None) -> str:
    """The caption stating every attribute, e.g. "a large red circle on a white background, top left".

    The held-out style appears as a word before the shape ("a small blue outlined square ..."); the
    pretrain style is left implicit. With ``concept_token`` the shape is named "<token> shape" instead.
    """
    shape = f"{concept_token} shape" if concept_token else spec.shape
    style = f"{spec.style} " if spec.style != PRETRAIN_STYLE else ""
    return f"a {spec.size} {spec.colour} {style}{shape} on a {spec.background} background, {spec.position}"


def _centre(spec: ShapeSpec, side: float, extent: float) -> tuple[float, float]:
    margin = side * 0.06 + extent / 2
    low, mid, high = margin, side / 2, side - margin
    x = {"left": low, "right": high}.get(spec.position.split()[-1], mid)
    y = {"top": low, "bottom": high}.get(spec.position.split()[0], mid)
    return x + spec.jitter[0] * _SUPERSAMPLE, y + spec.jitter[1] * _SUPERSAMPLE


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """The polygon of ``shape`` (None for the circle, which is drawn as an ellipse)."""
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "cross":
        a, w = r, r * 0.36
        return [
            (cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w),
            (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w),
            (cx - a, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    if shape == "star":
        return _star(cx, cy, r * 1.1)
    return None


def render(spec: ShapeSpec, resolution: int = RESOLUTION) -> Image.Image:
    """Draw ``spec`` as an RGB image (supersampled, so edges are smooth but colours stay flat)."""
    side = resolution * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(image)
    extent = SIZES[spec.size] * side
    cx, cy = _centre(spec, side, extent)
    r = extent / 2
    colour = COLOURS[spec.colour]
    filled = spec.style == PRETRAIN_STYLE
    width = 0 if filled else max(1, round(side * 0.07))
    polygon = _outline(spec.shape, cx, cy, r)
    if polygon is None:
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, fill=colour if filled else None, outline=None if filled else colour, width=width)
    elif filled:
        draw.polygon(polygon, fill=colour)
    else:
        draw.line(polygon + polygon[:2], fill=colour, width=width, joint="curve")
    return image.resize((resolution, resolution), Image.Resampling.BOX)


def sample_specs(n: int, seed: int, split: str = "pretrain") -> list[ShapeSpec]:
    """``n`` random specs of one split: "pretrain" (no star, filled), "concept" (stars), "style" (outlined).

    The concept and style splits keep every other attribute random, so a fine-tune can be judged on
    whether it learnt only the new shape or style.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{split}:{seed}")
    shapes = (CONCEPT_SHAPE,) if split == "concept" else PRETRAIN_SHAPES
    style = HELD_OUT_STYLE if split == "style" else PRETRAIN_STYLE
    specs = []
    for _ in range(n):
        specs.append(
            ShapeSpec(
                shape=rng.choice(shapes),
                colour=rng.choice(tuple(COLOURS)),
                size=rng.choice(tuple(SIZES)),
                position=rng.choice(POSITIONS),
                background=rng.choice(tuple(BACKGROUNDS)),
                style=style,
                jitter=(rng.randint(-1, 1), rng.randint(-1, 1)),
            )
        )
    return specs


def write_image_folder(
    folder: str | Path, n: int, seed: int, split: str = "pretrain", concept_token: str | None = None
) -> Path:
    """Write ``n`` PNGs and a diffusers ``imagefolder`` ``metadata.jsonl`` (``file_name``, ``text``).

    The rows also carry the spec's attributes, so a fine-tuning run can be evaluated per attribute.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for i, spec in enumerate(sample_specs(n, seed, split)):
            name = f"{split}_{seed}_{i:05d}.png"
            render(spec).save(folder / name)
            row = {"file_name": name, "text": caption(spec, concept_token), **asdict(spec)}
            f.write(json.dumps(row) + "\n")
    return folder
