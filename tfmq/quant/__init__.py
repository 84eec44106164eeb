"""The quantization engine: quantizers and AdaRound, quantized layers and the layer policy, the
Temporal Information Block's engine side (TIAR targets, feature cache), BRECQ reconstruction,
Finite Set Calibration, method recipes, the three stage verbs and the checkpoint format.

Depends on torch, diffusers and the FP side (``tfmq.diffusion``) only; the public verbs are
re-exported by ``tfmq``.
"""
