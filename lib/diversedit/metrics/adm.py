"""The ADM evaluator's metric definitions (guided-diffusion ``evaluations/evaluator.py``).

* Fréchet distance: ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) with ``scipy.linalg.sqrtm``; when the
  root is not finite, 1e-6·I is added to both covariances; a small imaginary part is dropped
  (error if a diagonal imaginary component exceeds 1e-3). float64 throughout.
* Inception Score: mean over **in-order** splits (no shuffle) of exp(mean_x KL(p(y|x) ‖ p(y)));
  ADM splits into chunks of 5000 and reports the mean only.
* Precision / Recall (Kynkäänniemi et al. 2019, ADM's ``ManifoldEstimator``): squared Euclidean
  distances, radius = distance to the k-th nearest neighbour (k = 3, self excluded); precision =
  fraction of samples inside any reference ball, recall = fraction of references inside any sample
  ball. Computed in blocks, so the full N×M distance matrix never exists. ADM computes the
  distances in float16 (float32 fallback); here they are float64 by default (``dtype``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from scipy.special import rel_entr, softmax

from ..files import atomic_write

ADM_IS_SPLIT_SIZE = 5000
ADM_PR_K = 3
ADM_FID_EPS = 1e-6


# ----------------------------------------------------------------------------- Fréchet distance


def stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of features (N, d) in float64: ``mean`` and ``cov(rowvar=False)`` as ADM."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need features of shape (N >= 2, d), got {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = ADM_FID_EPS,
) -> float:
    """Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂) with ADM's handling of numerics."""
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    if sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"sigma {sigma1.shape} does not match mu {mu1.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"Fréchet distance: singular covariance product; adding {eps} to the diagonals",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- Inception Score


def inception_score(
    logits: np.ndarray,
    splits: int = 10,
    *,
    split_size: int | None = None,
    probs: bool = False,
) -> float:
    """Mean over in-order splits of exp(mean KL(p(y|x) ‖ p(y))); float64.

    ``logits`` (N, C) are softmaxed unless ``probs`` (rows already sum to 1). Splits are either
    ``splits`` near-equal chunks ``[i·N//splits, (i+1)·N//splits)`` (torch-fidelity with
    ``samples_shuffle=False``) or, when ``split_size`` is given, consecutive chunks of that size
    with a shorter last one (ADM: ``split_size=5000``). Both coincide when N = splits·split_size
    (10 × 5000 for 50K). Only the mean is returned (ADM reports no std)."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"need (N, C) logits, got shape {x.shape}")
    if probs:
        if (x < 0).any() or not np.allclose(x.sum(axis=1), 1.0, atol=1e-4):
            raise ValueError("probs=True needs non-negative rows summing to 1")
        p = x
    else:
        p = softmax(x, axis=1)
    n = len(p)
    if split_size is not None:
        if split_size < 1:
            raise ValueError(f"split_size must be >= 1, got {split_size}")
        bounds = [(i, min(i + split_size, n)) for i in range(0, n, split_size)]
    else:
        if not 1 <= splits <= n:
            raise ValueError(f"splits must be in [1, N={n}], got {splits}")
        bounds = [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
    scores = []
    for lo, hi in bounds:
        part = p[lo:hi]
        marginal = part.mean(axis=0, keepdims=True)
        kl = rel_entr(part, marginal).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- Precision / Recall


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances, clamped at 0 (ADM's expansion ‖a‖² − 2ab + ‖b‖²)."""
    d = (a * a).sum(1)[:, None] - 2 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d.clamp_min_(0)


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def manifold_radii(feats: torch.Tensor, k: int = ADM_PR_K, batch_size: int = 10000) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour (self excluded), by blocks:
    a running k+1 smallest per row (self included at ≈ 0), so memory is batch_size² per step."""
    n = len(feats)
    if n <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {n}")
    radii = torch.empty(n, dtype=feats.dtype, device=feats.device)
    for rows in _blocks(n, batch_size):
        best = None
        for cols in _blocks(n, batch_size):
            d = _sq_dists(feats[rows], feats[cols])
            d = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
            best = d if best is None else torch.cat([best, d], dim=1)
            best = best.topk(min(k + 1, best.shape[1]), dim=1, largest=False).values
        radii[rows] = best.sort(dim=1).values[:, k]
    return radii


def precision_recall(
    ref_feats: np.ndarray | torch.Tensor,
    sample_feats: np.ndarray | torch.Tensor,
    k: int = ADM_PR_K,
    *,
    batch_size: int = 10000,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[float, float]:
    """ADM's improved precision and recall: (fraction of samples inside the reference manifold,
    fraction of references inside the sample manifold); k-NN balls with squared distances."""
    ref = torch.as_tensor(np.asarray(ref_feats), dtype=dtype, device=device)
    sam = torch.as_tensor(np.asarray(sample_feats), dtype=dtype, device=device)
    if ref.ndim != 2 or sam.ndim != 2 or ref.shape[1] != sam.shape[1]:
        raise ValueError(f"need (N, d) features of equal d, got {ref.shape} and {sam.shape}")
    r_ref, r_sam = manifold_radii(ref, k, batch_size), manifold_radii(sam, k, batch_size)
    sam_in = torch.zeros(len(sam), dtype=torch.bool, device=sam.device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    for rows in _blocks(len(sam), batch_size):
        for cols in _blocks(len(ref), batch_size):
            d = _sq_dists(sam[rows], ref[cols])
            sam_in[rows] |= (d <= r_ref[None, cols]).any(dim=1)
            ref_in[cols] |= (d <= r_sam[rows, None]).any(dim=0)
    return sam_in.double().mean().item(), ref_in.double().mean().item()


# ----------------------------------------------------------------------------- reference statistics

_STR_KEYS = ("extractor", "source", "key")


@dataclass
class ReferenceStats:
    """Reference-side statistics: pool (μ, Σ), optional spatial (μ_s, Σ_s) for sFID, and optional
    reference pool features (``pool``) for Precision/Recall.

    ``n`` is the number of reference images behind the computed parts (None for ADM's precomputed
    ``mu``/``sigma``, whose N the file does not record); ``key`` identifies the cache entry."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool: np.ndarray | None = None
    extractor: str = ""
    n: int | None = None
    source: str = ""
    key: str = ""

    @classmethod
    def from_features(
        cls, feats: Mapping[str, np.ndarray], extractor: str, source: str = "", key: str = ""
    ) -> ReferenceStats:
        """Statistics of extracted reference features (keys ``pool`` and optionally ``spatial``)."""
        mu, sigma = stats(feats["pool"])
        mu_s = sigma_s = None
        if "spatial" in feats:
            mu_s, sigma_s = stats(feats["spatial"])
        pool = np.asarray(feats["pool"], dtype=np.float32)
        return cls(mu, sigma, mu_s, sigma_s, pool, extractor, len(pool), source, key)

    @classmethod
    def from_adm_npz(cls, path: str | Path) -> ReferenceStats:
        """ADM's precomputed ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` (Inception TF statistics);
        ``arr_0`` is not read here (its features are what Precision/Recall needs)."""
        with np.load(path) as data:
            missing = [k for k in ("mu", "sigma") if k not in data.files]
            if missing:
                raise ValueError(f"{path} has no precomputed statistics (missing {missing})")
            mu_s = data["mu_s"] if "mu_s" in data.files else None
            sigma_s = data["sigma_s"] if "sigma_s" in data.files else None
            return cls(
                data["mu"].astype(np.float64),
                data["sigma"].astype(np.float64),
                None if mu_s is None else mu_s.astype(np.float64),
                None if sigma_s is None else sigma_s.astype(np.float64),
                extractor="inception-v3-compat",
                source=f"precomputed in {Path(path).name} (ADM mu/sigma/mu_s/sigma_s)",
            )

    def save(self, path: str | Path) -> None:
        """Write as an .npz with the same keys (``n`` = -1 when unknown); no pickles."""
        arrays: dict[str, np.ndarray] = {"mu": self.mu, "sigma": self.sigma}
        for name in ("mu_s", "sigma_s", "pool"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        for name in _STR_KEYS:
            arrays[name] = np.array(getattr(self, name))
        arrays["n"] = np.array(-1 if self.n is None else self.n)
        atomic_write(Path(path), lambda f: np.savez(f, **arrays))  # concurrent writers: one wins

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        """Read a file written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            get = {k: data[k] for k in data.files}
        n = int(get.pop("n", -1))
        strings = {k: str(get.pop(k)) for k in _STR_KEYS if k in get}
        return cls(**get, **strings, n=None if n < 0 else n)


# ----------------------------------------------------------------------------- all metrics


def metric_names(suffix: str = "") -> dict[str, str]:
    """Result keys: FID/sFID/IS/Precision/Recall for the real Inception (``suffix`` ""), else
    FD<suffix>, sFD<suffix>, IS<suffix>, Precision<suffix>, Recall<suffix> (never "FID")."""
    return {
        "fd": "FID" if not suffix else f"FD{suffix}",
        "sfd": "sFID" if not suffix else f"sFD{suffix}",
        "is": f"IS{suffix}",
        "precision": f"Precision{suffix}",
        "recall": f"Recall{suffix}",
    }


def compute_metrics(
    ref: ReferenceStats,
    sample_features: Mapping[str, np.ndarray],
    *,
    metric_suffix: str = "",
    extractor: str = "",
    ref_features: np.ndarray | None = None,
    k: int = ADM_PR_K,
    is_split_size: int | None = ADM_IS_SPLIT_SIZE,
    pr_batch_size: int = 10000,
    device: torch.device | str | None = None,
) -> dict:
    """Metrics of sample features (``pool``, optional ``spatial``, ``logits``) against ``ref``.

    FD on ``pool`` vs (ref.mu, ref.sigma); sFD on ``spatial`` when both sides have it; IS on
    ``logits`` (ADM split size 5000 by default); Precision/Recall on ``pool`` vs ``ref_features``
    (default ``ref.pool``). Metrics that cannot be computed are omitted, never zero. Adds
    ``N_samples``, ``N_ref`` and ``extractor``."""
    names = metric_names(metric_suffix)
    pool = np.asarray(sample_features["pool"])
    out: dict = {}
    out[names["fd"]] = frechet_distance(*stats(pool), ref.mu, ref.sigma)
    spatial = sample_features.get("spatial")
    if spatial is not None and ref.mu_s is not None and ref.sigma_s is not None:
        out[names["sfd"]] = frechet_distance(*stats(spatial), ref.mu_s, ref.sigma_s)
    logits = sample_features.get("logits")
    if logits is not None:
        out[names["is"]] = inception_score(logits, split_size=is_split_size)
    ref_pool = ref.pool if ref_features is None else ref_features
    if ref_pool is not None:
        p, r = precision_recall(ref_pool, pool, k, batch_size=pr_batch_size, device=device)
        out[names["precision"]], out[names["recall"]] = p, r
    out["N_samples"] = len(pool)
    out["N_ref"] = ref.n if ref_features is None else len(ref_features)
    out["extractor"] = extractor or ref.extractor
    return out
