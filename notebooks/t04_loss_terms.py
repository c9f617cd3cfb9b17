# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python (diversedit)
#     language: python
#     name: diversedit
# ---

# %% [markdown]
# # Loss-term ablation — L_orth, L_MI, L_disp
#
# REPA-B, 400K iterations, no CFG. Tests each term of the diversity loss alone (only L_orth, only
# L_MI, only L_disp) against the full loss. The row files keep the term weight at 1/3 (the paper
# does not say otherwise), so with the adaptive weight only L_disp (≤ 0) never switches on:
# that row trains as REPA-B + long residuals, and the report marks it "diversity loss idle".

# %% [markdown]
# One execution reproduces **one row**: papermill injects a row file
# `params/t04_loss_terms/<tier>/<row>.yaml`
# (tiers: `paper` = the paper's settings; `smoke` = CPU, digits, seconds). Run every row with
# `diversedit reproduce t04 --tier smoke` (or `--tier paper`); results go to
# `<results_dir>/t04/<tier>/<row>/metrics.json`, written last. The defaults below run the
# first row's training file as it is (minutes on CPU; no smoke-tier size overrides), under
# `results/notebook-defaults`.

# %% tags=["parameters"]
# Every field of diversedit.pipeline.RowParams. `overrides` holds dotted training overrides
# separated by semicolons, each `key=value` (e.g. `model.long_skip=false`); no default may
# contain an equals sign, which papermill's parameter inspection cannot parse.
table: str = "t04"  # table id of params/published (t01 … t07)
row: str = "repa-b"  # row slug of that table
tier: str = "smoke"  # smoke (CPU, digits) | mini (one GPU) | paper (the paper's settings)
label: str = "REPA-B"  # display name of the row
train: str = "params/train/digits_repa.yaml"  # training params file the row starts from
overrides: str = ""  # dotted training overrides (see above)
sampler: str = "sde"  # sde | ode | ode_heun | meanflow
sampler_steps: int = 10  # sampler steps (paper: 250 SDE steps; MeanFlow: 1)
cfg_scale: float = 1.0  # classifier-free guidance scale (1.0: off; Table 2: 1.8)
guidance_high: float = 1.0  # CFG applies for t < guidance_high (Table 2: 0.7)
num_samples: int = 128  # samples to generate and evaluate (paper: 50000)
sample_batch: int = 128  # sampling batch per process (also the chunk size)
seed: int = 0  # sampling seed
extractor: str = "digits-cnn"  # inception (FID, sFID, IS, P, R) | digits-cnn (FD_digits …)
reference: str = "digits"  # ADM reference .npz, or "digits" for the digits images
inception_weights: str = ""  # local Inception 2015-12-05 weights (empty: env var or cache)
vae: str = "stabilityai/sd-vae-ft-mse"  # SD-VAE decoder for latent runs: local dir or hub id
results_dir: str = "results/notebook-defaults"  # results root (runs/, <table>/<tier>/<row>/)

# %%
from diversedit.files import use_repository_root
from diversedit.pipeline import ROW_PARAMETERS, comparison_table, row_params, run_row

use_repository_root()  # a kernel started in notebooks/ reads relative paths from the root
params = row_params({name: globals()[name] for name in ROW_PARAMETERS})
config = params.run_config()  # the validated training configuration
print(f"run {config.run_dir()} ({config.optim.max_steps} steps)")

# %% [markdown]
# Train (or resume, or reuse a finished run with the same configuration), sample, evaluate,
# and write the row's `metrics.json`.

# %%
result = run_row(params)
result["metrics"]

# %% [markdown]
# The table at this tier: reproduced beside the published numbers (pending rows greyed).

# %%
comparison_table(params)
