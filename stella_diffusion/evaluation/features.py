"""Feature extractors for FID / KID: torch-fidelity's InceptionV3 loaded offline, or a user's module.

No model hub is reachable here, so torch-fidelity's usual download is never attempted: the weights come
from a path the user gives or from the torch hub cache file that torch-fidelity itself would have written,
and when neither exists one :class:`InceptionWeightsNotFoundError` says where to put the file.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torchmetrics.image.fid import NoTrainInceptionV3

INCEPTION_NAME = "torch-fidelity InceptionV3 (TF 2015-12-05 FID weights), pool3 2048-d"
INCEPTION_IMAGE_SIZE = NoTrainInceptionV3.INPUT_IMAGE_SIZE
INCEPTION_WEIGHTS_FILE = Path(urlparse(URL_INCEPTION_V3).path).name


class InceptionWeightsNotFoundError(FileNotFoundError):
    """The FID Inception weights are neither at the given path nor in the torch hub cache."""


def inception_cache_path() -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` (used by torch-fidelity) keeps the weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def inception_weights_path(weights: str | Path | None = None) -> Path:
    """The weights file to use: ``weights`` if given (it must exist), else the torch hub cache file.

    Raises :class:`InceptionWeightsNotFoundError` naming the expected path and how to get the file; an
    explicit path that does not exist is an error even if the cache has the file, so a typo is not hidden.
    """
    cache = inception_cache_path()
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        looked = f"the given path {path}"
    elif cache.is_file():
        return cache
    else:
        looked = f"the torch hub cache {cache}"
    raise InceptionWeightsNotFoundError(
        f"FID Inception weights not found at {looked}. Nothing is downloaded here (no internet): get "
        f"{INCEPTION_WEIGHTS_FILE} from {URL_INCEPTION_V3} on a machine that has internet, then either pass "
        f"its path with --inception_weights PATH (`inception_weights=` in Python) or copy it to {cache} "
        "(the torch hub cache; set TORCH_HOME to move it). Or use your own feature extractor with "
        "--feature_extractor module:callable."
    )


def load_inception(weights: str | Path | None = None) -> nn.Module:
    """torchmetrics' InceptionV3 (torch-fidelity's port of the TF FID graph) returning 2048-d pool features.

    Input: uint8 ``N×3×H×W``; the net resizes to 299 itself (identity for the 299×299 images that
    :mod:`stella_diffusion.evaluation.images` produces). Loading goes through torch-fidelity's own code, given a path.
    """
    path = inception_weights_path(weights)
    try:
        net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
        )
    except RuntimeError as err:  # load_state_dict: missing / unexpected keys or wrong shapes
        raise ValueError(f"{path} is not torch-fidelity's InceptionV3 state dict: {err}") from err
    net.num_features = 2048  # torchmetrics' convention: spares a dummy forward pass to find it
    return net


# Extractors known by name; each is an installed module's callable, imported only when asked for.
NAMED_EXTRACTORS = {"domain": "stella_diffusion.shapes.classifier:domain_feature_extractor"}


def load_feature_extractor(spec: str) -> nn.Module:
    """Resolve a named extractor (`NAMED_EXTRACTORS`) or ``"package.module:name"``: ``name`` is an ``nn.Module`` or
    a callable returning one. This imports that module and calls it: it runs code.

    The module maps uint8 ``N×3×S×S`` images to ``N×d`` features (see ``metrics.StreamingFID``).
    """
    spec = NAMED_EXTRACTORS.get(spec, spec)
    module_name, sep, attr = spec.partition(":")
    if not (module_name and sep and attr):
        raise ValueError(f"Feature extractor must be given as 'module:callable', got {spec!r}.")
    obj = getattr(importlib.import_module(module_name), attr)
    extractor = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(extractor, nn.Module):
        raise TypeError(f"{spec} gave {type(extractor).__name__}, expected a torch.nn.Module.")
    return extractor
