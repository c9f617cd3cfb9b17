"""DiverseDiT reproducibility suite: models, objectives, samplers and analysis."""

__version__ = "0.1.0"
