# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # DiverseDiT reproduction report
#
# Every table of the DiverseDiT paper (arXiv 2603.04239) with the numbers this suite reproduced
# next to the published ones (`params/published/*.yaml`, each with its source), the in-pipeline
# gain of every method row over its own baseline row (the comparison that survives differences
# between our baselines and the paper's), block × block CKA heatmaps and training curves.
#
# Results come in three tiers. **smoke**: CPU, digits data and a stand-in feature extractor
# (metrics named `FD_digits`, …): it shows that the pipeline runs, not how good the method is.
# **mini**: reduced models, budgets and sample counts: trends only. **paper**: the paper's
# setting; only its FID/sFID/IS/Precision/Recall on 50,000 samples with the real Inception are
# comparable with the published numbers. Rows without a result are shown as *pending*.
#
# Built by `diversedit.report.build_report`; all logic is in `lib/diversedit/report.py`.

# %% tags=["parameters"]
results_dir: str = "results"  # results root (relative: to the repo root or $DIVERSEDIT_ROOT)
published_dir: str = "params/published"  # published numbers, one YAML per table

# %%
from IPython.display import display

from diversedit import report
from diversedit.files import use_repository_root

use_repository_root()  # a kernel started in notebooks/ reads relative paths from the root
report.configure_plotly()
data = report.load_report_data(results_dir, published_dir)
for item in report.overview(data):
    display(item)

# %% [markdown]
# ## Tables

# %%
for item in report.table_sections(data):
    display(item)

# %% [markdown]
# ## Representation similarity

# %%
for item in report.cka_section(data):
    display(item)

# %%
for item in report.training_section(data):
    display(item)
