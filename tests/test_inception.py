"""The FID Inception is loaded offline: from a given file or the torch hub cache, through torch-fidelity's own
loading code, and a missing file gives one clear error instead of a download attempt."""

from pathlib import Path
from unittest import mock

import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception

from stella_diffusion.evaluation.features import (
    INCEPTION_NAME,
    INCEPTION_WEIGHTS_FILE,
    InceptionWeightsNotFoundError,
    inception_weights_path,
    load_feature_extractor,
    load_inception,
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
def test_weights_from_a_local_file_go_through_the_real_loader(random_weights, empty_hub):
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
