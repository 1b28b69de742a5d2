"""Supervised fine-tuning: the pretraining loss on chat-template rows whose loss mask keeps only the
answer tokens (and the EOS the model must learn to emit); data.sft_mode picks the mask."""

from __future__ import annotations

from jaxllm import steps
from jaxllm.stages.base import Stage, register

STAGE = register(Stage(name="sft", summary="cross-entropy on the answer tokens of chat conversations",
                       data_format="chat", loss=steps.next_token_loss))
