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
# # Figure — inter-block representation similarity (linear CKA) during training
#
# The paper's analysis: block × block CKA of DiT block outputs on a fixed probe batch, followed
# over training. Its representation-diversity hypothesis predicts lower inter-block similarity
# for REPA than for SiT (REPA separates the aligned block from the others), and lower still for
# DiverseDiT (long residual connections + diversity loss), without an external encoder. The
# paper's figures give no numbers; this notebook records the mean off-diagonal CKA of each run's
# last snapshot (`mean_offdiag_CKA_<run>`, N = probe size).

# %% [markdown]
# The three runs are those of Table 1's rows `sit-b`, `repa-b` and `sit-b-ours` (same train files
# and overrides in `params/f01_cka/<tier>/cka.yaml`), so they are trained once and reused here.
# The trainer writes a snapshot `<run_dir>/cka/step_XXXXXXXX.npy` every `logging.cka_every`
# steps. The defaults below run the three digits training files as they are (minutes on CPU),
# under `results/notebook-defaults`.

# %% tags=["parameters"]
# Every field of diversedit.pipeline.CkaParams. The `*_overrides` hold dotted training overrides
# separated by semicolons, each `key=value` (e.g. `logging.cka_every=10`); no default may contain
# an equals sign, which papermill's parameter inspection cannot parse.
table: str = "f01"  # figure id of params/published
row: str = "cka"  # result slug
tier: str = "smoke"  # smoke (CPU, digits) | mini (one GPU) | paper (the paper's settings)
label: str = "Inter-block CKA: SiT vs REPA vs DiverseDiT"  # display name
sit: str = "params/train/digits_sit.yaml"  # training params file of the SiT run
sit_overrides: str = ""  # dotted training overrides of the SiT run (see above)
repa: str = "params/train/digits_repa.yaml"  # training params file of the REPA run
repa_overrides: str = ""  # dotted training overrides of the REPA run
diversedit: str = "params/train/digits_diversedit.yaml"  # … of the DiverseDiT run
diversedit_overrides: str = ""  # dotted training overrides of the DiverseDiT run
results_dir: str = "results/notebook-defaults"  # results root (runs/, <table>/<tier>/<row>/)

# %%
from diversedit.files import use_repository_root
from diversedit.pipeline import CKA_PARAMETERS, cka_figure, cka_params, run_cka

use_repository_root()  # a kernel started in notebooks/ reads relative paths from the root
params = cka_params({name: globals()[name] for name in CKA_PARAMETERS})
configs = params.run_configs()  # validated; each must take CKA snapshots
{name: str(cfg.run_dir()) for name, cfg in configs.items()}

# %% [markdown]
# Train (or reuse) the three runs and write the mean off-diagonal CKA of their last snapshots.

# %%
result = run_cka(params)
result["metrics"]

# %% [markdown]
# Block × block CKA per run; the slider moves over the training steps.

# %%
cka_figure(params.run_dirs())
