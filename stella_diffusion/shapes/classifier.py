"""A small CNN that judges images of the shapes domain: per-attribute heads and FID-style features.

Inception features say little about 32×32 flat shapes, so the project measures its generations with this
network instead: ``features`` gives a vector per image for a custom FID, and the heads say whether an
image shows the prompted shape, colour, style, ... (the held-out ``star`` shape and ``outlined`` style
are classes too, so it can judge the DreamBooth and style fine-tunes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from importlib.resources import files
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .domain import ATTRIBUTES, RESOLUTION, ShapeSpec

CLASSIFIER_WEIGHTS = "shapes-classifier.safetensors"
CLASSIFIER_CONFIG = "shapes-classifier.json"


def default_classifier_path() -> Path:
    """The committed classifier's weights inside the package assets."""
    return Path(str(files("stella_diffusion.shapes") / "assets" / CLASSIFIER_WEIGHTS))


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(8, cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(8, cout),
        nn.SiLU(),
        nn.AvgPool2d(2),
    )


class DomainClassifier(nn.Module):
    """Three conv stages (32→16→8→4), a ``feature_dim`` embedding, and one linear head per attribute.

    Inputs are float images in [0, 1], shape (N, 3, H, W); other sizes are resized to the domain's.
    The features keep spatial layout (flattened, not pooled), since position is an attribute.
    """

    def __init__(
        self,
        channels: tuple[int, int, int] = (16, 32, 64),
        feature_dim: int = 128,
        attributes: dict[str, tuple[str, ...]] | None = None,
        resolution: int = RESOLUTION,
    ) -> None:
        super().__init__()
        self.attributes = dict(attributes or ATTRIBUTES)
        self.config = {
            "channels": list(channels),
            "feature_dim": feature_dim,
            "attributes": {k: list(v) for k, v in self.attributes.items()},
            "resolution": resolution,
        }
        self.resolution = resolution
        c1, c2, c3 = channels
        self.trunk = nn.Sequential(_block(3, c1), _block(c1, c2), _block(c2, c3), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(c3 * (resolution // 8) ** 2, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(v)) for k, v in self.attributes.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) embeddings, usable as a custom FID feature extractor."""
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = nn.functional.interpolate(
                images, size=(self.resolution, self.resolution), mode="bilinear", antialias=True
            )
        return self.embed(self.trunk(images * 2 - 1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute."""
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """The most likely value of every attribute, as words (e.g. ``{"shape": ["circle", ...]}``)."""
        logits = self(images)
        return {k: [self.attributes[k][i] for i in v.argmax(-1).tolist()] for k, v in logits.items()}

    def save(self, weights_path: str | Path) -> None:
        """Weights as safetensors and the constructor arguments as a json beside them."""
        weights_path = Path(weights_path)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(weights_path))
        weights_path.with_name(CLASSIFIER_CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")


def load_domain_classifier(weights_path: str | Path | None = None, device: str = "cpu") -> DomainClassifier:
    """The trained classifier (the committed asset by default), on ``device`` and in eval mode."""
    weights_path = Path(weights_path) if weights_path else default_classifier_path()
    config = json.loads(weights_path.with_name(CLASSIFIER_CONFIG).read_text())
    model = DomainClassifier(
        channels=tuple(config["channels"]),
        feature_dim=config["feature_dim"],
        attributes={k: tuple(v) for k, v in config["attributes"].items()},
        resolution=config["resolution"],
    )
    model.load_state_dict(load_file(str(weights_path), device="cpu"))
    return model.to(device).eval()


class DomainFeatures(nn.Module):
    """The classifier's embedding of uint8 images: the FID / KID feature extractor of the shapes domain.

    Takes what :class:`~stella_diffusion.evaluation.metrics.StreamingFID` feeds its extractors (uint8 ``N×3×S×S``).
    """

    feature_name = "shapes-classifier"

    def __init__(self, classifier: DomainClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.config["feature_dim"]
        self.image_size = classifier.resolution
        self.attributes = tuple(classifier.attributes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float() / 255)

    def attribute_accuracy(self, images: torch.Tensor, expected: Sequence[Mapping[str, str]],
                           attributes: tuple[str, ...]) -> dict[str, float]:
        """The evaluation's attribute judge: see `prompted_accuracy` (images float in [0, 1])."""
        return prompted_accuracy(self.classifier, images, expected, attributes=attributes)


def domain_feature_extractor(weights_path: str | Path | None = None) -> DomainFeatures:
    """FID features of the committed classifier (``eval/fid.py --feature_extractor`` accepts this name)."""
    return DomainFeatures(load_domain_classifier(weights_path))


def prompted_accuracy(
    classifier: DomainClassifier,
    images: torch.Tensor,
    specs: Sequence[ShapeSpec | Mapping[str, str]],
    attributes: tuple[str, ...] = ("shape", "colour"),
) -> dict[str, float]:
    """Share of ``images`` (float, [0, 1], N×3×H×W) whose attributes the classifier reads as ``specs`` say.

    This is how the project judges a generator: prompt it with ``caption(spec)`` and compare. A spec is a
    :class:`ShapeSpec` or a mapping of the attributes asked for. The key ``"all"`` is the share of images
    where every one of ``attributes`` is right.
    """
    wanted = [asdict(s) if isinstance(s, ShapeSpec) else s for s in specs]
    predicted = classifier.predict(images.to(next(classifier.parameters()).device).float())
    right = {k: [p == w[k] for p, w in zip(predicted[k], wanted, strict=True)] for k in attributes}
    result = {name: sum(hits) / len(wanted) for name, hits in right.items()}
    result["all"] = sum(all(hits) for hits in zip(*right.values(), strict=True)) / len(wanted)
    return result
