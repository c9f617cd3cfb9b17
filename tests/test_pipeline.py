"""The paper tier's path in miniature, offline: ImageFolder → prepare (SD-VAE latents) → train
on latents → sample with VAE decoding. A tiny random VAE stands in for sd-vae-ft-mse."""

import numpy as np
import PIL.Image
import pytest
from accelerate.state import AcceleratorState

from diversedit.config import load_config
from diversedit.data.prepare import prepare_imagenet
from diversedit.generate import SamplingConfig, sample_run
from diversedit.train import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, vae_dir):
    root = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    for i in range(8):
        path = root / "imagenet" / f"n{i % 2:03d}" / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)
    prepare_imagenet(root / "imagenet", root / "latents", vae=str(vae_dir), resolution=32)
    return root


def test_latent_run_trains_and_samples_through_the_vae(prepared, vae_dir, tmp_path):
    overrides = {
        "results_dir": str(tmp_path),
        "model.name": "custom",
        "model.depth": 2,
        "model.hidden_size": 32,
        "model.num_heads": 4,
        "data.path": str(prepared / "latents"),
        "data.image_size": 32,
        "data.num_workers": 0,
        "objective.diversity.pairs": "star",
        "optim.global_batch": 4,
        "optim.max_steps": 2,
        "precision.mixed_precision": "no",
        "checkpoint.every": 2,
        "logging.tensorboard": False,
    }
    cfg = load_config("params/train/sit_b2_diversedit.yaml", overrides)  # checks the data path
    assert cfg.model_config().input_size == 4 and cfg.model_config().in_channels == 4
    AcceleratorState._reset_state(True)
    run = Trainer(cfg).fit()
    assert (run / "log.jsonl").read_text().count('"div"') == 1
    sampling = SamplingConfig(num_samples=3, batch_size=2, num_steps=4, vae=str(vae_dir))
    path = sample_run(run, sampling, progress=False)
    images = np.load(path)["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (3, 32, 32, 3)  # decoded to pixels
    record = (path.parent / "sampling.json").read_text()
    assert '"decoder": "sd-vae"' in record and str(vae_dir) in record


def test_a_diverging_row_is_recorded_as_diverged(tmp_path, monkeypatch):
    """A run that stops on a non-finite loss becomes a 'diverged' result (the paper's t05
    'constant weight' row diverges), not a failed row; the report shows it beside 'diverges'."""
    import diversedit.train as train_module
    from diversedit.pipeline import load_row, run_row
    from diversedit.results import aggregate, read_results

    real = train_module.compute_loss

    def poisoned(*args, **kwargs):  # the loss turns NaN from the second step on
        loss, terms = real(*args, **kwargs)
        poisoned.calls += 1
        if poisoned.calls >= 2:
            terms = terms | {"denoise": terms["denoise"] * float("nan")}
            loss = loss * float("nan")
        return loss, terms

    poisoned.calls = 0
    monkeypatch.setattr(train_module, "compute_loss", poisoned)
    AcceleratorState._reset_state(True)
    params = load_row(
        "params/t05_adaptive_range/smoke/constant-weight.yaml", results_dir=str(tmp_path)
    )
    record = run_row(params)
    assert record["status"] == "diverged" and record["metrics"] == {}
    assert record["metric_info"]["step"] == 2 and "denoise" in record["metric_info"]["error"]
    (result,) = read_results(tmp_path)
    assert result.status == "diverged" and result.run_dir
    df = aggregate(tmp_path)
    row = df[(df.table == "t05") & (df.tier == "smoke") & (df.row == "constant-weight")]
    assert set(row.status) == {"diverged"} and set(row.published_status) == {"diverges"}


def test_row_sampling_starts_on_an_empty_graph_cache(tmp_path, monkeypatch):
    """After training, a row resets torch's graph cache before sampling: a compiled training
    run's graphs would otherwise count against the sampling network's 8 (torch then samples
    eagerly, with a warning only)."""
    import torch

    import diversedit.generate as generate_module
    import diversedit.train as train_module
    from diversedit.pipeline import load_row, run_row

    calls = []

    class Stop(Exception):
        pass

    def sample_run(*args, **kwargs):
        calls.append("sample")
        raise Stop

    monkeypatch.setattr(train_module, "train", lambda cfg: calls.append("train") or tmp_path)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append("reset"))
    monkeypatch.setattr(generate_module, "sample_run", sample_run)
    params = load_row(
        "params/t05_adaptive_range/smoke/constant-weight.yaml", results_dir=str(tmp_path)
    )
    with pytest.raises(Stop):
        run_row(params)
    assert calls == ["train", "reset", "sample"]
