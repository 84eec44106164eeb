"""The quantization engine (docs/method.md sections 2-8).

quantizer (weight/activation quantizers, AdaRound, their checkpoint state), layers (quantized
layers, layer policy), prepare (wrapping a UNet in place, quant state), tib (engine side of the
Temporal Information Block: features of a model as it stands, FP feature cache), tiar (TIAR),
reconstruction (BRECQ units), fsc (Finite Set Calibration, shared ranges), steps (recipe steps as
registered handlers), recipes + registry (methods as data), methods (the built-in steps and
recipes), api (the stage verbs and ``quantize``), checkpoint (safetensors + JSON), config
(``QuantConfig``).

Depends on torch, diffusers and the FP side (``tfmq.diffusion``) only; the public verbs are
re-exported by ``tfmq``.
"""

from . import methods  # noqa: F401,E402  (registers the built-in step handlers and recipes)
