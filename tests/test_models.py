"""SiT / REPA / DiverseDiT network: registry, initialisation, long skips, taps, checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

from diversedit.models import SiT, config_from_state_dict, create_model, model_config

TINY = dict(depth=6, hidden_size=32, num_heads=4, input_size=8, patch_size=2, num_classes=10)


def tiny(**kw):
    torch.manual_seed(0)
    return create_model("custom", **(TINY | kw))


def perturb(model, scale=0.05, seed=1):
    """adaLN-Zero makes a fresh model's output zero: give every weight a random offset."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 4, 8, 8, generator=g),
        torch.rand(n, generator=g),
        torch.randint(0, 10, (n,), generator=g),
    )


# --- registry -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params, long_skip_extra",
    [
        ("SiT-B/2", 130e6, 7_100_928),
        ("SiT-L/2", 458e6, 25_227_264),
        ("SiT-XL/2", 675e6, 37_239_552),
    ],
)
def test_published_parameter_counts(name, params, long_skip_extra):
    with torch.device("meta"):  # no allocation
        base = sum(p.numel() for p in create_model(name).parameters())
        fused = sum(p.numel() for p in create_model(name, long_skip=True).parameters())
    assert abs(base - params) / params < 0.005
    assert fused - base == long_skip_extra  # method-spec §2.5, exact


def test_registry_names_and_custom_sizes():
    cfg = model_config("SiT-S/4")
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (12, 384, 6, 4)
    assert model_config("SiT-XL/8").num_patches == 16
    with pytest.raises(ValueError, match="unknown model"):
        model_config("SiT-XXL/2")
    with pytest.raises(ValueError, match="hidden_size"):
        model_config("custom", depth=2, hidden_size=30, num_heads=4)
    # SiT-S runs (REPA's registry leaves its decoder width at 768 and crashes).
    s = create_model("SiT-S/8", input_size=16, num_classes=10)
    out = s(torch.randn(2, 4, 16, 16), torch.rand(2), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 4, 16, 16)


# --- initialisation -----------------------------------------------------------------------------


def test_adaln_zero_output_is_zero_at_init():
    for kw in ({}, {"long_skip": True}, {"z_dims": (16,), "encoder_depth": 2}):
        out = tiny(**kw)(*inputs())
        assert out.shape == (3, 4, 8, 8) and torch.count_nonzero(out) == 0


def test_position_embedding_is_frozen_sincos():
    m = tiny()
    pos = m.pos_embed[0]
    assert not m.pos_embed.requires_grad
    # token (row 1, col 2) of a 4×4 grid: first half encodes the column, second half the row
    d4 = 32 // 4
    omega = 1.0 / 10000 ** (torch.arange(d4, dtype=torch.float64) / d4)
    expect = torch.cat(
        [torch.sin(2 * omega), torch.cos(2 * omega), torch.sin(omega), torch.cos(omega)]
    )
    torch.testing.assert_close(pos[1 * 4 + 2].double(), expect, atol=1e-6, rtol=0)


def test_long_skip_init_modes():
    xavier = tiny(long_skip=True)
    w = xavier.skip_linears[0].linear.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert (
        w.abs().max() <= bound
        and w.std() > bound / 3
        and xavier.skip_linears[0].linear.bias.abs().max() == 0
    )
    ident = tiny(long_skip=True, long_skip_init="identity_like")
    w = ident.skip_linears[0].linear.weight
    assert torch.equal(w[:, :32], torch.eye(32)) and torch.count_nonzero(w[:, 32:]) == 0
    assert (
        torch.count_nonzero(
            tiny(long_skip=True, long_skip_init="zero").skip_linears[0].linear.weight
        )
        == 0
    )


# --- long residual connections --------------------------------------------------------------------


@pytest.mark.parametrize(
    "depth, expected",
    [
        (12, [(6, 5), (7, 4), (8, 3), (9, 2), (10, 1), (11, 0)]),
        (24, [(k, 23 - k) for k in range(12, 24)]),
        (28, [(k, 27 - k) for k in range(14, 28)]),
    ],
)
def test_fusion_pairs(depth, expected):
    assert (
        model_config(
            "custom", depth=depth, hidden_size=32, num_heads=4, long_skip=True
        ).fusion_pairs
        == expected
    )
    assert model_config("custom", depth=depth, hidden_size=32, num_heads=4).fusion_pairs == []


def test_long_skip_option_is_not_silently_ignored():
    """Release defect 2: the flag never reached the model. Ours must change the network."""
    off, on = tiny(), tiny(long_skip=True)
    assert not hasattr(off, "skip_linears") and len(on.skip_linears) == len(on.skip_norms) == 3
    n_off = sum(p.numel() for p in off.parameters())
    n_on = sum(p.numel() for p in on.parameters())
    assert n_on - n_off == 3 * (2 * 32 * 32 + 32 + 4 * 32)
    perturb(on)
    x, t, y = inputs()
    on.eval()
    before = on(x, t, y)
    with torch.no_grad():
        on.skip_linears[1].linear.weight.mul_(2)
    assert not torch.allclose(on(x, t, y), before)  # the fusion lies on the forward path


def reference_forward(sd, cfg, x, t, y):
    """An independent functional SiT written from baselines-spec §2 / method-spec §2.

    Returns (output, post-fusion features). Uses explicit softmax attention and only the state
    dict, so it checks the parameter names and the mathematics of the module implementation.
    """
    d, heads, p, L = cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.depth

    def lin(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(h):
        return F.layer_norm(h, (h.shape[-1],), eps=1e-6)

    n = x.shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    tf = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
    c = lin(F.silu(lin(tf, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]
    feats, stack = [], []
    for k in range(L):
        b = f"blocks.{k}."
        mod = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, -1)
        a = ln(h) * (1 + mod[1][:, None]) + mod[0][:, None]
        q, kk, v = (
            lin(a, b + "attn.qkv").reshape(n, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        )
        att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
        h = h + mod[2][:, None] * lin(att.transpose(1, 2).reshape(n, -1, d), b + "attn.proj")
        a = ln(h) * (1 + mod[4][:, None]) + mod[3][:, None]
        mlp = lin(F.gelu(lin(a, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        h = h + mod[5][:, None] * mlp
        if cfg.long_skip and k >= L // 2:
            j = k - L // 2
            cat = torch.cat([h, stack.pop()], -1)  # (deep, shallow)
            cat = F.layer_norm(
                cat, (2 * d,), sd[f"skip_norms.{j}.weight"], sd[f"skip_norms.{j}.bias"], 1e-6
            )
            h = lin(cat, f"skip_linears.{j}.linear")
        elif cfg.long_skip:
            stack.append(h)
        feats.append(h)
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, -1)
    out = lin(ln(h) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    g = cfg.input_size // p
    out = out.reshape(n, g, g, p, p, 4).permute(0, 5, 1, 3, 2, 4).reshape(n, 4, g * p, g * p)
    return out, feats


@pytest.mark.parametrize("long_skip", [False, True])
@pytest.mark.parametrize("fused_attn", [True, False])
def test_forward_matches_independent_reference(long_skip, fused_attn):
    model = perturb(tiny(long_skip=long_skip, fused_attn=fused_attn)).eval()
    x, t, y = inputs()
    with torch.no_grad():
        got = model(x, t, y, return_aux=True)
        ref, ref_feats = reference_forward(model.state_dict(), model.config, x, t, y)
    torch.testing.assert_close(got.output, ref, atol=2e-5, rtol=1e-4)
    for a, b in zip(got.features, ref_feats, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_concat_order_shallow_first_is_a_permutation():
    deep = perturb(tiny(long_skip=True)).eval()
    shallow = tiny(long_skip=True, long_skip_concat_order="shallow_first").eval()
    sd = deep.state_dict()
    for j in range(3):  # swap the halves of every fusion's input
        for key in (
            f"skip_linears.{j}.linear.weight",
            f"skip_norms.{j}.weight",
            f"skip_norms.{j}.bias",
        ):
            sd[key] = torch.cat(sd[key].split(32, dim=-1)[::-1], dim=-1)
    shallow.load_state_dict(sd)
    x, t, y = inputs()
    torch.testing.assert_close(shallow(x, t, y), deep(x, t, y), atol=1e-5, rtol=1e-5)


def test_fusion_dtype_option_under_autocast():
    x, t, y = inputs()
    for dtype_opt, expected in (("autocast", torch.bfloat16), ("fp32", torch.float32)):
        model = perturb(tiny(long_skip=True, fusion_output_dtype=dtype_opt))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = model(x, t, y, return_aux=True).features
        assert feats[-1].dtype == expected  # deep half of the residual stream


# --- taps ---------------------------------------------------------------------------------------


def test_feature_taps():
    model = perturb(tiny(long_skip=True, z_dims=(16, 8), encoder_depth=2, projector_dim=24)).eval()
    x, t, y = inputs()
    plain = model(x, t, y)
    assert isinstance(plain, torch.Tensor)
    post = model(x, t, y, return_aux=True)
    pre = model(x, t, y, return_aux=True, tap="pre_fusion")
    torch.testing.assert_close(post.output, plain)
    assert len(post.features) == 6 and post.features[0].shape == (3, 16, 32)
    assert [z.shape for z in post.zs] == [(3, 16, 16), (3, 16, 8)]
    for k in range(3):  # shallow blocks are never fused
        torch.testing.assert_close(pre.features[k], post.features[k])
    for k in range(3, 6):
        assert not torch.allclose(pre.features[k], post.features[k])
    # the projector reads block 2 (1-based)
    proj = model.projectors[1](post.features[1])
    torch.testing.assert_close(post.zs[1], proj)
    assert post.sra is None


def test_label_dropout_and_null_class():
    model = perturb(tiny())
    x, t, y = inputs(4)
    model.eval()
    null = model(x, t, torch.full_like(y, 10))
    forced = model(x, t, y, force_drop_ids=torch.ones_like(y))
    torch.testing.assert_close(forced, null)
    # training-mode dropout replaces ~10% of labels by the null row, eval never does
    torch.manual_seed(0)
    emb, table = model.y_embedder, model.y_embedder.embedding_table.weight
    labels = torch.randint(0, 10, (5000,))
    dropped = (emb(labels, train=True) == table[10]).all(dim=1).float().mean()
    assert 0.08 < dropped < 0.12
    assert not (emb(labels, train=False) == table[10]).all(dim=1).any()


def test_meanflow_interval_embedding_and_sra_head():
    model = perturb(tiny(interval_embedding=True, sra_student_depth=2))
    x, t, y = inputs()
    with pytest.raises(ValueError, match="pass r"):
        model(x, t, y)
    out = model(x, t, y, r=t * 0.5, return_aux=True)
    assert out.sra.shape == (3, 16, 32)
    assert not torch.allclose(out.output, model(x, t, y, r=t))
    torch.testing.assert_close(out.sra, model.sra_head(out.features[1]))


# --- checkpoints --------------------------------------------------------------------------------

REPA_TINY_KEYS = {
    "pos_embed",
    "x_embedder.proj.weight",
    "x_embedder.proj.bias",
    "t_embedder.mlp.0.weight",
    "t_embedder.mlp.0.bias",
    "t_embedder.mlp.2.weight",
    "t_embedder.mlp.2.bias",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
    "final_layer.linear.bias",
    "final_layer.adaLN_modulation.1.weight",
    "final_layer.adaLN_modulation.1.bias",
    *(f"projectors.0.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")),
    *(
        f"blocks.{k}.{m}.{w}"
        for k in range(2)
        for w in ("weight", "bias")
        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
    ),
}


def test_state_dict_names_match_repa_and_release():
    """Keys of REPA's models/sit.py (with one projector) and the release's fusion names."""
    m = create_model("custom", **(TINY | {"depth": 2, "z_dims": (16,), "encoder_depth": 1}))
    assert set(m.state_dict()) == REPA_TINY_KEYS
    m = create_model("custom", **(TINY | {"depth": 2, "long_skip": True}))
    extra = set(m.state_dict()) - REPA_TINY_KEYS
    assert extra == {
        "skip_linears.0.linear.weight",
        "skip_linears.0.linear.bias",
        "skip_norms.0.weight",
        "skip_norms.0.bias",
    }


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"long_skip": True, "z_dims": (16,), "encoder_depth": 3},
        {"qk_norm": True, "interval_embedding": True},
        {"long_skip": True, "long_skip_norm": "none", "class_dropout_prob": 0.0},
    ],
)
def test_config_from_state_dict_round_trip(kw):
    model = perturb(tiny(**kw)).eval()
    sd = {"module." + k: v for k, v in model.state_dict().items()}  # a DDP-saved checkpoint
    cfg = config_from_state_dict(
        sd, num_heads=4, encoder_depth=model.config.encoder_depth, num_classes=10
    )
    assert cfg == model.config
    clone = SiT(cfg).eval()
    clone.load_state_dict(model.state_dict())  # strict
    x, t, y = inputs()
    r = {"r": t} if kw.get("interval_embedding") else {}
    torch.testing.assert_close(clone(x, t, y, **r), model(x, t, y, **r), atol=0, rtol=0)


def test_compile_blocks_shares_one_graph_and_matches_eager():
    """Regional compilation (precision.compile_scope=blocks): same outputs and gradients as the
    eager model, one compiled graph for all blocks, state-dict keys unchanged."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # other tests' compilations count too
    eager = perturb(tiny(depth=4, long_skip=True)).eval()  # eval: no random label dropout
    compiled = perturb(tiny(depth=4, long_skip=True)).eval().compile_blocks()
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    x, t, y = inputs()
    outs = []
    for model in (eager, compiled):
        out = model(x, t, y)
        out.square().mean().backward()
        outs.append((out, [p.grad for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-4)
    for a, b in zip(outs[1][1], outs[0][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1
