"""tfmq: TFMQ-DM post-training quantization for diffusers UNets."""
