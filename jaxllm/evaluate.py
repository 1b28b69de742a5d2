"""Evaluation of a trained model: `jaxllm eval`, the scoring and generation it is built on, and the
functions the pipeline calls after every stage.

    jaxllm eval --checkpoint runs/sft --task heldout_text --task bio_qa --task bio_mc --out results.json

Two primitives do all the work, both batched and, under a mesh, sharded like training (batch rows over
the data and fsdp axes, the model by its logical axes):
- `score_continuations(model_config, graphdef, params, [(context_ids, continuation_ids), ...])` -> the
  summed log-probability of each continuation given its context, whether greedy decoding would produce
  it, and its token count. Rows are right-padded; pad slots have segment id 0, so no real token
  attends to them and they carry no weight. Long rows keep the continuation and lose the start of
  the context. The lm head runs over blocks of positions, so no [B, T, V] logits exist at once.
- `jaxllm.generate.generate` (KV cache, the generation module's decoding rules) for answers.

Task kinds (definitions in `jaxllm.tasks`):
- perplexity: each document is BOS + text + EOS, scored in windows of model.max_seq_len (every token
  predicted once, each with as much context as fits). Reports loss (nats per token), perplexity and
  bits per byte = total nats / ln 2 / UTF-8 bytes of the text, which compares models whose tokenizers differ.
- multiple_choice: the log-likelihood of each choice after the prompt; `acc` picks the highest sum,
  `acc_norm` the highest per UTF-8 byte of the choice text (lm-evaluation-harness's acc_norm).
- generate: greedy (or sampled) answers, scored by exact_match / contains / regex (jaxllm.tasks.metrics).
- pairwise: the model's answers against a baseline's (another checkpoint, or answers in the records),
  graded by a judge checkpoint that is asked twice per prompt with the answers in both orders; the judge's
  choice is whichever of the replies "A" / "B" it finds more likely. Win = preferred in both orders, tie =
  the judge followed the position; win rate counts ties as one half.

Outputs: a summary table on stdout; with `--out results.json` the summary as JSON and one JSONL of
per-example results per task beside it (`results.<task>.jsonl`, or in `--samples-dir`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import losses
from jaxllm import model as model_lib
from jaxllm import sharding as sharding_lib
from jaxllm import steps as steps_lib
from jaxllm.config import Config, ModelConfig
from jaxllm.data.chat import answer_ids, prompt_ids as chat_prompt_ids
from jaxllm.data.pipeline import build_rows
from jaxllm.data.sources import read_records as read_source_records
from jaxllm.errors import UsageError
from jaxllm.generate import SamplingSettings, bucket, generate, host_rows, load_model_for_inference, mesh_of
from jaxllm.tasks import CANONICAL_FIELDS, Task, get_task, is_registered, with_overrides
from jaxllm.tasks.metrics import cut_at_stop, exact_match, mean_and_stderr, pairwise_outcome, score_generation, win_rate

LOGITS_BLOCK_BYTES = 256 << 20  # float32 logits per scoring block, at most


# ----------------------------------------------------------------------------------------------
# The model under evaluation


@dataclasses.dataclass
class EvalModel:
    """A model ready for evaluation: what `generate.load_model_for_inference` returns, plus its mesh."""

    config: Config
    graphdef: Any
    params: Any
    tokenizer: Any
    name: str = ""
    mesh: jax.sharding.Mesh | None = None  # default: the mesh the params live on (None: one device)

    def __post_init__(self):
        if self.mesh is None:
            self.mesh = mesh_of(self.params)

    @classmethod
    def load(cls, workdir: str | Path, mesh: jax.sharding.Mesh | None = None) -> "EvalModel":
        config, graphdef, params, tokenizer = load_model_for_inference(workdir, mesh)
        return cls(config, graphdef, params, tokenizer, str(workdir))

    @property
    def max_len(self) -> int:
        return self.config.model.max_seq_len


def _mesh_context(mesh):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool, unit: str = "ex") -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
    try:
        yield bar
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------
# Log-likelihood scoring


@dataclasses.dataclass
class Scores:
    """Per request: logprob [N] float64 summed log p (nats) of the continuation tokens; greedy [N] bool
    every continuation token is the model's argmax; tokens [N] int continuation tokens scored."""

    logprob: np.ndarray
    greedy: np.ndarray
    tokens: np.ndarray


def _logits_block(rows: int, positions: int, vocab: int) -> int:
    """Positions per lm-head block so that [rows, block, vocab] float32 logits stay under LOGITS_BLOCK_BYTES."""
    return max(1, min(positions, LOGITS_BLOCK_BYTES // (4 * rows * vocab)))


@functools.partial(jax.jit, static_argnames=("graphdef", "block"))
def _score_batch(graphdef, params, tokens, segment_ids, loss_mask, *, block: int):
    """tokens/segment_ids/loss_mask [B,T] (right-padded rows) -> per row: summed log p of the masked
    tokens [B] float32, all of them greedy [B] bool, their count [B] float32."""
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], tokens.shape)
    hidden = model_lib.apply_hidden(graphdef, params, tokens, positions, segment_ids)[:, :-1]  # t predicts t+1
    unembedding = model_lib.unembedding(graphdef, params).astype(hidden.dtype)
    targets = tokens[:, 1:]
    weights = losses.target_weights(loss_mask, segment_ids)[:, 1:]
    count = length - 1
    padded = -count % block
    hidden = jnp.pad(hidden, ((0, 0), (0, padded), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, padded)))
    blocks = (count + padded) // block

    def to_blocks(x):  # [B, n*C, ...] -> [n, B, C, ...]
        return jnp.swapaxes(x.reshape(batch, blocks, block, *x.shape[2:]), 0, 1)

    def score_block(_, inputs):
        h, target = inputs
        logits = jnp.einsum("bcd,dv->bcv", h, unembedding, preferred_element_type=jnp.float32)
        picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        return None, (picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == target)

    _, (logprobs, greedy) = jax.lax.scan(score_block, None, (to_blocks(hidden), to_blocks(targets)))
    logprobs = jnp.swapaxes(logprobs, 0, 1).reshape(batch, -1)[:, :count]
    greedy = jnp.swapaxes(greedy, 0, 1).reshape(batch, -1)[:, :count]
    return (jnp.sum(logprobs * weights, axis=1), jnp.all(greedy | (weights == 0), axis=1),
            jnp.sum(weights, axis=1))


def _fit_request(number: int, context: Sequence[int], continuation: Sequence[int],
                 max_len: int) -> tuple[list[int], int]:
    context, continuation = [int(t) for t in context], [int(t) for t in continuation]
    if not continuation:
        raise UsageError(f"scoring request {number} has an empty continuation: there is nothing to score")
    if not context:
        raise UsageError(f"scoring request {number} has an empty context: start it with BOS (nothing predicts "
                         "the first token)")
    if len(continuation) > max_len - 1:
        raise UsageError(f"scoring request {number}: the continuation has {len(continuation)} tokens but at most "
                         f"model.max_seq_len - 1 = {max_len - 1} fit with one token of context")
    return (context + continuation)[-max_len:], len(continuation)


def score_continuations(model_config: ModelConfig, graphdef, params,
                        requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 16,
                        mesh: jax.sharding.Mesh | None = None, pad_id: int = 0, progress: bool = False,
                        desc: str = "scoring") -> Scores:
    """log p(continuation | context) for token-id pairs, in batches of `batch_size` rows.

    Rows are sorted by length so a batch pads little, widths are bucketed (a few compilations serve
    any request set), and the results come back in request order. `mesh`: default the params' mesh;
    the batch (rounded up to a multiple of the data-parallel size) is split over (data, fsdp)."""
    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} must be at least 1")
    rows = [_fit_request(n, context, continuation, model_config.max_seq_len)
            for n, (context, continuation) in enumerate(requests)]
    total = len(rows)
    logprob, greedy, tokens = np.zeros(total, np.float64), np.zeros(total, bool), np.zeros(total, np.int64)
    mesh = mesh if mesh is not None else mesh_of(params)
    multiple = sharding_lib.data_parallel_size(mesh) if mesh is not None else 1
    per_batch = -(-batch_size // multiple) * multiple
    order = sorted(range(total), key=lambda i: -len(rows[i][0]))
    with _progress(total, desc, progress, "seq") as bar, _mesh_context(mesh):
        for start in range(0, total, per_batch):
            chosen = order[start:start + per_batch]
            width = min(bucket(len(rows[chosen[0]][0])), model_config.max_seq_len)
            batch = {"tokens": np.full((per_batch, width), pad_id, np.int32),
                     "segment_ids": np.zeros((per_batch, width), np.int32),
                     "loss_mask": np.zeros((per_batch, width), np.float32)}
            for slot, index in enumerate(chosen):
                ids, scored = rows[index]
                batch["tokens"][slot, :len(ids)] = ids
                batch["segment_ids"][slot, :len(ids)] = 1
                batch["loss_mask"][slot, len(ids) - scored:len(ids)] = 1.0
            placed = sharding_lib.place_batch(batch, mesh) if mesh is not None else batch
            out = _score_batch(graphdef, params, placed["tokens"], placed["segment_ids"], placed["loss_mask"],
                               block=_logits_block(per_batch, width - 1, model_config.vocab_size))
            sums, all_greedy, counts = (host_rows(x, mesh) for x in out)
            for slot, index in enumerate(chosen):
                logprob[index], greedy[index], tokens[index] = sums[slot], all_greedy[slot], counts[slot]
            if bar is not None:
                bar.update(len(chosen))
    return Scores(logprob, greedy, tokens)


def rolling_requests(ids: Sequence[int], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that predict every token of `ids` after the first exactly once,
    each window at most max_len tokens long with as much context as fits (lm-evaluation-harness's
    rolling log-likelihood)."""
    ids = [int(t) for t in ids]
    windows, start = [], 1
    while start < len(ids):
        stop = min(start + max_len - 1, len(ids))
        windows.append((ids[max(0, stop - max_len):start], ids[start:stop]))
        start = stop
    return windows


def score_documents(model_config: ModelConfig, graphdef, params, documents: Sequence[Sequence[int]],
                    **kwargs: Any) -> Scores:
    """Log-likelihood of whole token sequences (every token after the first; BOS first by convention),
    any length: windows of model.max_seq_len, summed per document. Keyword arguments as score_continuations."""
    requests, owner = [], []
    for number, ids in enumerate(documents):
        if len(ids) < 2:
            raise UsageError(f"document {number} has {len(ids)} token(s); scoring needs at least 2 (e.g. BOS + text)")
        windows = rolling_requests(ids, model_config.max_seq_len)
        requests.extend(windows)
        owner.extend([number] * len(windows))
    scores = score_continuations(model_config, graphdef, params, requests, **kwargs)
    owner = np.asarray(owner, np.int64)
    count = len(documents)
    greedy = np.ones(count, bool)
    np.logical_and.at(greedy, owner, scores.greedy)
    return Scores(np.bincount(owner, scores.logprob, count), greedy,
                  np.bincount(owner, scores.tokens, count).astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Generation


def generate_completions(model: EvalModel, prompts: Sequence[Sequence[int]], settings, *, batch_size: int = 16,
                         seed: int = 0, progress: bool = False, desc: str = "generating") -> list[dict[str, Any]]:
    """Answers to token-id prompts in batches: [{"ids", "text", "finished", "tokens"}] in prompt order.
    A prompt longer than max_seq_len - max_new_tokens keeps its end."""
    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} must be at least 1")
    room = model.max_len - settings.max_new_tokens
    if room < 1:
        raise UsageError(f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in "
                         f"model.max_seq_len={model.max_len}")
    prompts = [list(p)[-room:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[dict[str, Any]] = [{} for _ in prompts]
    pad_id = model.tokenizer.pad_id if model.tokenizer is not None else 0
    with _progress(len(prompts), desc, progress) as bar:
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            output = generate(model.config.model, model.graphdef, model.params, [prompts[i] for i in chosen],
                              settings, jax.random.fold_in(jax.random.key(seed), start), pad_id=pad_id,
                              mesh=model.mesh)
            for row, index in enumerate(chosen):
                ids = output.completion(row)
                text = model.tokenizer.decode(ids) if model.tokenizer is not None else ""
                results[index] = {"ids": ids, "text": text, "finished": bool(output.finished[row]),
                                  "tokens": int(output.lengths[row])}
            if bar is not None:
                bar.update(len(chosen))
    return results


def greedy_settings(tokenizer, max_new_tokens: int, chat: bool):
    """Greedy decoding that stops at EOS (and, in chat, where the model would open the next user turn)."""
    stops = (tokenizer.eos_id, tokenizer.user_id) if chat else (tokenizer.eos_id,)
    return SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=stops)


# ----------------------------------------------------------------------------------------------
# Prompts of a task


def _encode_plain(tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_id, *tokenizer.encode(text)]


def _reference(task, example) -> str:
    """The solved answer a few-shot example shows."""
    if task.kind == "multiple_choice":
        return example.choices[example.answer]
    if task.kind == "generate":
        return example.answer[0]
    return example.values.get("baseline") or ""


def prompt_ids(task, example, shots: Sequence, tokenizer) -> list[int]:
    """Token ids of the prompt: the few-shot examples, then the example's prompt (chat: as turns, ending
    with the assistant marker; plain: BOS + text)."""
    if task.chat:
        messages: list[dict[str, str]] = []
        for shot in shots:
            messages += [{"role": "user", "content": task.prompt_text(shot)},
                         {"role": "assistant", "content": _reference(task, shot)}]
        if "messages" in example.values:
            messages += example.values["messages"]
        else:
            messages.append({"role": "user", "content": task.prompt_text(example)})
        return chat_prompt_ids(messages, tokenizer)
    prefix = "".join(task.prompt_text(shot) + task.choice_prefix + _reference(task, shot) + task.fewshot_separator
                     for shot in shots)
    return _encode_plain(tokenizer, prefix + task.prompt_text(example))


def _answer_ids(task, text: str, tokenizer) -> list[int]:
    """A choice as the continuation of the prompt (chat: the answer then EOS)."""
    return answer_ids(text, tokenizer) if task.chat else tokenizer.encode(task.choice_prefix + text)


# ----------------------------------------------------------------------------------------------
# Running tasks


@dataclasses.dataclass
class TaskResult:
    name: str
    kind: str
    metrics: dict[str, float]
    samples: list[dict[str, Any]]
    seconds: float

    @property
    def examples(self) -> int:
        return len(self.samples)

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "examples": self.examples, "metrics": self.metrics, "seconds": self.seconds,
                "examples_per_second": self.examples / max(self.seconds, 1e-9)}


@dataclasses.dataclass
class RunSettings:
    """How tasks run: batch size, progress bars, decoding for generative tasks, pairwise models."""

    batch_size: int = 16
    progress: bool = False
    sampling: Any = None  # a SamplingSettings for generate/pairwise (None: greedy); max_new_tokens is the task's
    seed: int = 0
    judge: EvalModel | None = None  # pairwise: None = the evaluated model judges
    baseline: EvalModel | None = None  # pairwise: None = the records' baseline answers


def _sampling(task, tokenizer, settings: RunSettings):
    if settings.sampling is None:
        return greedy_settings(tokenizer, task.max_new_tokens, task.chat)
    stops = tuple(settings.sampling.stop_ids)
    if task.chat and tokenizer.user_id not in stops:
        stops += (tokenizer.user_id,)
    return dataclasses.replace(settings.sampling, max_new_tokens=task.max_new_tokens, stop_ids=stops)


def _shots(task, examples) -> list[list]:
    pool = task.fewshot_pool(examples)
    return [task.fewshot(example, pool) if task.num_fewshot else [] for example in examples]


def run_perplexity(model: EvalModel, task, examples, settings: RunSettings) -> tuple[dict, list[dict]]:
    tokenizer = model.tokenizer
    kept = [example for example in examples if example.text.strip()]
    encoded = tokenizer.encode_batch([example.text for example in kept], num_threads=1)
    documents = [[tokenizer.bos_id, *ids, tokenizer.eos_id] for ids in encoded]
    scores = score_documents(model.config.model, model.graphdef, model.params, documents,
                             batch_size=settings.batch_size, mesh=model.mesh, pad_id=tokenizer.pad_id,
                             progress=settings.progress, desc=task.name)
    text_bytes = [len(example.text.encode("utf-8")) for example in kept]
    nats, tokens, total_bytes = -float(np.sum(scores.logprob)), int(np.sum(scores.tokens)), sum(text_bytes)
    loss = nats / max(tokens, 1)
    metrics = {"bits_per_byte": nats / math.log(2) / max(total_bytes, 1), "perplexity": math.exp(min(loss, 30.0)),
               "loss": loss, "tokens": tokens, "bytes": total_bytes}
    if len(kept) < len(examples):
        metrics["empty_documents_skipped"] = len(examples) - len(kept)
    samples = [{"where": example.where, "tokens": int(count), "bytes": size, "nats": -float(logprob),
                "bits_per_byte": -float(logprob) / math.log(2) / max(size, 1)}
               for example, count, size, logprob in zip(kept, scores.tokens, text_bytes, scores.logprob)]
    return metrics, samples


def run_multiple_choice(model: EvalModel, task, examples, settings: RunSettings) -> tuple[dict, list[dict]]:
    tokenizer = model.tokenizer
    requests, spans = [], []
    for example, shots in zip(examples, _shots(task, examples)):
        context = prompt_ids(task, example, shots, tokenizer)
        spans.append((len(requests), len(example.choices)))
        requests.extend((context, _answer_ids(task, choice, tokenizer)) for choice in example.choices)
    scores = score_continuations(model.config.model, model.graphdef, model.params, requests,
                                 batch_size=settings.batch_size, mesh=model.mesh, pad_id=tokenizer.pad_id,
                                 progress=settings.progress, desc=task.name)
    samples, correct, correct_norm = [], [], []
    for example, (start, count) in zip(examples, spans):
        logprobs = scores.logprob[start:start + count]
        sizes = np.asarray([max(len(((task.choice_prefix if not task.chat else "") + c).encode("utf-8")), 1)
                            for c in example.choices], np.float64)
        prediction, prediction_norm = int(np.argmax(logprobs)), int(np.argmax(logprobs / sizes))
        correct.append(float(prediction == example.answer))
        correct_norm.append(float(prediction_norm == example.answer))
        samples.append({"where": example.where, "question": example.question, "choices": example.choices,
                        "answer": example.answer, "logprobs": [float(x) for x in logprobs],
                        "prediction": prediction, "prediction_norm": prediction_norm,
                        "correct": bool(correct[-1]), "correct_norm": bool(correct_norm[-1])})
    acc, acc_stderr = mean_and_stderr(correct)
    acc_norm, acc_norm_stderr = mean_and_stderr(correct_norm)
    chance = float(np.mean([1.0 / len(example.choices) for example in examples]))
    return {"acc": acc, "acc_stderr": acc_stderr, "acc_norm": acc_norm, "acc_norm_stderr": acc_norm_stderr,
            "chance": chance}, samples


def run_generate(model: EvalModel, task, examples, settings: RunSettings) -> tuple[dict, list[dict]]:
    tokenizer = model.tokenizer
    prompts = [prompt_ids(task, example, shots, tokenizer) for example, shots in zip(examples, _shots(task, examples))]
    outputs = generate_completions(model, prompts, _sampling(task, tokenizer, settings), batch_size=settings.batch_size,
                                   seed=settings.seed, progress=settings.progress, desc=task.name)
    samples, correct = [], []
    for example, output in zip(examples, outputs):
        prediction = cut_at_stop(output["text"], task.stop)
        scored = score_generation(prediction, example.answer, task.metric, task.answer_regex)
        correct.append(float(scored["correct"]))
        samples.append({"where": example.where, "question": example.question, "references": example.answer,
                        "prediction": prediction, **scored, "finished": output["finished"],
                        "tokens": output["tokens"]})
    value, stderr = mean_and_stderr(correct)
    return {task.metric: value, f"{task.metric}_stderr": stderr,
            "eos_rate": float(np.mean([o["finished"] for o in outputs])) if outputs else 0.0,
            "mean_answer_tokens": float(np.mean([o["tokens"] for o in outputs])) if outputs else 0.0}, samples


def _judge_prompt(task, judge: EvalModel, question: str, answer_a: str, answer_b: str) -> list[int]:
    """The judge's chat prompt; over-long answers are judged on their beginnings."""
    room = judge.max_len - max(len(answer_ids(letter, judge.tokenizer)) for letter in "AB")
    while True:
        text = task.judge_template.format(question=question, answer_a=answer_a, answer_b=answer_b)
        ids = chat_prompt_ids([{"role": "user", "content": text}], judge.tokenizer)
        if len(ids) <= room or not (answer_a or answer_b):
            return ids[-room:]
        answer_a, answer_b = answer_a[: len(answer_a) // 2], answer_b[: len(answer_b) // 2]


def run_pairwise(model: EvalModel, task, examples, settings: RunSettings) -> tuple[dict, list[dict]]:
    try:
        task.judge_template.format(question="", answer_a="", answer_b="")
    except (KeyError, IndexError, ValueError) as error:
        raise UsageError(f"task '{task.name}': judge_template may only use {{question}}, {{answer_a}} and "
                         f"{{answer_b}} ({error!r})") from None
    judge = settings.judge or model
    all_shots = _shots(task, examples)
    answers = generate_completions(
        model, [prompt_ids(task, e, s, model.tokenizer) for e, s in zip(examples, all_shots)],
        _sampling(task, model.tokenizer, settings), batch_size=settings.batch_size, seed=settings.seed,
        progress=settings.progress, desc=f"{task.name} answers")
    if settings.baseline is not None:
        baseline = settings.baseline
        baselines = [o["text"] for o in generate_completions(
            baseline, [prompt_ids(task, e, s, baseline.tokenizer) for e, s in zip(examples, all_shots)],
            _sampling(task, baseline.tokenizer, settings), batch_size=settings.batch_size, seed=settings.seed,
            progress=settings.progress, desc=f"{task.name} baseline")]
    else:
        missing = [e.where for e in examples if e.values.get("baseline") is None]
        if missing:
            raise UsageError(f"task '{task.name}': {missing[0]} has no baseline answer (field "
                             f"'{task.fields.get('baseline', 'baseline')}'); give --baseline CHECKPOINT or map the "
                             "field with --field baseline=FIELD")
        baselines = [e.values["baseline"] for e in examples]
    letters = [answer_ids(letter, judge.tokenizer) for letter in "AB"]
    requests = []
    for example, answer, other in zip(examples, answers, baselines):
        for first, second in ((answer["text"], other), (other, answer["text"])):
            context = _judge_prompt(task, judge, example.question, first, second)
            requests += [(context, letters[0]), (context, letters[1])]
    scores = score_continuations(judge.config.model, judge.graphdef, judge.params, requests,
                                 batch_size=settings.batch_size, mesh=judge.mesh, pad_id=judge.tokenizer.pad_id,
                                 progress=settings.progress, desc=f"{task.name} judge")
    logprobs = scores.logprob.reshape(len(examples), 2, 2)  # [example, order, letter]
    picks_a = logprobs[:, :, 0] > logprobs[:, :, 1]
    outcomes, samples = [], []
    for number, (example, answer, other) in enumerate(zip(examples, answers, baselines)):
        outcome = pairwise_outcome(bool(picks_a[number, 0]), not bool(picks_a[number, 1]))
        outcomes.append(outcome)
        samples.append({"where": example.where, "question": example.question, "answer": answer["text"],
                        "baseline": other, "judge_logprobs_model_first": logprobs[number, 0].tolist(),
                        "judge_logprobs_model_second": logprobs[number, 1].tolist(), "outcome": outcome})
    metrics = win_rate(outcomes)
    metrics["judge_picks_first"] = float(np.mean(picks_a)) if len(examples) else 0.0
    return metrics, samples


RUNNERS = {"perplexity": run_perplexity, "multiple_choice": run_multiple_choice, "generate": run_generate,
           "pairwise": run_pairwise}


def run_task(model: EvalModel, task, settings: RunSettings | None = None, limit: int | None = None) -> TaskResult:
    """Evaluates one task (a jaxllm.tasks.Task) on the first `limit` examples (default: task.limit, else all)."""
    settings = settings or RunSettings()
    if model.tokenizer is None:
        raise UsageError("evaluation needs the model's tokenizer (load it with load_tokenizer=True)")
    started = time.perf_counter()
    examples = task.examples(limit or task.limit or None)
    metrics, samples = RUNNERS[task.kind](model, task, examples, settings)
    return TaskResult(task.name, task.kind, metrics, samples, time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# The pipeline's evaluation (signatures kept: pipeline.py and knowledge_experiment.py call these)


def _with(config: Config, **sections: dict[str, Any]) -> Config:
    """A copy of the config with some fields of some sections replaced."""
    replaced = {name: dataclasses.replace(getattr(config, name), **fields) for name, fields in sections.items()}
    return dataclasses.replace(config, **replaced)


def perplexity(config: Config, graphdef, params, tokenizer, source: str, num_batches: int = 8,
               batch_size: int = 16) -> dict[str, float]:
    """Next-token loss, perplexity and bits per byte of the first num_batches * batch_size documents of
    held-out text `source` (each BOS + text + EOS; every token counted)."""
    task = Task(name="text", kind="perplexity", source=source)
    result = run_task(EvalModel(config, graphdef, params, tokenizer), task, RunSettings(batch_size=batch_size),
                      limit=num_batches * batch_size)
    metrics = result.metrics
    return {"loss": metrics["loss"], "perplexity": metrics["perplexity"], "tokens": float(metrics["tokens"]),
            "bits_per_byte": metrics["bits_per_byte"]}


def answer_questions(config: Config, graphdef, params, tokenizer, questions: Sequence[str],
                     max_new_tokens: int = 32, batch_size: int = 64, **sampling: Any) -> list[dict[str, Any]]:
    """Greedy answers to single-turn questions with the chat template: [{"answer", "ended_with_eos", "tokens"}]."""
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=sampling.pop("temperature", 0.0),
                                stop_ids=(tokenizer.eos_id,), **sampling)
    prompts = [chat_prompt_ids([{"role": "user", "content": q}], tokenizer) for q in questions]
    outputs = generate_completions(EvalModel(config, graphdef, params, tokenizer), prompts, settings,
                                   batch_size=batch_size)
    return [{"answer": o["text"], "ended_with_eos": o["finished"], "tokens": o["tokens"]} for o in outputs]


def qa_accuracy(config: Config, graphdef, params, tokenizer, records: Sequence[dict], max_new_tokens: int = 32
                ) -> dict[str, Any]:
    """Exact match of greedy answers against `reference`, the fraction ending with EOS, mean length."""
    answers = answer_questions(config, graphdef, params, tokenizer, [r["prompt"] for r in records], max_new_tokens)
    correct = [exact_match(a["answer"], [r["reference"]]) for a, r in zip(answers, records)]
    return {
        "exact_match": float(np.mean(correct)) if correct else 0.0,
        "eos_rate": float(np.mean([a["ended_with_eos"] for a in answers])) if answers else 0.0,
        "mean_answer_tokens": float(np.mean([a["tokens"] for a in answers])) if answers else 0.0,
        "examples": len(records),
        "samples": [{"prompt": r["prompt"], "reference": r["reference"], **a, "correct": c}
                    for r, a, c in list(zip(records, answers, correct))[:8]],
    }


def preference_accuracy(config: Config, graphdef, params, tokenizer, source: str, max_pairs: int = 128,
                        batch_size: int = 32) -> dict[str, float]:
    """How often the model gives the chosen answer a higher log-probability than the rejected one."""
    eval_config = _with(config, train={"stage": "dpo", "batch_size": batch_size},
                        data={"source": source, "eval_source": source})
    rows = build_rows(eval_config, tokenizer, "eval", data_format="pairs", stage="dpo", source=source)
    logps = jax.jit(functools.partial(steps_lib.sequence_logprobs, graphdef))
    wins, margins = [], []
    total = min(max_pairs, rows.num_rows)
    for start in range(0, total, batch_size):
        batch = rows.batch(np.arange(start, min(start + batch_size, total)))
        sides = {}
        for side in ("chosen", "rejected"):
            sides[side] = np.asarray(logps(params, *(batch[f"{side}_{f}"] for f in
                                                     ("tokens", "positions", "segment_ids", "loss_mask"))))
        wins.extend(sides["chosen"] > sides["rejected"])
        margins.extend(sides["chosen"] - sides["rejected"])
    return {"preference_accuracy": float(np.mean(wins)), "logprob_margin": float(np.mean(margins)), "pairs": total}


def read_records(source: str, limit: int | None = None) -> list[dict]:
    """Raw records of a data source (e.g. `default:qa_eval`) as dicts."""
    records = []
    for record in read_source_records(source):
        records.append(dict(getattr(record, "data", record)))
        if limit is not None and len(records) >= limit:
            break
    return records


# ----------------------------------------------------------------------------------------------
# Tasks as asked for, results as a table


def _format_metrics(kind: str, metrics: dict[str, float]) -> str:
    shown = {"perplexity": ("bits_per_byte", "perplexity", "loss", "tokens"),
             "multiple_choice": ("acc", "acc_norm", "chance"),
             "generate": ("exact_match", "contains", "regex", "eos_rate"),
             "pairwise": ("win_rate", "wins", "ties", "losses", "judge_picks_first")}[kind]
    parts = []
    for key in shown:
        if key not in metrics:
            continue
        value = metrics[key]
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        if f"{key}_stderr" in metrics:
            text += f"±{metrics[f'{key}_stderr']:.3f}"
        parts.append(f"{key}={text}")
    return " ".join(parts)


def format_table(results: Sequence[TaskResult]) -> str:
    """The summary table: one line per task."""
    rows = [("task", "kind", "n", "metrics", "ex/s")]
    for result in results:
        rows.append((result.name, result.kind, str(result.examples), _format_metrics(result.kind, result.metrics),
                     f"{result.examples / max(result.seconds, 1e-9):.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def evaluate_checkpoint(checkpoint: str | Path, tasks: Sequence, settings: RunSettings | None = None,
                        limit: int | None = None, log=print) -> list[TaskResult]:
    """Loads a workdir's model and runs the tasks; returns their results (the CLI without the files)."""
    model = EvalModel.load(checkpoint)
    results = []
    for task in tasks:
        results.append(run_task(model, task, settings, limit))
        log(f"{task.name}: {_format_metrics(task.kind, results[-1].metrics)} ({results[-1].seconds:.1f}s)")
    return results


def configure_tasks(specs: Sequence[str], fields: dict[str, str] | None = None, template: str | None = None,
                    num_fewshot: int | None = None, fewshot_source: str | None = None, chat: bool | None = None,
                    metric: str | None = None, answer_regex: str | None = None, stop: Sequence[str] | None = None,
                    max_new_tokens: int | None = None) -> list[Task]:
    """The tasks `specs` name (registered names, task YAML files or KIND:SOURCE), with the given settings
    overriding the tasks' own (None: keep it). `fields` (canonical field -> record field) and `template`
    apply only to KIND:SOURCE and YAML tasks, whose record layout is the user's."""
    fields = dict(fields or {})
    known = {name for names in CANONICAL_FIELDS.values() for name in names}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UsageError(f"--field {unknown[0]}=...: '{unknown[0]}' is not a task field; map one of "
                         f"{', '.join(sorted(known))}")
    tasks, names, adhoc = [], set(), 0
    for spec in specs:
        task = get_task(spec)
        if not is_registered(spec):  # a KIND:SOURCE or YAML task: the record layout is the user's
            adhoc += 1
            task = with_overrides(task, fields=fields or None, template=template)
        task = with_overrides(task, num_fewshot=num_fewshot, fewshot_source=fewshot_source, chat=chat,
                              metric=metric, answer_regex=answer_regex,
                              stop=tuple(stop) if stop else None, max_new_tokens=max_new_tokens)
        if task.name in names:
            raise UsageError(f"task '{task.name}' is given twice")
        names.add(task.name)
        tasks.append(task)
    if (fields or template) and not adhoc:
        raise UsageError("--field and --template apply to KIND:SOURCE and YAML tasks (registered tasks have their own "
                         "mapping and template); give such a task or drop them")
    return tasks


def write_samples(path: str | Path, samples: Sequence[dict]) -> None:
    """One JSON line per example (a TaskResult's samples), the directory created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")


__all__ = [
    "EvalModel", "Scores", "TaskResult", "RunSettings", "score_continuations", "score_documents", "rolling_requests",
    "generate_completions", "greedy_settings", "prompt_ids", "run_task", "run_perplexity", "run_multiple_choice",
    "run_generate", "run_pairwise", "evaluate_checkpoint", "format_table", "perplexity", "answer_questions",
    "qa_accuracy", "preference_accuracy", "read_records", "configure_tasks", "write_samples",
]
