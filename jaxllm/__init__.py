"""jaxllm: pretraining, supervised fine-tuning and learning from feedback in one small JAX/Flax stack."""

__version__ = "0.1.0"
