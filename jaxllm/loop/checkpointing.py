"""Checkpoints of the run: every train.checkpoint_every steps, and the last step when the loop ends
(finished, stopped by a signal or by max_steps_this_run)."""

from __future__ import annotations

from jaxllm import checkpoint as ckpt
from jaxllm.config import to_dict
from jaxllm.loop.context import RunContext
from jaxllm.loop.hooks import Hook, LoopRun


def save_checkpoint(context: RunContext, batch_iterator, step: int, force: bool = False) -> None:
    """The state, the data position and the meta (step, stage, config, spike guard, tokenizer) as
    checkpoint `step` of `context.manager`."""
    meta = {"step": step, "stage": context.config.train.stage, "config": to_dict(context.config),
            "guard": context.guard_state, "tokenizer_fingerprint": getattr(context.tokenizer, "fingerprint", None)}
    ckpt.save(context.manager, step, context.state, batch_iterator.get_state(), meta, force=force)


class Checkpointing(Hook):
    """The loop's hook: a periodic checkpoint before the last step (none while `run.hold_checkpoints`);
    at the end the last step's, unless it is saved already, and waits for the async writes."""

    def after_step(self, run: LoopRun, values: dict[str, float]) -> None:
        every = run.context.config.train.checkpoint_every
        if run.step % every == 0 and run.step < run.end and not run.hold_checkpoints:
            save_checkpoint(run.context, run.batch_iterator, run.step)

    def on_end(self, run: LoopRun) -> None:
        manager = run.context.manager
        if manager.latest_step() != run.step:
            save_checkpoint(run.context, run.batch_iterator, run.step, force=True)
        manager.wait_until_finished()
