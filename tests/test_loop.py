"""The one loop calls its hooks in a fixed protocol; its side concerns are only the hooks it is given."""

import jax

from helpers import SyntheticIterator, tiny_config

from jaxllm import sharding as sharding_lib
from jaxllm import train as train_lib
from jaxllm.config import MeshConfig
from jaxllm.loop.hooks import Hook
from jaxllm.loop.loop import run_loop


class Recorder(Hook):
    """Records the calls it gets; asks the loop to stop before update `stop_at + 1`."""

    def __init__(self, name, calls, stop_at=None):
        self.name, self.calls, self.stop_at = name, calls, stop_at

    def on_start(self, run):
        self.calls.append((self.name, "start", run.step))

    def before_step(self, run):
        return run.step == self.stop_at

    def after_step(self, run, values):
        self.calls.append((self.name, "after", run.step, "loss" in values and "tokens_per_second" in values))

    def on_end(self, run):
        self.calls.append((self.name, "end", run.step))


def test_hooks_see_every_update_end_in_reverse_order_and_replace_the_default_side_concerns(tmp_path):
    config = tiny_config("train.steps=5", "train.batch_size=2", "train.tensorboard=false")
    mesh = sharding_lib.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    context = train_lib.setup(config, tmp_path / "run", mesh=mesh, tokenizer=False, log=lambda *_: None)
    calls = []
    iterator = SyntheticIterator("pretrain", 2, config.data.seq_len, config.model.vocab_size)
    result = run_loop(context, iterator, context.built.train_step, context.built.eval_step, [],
                      hooks=[Recorder("a", calls), Recorder("b", calls, stop_at=2)])
    assert calls == [("a", "start", 0), ("b", "start", 0),
                     ("a", "after", 1, True), ("b", "after", 1, True), ("a", "after", 2, True), ("b", "after", 2, True),
                     ("b", "end", 2), ("a", "end", 2)]
    assert result.final_step == 2 and result.stopped_early
    assert (tmp_path / "run" / "config.yaml").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints" / "2").exists()
