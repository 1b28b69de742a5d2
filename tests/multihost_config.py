"""The config both sides of tests/test_multihost.py train with (a (data=2, fsdp=4) mesh over 8 devices)."""

from helpers import tiny_config

STEPS = 4


def multihost_config():
    return tiny_config(f"train.steps={STEPS}", "train.batch_size=8", "mesh.data=2", "mesh.fsdp=4",
                       "train.checkpoint_every=2", "train.async_checkpointing=false", "train.eval_batches=0")
