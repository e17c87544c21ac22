"""Frechet distance against an independent scipy.linalg.sqrtm formula, plus its basic properties."""

import numpy as np
import pytest
import scipy.linalg

from jaxt2i.eval import frechet as F


def reference_fd(x, y):
    """The textbook formula with a general matrix square root (independent of our eigen route)."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _features(seed, n, d, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing * scale + shift


@pytest.mark.parametrize("d,n", [(4, 50), (16, 200), (64, 300)])
def test_matches_sqrtm_formula(d, n):
    for seed in range(3):
        x = _features(seed, n, d)
        y = _features(seed + 100, n + 17, d, shift=0.3, scale=1.5)
        ours = F.frechet_distance_from_features(x, y)
        assert ours == pytest.approx(reference_fd(x, y), rel=1e-6)


def test_statistics_match_numpy():
    x = _features(0, 40, 5)
    mu, sigma = F.feature_statistics(x)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        F.feature_statistics(x[0])


def test_distance_to_itself_is_zero():
    x = _features(1, 500, 32, scale=10.0)
    mu, sigma = F.feature_statistics(x)
    assert F.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8 * np.trace(sigma))


def test_symmetric():
    x, y = _features(2, 100, 12), _features(3, 80, 12, shift=1.0, scale=0.5)
    assert F.frechet_distance_from_features(x, y) == pytest.approx(F.frechet_distance_from_features(y, x), rel=1e-10)


def test_shifting_the_mean_adds_its_squared_norm():
    x, y = _features(4, 200, 10), _features(5, 150, 10, scale=2.0)
    delta = np.random.default_rng(6).normal(size=10)
    base = F.frechet_distance_from_features(x, y)
    expected = base + delta @ delta + 2 * delta @ (y.mean(0) - x.mean(0))
    assert F.frechet_distance_from_features(x, y + delta) == pytest.approx(expected, rel=1e-9)
    mu1, s1 = F.feature_statistics(x)
    assert F.frechet_distance(mu1, s1, mu1 + delta, s1) == pytest.approx(delta @ delta, rel=1e-9)


def test_closed_form_for_diagonal_gaussians():
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 0.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 2.0])
    expected = 9.0 + sum((np.sqrt(a) - np.sqrt(b)) ** 2 for a, b in [(1, 4), (4, 1), (9, 0)])
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)


def test_rank_deficient_covariances_stay_finite_and_non_negative():
    x = _features(7, 10, 32)  # N < D: singular covariances
    y = _features(8, 12, 32, shift=0.1)
    value = F.frechet_distance_from_features(x, y)
    assert np.isfinite(value) and value > 0


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="same feature extractor"):
        F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_running_statistics_equal_the_batch_ones():
    x = np.random.default_rng(3).normal(5.0, 2.0, (101, 6))  # far from zero: a naive sum would lose digits
    stats = F.RunningStatistics.empty(6)
    for start in range(0, 101, 17):
        stats = stats.update(x[start:start + 17])
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert stats.update(np.zeros((0, 6))) is stats
    with pytest.raises(ValueError, match="at least 2"):
        F.RunningStatistics.empty(6).update(x[:1]).mean_cov()
    with pytest.raises(ValueError, match=r"\[N, 6\]"):
        stats.update(x[:, :5])
    with pytest.raises(ValueError, match="same feature extractor"):
        stats.merge(F.RunningStatistics.empty(5))
