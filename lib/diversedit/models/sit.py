"""SiT as in REPA, with DiverseDiT's long residual connections and feature taps.

``SiT(SiTConfig(...))`` is numerically REPA's ``models/sit.py`` when ``long_skip`` is off and
the DiverseDiT release's model when it is on; parameter names match both, so their checkpoints
load with ``load_state_dict`` (see :func:`config_from_state_dict`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from timm.models.vision_transformer import PatchEmbed
from torch import Tensor, nn

from .layers import (
    FinalLayer,
    FP32LayerNorm,
    LabelEmbedder,
    SiTBlock,
    SkipLinear,
    TimestepEmbedder,
    build_projector,
    build_sra_head,
    sincos_pos_embed_2d,
)

CONCAT_ORDERS = ("deep_first", "shallow_first")
SKIP_NORMS = ("layernorm_fp32_affine", "layernorm", "none")
SKIP_INITS = ("xavier", "zero", "identity_like")
FUSION_DTYPES = ("autocast", "fp32")
TAPS = ("post_fusion", "pre_fusion")


@dataclass(frozen=True)
class SiTConfig:
    """Architecture of a SiT / REPA / DiverseDiT network (defaults: SiT-XL/2 on 32×32×4 latents)."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    qk_norm: bool = False
    fused_attn: bool = True
    # REPA projectors: one per encoder, fed by the output of block ``encoder_depth`` (1-based).
    z_dims: tuple[int, ...] = ()
    projector_dim: int = 2048
    encoder_depth: int = 8
    # DiverseDiT long residual connections (method-spec §2).
    long_skip: bool = False
    long_skip_concat_order: str = "deep_first"
    long_skip_norm: str = "layernorm_fp32_affine"
    long_skip_init: str = "xavier"
    fusion_output_dtype: str = "autocast"
    # MeanFlow: a second timestep embedder for the interval h = t - r.
    interval_embedding: bool = False
    # SRA: student head on the output of block ``sra_student_depth`` (1-based); 0 = none.
    sra_student_depth: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "z_dims", tuple(int(z) for z in self.z_dims))
        checks = {
            "input_size": self.input_size % self.patch_size == 0,
            "hidden_size": self.hidden_size % self.num_heads == 0 and self.hidden_size % 4 == 0,
            "depth": self.depth >= 1,
            "class_dropout_prob": 0.0 <= self.class_dropout_prob < 1.0,
            "encoder_depth": not self.z_dims or 1 <= self.encoder_depth <= self.depth,
            "sra_student_depth": 0 <= self.sra_student_depth <= self.depth,
            "long_skip_concat_order": self.long_skip_concat_order in CONCAT_ORDERS,
            "long_skip_norm": self.long_skip_norm in SKIP_NORMS,
            "long_skip_init": self.long_skip_init in SKIP_INITS,
            "fusion_output_dtype": self.fusion_output_dtype in FUSION_DTYPES,
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid SiT configuration field(s) {bad}: {self}")

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def fusion_pairs(self) -> list[tuple[int, int]]:
        """0-based (deep, shallow) block pairs fused by the long residual connections."""
        half = self.depth // 2
        return [(k, self.depth - 1 - k) for k in range(half, self.depth)] if self.long_skip else []

    def replace(self, **changes: Any) -> SiTConfig:
        return dataclasses.replace(self, **changes)


class ModelOutput(NamedTuple):
    """Forward result with taps: ``output`` is the network prediction.

    ``features`` holds every block's hidden state (post-fusion by default), ``zs`` the REPA
    projector outputs, ``sra`` the SRA student head output (or ``None``).
    """

    output: Tensor
    features: list[Tensor]
    zs: list[Tensor]
    sra: Tensor | None


class SiT(nn.Module):
    """Diffusion transformer with adaLN-Zero blocks, optional long skips, REPA/SRA heads."""

    def __init__(self, config: SiTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        d = cfg.hidden_size
        self.in_channels = self.out_channels = cfg.in_channels
        self.patch_size = cfg.patch_size
        self.num_classes = cfg.num_classes
        self.depth = cfg.depth
        self.encoder_depth = cfg.encoder_depth
        # Registration order follows the release so a given seed gives the same initial weights.
        if cfg.long_skip:
            self.skip_linears = nn.ModuleList(SkipLinear(d) for _ in range(cfg.depth // 2))
            if cfg.long_skip_norm != "none":
                norm = (
                    FP32LayerNorm if cfg.long_skip_norm == "layernorm_fp32_affine" else nn.LayerNorm
                )
                self.skip_norms = nn.ModuleList(
                    norm(2 * d, eps=1e-6) for _ in range(cfg.depth // 2)
                )
        self.x_embedder = PatchEmbed(cfg.input_size, cfg.patch_size, cfg.in_channels, d, bias=True)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, d), requires_grad=False)
        self.blocks = nn.ModuleList(
            SiTBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, cfg.fused_attn)
            for _ in range(cfg.depth)
        )
        self.projectors = nn.ModuleList(
            build_projector(d, cfg.projector_dim, z) for z in cfg.z_dims
        )
        self.final_layer = FinalLayer(d, cfg.patch_size, self.out_channels)
        if cfg.interval_embedding:
            self.h_embedder = TimestepEmbedder(d)
        if cfg.sra_student_depth:
            self.sra_head = build_sra_head(d)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """REPA's initialisation (xavier Linear, N(0, .02) embeddings, zero adaLN and output)."""

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        grid = int(self.config.num_patches**0.5)
        pos = sincos_pos_embed_2d(self.config.hidden_size, grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        embedders = [self.t_embedder] + (
            [self.h_embedder] if self.config.interval_embedding else []
        )
        for emb in embedders:
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.config.long_skip:
            self._init_long_skips()

    def _init_long_skips(self) -> None:
        mode, d = self.config.long_skip_init, self.config.hidden_size
        if mode == "xavier":  # already done by basic_init, as in the release
            return
        for skip in self.skip_linears:
            nn.init.zeros_(skip.linear.weight)
            nn.init.zeros_(skip.linear.bias)
            if mode == "identity_like":  # pass the (normalised) deep input straight through
                offset = 0 if self.config.long_skip_concat_order == "deep_first" else d
                skip.linear.weight.data[:, offset : offset + d].copy_(torch.eye(d))

    def compile_blocks(self, mode: str = "default") -> SiT:
        """Regional compilation: ``torch.compile`` each transformer block in place. Blocks of one
        shape share a compiled graph, so this compiles in seconds; embedders, long-skip fusions
        and the final layer stay eager. State-dict keys are unchanged."""
        for block in self.blocks:
            block.compile(mode=mode)
        return self

    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, T, p·p·C) → (N, C, H, W)."""
        p, c = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def fuse(self, j: int, deep: Tensor, shallow: Tensor) -> Tensor:
        """Long-residual fusion j: ``Linear(Norm([deep; shallow]))`` replaces the deep state."""
        cfg = self.config
        pair = (deep, shallow) if cfg.long_skip_concat_order == "deep_first" else (shallow, deep)
        x = torch.cat(pair, dim=-1)
        if cfg.long_skip_norm != "none":
            x = self.skip_norms[j](x)
        x = self.skip_linears[j](x)
        return x.float() if cfg.fusion_output_dtype == "fp32" else x

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        r: Tensor | None = None,
        *,
        force_drop_ids: Tensor | None = None,
        return_aux: bool = False,
        tap: str = "post_fusion",
    ) -> Tensor | ModelOutput:
        """Predict the velocity (or MeanFlow's average velocity u(x, r, t) when ``r`` is given).

        x: (N, C, H, W) latents; t, r: (N,) times in [0, 1]; y: (N,) labels, ``num_classes`` =
        null. ``force_drop_ids`` (N,) replaces label dropout (1 = drop). With ``return_aux`` the
        result is a :class:`ModelOutput` carrying every block's hidden state (``tap`` chooses
        post- or pre-fusion), the REPA projections and the SRA head output.
        """
        cfg = self.config
        # contiguous: PatchEmbed's tokens are a transposed view; every block then sees one layout
        # (a single compiled graph under compile_blocks)
        x = (self.x_embedder(x) + self.pos_embed).contiguous()
        n, tokens, d = x.shape
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        if cfg.interval_embedding:
            if r is None:
                raise ValueError("this model embeds the interval t - r: pass r")
            c = c + self.h_embedder(t - r)
        half = cfg.depth // 2
        skips: list[Tensor] = []
        features: list[Tensor] = []
        zs: list[Tensor] = []
        sra = None
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if return_aux and tap == "pre_fusion":
                features.append(x)
            if cfg.long_skip:
                if i >= half:
                    x = self.fuse(i - half, x, skips.pop())
                else:
                    skips.append(x)
            if return_aux:
                if tap == "post_fusion":
                    features.append(x)
                if i + 1 == cfg.encoder_depth:
                    zs = [proj(x.reshape(-1, d)).reshape(n, tokens, -1) for proj in self.projectors]
                if i + 1 == cfg.sra_student_depth:
                    sra = self.sra_head(x)
        out = self.unpatchify(self.final_layer(x, c))
        return ModelOutput(out, features, zs, sra) if return_aux else out


# name → (depth, hidden size, heads)
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
MODEL_NAMES = tuple(f"SiT-{s}/{p}" for s in SIZES for p in (1, 2, 4, 8))


def model_config(name: str = "SiT-XL/2", **overrides: Any) -> SiTConfig:
    """Configuration of a registered model (``SiT-B/2`` …) or of a custom size.

    A custom size is the name ``"custom"`` with ``depth``, ``hidden_size``, ``num_heads`` (and
    usually ``input_size``, ``patch_size``, ``in_channels``, ``num_classes``) given as overrides.
    """
    if name == "custom":
        return SiTConfig(**overrides)
    try:
        size, patch = name.removeprefix("SiT-").split("/")
        depth, hidden, heads = SIZES[size]
        patch_size = int(patch)
    except (KeyError, ValueError):
        raise ValueError(
            f"unknown model {name!r}; choose one of {MODEL_NAMES} or 'custom'"
        ) from None
    base = {"depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": patch_size}
    return SiTConfig(**(base | overrides))


def create_model(name: str | SiTConfig = "SiT-XL/2", **overrides: Any) -> SiT:
    """Build a model by registry name (``create_model("SiT-B/2", long_skip=True)``) or config."""
    cfg = (
        name.replace(**overrides)
        if isinstance(name, SiTConfig)
        else model_config(name, **overrides)
    )
    return SiT(cfg)


def config_from_state_dict(state: Mapping[str, Tensor], **overrides: Any) -> SiTConfig:
    """Infer the architecture of a SiT / REPA / DiverseDiT state dict.

    Everything is read from tensor shapes except ``num_heads`` (taken from the registry size with
    the same width unless given), ``encoder_depth`` (default 8) and ``num_classes`` (the table
    size minus its null row unless given; label dropout 0.1 when a null row exists).
    """
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    hidden = state["pos_embed"].shape[-1]
    proj = state["x_embedder.proj.weight"]
    patch, in_ch = proj.shape[-1], proj.shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    n_proj = sum(1 for k in state if k.startswith("projectors.") and k.endswith(".0.weight"))
    table = state["y_embedder.embedding_table.weight"].shape[0]
    out_dim = state["final_layer.linear.weight"].shape[0]
    if out_dim != patch * patch * in_ch:
        raise ValueError(
            f"output layer has {out_dim} rows, expected {patch * patch * in_ch}: learned-sigma "
            "(DiT/SiT 8-channel) checkpoints are not supported"
        )
    heads = {h: n for _, h, n in SIZES.values()}.get(hidden)
    long_skip = "skip_linears.0.linear.weight" in state
    norms = "skip_norms.0.weight" in state or not long_skip
    inferred: dict[str, Any] = {
        "input_size": int(state["pos_embed"].shape[1] ** 0.5) * patch,
        "patch_size": patch,
        "in_channels": in_ch,
        "hidden_size": hidden,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        "qk_norm": "blocks.0.attn.q_norm.weight" in state,
        "z_dims": tuple(state[f"projectors.{i}.4.weight"].shape[0] for i in range(n_proj)),
        "projector_dim": state["projectors.0.0.weight"].shape[0] if n_proj else 2048,
        "long_skip": long_skip,
        "long_skip_norm": "layernorm_fp32_affine" if norms else "none",
        "interval_embedding": "h_embedder.mlp.0.weight" in state,
    }
    if "sra_head.0.weight" in state and "sra_student_depth" not in overrides:
        raise ValueError("state dict has an SRA head: pass sra_student_depth=")
    inferred = inferred | overrides
    # The embedding table has a null row when label dropout is on (every published checkpoint).
    num_classes = inferred.setdefault("num_classes", table - 1)
    inferred.setdefault("class_dropout_prob", 0.1 if table == num_classes + 1 else 0.0)
    if inferred["num_heads"] is None:
        raise ValueError(f"cannot infer num_heads for width {hidden}: pass num_heads=")
    return SiTConfig(**inferred)
