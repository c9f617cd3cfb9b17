"""Linear CKA with the unbiased HSIC_1 estimator (Song et al. 2012; Nguyen et al. 2021).

All arithmetic is float64 on column-centred features, via n×n Gram matrices (n = examples, features
flattened per example; cheap when features per example ≫ n, as for DiT blocks). CKA is
HSIC_1(K, L) / sqrt(HSIC_1(K, K) · HSIC_1(L, L)). Self-HSIC_1 is >= 0 (a squared norm of the
U-centred Gram); where a self-HSIC sum is <= 0 (constant features) the result is NaN, not a
division by zero. Cross-HSIC_1 can be slightly negative, so CKA of unrelated features is ≈ 0,
possibly < 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def _gram(x: Tensor) -> Tensor:
    """Centred float64 linear Gram matrix of ``x`` (n, ...) with its diagonal zeroed."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    x = x - x.mean(dim=0, keepdim=True)  # HSIC_1 is shift-invariant; centring keeps it accurate
    return (x @ x.T).fill_diagonal_(0.0)


def _hsic1_pairs(ga: Tensor, gb: Tensor) -> Tensor:
    """HSIC_1 for every pair of zero-diagonal Grams: ga (a, n, n), gb (b, n, n) -> (a, b)."""
    n = ga.shape[-1]
    if n < 4:
        raise ValueError(f"HSIC_1 needs n >= 4 examples, got {n}")
    trace = torch.einsum("aij,bji->ab", ga, gb)  # tr(K~ L~)
    rows_a, rows_b = ga.sum(dim=-1), gb.sum(dim=-1)  # K~ 1 (row sums)
    sums = torch.outer(rows_a.sum(-1), rows_b.sum(-1)) / ((n - 1) * (n - 2))
    cross = (ga.sum(dim=-2) @ rows_b.T) * (2.0 / (n - 2))  # 1ᵀ K~ L~ 1
    return (trace + sums - cross) / (n * (n - 3))


def hsic1(gram_x: Tensor, gram_y: Tensor) -> Tensor:
    """Unbiased HSIC_1 of two n×n Gram matrices (n >= 4), as a float64 scalar."""
    gx = gram_x.to(torch.float64).clone().fill_diagonal_(0.0)
    gy = gram_y.to(torch.float64).clone().fill_diagonal_(0.0)
    return _hsic1_pairs(gx[None], gy[None])[0, 0]


class MinibatchCKA:
    """Accumulates HSIC_1 sums for a k×k set of representations (e.g. all blocks of a model)
    over minibatches; ``compute`` takes the ratio of the sums (never an average of per-batch CKAs).
    ``hsic`` holds the running (k, k) float64 sums of HSIC_1 (on CPU).
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.hsic = torch.zeros(num_layers, num_layers, dtype=torch.float64)

    def update(self, features: Sequence[Tensor]) -> None:
        """Add one minibatch: ``k`` tensors (n, ...) computed from the same n examples."""
        if len(features) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} feature tensors, got {len(features)}")
        if len({f.shape[0] for f in features}) != 1:
            raise ValueError("all feature tensors must share the example dimension n")
        grams = torch.stack([_gram(f) for f in features])
        self.hsic += _hsic1_pairs(grams, grams).cpu()

    def compute(self) -> Tensor:
        """(k, k) float64 CKA matrix (ratio of the accumulated sums); NaN where a self-HSIC <= 0."""
        h = (self.hsic + self.hsic.T) / 2  # exact symmetry despite rounding
        diag = h.diagonal()
        diag = diag.where(diag > 0, torch.nan)  # guard: NaN propagates, no division by zero
        return h / torch.sqrt(torch.outer(diag, diag))


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased (HSIC_1) linear CKA of x (n, ...) and y (n, ...), features flattened per example."""
    acc = MinibatchCKA(2)
    acc.update([x, y])
    return acc.compute()[0, 1]


@torch.no_grad()
def block_similarity(
    model: torch.nn.Module,
    batches: Iterable[tuple[Tensor, ...]],
    *,
    unit: str = "image",
) -> Tensor:
    """(L, L) minibatch CKA between the post-fusion outputs of a model's L blocks.

    ``batches`` yields ``(x_t, t, y)`` or ``(x_t, t, y, r)``; ``model(x_t, t, y[, r],
    return_aux=True).features`` must be a list of L tensors (N, T, D). A MeanFlow model (one
    that embeds the interval t − r) without an ``r`` is probed at ``r = t``, its instantaneous
    velocity. Runs in eval mode under no_grad; the training flag is restored.

    unit="image" (default): one example per image, T×D flattened; keeps spatial layout, cheap
    Gram (N×N), but needs N >= 4 per batch and many images for low variance.
    unit="token": each token is an example, features (N*T, D); many more examples, but tokens of one
    image are not independent (shared positional structure inflates similarity) and the Grams cost
    (N*T)² memory per block, so keep N small.
    """
    if unit not in ("image", "token"):
        raise ValueError(f"unit must be 'image' or 'token', got {unit!r}")
    was_training = model.training
    model.eval()
    acc: MinibatchCKA | None = None
    try:
        interval = getattr(getattr(model, "config", None), "interval_embedding", False)
        for x_t, t, y, *r in batches:
            r = r or ([t] if interval else [])
            feats = model(x_t, t, y, *r, return_aux=True).features
            if unit == "token":
                feats = [f.reshape(-1, f.shape[-1]) for f in feats]
            if acc is None:
                acc = MinibatchCKA(len(feats))
            acc.update(feats)
    finally:
        model.train(was_training)
    if acc is None:
        raise ValueError("no batches given")
    return acc.compute()
