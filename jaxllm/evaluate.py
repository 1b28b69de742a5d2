"""Evaluation of a trained model: perplexity, QA exact match and EOS rate from generation,
preference accuracy from sequence log-probs. The pipeline runs these after every stage.

All functions take (config, graphdef, params, tokenizer) as returned by
`jaxllm.generate.load_model_for_inference(workdir)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import numpy as np

from jaxllm import steps as steps_lib
from jaxllm.config import Config


def _with(config: Config, **sections: dict[str, Any]) -> Config:
    """A copy of the config with some fields of some sections replaced."""
    replaced = {name: dataclasses.replace(getattr(config, name), **fields) for name, fields in sections.items()}
    return dataclasses.replace(config, **replaced)


@functools.lru_cache(maxsize=8)
def _jitted_loss(graphdef, stage: str, z_loss: float):
    if stage in ("pretrain", "sft"):
        loss_fn = functools.partial(steps_lib.lm_loss, graphdef, z_loss=z_loss)
    else:
        raise ValueError(stage)
    return jax.jit(functools.partial(steps_lib.eval_step, loss_fn=loss_fn))


def perplexity(config: Config, graphdef, params, tokenizer, source: str, num_batches: int = 8,
               batch_size: int = 16) -> dict[str, float]:
    """Next-token loss, perplexity and bits per byte of held-out text `source` (every token counted)."""
    from jaxllm.data.pipeline import build_rows

    eval_config = _with(config, train={"stage": "pretrain", "batch_size": batch_size},
                        data={"source": source, "eval_source": source})
    rows = build_rows(eval_config, tokenizer, "eval", stage="pretrain", source=source)
    step = _jitted_loss(graphdef, "pretrain", 0.0)
    results, text_bytes = [], 0
    count = min(num_batches, -(-rows.num_rows // batch_size))
    for index in range(count):
        indices = np.arange(index * batch_size, min((index + 1) * batch_size, rows.num_rows))
        batch = rows.batch(indices)
        batch = {k: v for k, v in batch.items() if k in ("tokens", "positions", "segment_ids", "loss_mask")}
        results.append(jax.device_get(step(params, batch)))
        weights = np.asarray(steps_lib.losses.target_weights(batch["loss_mask"], batch["segment_ids"]))
        counted = batch["tokens"][weights > 0]
        text_bytes += sum(len(tokenizer.piece_bytes(int(t))) if hasattr(tokenizer, "piece_bytes")
                          else len(tokenizer.decode([int(t)]).encode()) for t in counted)
    summary = steps_lib.summarize_eval(results)
    nats = summary["loss"] * summary["denominator"]
    return {"loss": summary["loss"], "perplexity": summary["perplexity"], "tokens": summary["denominator"],
            "bits_per_byte": nats / math.log(2) / max(text_bytes, 1)}


def answer_questions(config: Config, graphdef, params, tokenizer, questions: Sequence[str],
                     max_new_tokens: int = 32, batch_size: int = 64, **sampling: Any) -> list[dict[str, Any]]:
    """Greedy answers to single-turn questions with the chat template: [{"answer", "ended_with_eos", "tokens"}]."""
    from jaxllm.data.chat import prompt_ids
    from jaxllm.generate import SamplingSettings, generate

    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=sampling.pop("temperature", 0.0),
                                stop_ids=(tokenizer.eos_id,), **sampling)
    prompts = [prompt_ids([{"role": "user", "content": q}], tokenizer) for q in questions]
    room = config.model.max_seq_len - max_new_tokens
    prompts = [p[-room:] for p in prompts]
    answers: list[dict[str, Any]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        out = generate(config.model, graphdef, params, chunk, settings, rng=start)
        for row in range(len(chunk)):
            ids = out.completion(row)
            answers.append({"answer": tokenizer.decode(ids), "ended_with_eos": bool(out.finished[row]),
                            "tokens": int(out.lengths[row])})
    return answers


def qa_accuracy(config: Config, graphdef, params, tokenizer, records: Sequence[dict], max_new_tokens: int = 32
                ) -> dict[str, Any]:
    """Exact match of greedy answers against `reference`, the fraction ending with EOS, mean length."""
    from jaxllm.data.biographies import exact_match

    answers = answer_questions(config, graphdef, params, tokenizer, [r["prompt"] for r in records], max_new_tokens)
    correct = [exact_match(a["answer"], r["reference"]) for a, r in zip(answers, records)]
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
    from jaxllm.data.pipeline import build_rows

    eval_config = _with(config, train={"stage": "dpo", "batch_size": batch_size},
                        data={"source": source, "eval_source": source})
    rows = build_rows(eval_config, tokenizer, "eval", stage="dpo", source=source)
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
    from jaxllm.data.sources import read_records as read

    records = []
    for record in read(source):
        records.append(dict(getattr(record, "data", record)))
        if limit is not None and len(records) >= limit:
            break
    return records
