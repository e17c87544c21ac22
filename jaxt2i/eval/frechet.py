"""Frechet distance between two Gaussians fitted to feature sets (the FID formula).

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

``tr((S1 S2)^(1/2))`` is computed without a general (non-symmetric) matrix square root: with
A = S1^(1/2) (symmetric, from an eigen-decomposition), S1 S2 = A (A S2 A) A^(-1) is similar to
the symmetric PSD matrix A S2 A, so the trace is the sum of the square roots of its eigenvalues.
Everything runs in float64; tiny negative eigenvalues from round-off are clipped to zero.

The statistics are gathered batch by batch (``RunningStatistics``): ``update`` adds a batch of feature rows,
``merge`` combines statistics gathered apart (other shards, other processes) in any order, ``mean_cov`` gives the
mean and covariance. Only ``D + D * D`` float64 numbers are held, whatever the number of rows, so a Frechet distance
over tens of thousands of images never holds all their features at once.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class RunningStatistics(NamedTuple):
    """Feature statistics gathered so far: ``n`` rows, their ``mean`` [D] and ``m2`` [D, D] (the sum of outer
    products of the rows' deviations from the mean), all float64. Immutable: ``update`` and ``merge`` return new
    statistics.

    The merge is Chan, Golub and LeVeque's pairwise update: with ``delta = mean_b - mean_a``,
    ``mean = mean_a + delta * n_b / n`` and ``m2 = m2_a + m2_b + outer(delta, delta) * n_a * n_b / n``. It needs no
    sums of squares (no cancellation when the features sit far from zero) and is exact up to rounding whatever the
    batch sizes and the order of the merges.
    """

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> "RunningStatistics":
        """Statistics of no features of dimension ``dim``."""
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def of(cls, features: np.ndarray) -> "RunningStatistics":
        """Statistics of the rows of ``features`` [N, D] (N may be 0)."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {x.shape}")
        if len(x) == 0:
            return cls.empty(x.shape[1])
        mean = x.mean(axis=0)
        centered = x - mean
        return cls(len(x), mean, centered.T @ centered)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def update(self, features: np.ndarray) -> "RunningStatistics":
        """These statistics with the rows of ``features`` [N, D] added."""
        x = np.asarray(features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}], got shape {x.shape}")
        return self.merge(RunningStatistics.of(x))

    def merge(self, other: "RunningStatistics") -> "RunningStatistics":
        """The statistics of the rows of both (disjoint) sets; commutative and associative up to rounding."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {self.dim} and {other.dim}; both must come "
                             "from the same feature extractor")
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
        return RunningStatistics(n, mean, m2)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean [D] and unbiased covariance [D, D] of everything gathered (at least two rows)."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance, got {self.n}")
        return self.mean, self.m2 / (self.n - 1)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D]."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {x.shape}")
    return RunningStatistics.of(x).mean_cov()


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix [D, D]; negative round-off eigenvalues become zero."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2 [D, D]."""
    root1 = _symmetric_sqrt(np.asarray(sigma1, np.float64))
    middle = root1 @ np.asarray(sigma2, np.float64) @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1 [D], sigma1 [D, D]) and N(mu2, sigma2), >= 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"shapes disagree: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}; "
            "expected [D], [D, D], [D], [D, D] from the same feature extractor"
        )
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(value, 0.0))


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to features [N1, D] and [N2, D]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def frechet_distance_from_statistics(stats1: RunningStatistics, stats2: RunningStatistics) -> float:
    """Frechet distance between the Gaussians fitted to two ``RunningStatistics`` (each of at least 2 rows)."""
    return frechet_distance(*stats1.mean_cov(), *stats2.mean_cov())
