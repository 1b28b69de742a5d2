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

Modules: `scoring` (EvalModel, score_continuations, score_documents, generate_completions), `runner` (the task
kinds' runners, run_task, the results table, configure_tasks); this package holds the functions the pipeline
calls after every stage (perplexity, answer_questions, qa_accuracy, preference_accuracy, read_records).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from jaxllm import row_groups
from jaxllm import steps as steps_lib
from jaxllm.config import Config
from jaxllm.data.chat import prompt_ids as chat_prompt_ids
from jaxllm.data.pipeline import build_rows
from jaxllm.data.sources import read_records as read_source_records
from jaxllm.evaluate.runner import RunSettings, run_task
from jaxllm.evaluate.scoring import EvalModel, generate_completions
from jaxllm.generate import SamplingSettings, mesh_of
from jaxllm.tasks import Task
from jaxllm.tasks.metrics import exact_match


# ----------------------------------------------------------------------------------------------
# The pipeline's evaluation (signatures kept: pipeline.py and lecture/knowledge_experiment.py call these)


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


_sequence_logprobs = jax.jit(steps_lib.sequence_logprobs, static_argnums=0)


def preference_accuracy(config: Config, graphdef, params, tokenizer, source: str, max_pairs: int = 128,
                        batch_size: int = 32) -> dict[str, float]:
    """How often the model gives the chosen answer a higher log-probability than the rejected one."""
    eval_config = _with(config, train={"stage": "dpo", "batch_size": batch_size},
                        data={"source": source, "eval_source": source})
    rows = build_rows(eval_config, tokenizer, "eval", data_format="pairs", stage="dpo", source=source)
    total = min(max_pairs, rows.num_rows)
    batches = []
    for start in range(0, total, batch_size):
        indices = np.arange(start, min(start + batch_size, total))
        # A short last batch repeats its last pair up to the full size: one compiled shape for every batch.
        batches.append((rows.batch(np.pad(indices, (0, batch_size - len(indices)), mode="edge")), len(indices)))
    sides = ("chosen", "rejected")

    def score(call: int) -> np.ndarray:  # call 2k: batch k's chosen answers, 2k + 1: its rejected ones
        (batch, count), side = batches[call // 2], sides[call % 2]
        return np.asarray(_sequence_logprobs(graphdef, params, *(
            batch[f"{side}_{f}"] for f in ("tokens", "positions", "segment_ids", "loss_mask"))))[:count]

    mesh = mesh_of(params)  # the calls are independent: side by side on the host's cores (CPU)
    scores = list(row_groups.map_on_threads(score, 2 * len(batches), row_groups.host_workers(mesh), mesh))
    chosen, rejected = np.concatenate(scores[0::2]), np.concatenate(scores[1::2])
    return {"preference_accuracy": float(np.mean(chosen > rejected)),
            "logprob_margin": float(np.mean(chosen - rejected)), "pairs": total}


def read_records(source: str, limit: int | None = None) -> list[dict]:
    """Raw records of a data source (e.g. `default:qa_eval`) as dicts."""
    records = []
    for record in read_source_records(source):
        records.append(dict(getattr(record, "data", record)))
        if limit is not None and len(records) >= limit:
            break
    return records
