"""The Fréchet distance formula and the offline feature extractors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visionpipe_plugins.dcgan.features import RandomConvFeatures, build_extractor
from visionpipe_plugins.dcgan.fid import feature_stats, fid_from_features, frechet_distance


def test_identical_sets_are_at_distance_zero():
    x = np.random.default_rng(0).normal(size=(500, 16))
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-8)


def test_a_shift_adds_its_squared_length():
    x = np.random.default_rng(1).normal(size=(400, 8)) @ np.random.default_rng(2).normal(size=(8, 8))
    c = np.arange(8) * 0.5
    # same covariance: the distance is exactly ||c||², whatever the covariance is
    assert fid_from_features(x, x + c) == pytest.approx(float(c @ c), rel=1e-6)
    assert fid_from_features(x, x + 2 * c) > fid_from_features(x, x + c) > 0


def test_closed_form_for_diagonal_gaussians():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, 2.0])
    expected = 5.0 + float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())  # ||mu||² + Σ(√a - √b)²
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # symmetric, and defined for rank-deficient covariances (fewer samples than dimensions)
    assert frechet_distance(mu2, np.diag(b), mu1, np.diag(a)) == pytest.approx(expected, rel=1e-9)
    few = np.random.default_rng(3).normal(size=(5, 20))
    assert np.isfinite(fid_from_features(few, few + 1.0)) and fid_from_features(few, few + 1.0) == pytest.approx(20.0, rel=1e-6)


def test_stats_refuse_a_single_sample():
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="differ"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def _squares(n: int, seed: int) -> torch.Tensor:
    """[n, 3, 32, 32] images in [-1, 1]: a bright square on a dark background."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 3, 32, 32), -0.8)
    for i in range(n):
        y0, x0 = torch.randint(0, 16, (2,), generator=g).tolist()
        x[i, :, y0:y0 + 14, x0:x0 + 14] = torch.rand(3, 1, 1, generator=g) * 0.8 + 0.2
    return x + 0.05 * torch.randn(x.shape, generator=g)


def test_random_extractor_is_fixed_and_tells_images_from_noise():
    a, b = RandomConvFeatures(), RandomConvFeatures()
    x = _squares(8, 0)
    assert torch.equal(a(x), b(x)) and a(x).shape == (8, a.dim)
    real1, real2 = _squares(200, 1), _squares(200, 2)
    noise = torch.rand(200, 3, 32, 32) * 2 - 1
    blur = torch.nn.functional.avg_pool2d(real2, 5, 1, 2)
    with torch.no_grad():
        f1, f2, fn, fb = a(real1).numpy(), a(real2).numpy(), a(noise).numpy(), a(blur).numpy()
    same, blurred, noisy = fid_from_features(f1, f2), fid_from_features(f1, fb), fid_from_features(f1, fn)
    assert same < blurred < noisy, (same, blurred, noisy)
    assert same < 0.2 * noisy


def test_grayscale_images_are_accepted():
    x = _squares(4, 0)[:, :1]
    assert RandomConvFeatures()(x).shape == (4, RandomConvFeatures().dim)


def test_plain_state_dict_needs_an_architecture(tmp_path):
    import torchvision

    from visionpipe.errors import ConfigError

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ConfigError, match="evaluate.feature_arch"):
        build_extractor(str(path))
    ext = build_extractor(str(path), "resnet18", 32)
    with torch.no_grad():
        assert ext(_squares(2, 0)).shape == (2, 512)
    with pytest.raises(ConfigError, match="neither 'random' nor an existing"):
        build_extractor(str(tmp_path / "missing.pt"))
