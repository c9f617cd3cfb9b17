"""Shared test settings: each test starts from one random state; tiny models run fastest on one
intra-op thread on shared CPU cores; without a GPU, Triton kernels run in Triton's CPU
interpreter (set before Triton is imported)."""

import importlib.util
import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(items):
    """``triton_interpreted`` tests need Triton's interpreter: no CUDA (tests/test_gpu.py runs
    the kernels there), TRITON_INTERPRET=1, and a torch build that ships Triton."""
    off = (
        torch.cuda.is_available()
        or os.environ.get("TRITON_INTERPRET") != "1"
        or importlib.util.find_spec("triton") is None
    )
    skip = pytest.mark.skip(reason="CPU check of Triton kernels in Triton's interpreter")
    for item in items:
        if off and "triton_interpreted" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, whatever ran before it: a failure seen once
    is seen again, and no test passes or fails by the draw of the day."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """A tiny random SD-VAE-shaped AutoencoderKL (downsampling 8, 4 latent channels) saved with
    ``save_pretrained``: the offline stand-in for ``stabilityai/sd-vae-ft-mse``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamples: /8 like the SD VAE
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    path = tmp_path_factory.mktemp("vae") / "sd-vae-tiny"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def not_a_checkpoint() -> bytes:
    """Fixed bytes no ``torch.load`` can read: a pickle header, then an opcode that does not
    exist (random bytes fail with an exception type that depends on their first byte)."""
    return b"\x80\x02" + b"\xff" * 998
