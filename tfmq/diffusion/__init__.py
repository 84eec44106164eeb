"""The full-precision diffusion side: models and pipeline folders, samplers, training of the
embedded defaults, the bundled dataset, calibration capture along the sampler's trajectories and
the temporal information block as the FP model computes it (``tfmq.diffusion.temporal``).

Nothing here imports the quantization engine; the engine and the evaluation build on it.
"""
