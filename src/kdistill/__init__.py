"""kdistill: knowledge distillation for PyTorch (ReviewKD, MEAL and the classic baselines)."""

from kdistill import losses
from kdistill.checkpoint import load_weights
from kdistill.features import FeatureRecorder, probe_shapes, stage_taps
from kdistill.methods import build_method, list_methods
from kdistill.models import create_model, list_models

__version__ = "0.1.0"
__all__ = [
    "FeatureRecorder",
    "build_method",
    "create_model",
    "list_methods",
    "list_models",
    "load_weights",
    "losses",
    "probe_shapes",
    "stage_taps",
]
