"""Evaluation metrics: ADM's definitions (FID, sFID, IS, Precision/Recall) on pluggable feature
extractors (torch-fidelity's Inception from a local file, or the digits-cnn stand-in)."""

from .adm import (
    ReferenceStats,
    compute_metrics,
    frechet_distance,
    inception_score,
    metric_names,
    precision_recall,
    stats,
)
from .evaluate import evaluate, load_adm_npz, save_adm_npz
from .extractors import (
    DigitsExtractor,
    FeatureExtractor,
    InceptionExtractor,
    build_extractor,
    resolve_inception_weights,
)

__all__ = [
    "DigitsExtractor",
    "FeatureExtractor",
    "InceptionExtractor",
    "ReferenceStats",
    "build_extractor",
    "compute_metrics",
    "evaluate",
    "frechet_distance",
    "inception_score",
    "load_adm_npz",
    "metric_names",
    "precision_recall",
    "resolve_inception_weights",
    "save_adm_npz",
    "stats",
]
