"""FID / KID maths and streaming: float64 Fréchet distance, running sums, KID reservoir, statistics files, and
the image-folder conversion both sets go through."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from stella_diffusion.evaluation.images import iter_image_batches, load_image
from stella_diffusion.evaluation.metrics import FeatureStats, StreamingFID, compute_fid, frechet_distance
from stella_diffusion.files import UnreadableImageWarning


class CellMeans(nn.Module):
    """A weight-free feature extractor: mean colour of each 4×4 cell (48 features)."""

    num_features = 48

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(imgs.float() / 255, 4).flatten(1)


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _scipy_fid(mu1, sigma1, mu2, sigma2) -> float:
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _images(n: int, low: int, high: int, seed: int, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _write_folder(folder, imgs: torch.Tensor) -> None:
    folder.mkdir(parents=True)
    for i, img in enumerate(imgs):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")


def test_frechet_distance_matches_scipy_float64():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 32))
    y = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32)) * 0.5 + 0.3
    expected = _scipy_fid(*_stats(x), *_stats(y))
    assert frechet_distance(*_stats(x), *_stats(y)) == pytest.approx(expected, rel=1e-6)
    as_tensors = [torch.from_numpy(a).float() for a in (*_stats(x), *_stats(y))]
    assert frechet_distance(*as_tensors) == pytest.approx(expected, rel=1e-5)


def test_identical_sets_give_zero():
    mu, sigma = _stats(np.random.default_rng(1).normal(size=(300, 40)) * 3 + 1)
    assert 0.0 <= frechet_distance(mu, sigma, mu, sigma) < 1e-9 * np.trace(sigma)


def test_near_singular_covariance_gives_a_finite_real_number():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 64))  # 10 samples in 64 dimensions: rank 9
    x[:, 1] = x[:, 0]  # a duplicated feature
    x[:, 2] *= 1e-9  # a nearly constant one
    x[:, 3] = 0.5  # a constant one: σ1 is exactly singular
    y = rng.normal(size=(12, 64)) + 0.1
    value = frechet_distance(*_stats(x), *_stats(y))
    assert isinstance(value, float) and math.isfinite(value) and value > 0
    # symmetric in its arguments, though the two orders factor different matrices
    assert value == pytest.approx(frechet_distance(*_stats(y), *_stats(x)), rel=1e-6)
    big = rng.normal(size=(500, 64)) * np.linspace(1e-6, 1, 64)  # positive definite, condition number 1e12
    assert frechet_distance(*_stats(big), *_stats(y)) == pytest.approx(
        _scipy_fid(*_stats(big), *_stats(y)), rel=1e-6
    )
    with pytest.raises(ValueError, match="finite"):
        frechet_distance(np.full(64, np.nan), np.eye(64), np.zeros(64), np.eye(64))


def test_streaming_sums_equal_all_at_once_and_torchmetrics():
    real, fake = _images(120, 0, 256, seed=0), _images(90, 40, 256, seed=1)
    ours = StreamingFID(CellMeans(), image_size=16, kid_max_samples=0)
    reference = FrechetInceptionDistance(feature=CellMeans())
    for imgs, is_real in ((real, True), (fake, False)):
        for batch in imgs.split(7):
            ours.update(batch, real=is_real)
            reference.update(batch, real=is_real)
    features = [CellMeans()(imgs).double().numpy() for imgs in (real, fake)]
    fid = ours.compute()["fid"]
    assert fid == pytest.approx(frechet_distance(*_stats(features[0]), *_stats(features[1])), rel=1e-9)
    assert fid == pytest.approx(float(reference.compute()), rel=1e-4)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_kid_equals_torchmetrics_with_full_subsets():
    real, fake = _images(40, 0, 256, seed=2), _images(40, 30, 256, seed=3)
    ours = StreamingFID(CellMeans(), image_size=16, kid_subset_size=40, kid_subsets=3)
    reference = KernelInceptionDistance(feature=CellMeans(), subset_size=40, subsets=3)
    for imgs, is_real in ((real, True), (fake, False)):
        ours.update(imgs, real=is_real)
        reference.update(imgs, real=is_real)
    result = ours.compute()
    assert result["kid_subset_size"] == 40
    assert result["kid_mean"] == pytest.approx(float(reference.compute()[0]), rel=1e-4, abs=1e-7)


def test_memory_is_flat_and_the_reservoir_is_a_uniform_subset():
    metric = StreamingFID(CellMeans(), image_size=16, kid_max_samples=8, kid_subset_size=8, kid_subsets=5)
    sizes = {name: state.numel() for name, state in metric.metric_state.items()}
    fed = []
    for seed in range(10):
        batch = _images(10, 0, 256, seed=seed)
        metric.update(batch, real=True)
        metric.update(batch.flip(0), real=False)
        fed.append(CellMeans()(batch))
    assert {name: state.numel() for name, state in metric.metric_state.items()} == sizes
    assert int(metric.real_count) == 100
    fed = torch.cat(fed)
    rows = [int((fed == row).all(dim=1).nonzero()[0]) for row in metric.real_reservoir]
    assert len(set(rows)) == 8 and max(rows) >= 8  # distinct samples, not just the first ones
    assert metric.generated_stats().num_samples == 100 and math.isfinite(metric.compute()["kid_mean"])


def test_saved_stats_reused_give_the_same_fid_as_images(tmp_path):
    _write_folder(tmp_path / "ref", _images(40, 0, 256, seed=4))
    _write_folder(tmp_path / "gen", _images(30, 20, 230, seed=5))

    def metric() -> StreamingFID:
        return StreamingFID(CellMeans(), image_size=16, kid_subset_size=20, kid_subsets=5)

    from_images = compute_fid(tmp_path / "gen", tmp_path / "ref", metric(), 16, tmp_path / "ref.npz", False)
    stats = FeatureStats.load(tmp_path / "ref.npz")
    assert stats.num_samples == 40 and stats.kid_features.shape == (40, 48)
    from_stats = compute_fid(tmp_path / "gen", tmp_path / "ref.npz", metric(), progress=False)
    assert from_stats["fid"] == pytest.approx(from_images["fid"], rel=1e-12)
    assert from_stats["kid_mean"] == pytest.approx(from_images["kid_mean"], rel=1e-12)
    assert from_stats["num_reference"] == 40 and from_images["fid"] > 0


def test_stats_from_another_convention_are_refused(tmp_path):
    metric = StreamingFID(CellMeans(), image_size=16)
    metric.update(_images(4, 0, 256, seed=6), real=True)
    metric.reference_stats().save(tmp_path / "ref.npz")
    with pytest.raises(ValueError, match="image_size"):
        StreamingFID(CellMeans(), image_size=32).set_reference(FeatureStats.load(tmp_path / "ref.npz"))
    np.savez(tmp_path / "pytorch_fid.npz", mu=np.zeros(48), sigma=np.eye(48))  # pytorch-fid's format
    with pytest.warns(UserWarning, match="no convention"):
        StreamingFID(CellMeans(), image_size=16).set_reference(
            FeatureStats.load(tmp_path / "pytorch_fid.npz")
        )


def test_images_of_any_mode_and_size_are_converted_alike_and_bad_files_named(tmp_path):
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))
    rgb.save(tmp_path / "a_rgb.png")
    rgb.convert("L").save(tmp_path / "b_grey.png")
    rgb.convert("L").convert("RGB").save(tmp_path / "c_grey_as_rgb.png")
    rgb.convert("CMYK").save(tmp_path / "d_cmyk.jpg")
    rgb.convert("P").save(tmp_path / "e_palette.gif")
    Image.new("RGBA", (9, 9), (10, 20, 30, 0)).save(tmp_path / "f_transparent.png")
    Image.fromarray(np.full((5, 7), 65535, dtype=np.uint16)).save(tmp_path / "g_16bit.png")
    (tmp_path / "h_broken.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")

    with pytest.warns(UnreadableImageWarning, match="h_broken.png"):
        batches = list(iter_image_batches(tmp_path, size=8, batch_size=3))
    assert [b.shape for b in batches] == [(3, 3, 8, 8), (3, 3, 8, 8), (1, 3, 8, 8)]
    assert all(b.dtype == torch.uint8 for b in batches)
    assert np.array_equal(
        load_image(tmp_path / "b_grey.png", 8), load_image(tmp_path / "c_grey_as_rgb.png", 8)
    )
    assert (load_image(tmp_path / "f_transparent.png", 8) == 255).all()  # transparent over white
    assert (load_image(tmp_path / "g_16bit.png", 8) == 255).all()  # 16-bit white stays white
