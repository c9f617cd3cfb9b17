"""DiverseDiT reproducibility suite: models, objectives, samplers and analysis."""

import warnings

__version__ = "0.1.0"

# tqdm.auto (imported by huggingface_hub, accelerate and this package) warns in a notebook
# kernel without ipywidgets, then draws the text bars that papermill runs want anyway.
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")
