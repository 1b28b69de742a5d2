"""The generic train and eval steps: `(state, batch[, ref_params]) -> (state, metrics)`.

Each stage (jaxllm/stages/) is a loss function `(params, batch, reference_params) -> (loss_sum,
denominator, sums)` built from `jaxllm.losses` and the model-level pieces here (next-token loss,
sequence log-probs, scalar-head scores); one generic step turns any of them into an update with exact gradient
accumulation (sums over micro-batches, divided once by the total denominator), global-norm
clipping (in the optimizer), and a guard that skips updates with a non-finite or spiking loss.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxllm import lora
from jaxllm import losses
from jaxllm import model as model_lib
from jaxllm.config import Config
from jaxllm.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, Any], tuple[jax.Array, jax.Array, Metrics]]

# Metric sums divided by a count other than the loss denominator.
_SUM_DENOMINATORS = {
    "reward_desirable_sum": "desirable",
    "reward_undesirable_sum": "undesirable",
}


# ----------------------------------------------------------------------------------------------
# Model-level loss pieces the stages are built from.


def lm_loss(graphdef, params, batch: Batch, reference_params=None, *, z_loss: float = 0.0, loss_chunk_size: int = 0):
    """Pretraining and SFT: next-token cross-entropy on the tokens the loss mask selects.
    `loss_chunk_size` > 0 fuses the lm head into the loss (no [B,T,V] float32 logits; same sums)."""
    weights = losses.target_weights(batch["loss_mask"], batch["segment_ids"])
    if loss_chunk_size:
        hidden = model_lib.apply_hidden(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
        unembedding = model_lib.unembedding(graphdef, params, hidden.dtype)
        return losses.chunked_cross_entropy(hidden, unembedding, batch["tokens"], weights, z_loss, loss_chunk_size)
    logits = model_lib.apply(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    return losses.cross_entropy(logits, batch["tokens"], weights, z_loss)


def sequence_logprobs(graphdef, params, tokens, positions, segment_ids, loss_mask) -> jax.Array:
    """[B] summed log-prob of each row's masked (answer) tokens."""
    logits = model_lib.apply(graphdef, params, tokens, positions, segment_ids)
    weights = losses.target_weights(loss_mask, segment_ids)
    return losses.sequence_logprobs(losses.token_logprobs(logits, tokens), weights)


def row_presence(loss_mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B,T] -> [B] float32: 1 for a row with at least one target token, 0 for a padding row (e.g. the
    fill of a last, partial eval batch), which must count as absent in every per-row loss and count."""
    return (jnp.sum(losses.target_weights(loss_mask, segment_ids), axis=1) > 0).astype(jnp.float32)


def pair_presence(batch: Batch) -> jax.Array:
    """[B] 1 for a preference pair with any answer token on either side, 0 for a padding pair."""
    return jnp.maximum(row_presence(batch["chosen_loss_mask"], batch["chosen_segment_ids"]),
                       row_presence(batch["rejected_loss_mask"], batch["rejected_segment_ids"]))


def pair_logprobs(graphdef, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Summed answer log-probs of a pair batch's chosen and rejected rows ([B], [B]), from one forward
    pass over both."""
    fields = ("tokens", "positions", "segment_ids", "loss_mask")
    joined = [jnp.concatenate([batch[f"chosen_{f}"], batch[f"rejected_{f}"]], axis=0) for f in fields]
    logps = sequence_logprobs(graphdef, params, *joined)
    half = batch["chosen_tokens"].shape[0]
    return logps[:half], logps[half:]


def pair_token_counts(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Number of answer (target) tokens [B] of a pair batch's chosen and rejected rows (0 for padding rows)."""
    return tuple(jnp.sum(losses.target_weights(batch[f"{side}_loss_mask"], batch[f"{side}_segment_ids"]), axis=-1)
                 for side in ("chosen", "rejected"))


def pair_mean_logprobs(graphdef, params, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token (length-normalised) answer log-probs [B] of a pair batch's chosen and rejected rows, and
    [B] 1/0 presence of each pair (padding pairs are 0): the inputs of the reference-free preference losses."""
    chosen_sum, rejected_sum = pair_logprobs(graphdef, params, batch)
    chosen_tokens, rejected_tokens = pair_token_counts(batch)
    return (chosen_sum / jnp.maximum(chosen_tokens, 1.0), rejected_sum / jnp.maximum(rejected_tokens, 1.0),
            pair_presence(batch))


def last_token_index(weights: jax.Array) -> jax.Array:
    """[B,T] weights -> [B] index of the last weighted token (0 when none)."""
    positions = jnp.arange(weights.shape[1])[None]
    return jnp.max(jnp.where(weights > 0, positions, 0), axis=1)


def sequence_scores(graphdef, params, tokens, positions, segment_ids, loss_mask, head: str = "reward") -> jax.Array:
    """Scalar head on the hidden state of each row's last answer token (its EOS) -> [B]."""
    hidden = model_lib.apply_hidden(graphdef, params, tokens, positions, segment_ids)
    weights = losses.target_weights(loss_mask, segment_ids)
    last = last_token_index(weights)
    final = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    head_params = params[model_lib.HEADS_KEY][head]
    return final @ head_params["kernel"] + head_params["bias"]


# ----------------------------------------------------------------------------------------------
# The generic step.


def summarize(loss_sum: jax.Array, denominator: jax.Array, sums: Metrics) -> Metrics:
    """Sums -> means: `x_sum` keys are divided by their count (the loss denominator by default)."""
    out: Metrics = {"loss": losses.safe_mean(loss_sum, denominator), "denominator": denominator}
    for key, value in sums.items():
        if key.endswith("_sum"):
            count = sums.get(_SUM_DENOMINATORS.get(key, ""), denominator)
            out[key[: -len("_sum")]] = losses.safe_mean(value, count)
        else:
            out[key] = value
    if "nll" in out:
        out["perplexity"] = jnp.exp(jnp.minimum(out["nll"], 30.0))
        out["accuracy"] = out.pop("correct")
    if "preference_correct" in out:
        out["preference_accuracy"] = out.pop("preference_correct")
    return out


def _split_micro_batches(batch: Batch, count: int) -> Batch:
    def split(x):
        if x.ndim == 0:
            return jnp.broadcast_to(x, (count,))
        return x.reshape((count, x.shape[0] // count) + x.shape[1:])
    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: LossFn, params, batch: Batch, reference_params, micro_batches: int):
    """Sum of loss, denominator, metric sums and gradients of the loss *sum* over micro-batches."""
    grad_fn = jax.value_and_grad(lambda p, b: _sum_and_aux(loss_fn, p, b, reference_params), has_aux=True)
    if micro_batches == 1:
        (loss_sum, (denominator, sums)), grads = grad_fn(params, batch)
        return loss_sum, denominator, sums, grads

    def body(carry, micro):
        (loss_sum, (denominator, sums)), grads = grad_fn(params, micro)
        return jax.tree.map(jnp.add, carry, (loss_sum, denominator, sums, grads)), None

    first = jax.tree.map(lambda x: x[0], _split_micro_batches(batch, micro_batches))
    shapes = jax.eval_shape(lambda b: grad_fn(params, b), first)
    (loss_shape, (denominator_shape, sums_shape)), grads_shape = shapes
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_shape, denominator_shape, sums_shape, grads_shape))
    totals, _ = jax.lax.scan(body, zeros, _split_micro_batches(batch, micro_batches))
    return totals


def _sum_and_aux(loss_fn: LossFn, params, batch, reference_params):
    loss_sum, denominator, sums = loss_fn(params, batch, reference_params)
    return loss_sum, (denominator, sums)


def train_step(state: TrainState, batch: Batch, reference_params=None, loss_limit=jnp.inf, *,
               loss_fn: LossFn, optimizer: optax.GradientTransformation, micro_batches: int = 1):
    """One update. Skips (keeps params and optimizer state) when the loss or gradient norm is
    non-finite or the loss exceeds `loss_limit`; the step counter always advances, so the data
    order stays a function of the step."""
    totals = accumulate_gradients(loss_fn, state.params, batch, reference_params, micro_batches)
    return apply_gradients(state, totals, loss_limit, optimizer=optimizer)


def apply_gradients(state: TrainState, totals, loss_limit=jnp.inf, *, optimizer: optax.GradientTransformation):
    """The update from `accumulate_gradients`' (loss sum, denominator, metric sums, gradient sums), or from a
    list of them (row groups: summed in order first): the metrics (`summarize`) and `update_state`."""
    loss_sum, denominator, sums, grads = sum_parts(totals) if isinstance(totals, list) else totals
    new_state, update_metrics = update_state(state, grads, loss_sum, denominator, loss_limit, optimizer=optimizer)
    return new_state, {**summarize(loss_sum, denominator, sums), **update_metrics}


def sum_parts(parts: list) -> Any:
    """The elementwise sum of equally structured trees, in list order (row groups' partial sums)."""
    return functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), parts)


def update_state(state: TrainState, grads, loss_sum: jax.Array, denominator: jax.Array, loss_limit=jnp.inf, *,
                 optimizer: optax.GradientTransformation) -> tuple[TrainState, Metrics]:
    """The optimizer step on the gradient sums divided once by the denominator, skipped (params and optimizer
    state kept) when the loss (loss_sum / denominator) or the gradient norm is non-finite or the loss exceeds
    `loss_limit` (see `train_step`). Each input may be a list of row groups' parts (summed in order first).
    Metrics: grad_norm, skipped, nonfinite_update."""
    candidate, ok, metrics = propose_update(state, grads, loss_sum, denominator, loss_limit, optimizer=optimizer)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    return state.replace(step=candidate.step, params=keep(candidate.params, state.params),
                         opt_state=keep(candidate.opt_state, state.opt_state)), metrics


def propose_update(state: TrainState, grads, loss_sum: jax.Array, denominator: jax.Array, loss_limit=jnp.inf, *,
                   optimizer: optax.GradientTransformation) -> tuple[TrainState, jax.Array, Metrics]:
    """`update_state` before its skip: (the updated state, ok: [] bool, whether to keep it, metrics). Keeping the
    old params and optimizer state where not ok is the caller's (a select over the whole state inside the program
    costs a second pass over it: on CPU the row-grouped step decides on the host)."""
    grads, loss_sum, denominator = (sum_parts(x) if isinstance(x, list) else x for x in (grads, loss_sum, denominator))
    grads = jax.tree.map(lambda g: g / jnp.maximum(denominator, 1e-9), grads)
    loss = losses.safe_mean(loss_sum, denominator)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # The updated params must be finite too: a non-finite learning rate or optimizer setting turns a finite
    # gradient into a non-finite update, which must be skipped (and blamed on the update, not the data).
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)]))
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (loss <= loss_limit) & params_finite
    candidate = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state)
    return candidate, ok, {"grad_norm": grad_norm, "skipped": 1.0 - ok.astype(jnp.float32),
                           "nonfinite_update": 1.0 - params_finite.astype(jnp.float32)}


def eval_step(params, batch: Batch, reference_params=None, *, loss_fn: LossFn) -> Metrics:
    """Loss and metrics of one batch without an update (sums kept for exact averaging over batches)."""
    loss_sum, denominator, sums = loss_fn(params, batch, reference_params)
    return {"loss_sum": loss_sum, "denominator": denominator, **sums}


def summarize_eval(results: list[Metrics]) -> dict[str, float]:
    """Combines eval_step outputs of several batches exactly (sums first, then means)."""
    totals = jax.tree.map(lambda *x: sum(float(v) for v in x), *results)
    loss_sum, denominator = totals.pop("loss_sum"), totals.pop("denominator")
    return {k: float(v) for k, v in summarize(jnp.asarray(loss_sum), jnp.asarray(denominator),
                                              {k: jnp.asarray(v) for k, v in totals.items()}).items()}


# ----------------------------------------------------------------------------------------------
# Named steps for the Python API: each is `(state, batch[, ref_params]) -> (state, metrics)` once
# the static parts are bound with functools.partial (or built by `build_train_step`).


def pretrain_step(state, batch, *, graphdef, optimizer, z_loss: float = 0.0, micro_batches: int = 1,
                  loss_chunk_size: int = 0):
    loss_fn = functools.partial(lm_loss, graphdef, z_loss=z_loss, loss_chunk_size=loss_chunk_size)
    return train_step(state, batch, loss_fn=loss_fn, optimizer=optimizer, micro_batches=micro_batches)


sft_step = pretrain_step  # the same loss: the SFT batch's loss_mask selects the answer tokens


def next_token_loss(config: Config, graphdef) -> LossFn:
    """`lm_loss` with the config's z-loss and fused-loss chunk size bound (pretraining and SFT)."""
    return functools.partial(lm_loss, graphdef, z_loss=config.train.z_loss, loss_chunk_size=config.model.loss_chunk_size)


def build_train_step(config: Config, graphdef, optimizer, loss_fn: LossFn | None = None):
    """The (unjitted) step (state, batch, reference_params, loss_limit) of `loss_fn`, by default the
    next-token loss (pretraining, SFT); other stages pass theirs (`jaxllm.stages.build_train_step(config,
    ...)` does it for the configured stage). With LoRA (model.lora_rank > 0) state.params are the
    adapters and reference_params the frozen base."""
    return functools.partial(train_step, loss_fn=build_train_loss(config, graphdef, loss_fn), optimizer=optimizer,
                             micro_batches=config.train.grad_accum_steps)


def build_train_loss(config: Config, graphdef, loss_fn: LossFn | None = None) -> LossFn:
    """The loss the train step differentiates: `loss_fn` (default the next-token loss), on the LoRA adapters
    when model.lora_rank > 0."""
    return _maybe_lora(config, loss_fn or next_token_loss(config, graphdef))


def build_eval_step(config: Config, graphdef, loss_fn: LossFn | None = None):
    return functools.partial(eval_step, loss_fn=_maybe_lora(config, loss_fn or next_token_loss(config, graphdef)))


def _maybe_lora(config: Config, loss_fn: LossFn) -> LossFn:
    if not config.model.lora_rank:
        return loss_fn

    return lora.adapter_loss(loss_fn)
