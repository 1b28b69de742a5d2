"""Pretraining: next-token cross-entropy on packed text; every token of every document is a target
(with train.z_loss, and fused with the lm head when model.loss_chunk_size > 0)."""

from __future__ import annotations

from jaxllm import steps
from jaxllm.stages.base import Stage, register

STAGE = register(Stage(name="pretrain", summary="next-token prediction on packed plain text",
                       data_format="text", loss=steps.next_token_loss))
