"""diversedit.metrics: ADM metric definitions, extractors, ADM .npz I/O and the evaluate command.

Offline and CPU only. The Inception tests use a deterministic random-initialised torch-fidelity
``inception-v3-compat`` saved to a file and loaded through the real weights path; it is
re-initialised (Kaiming-normal convs, centred random fc) so its features are not degenerate
(evaluation spec §6.1), and it is tagged, so its metrics are named FD_randomInception etc.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from diversedit.data.digits import digits_images
from diversedit.metrics import (
    DigitsExtractor,
    FeatureExtractor,
    InceptionExtractor,
    ReferenceStats,
    compute_metrics,
    evaluate,
    frechet_distance,
    inception_score,
    load_adm_npz,
    precision_recall,
    resolve_inception_weights,
    save_adm_npz,
    stats,
)
from diversedit.metrics.adm import manifold_radii
from diversedit.metrics.evaluate import iter_adm_batches, main
from diversedit.metrics.extractors import (
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_URL,
    build_random_inception_weights,
)
from diversedit.numerics import allow_tf32

RANDOM_TAG = "random-inception(seed=0)"


# ----------------------------------------------------------------------------- image sets


def noise_images(seed: int, n: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def smooth_images(seed: int, n: int, size: int = 32) -> np.ndarray:
    """Low-frequency colour sinusoids."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        f, ph = rng.uniform(0.5, 2, 3), rng.uniform(0, 2 * np.pi, 3)
        chans = [np.sin(2 * np.pi * (f[c] * xx + f[(c + 1) % 3] * yy) + ph[c]) for c in range(3)]
        out.append(127.5 + 120 * np.stack(chans, -1))
    return np.asarray(out).astype(np.uint8)


def flat_images(seed: int, n: int, size: int = 32) -> np.ndarray:
    """Near-constant grey images (a tight cluster in feature space)."""
    base = np.random.default_rng(seed).uniform(100, 110, (n, 1, 1, 3))
    return np.broadcast_to(base, (n, size, size, 3)).astype(np.uint8).copy()


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(200, 16))
    mu, sigma = stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)
    # Σ = I, μ₁ = 0, μ₂ = 1 ⇒ FID = ‖μ₁ − μ₂‖² = d
    assert frechet_distance(np.zeros(5), np.eye(5), np.ones(5), np.eye(5)) == pytest.approx(5.0)


def test_frechet_distance_agrees_with_torch_fidelity_eig_trace():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 12)), rng.normal(size=(250, 12)) @ rng.normal(size=(12, 12))
    (m1, s1), (m2, s2) = stats(a), stats(b + 0.3)
    theirs = fid_statistics_to_metric({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2}, False)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(
        theirs["frechet_inception_distance"], rel=1e-9
    )


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="differ in shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_stats_are_float64_mean_and_unbiased_covariance():
    feats = np.random.default_rng(3).normal(size=(50, 4)).astype(np.float32)
    mu, sigma = stats(feats)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False))


# ----------------------------------------------------------------------------- Inception Score


def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score(np.zeros((40, 7)), splits=4) == pytest.approx(1.0, abs=1e-12)
    # identical confident predictions: p(y|x) = p(y) ⇒ KL = 0
    assert inception_score(np.tile(20 * np.eye(7)[2], (40, 1)), splits=4) == pytest.approx(1.0)


def test_inception_score_of_balanced_confident_predictions_is_the_class_count():
    classes = 10
    logits = 60.0 * np.tile(np.eye(classes), (6, 1))  # 60 samples, every class 6 times
    assert inception_score(logits, splits=1) == pytest.approx(classes, rel=1e-9)
    probs = np.tile(np.eye(classes), (6, 1))
    assert inception_score(probs, splits=6, probs=True) == pytest.approx(classes, rel=1e-9)


def test_inception_score_splits_in_file_order():
    """First half all class 0, second half all class 1: in-order halves are each constant."""
    logits = 50.0 * np.repeat(np.eye(2), 50, axis=0)
    assert inception_score(logits, splits=2) == pytest.approx(1.0)
    assert inception_score(logits, splits=1) == pytest.approx(2.0)
    # ADM: consecutive chunks of split_size, the last one shorter (here 40 + 40 + 20)
    assert inception_score(logits, split_size=40) == pytest.approx(
        np.mean([1.0, np.exp(-(0.25 * np.log(0.25) + 0.75 * np.log(0.75))), 1.0])
    )
    # with N = splits · split_size both conventions agree
    rnd = np.random.default_rng(4).normal(size=(100, 5)) * 3
    assert inception_score(rnd, splits=4) == pytest.approx(inception_score(rnd, split_size=25))


# ----------------------------------------------------------------------------- Precision / Recall


def brute_force_pr(ref: np.ndarray, sam: np.ndarray, k: int = 3) -> tuple[float, float]:
    """The definition with full distance matrices (test oracle)."""

    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_ref, r_sam = np.sort(sq(ref, ref), 1)[:, k], np.sort(sq(sam, sam), 1)[:, k]
    d = sq(sam, ref)
    return (d <= r_ref[None]).any(1).mean(), (d <= r_sam[:, None]).any(0).mean()


def test_precision_recall_identical_sets_are_one_and_far_sets_zero():
    x = np.random.default_rng(5).normal(size=(64, 8))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_precision_recall_constructed_clouds_and_direction():
    """Samples: half on the reference cluster, half far away ⇒ precision 0.5; references: a
    cluster the samples cover plus one they miss ⇒ recall 0.5."""
    rng = np.random.default_rng(6)
    shared = rng.normal(size=(40, 4))
    ref = np.concatenate([shared, rng.normal(size=(40, 4)) + 50])
    sam = np.concatenate([shared + 0.01, rng.normal(size=(40, 4)) - 50])
    assert precision_recall(ref, sam) == (0.5, 0.5)
    # precision counts samples inside the reference manifold, recall the converse
    ref2 = np.concatenate([shared, rng.normal(size=(120, 4)) + 50])
    p, r = precision_recall(ref2, sam)
    assert (p, r) == (0.5, pytest.approx(40 / 160))


def test_precision_recall_matches_the_definition_and_is_batch_independent():
    rng = np.random.default_rng(7)
    ref, sam = rng.normal(size=(90, 6)), rng.normal(size=(70, 6)) * 1.3 + 0.4
    expected = brute_force_pr(ref, sam)
    assert precision_recall(ref, sam) == pytest.approx(expected)
    assert precision_recall(ref, sam, batch_size=7) == pytest.approx(expected)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    radii = manifold_radii(torch.as_tensor(ref), 3, batch_size=11)
    oracle = np.sort(((ref[:, None] - ref[None]) ** 2).sum(-1), 1)[:, 3]
    np.testing.assert_allclose(radii.numpy(), oracle, rtol=1e-10)


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


# ----------------------------------------------------------------------------- result naming


def test_metric_keys_follow_the_extractor():
    rng = np.random.default_rng(8)
    ref = ReferenceStats.from_features({"pool": rng.normal(size=(30, 5))}, "x")
    feats = {"pool": rng.normal(size=(20, 5)), "logits": rng.normal(size=(20, 10))}
    inception = compute_metrics(ref, feats, extractor="inception-v3-compat")
    assert {"FID", "IS", "Precision", "Recall"} <= inception.keys()
    assert "sFID" not in inception  # no spatial features: omitted, not zero
    digits = compute_metrics(ref, feats, metric_suffix="_digits", extractor="digits-cnn")
    assert {"FD_digits", "IS_digits", "Precision_digits", "Recall_digits"} <= digits.keys()
    assert not any("FID" in k for k in digits)
    assert (digits["N_samples"], digits["N_ref"], digits["extractor"]) == (20, 30, "digits-cnn")


def test_reference_stats_round_trip(tmp_path):
    rng = np.random.default_rng(9)
    feats = {"pool": rng.normal(size=(12, 4)), "spatial": rng.normal(size=(12, 3))}
    ref = ReferenceStats.from_features(feats, "fake", source="unit", key="abc")
    ref.save(tmp_path / "ref.npz")
    back = ReferenceStats.load(tmp_path / "ref.npz")
    for name in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
        np.testing.assert_allclose(getattr(back, name), getattr(ref, name), rtol=1e-6)
    assert (back.extractor, back.n, back.source, back.key) == ("fake", 12, "unit", "abc")


# ----------------------------------------------------------------------------- random Inception


class UInt8Images(torch.utils.data.Dataset):
    """uint8 CHW tensors, as torch-fidelity expects."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


@pytest.fixture(scope="module")
def inception_run(tmp_path_factory):
    """One pass of our extractor and one of torch-fidelity over the same 8 + 8 images."""
    import torch_fidelity

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        weights = build_random_inception_weights(
            tmp_path_factory.mktemp("inception") / "random-inception.pth"
        )
        ext = InceptionExtractor(weights, "cpu", tag=RANDOM_TAG, metric_suffix="_randomInception")
        noise, flat = noise_images(1, 4), flat_images(2, 4)
        samples = np.stack([noise, flat], axis=1).reshape(8, 32, 32, 3)  # noise, flat, noise, …
        ref = np.concatenate([noise_images(3, 4), smooth_images(4, 4)])
        sample_feats, ref_feats = ext.features(samples, 8), ext.features(ref, 8)
        cache = tmp_path_factory.mktemp("fidelity_cache")
        theirs = torch_fidelity.calculate_metrics(
            input1=UInt8Images(samples),  # generated
            input2=UInt8Images(ref),  # real
            isc=True,
            prc=True,
            cuda=False,
            feature_extractor="inception-v3-compat",
            feature_extractor_weights_path=str(weights),
            feature_layer_isc="logits_unbiased",
            feature_layer_prc="2048",
            prc_neighborhood=3,
            isc_splits=2,
            samples_shuffle=False,
            save_cpu_ram=True,
            cache=True,  # features written to a private cache, read back below
            cache_root=str(cache),
            input1_cache_name="s",
            input2_cache_name="r",
            verbose=False,
            batch_size=8,
        )
        their_features = {
            (name, layer): torch.load(
                cache / f"{name}-inception-v3-compat-features-{layer}.pt", weights_only=True
            ).numpy()
            for name in ("s", "r")
            for layer in ("2048", "logits_unbiased")
        }
    finally:
        torch.set_num_threads(threads)
    return {
        "ext": ext,
        "weights": weights,
        "samples": samples,
        "sample_feats": sample_feats,
        "ref_feats": ref_feats,
        "theirs": theirs,
        "their_features": their_features,
    }


def span_fid(x: np.ndarray, y: np.ndarray) -> float:
    """torch-fidelity's eig-trace FID of two small feature sets, computed in the subspace spanned
    by x − ȳ and y − ȳ (≤ n_x + n_y dims). Covariances and mean difference lie in that span and
    the Fréchet distance is invariant under isometries, so this equals the 2048-d value; it avoids
    2048² matrix functions (sqrtm alone takes ~20 s on the CI CPU). With N ≤ d both covariances
    are singular, where the eig trace is robust and ADM's sqrtm is not (it may raise)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    x, y = x.astype(np.float64), y.astype(np.float64)
    basis, _ = np.linalg.qr((np.concatenate([x, y]) - y.mean(axis=0)).T)
    stat_x = fid_features_to_statistics(torch.from_numpy(x @ basis))
    stat_y = fid_features_to_statistics(torch.from_numpy(y @ basis))
    return fid_statistics_to_metric(stat_x, stat_y, False)["frechet_inception_distance"]


def test_span_fid_equals_full_dimensional_fid():
    rng = np.random.default_rng(20)
    x, y = rng.normal(size=(6, 40)), rng.normal(size=(5, 40)) * 2 + 1
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    full = fid_statistics_to_metric(
        fid_features_to_statistics(torch.from_numpy(x)),
        fid_features_to_statistics(torch.from_numpy(y)),
        False,
    )["frechet_inception_distance"]
    assert span_fid(x, y) == pytest.approx(full, rel=1e-6)


def test_random_inception_is_not_degenerate(inception_run):
    s, r = inception_run["sample_feats"], inception_run["ref_feats"]
    noise = np.concatenate([s["pool"][0::2], r["pool"][:4]])
    smooth = r["pool"][4:]
    # FID ≥ ‖μ₁ − μ₂‖² (the trace term is a squared Bures distance, ≥ 0)
    assert np.sum((noise.mean(0) - smooth.mean(0)) ** 2, dtype=np.float64) > 1.0
    assert span_fid(noise, smooth) > 1.0
    assert span_fid(noise[:4], noise[4:]) < span_fid(noise[:4], smooth) / 5
    assert np.abs(s["pool"]).mean() > 1e-2 and s["pool"].std(axis=0).mean() > 1e-3
    assert inception_score(s["logits"], splits=2) > 1.1


def test_inception_feature_shapes_and_logits_unbiased(inception_run):
    feats, ext = inception_run["sample_feats"], inception_run["ext"]
    assert feats["pool"].shape == (8, 2048)
    assert feats["spatial"].shape == (8, 17 * 17 * 7) == (8, 2023)
    assert feats["logits"].shape == (8, 1008)
    unbiased = torch.from_numpy(feats["pool"]) @ ext.model.fc.weight.T  # no bias (ADM's IS)
    np.testing.assert_allclose(feats["logits"], unbiased.numpy(), rtol=1e-4, atol=1e-4)


def test_spatial_features_are_mixed_6d_branch1x1_channels_last(inception_run):
    """Independent route: the first 192 channels of the Mixed_6d block output (its 1×1 branch
    comes first in the concatenation), NHWC, first 7 channels, flattened."""
    ext, images = inception_run["ext"], inception_run["samples"][:2]
    seen = []
    hook = ext.model.Mixed_6d.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    try:
        ext.model.features_list = ["768"]  # stop after Mixed_6e
        with torch.no_grad():
            ext.model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    finally:
        ext.model.features_list = ["2048", "logits_unbiased"]
        hook.remove()
    expected = seen[0][:, :192].permute(0, 2, 3, 1)[..., :7].reshape(2, -1)
    np.testing.assert_allclose(
        inception_run["sample_feats"]["spatial"][:2], expected.numpy(), rtol=1e-5, atol=1e-6
    )
    # channel-first flattening would be a different (wrong) vector
    wrong = seen[0][:, :7].reshape(2, -1).numpy()
    assert not np.allclose(inception_run["sample_feats"]["spatial"][:2], wrong)


def test_inception_metrics_equal_torch_fidelity(inception_run):
    """Same random extractor file, same images through torch-fidelity's own pipeline, set to
    ADM's conventions: Inception for P/R (not its VGG16 default), k = 3, in-order IS splits.

    Its pipeline features (read back from its cache) equal ours; its IS and P/R equal ours
    exactly. FID at N = 8 ≪ 2048 is evaluated in the data's span with torch-fidelity's formula
    (span_fid); our ADM ``frechet_distance`` is checked against that formula on full-rank data in
    test_frechet_distance_agrees_with_torch_fidelity_eig_trace."""
    s, r, theirs = (
        inception_run["sample_feats"],
        inception_run["ref_feats"],
        inception_run["theirs"],
    )
    cached = inception_run["their_features"]
    np.testing.assert_allclose(cached["s", "2048"], s["pool"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cached["r", "2048"], r["pool"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cached["s", "logits_unbiased"], s["logits"], rtol=1e-5, atol=1e-4)
    fid = span_fid(s["pool"], r["pool"])
    assert fid > 1.0
    assert fid == pytest.approx(span_fid(cached["s", "2048"], cached["r", "2048"]), rel=1e-5)
    isc = inception_score(s["logits"], splits=2)
    assert isc > 1.1
    assert isc == pytest.approx(theirs["inception_score_mean"], rel=1e-9)
    precision, recall = precision_recall(r["pool"], s["pool"])
    assert 0 < precision < 1 and 0 < recall < 1  # not a vacuous (1, 1) or (0, 0)
    assert (precision, recall) == (theirs["precision"], theirs["recall"])


def test_random_inception_results_are_not_named_fid(inception_run):
    ext = inception_run["ext"]
    # names only: 4 high-variance dims (full-rank covariances at N = 8, cheap matrix functions)
    keep = {k: np.argsort(v.var(axis=0))[-4:] for k, v in inception_run["ref_feats"].items()}
    ref = ReferenceStats.from_features(
        {k: v[:, keep[k]] for k, v in inception_run["ref_feats"].items()}, ""
    )
    sample = {k: v[:, keep[k]] for k, v in inception_run["sample_feats"].items()}
    out = compute_metrics(ref, sample, metric_suffix=ext.metric_suffix, extractor=ext.name)
    assert {"FD_randomInception", "sFD_randomInception", "IS_randomInception"} <= out.keys()
    assert {"Precision_randomInception", "Recall_randomInception"} <= out.keys()
    assert "FID" not in out and "sFID" not in out and "IS" not in out
    assert out["extractor"] == RANDOM_TAG and not ext.adm_compatible
    info = ext.describe()
    assert len(info["weights_sha256"]) == 64 and "test only" in info["weights"]
    assert "tensorflow1x" in info["resize"]


# ----------------------------------------------------------------------------- missing weights


def test_missing_inception_weights_name_the_file_and_never_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("DIVERSEDIT_INCEPTION_WEIGHTS", raising=False)

    def no_download(*args, **kwargs):
        raise AssertionError("attempted a download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(FileNotFoundError) as err:
        InceptionExtractor(None)
    message = str(err.value)
    assert INCEPTION_WEIGHTS_FILE in message and INCEPTION_WEIGHTS_URL in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "--inception-weights" in message
    with pytest.raises(FileNotFoundError, match=r"nope\.pth does not exist"):
        InceptionExtractor(tmp_path / "nope.pth")
    hub_file = tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"")
    assert resolve_inception_weights(None) == hub_file  # torch-fidelity's cache location
    monkeypatch.setenv("DIVERSEDIT_INCEPTION_WEIGHTS", str(tmp_path / "env.pth"))
    with pytest.raises(FileNotFoundError, match=r"env\.pth"):
        resolve_inception_weights(None)


# ----------------------------------------------------------------------------- digits-cnn


@pytest.fixture(scope="module")
def digits_extractor():
    return DigitsExtractor(16)


def test_digits_extractor_names_and_discrimination(digits_extractor):
    test_images, _ = digits_images("test", 16)
    train_images, _ = digits_images("train", 16)
    noise = noise_images(10, len(test_images), size=16)
    feats = digits_extractor.features(test_images, 128)
    assert set(feats) == {"pool", "logits"}  # no spatial: sFD is not available
    assert feats["pool"].shape == (len(test_images), 64)
    ref = ReferenceStats.from_features(digits_extractor.features(train_images, 256), "digits")
    real = compute_metrics(
        ref, feats, metric_suffix=digits_extractor.metric_suffix, extractor=digits_extractor.name
    )
    fake = compute_metrics(
        ref, digits_extractor.features(noise, 128), metric_suffix="_digits", extractor="d"
    )
    assert {"FD_digits", "IS_digits", "Precision_digits", "Recall_digits"} <= real.keys()
    assert not any(k in real for k in ("FID", "sFID", "IS", "sFD_digits"))
    assert real["extractor"] == "digits-cnn (stand-in)"
    assert real["FD_digits"] * 20 < fake["FD_digits"]
    assert real["IS_digits"] > 5 > fake["IS_digits"]  # 10 balanced classes vs noise
    assert real["Precision_digits"] > 0.5 > fake["Precision_digits"]


# ----------------------------------------------------------------------------- ADM .npz I/O


def test_adm_npz_round_trip_and_streaming(tmp_path):
    images = noise_images(11, 10, size=8)
    path = save_adm_npz(tmp_path / "samples.npz", images)
    with np.load(path) as data:
        assert data.files == ["arr_0"] and data["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(load_adm_npz(path), images)
    batches = list(iter_adm_batches(path, 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)  # compressed files stream too
    np.testing.assert_array_equal(
        np.concatenate(list(iter_adm_batches(tmp_path / "c.npz"))), images
    )


def test_bad_sample_files_fail_clearly(tmp_path):
    np.savez(tmp_path / "float.npz", arr_0=np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"uint8 in \[0, 255\].*float64.*quantise.*span \[-"):
        load_adm_npz(tmp_path / "float.npz")
    np.savez(tmp_path / "rank3.npz", arr_0=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"N×H×W×3.*\(4, 8, 8\)"):
        load_adm_npz(tmp_path / "rank3.npz")
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((4, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="NCHW"):
        load_adm_npz(tmp_path / "nchw.npz")
    np.savez(tmp_path / "other.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'arr_0'"):
        load_adm_npz(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="uint8"):
        save_adm_npz(tmp_path / "x.npz", np.zeros((2, 8, 8, 3), np.float32))


# ----------------------------------------------------------------------------- evaluate


class ColourExtractor(FeatureExtractor):
    """Cheap deterministic features (channel means/stds), counting its calls."""

    def __init__(self, adm_compatible: bool = False) -> None:
        self.name, self.metric_suffix = "colour-stats", "_colour"
        self.adm_compatible, self.calls = adm_compatible, 0

    def features(self, images, batch_size=64):
        self.calls += 1
        return super().features(images, batch_size)

    def _forward(self, x):
        x = x.double() / 255
        pool = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
        return {"pool": pool, "spatial": x[:, :, ::4, ::4].flatten(1), "logits": 5 * pool}


def test_features_are_ieee_float32_whatever_the_process_set():
    """Extractors run with TF32 off (torch-fidelity's agreement with the TF graph is a float32
    one); the trainer may have turned it on in the same process, and it is given back."""
    seen = []

    class Spy(ColourExtractor):
        def _forward(self, x):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return super()._forward(x)

    with allow_tf32(True):
        Spy().features(noise_images(1, 5, size=8), batch_size=2)
        assert seen == [(False, False)] * 3
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert Spy().describe()["tf32"] is False


def test_reference_cache_key_covers_the_feature_arithmetic(tmp_path):
    """Reference statistics cached from TF32 features (before extraction switched it off) are
    not reused for IEEE float32 ones."""
    from diversedit.metrics.evaluate import _cache_key

    class Tf32Extractor(ColourExtractor):
        def describe(self):
            return super().describe() | {"tf32": True}

    ref = save_adm_npz(tmp_path / "ref.npz", smooth_images(1, 4, size=8))
    assert _cache_key(ref, ColourExtractor()) == _cache_key(ref, ColourExtractor())
    assert _cache_key(ref, ColourExtractor()) != _cache_key(ref, Tf32Extractor())


def test_evaluate_caches_reference_statistics(tmp_path):
    ref = save_adm_npz(tmp_path / "ref.npz", smooth_images(12, 40, size=8))
    samples = save_adm_npz(tmp_path / "samples.npz", noise_images(13, 30, size=8))
    ext = ColourExtractor()
    first = evaluate(ref, samples, extractor=ext, cache_dir=tmp_path / "cache", batch_size=16)
    assert ext.calls == 2 and first["reference"]["cache"] == "written"
    second = evaluate(ref, samples, extractor=ext, cache_dir=tmp_path / "cache", batch_size=16)
    assert ext.calls == 3 and second["reference"]["cache"] == "hit"  # only the samples again
    assert second["metrics"] == first["metrics"]
    metrics = first["metrics"]
    assert {"FD_colour", "sFD_colour", "IS_colour", "Precision_colour", "Recall_colour"} <= set(
        metrics
    )
    assert (metrics["N_samples"], metrics["N_ref"], metrics["extractor"]) == (30, 40, ext.name)
    assert first["protocol"]["paper_comparable"] is False
    save_adm_npz(ref, smooth_images(14, 40, size=8))  # a changed reference file is recomputed
    evaluate(ref, samples, extractor=ext, cache_dir=tmp_path / "cache")
    assert ext.calls == 5


def test_evaluate_uses_adm_precomputed_statistics_only_for_the_real_inception(tmp_path):
    images = smooth_images(15, 20, size=8)
    feats = ColourExtractor().features(images)
    mu, sigma = stats(feats["pool"])
    mu_s, sigma_s = stats(feats["spatial"])
    ref = tmp_path / "VIRTUAL_ref.npz"
    np.savez(ref, arr_0=images, mu=mu + 1.0, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    samples = save_adm_npz(tmp_path / "samples.npz", images)
    standin = evaluate(ref, samples, extractor=ColourExtractor(), cache_dir=tmp_path / "c")
    assert standin["metrics"]["FD_colour"] == pytest.approx(0.0, abs=1e-8)  # from arr_0
    assert standin["reference"]["stats_source"].startswith("computed from arr_0")
    adm = evaluate(ref, samples, extractor=ColourExtractor(True), cache_dir=tmp_path / "c")
    # the file's μ was shifted by 1 in each of the 6 dims: FD = 6, from the precomputed stats
    assert adm["metrics"]["FD_colour"] == pytest.approx(6.0)
    assert adm["metrics"]["sFD_colour"] == pytest.approx(0.0, abs=1e-6)
    assert adm["reference"]["stats_source"].startswith("precomputed")
    assert (adm["metrics"]["Precision_colour"], adm["metrics"]["Recall_colour"]) == (1.0, 1.0)


def test_evaluate_rejects_resolution_mismatch(tmp_path):
    ref = save_adm_npz(tmp_path / "ref.npz", smooth_images(16, 8, size=16))
    samples = save_adm_npz(tmp_path / "samples.npz", smooth_images(16, 8, size=8))
    with pytest.raises(ValueError, match="reference resolution"):
        evaluate(ref, samples, extractor=ColourExtractor(), cache_dir=tmp_path)


def test_cli_writes_json_with_n_and_extractor(tmp_path, capsys, digits_extractor):
    ref = save_adm_npz(tmp_path / "ref.npz", digits_images("train", 16)[0][:300])
    samples = save_adm_npz(tmp_path / "samples.npz", digits_images("test", 16)[0][:100])
    (tmp_path / "sampling.json").write_text(json.dumps({"seed": 7, "mode": "sde"}))
    out = tmp_path / "metrics.json"
    argv = [str(ref), str(samples), "--extractor", "digits-cnn", "--out", str(out)]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache"), "--batch-size", "50"]) == 0
    record = json.loads(out.read_text())
    assert record["metrics"]["N_samples"] == 100 and record["metrics"]["N_ref"] == 300
    assert record["metrics"]["extractor"] == "digits-cnn (stand-in)"
    assert record["extractor"]["name"] == "digits-cnn (stand-in)"
    assert record["reference"]["file"] == "ref.npz" and record["reference"]["N_images"] == 300
    assert "FID" not in record["metrics"] and "FD_digits" in record["metrics"]
    assert record["generation"] == {"seed": 7, "mode": "sde"}  # how the samples were made
    assert "FD_digits" in capsys.readouterr().out
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((4, 16, 16, 3), np.float32))
    assert main([str(ref), str(bad), "--extractor", "digits-cnn"]) == 2
    assert "uint8" in capsys.readouterr().err


def test_cli_digits_reference_is_every_digit_at_the_samples_resolution(tmp_path, capsys):
    """``evaluate digits …``: the 1,797 digits images at the samples' size, written once to
    the cache and reused; the test split's own images are close to them, noise is not."""
    from diversedit.metrics.evaluate import digits_reference

    samples = save_adm_npz(tmp_path / "samples.npz", digits_images("test", 8)[0][:64])
    noise = save_adm_npz(tmp_path / "noise.npz", noise_images(18, 64, size=8))
    cache = tmp_path / "cache"
    argv = ["--extractor", "digits-cnn", "--cache-dir", str(cache), "--out"]
    assert main(["digits", str(samples), *argv, str(tmp_path / "a.json")]) == 0
    ref = cache / "digits_8.npz"
    assert load_adm_npz(ref).shape == (1797, 8, 8, 3)
    assert np.array_equal(load_adm_npz(ref), digits_images("all", 8)[0])
    stamp = ref.stat().st_mtime_ns
    assert main(["digits", str(noise), *argv, str(tmp_path / "b.json")]) == 0
    assert ref.stat().st_mtime_ns == stamp and digits_reference(8, cache) == ref  # reused
    real, fake = (json.loads((tmp_path / f).read_text())["metrics"] for f in ("a.json", "b.json"))
    assert real["N_ref"] == 1797 and real["FD_digits"] < fake["FD_digits"] / 5
    from diversedit.results import STANDIN_METRICS  # the report's names for pending rows

    reported = {k for k, v in real.items() if isinstance(v, float) and k.endswith("_digits")}
    assert reported == set(STANDIN_METRICS["digits-cnn"])
    assert "FD_digits" in capsys.readouterr().out


def test_cli_inception_without_weights_exits_with_the_download_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("DIVERSEDIT_INCEPTION_WEIGHTS", raising=False)
    ref = save_adm_npz(tmp_path / "ref.npz", noise_images(17, 4, size=8))
    assert main([str(ref), str(ref), "--cache-dir", str(tmp_path)]) == 2
    assert INCEPTION_WEIGHTS_FILE in capsys.readouterr().err


# ----------------------------------------------------------------------------- real weights
REAL_INCEPTION = os.environ.get("DIVERSEDIT_INCEPTION_WEIGHTS", "")
ADM_REFERENCE = os.environ.get("DIVERSEDIT_ADM_REFERENCE", "")


@pytest.mark.slow
@pytest.mark.skipif(
    not (os.path.isfile(REAL_INCEPTION) and os.path.isfile(ADM_REFERENCE)),
    reason="set DIVERSEDIT_INCEPTION_WEIGHTS (pt_inception-2015-12-05-6726825d.pth) and "
    "DIVERSEDIT_ADM_REFERENCE (VIRTUAL_imagenet256_labeled.npz)",
)
def test_real_inception_reproduces_adm_reference_statistics() -> None:
    """Our pool and sFID features of ADM's 10K reference images against the statistics ADM's TF
    evaluator stored in the same file: a wrong resize, layer or channel order gives FD ≫ 1."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ext = InceptionExtractor(REAL_INCEPTION, device)
    feats = ext.features(iter_adm_batches(ADM_REFERENCE, 100), 100)
    with np.load(ADM_REFERENCE) as ref:
        pool = frechet_distance(*stats(feats["pool"]), ref["mu"], ref["sigma"])
        spatial = frechet_distance(*stats(feats["spatial"]), ref["mu_s"], ref["sigma_s"])
    assert feats["pool"].shape[1] == 2048 and feats["spatial"].shape[1] == 2023
    assert pool < 0.05 and spatial < 0.05, (pool, spatial)
