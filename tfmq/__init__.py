"""tfmq: TFMQ-DM post-training quantization for diffusers UNets (simulated quantization).

    >>> import tfmq
    >>> calib = tfmq.capture_calibration_data(unet, scheduler, "calib/", num_samples=64, num_inference_steps=50)
    >>> qunet = tfmq.quantize(unet, calib, tfmq.QuantConfig(method="tfmq", weight_bits=4, act_bits=8))
    >>> tfmq.save(qunet, "qunet/"); qunet = tfmq.load("qunet/", fresh_fp_unet)
"""
import logging as _logging

from .version import __version__

# torchao (the integer export's kernels) is imported by diffusers whenever it is installed; with
# diffusers 0.42 that prints three lines on every model load which concern neither tfmq nor its
# checkpoints (torch.compile enum registration; diffusers' loader for torchao-serialized files).
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
_logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(_logging.ERROR)

from .quant.config import ActReconConfig, CalibConfig, ConfigError, QuantConfig, ReconConfig, TiarConfig, parse_bits
from .quant.recipes import RECIPES, Recipe, get_recipe, register_recipe
from .quant.steps import STEP_KINDS, StepContext, get_step, register_step, step_names
from .quant.quantizer import UncalibratedTimestepError
from .quant.prepare import enable_inference, prepare_model, set_quant_state
from .quant.tib import TemporalInformationBlock, temporal_features
from .quant.api import adopt_activations, calibrate_activations, quant_summary, quantize, reconstruct_blocks, reconstruct_temporal
from .quant.checkpoint import (
    CheckpointError, CheckpointMismatchError, CheckpointNotFoundError, load, read_header, save, verify_checkpoint,
)
from .quant.export import ExportError, ExportReport, export_int8

METHODS = tuple(RECIPES)

__all__ = [
    "__version__",
    "ActReconConfig", "CalibConfig", "ConfigError", "QuantConfig", "ReconConfig", "TiarConfig", "parse_bits",
    "RECIPES", "Recipe", "get_recipe", "register_recipe", "METHODS", "UncalibratedTimestepError",
    "STEP_KINDS", "StepContext", "get_step", "register_step", "step_names",
    "enable_inference", "prepare_model", "set_quant_state", "TemporalInformationBlock", "temporal_features",
    "adopt_activations", "calibrate_activations", "quant_summary", "quantize", "reconstruct_blocks", "reconstruct_temporal",
    "CheckpointError", "CheckpointMismatchError", "CheckpointNotFoundError", "load", "read_header", "save",
    "verify_checkpoint", "ExportError", "ExportReport", "export_int8", "CalibrationSet", "capture_calibration_data",
]


def __getattr__(name):  # calibration capture pulls in schedulers: import it on first use
    if name in ("CalibrationSet", "capture_calibration_data"):
        from .diffusion import calibration as calibration_data

        return getattr(calibration_data, name)
    raise AttributeError(f"module 'tfmq' has no attribute {name!r}")
