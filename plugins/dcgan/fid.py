"""The Fréchet distance between two sets of feature vectors (Heusel et al. 2017), without scipy.

The linear algebra runs in float64 torch on one thread: multi-threaded LAPACK eigensolvers
on a shared, busy CPU spin for seconds on a 500x500 matrix, one thread takes ~0.1 s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _t(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).detach().cpu().double()


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of an [N, D] feature matrix, in float64."""
    f = _t(features)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"need an [N, D] feature matrix with N >= 2 (got shape {tuple(f.shape)})")
    mu = f.mean(0)
    c = f - mu
    with _one_thread():
        sigma = c.T @ c / (f.shape[0] - 1)
    return mu.numpy(), sigma.numpy()


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) between two Gaussians.

    Tr((S1 S2)^½) = Tr((S1^½ S2 S1^½)^½): the inner matrix is symmetric PSD, so both roots
    come from ``eigh`` (stable, no complex parts as with a general ``sqrtm``).
    """
    m1, m2 = _t(mu1).flatten(), _t(mu2).flatten()
    s1, s2 = _t(sigma1), _t(sigma2)
    d = m1.numel()
    if m2.numel() != d or s1.numel() != d * d or s2.numel() != d * d:
        raise ValueError(f"feature shapes differ: means {tuple(m1.shape)} and {tuple(m2.shape)}, "
                         f"covariances {tuple(s1.shape)} and {tuple(s2.shape)}")
    s1, s2 = s1.reshape(d, d), s2.reshape(d, d)
    with _one_thread():
        r1 = _sqrt_psd(s1)
        inner = r1 @ s2 @ r1
        tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
        diff = m1 - m2
        fd = float(diff @ diff + s1.trace() + s2.trace() - 2.0 * tr_covmean)
    return max(fd, 0.0)


def fid_from_features(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between the feature sets ``a`` [N, D] and ``b`` [M, D]."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))
