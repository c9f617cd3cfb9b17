"""SiT / REPA / DiverseDiT networks."""

from .sit import (
    MODEL_NAMES,
    SIZES,
    ModelOutput,
    SiT,
    SiTConfig,
    config_from_state_dict,
    create_model,
    model_config,
)

__all__ = [
    "MODEL_NAMES",
    "SIZES",
    "ModelOutput",
    "SiT",
    "SiTConfig",
    "config_from_state_dict",
    "create_model",
    "model_config",
]
