"""`jaxllm score`: a reward model scores (prompt, answer) pairs of a file."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from jaxllm import generate as generate_lib
from jaxllm import model as model_lib
from jaxllm.config import Config
from jaxllm.data.chat import prompt_messages, render_chat
from jaxllm.data.sources import iter_records
from jaxllm.errors import UsageError
from jaxllm.rl.rewards import sequence_scores_jit


# ----------------------------------------------------------------------------------------------
# Scoring (prompt, answer) pairs with a reward model: `jaxllm score`.


def score_rows(config: Config, graphdef, params, rows: Sequence[tuple[list[int], list[int]]],
               batch_size: int = 16) -> np.ndarray:
    """Reward-head scores [N] of (ids, loss_mask) rows (a rendered conversation whose mask marks the
    answer + EOS). Rows longer than model.max_seq_len keep their last max_seq_len tokens."""
    if model_lib.HEADS_KEY not in params or "reward" not in params[model_lib.HEADS_KEY]:
        raise UsageError(f"the checkpoint has no reward head (its stage is '{config.train.stage}'); score with a "
                         "reward model trained with train.stage=reward")
    mesh = generate_lib.mesh_of(params)
    limit = config.model.max_seq_len
    rows = [(ids[-limit:], mask[-limit:]) for ids, mask in rows]
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = generate_lib.bucket(max(len(ids) for ids, _ in chunk))
        tokens = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        segments = np.zeros((batch_size, width), np.int32)
        for row, (ids, row_mask) in enumerate(chunk):
            tokens[row, :len(ids)], mask[row, :len(ids)], segments[row, :len(ids)] = ids, row_mask, 1
        positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape).copy()
        arrays = [generate_lib.place_rows(a, mesh) for a in (tokens, positions, segments, mask)]
        with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
            out.append(np.asarray(jax.device_get(sequence_scores_jit(graphdef, params, *arrays)))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


_ANSWER_FIELDS = ("response", "answer", "completion")


def _score_record_rows(record: Any, where: str, tokenizer) -> tuple[list[str], list[tuple[list[int], list[int]]]]:
    """A record -> (names of the scores it gets, rendered rows)."""
    if not isinstance(record, dict):
        raise UsageError(f"{where}: a record must be a JSON object")
    messages = prompt_messages(record, where)  # a DataError (exit 2) names the record and the field
    if "chosen" in record and "rejected" in record:
        names, answers = ["chosen_score", "rejected_score"], [record["chosen"], record["rejected"]]
    else:
        field = next((f for f in _ANSWER_FIELDS if f in record), None)
        if field is None:
            raise UsageError(f"{where}: a record needs an answer to score: one of {', '.join(_ANSWER_FIELDS)}, "
                             "or 'chosen' and 'rejected'")
        names, answers = ["score"], [record[field]]
    rows = []
    for answer in answers:
        if not isinstance(answer, str):
            raise UsageError(f"{where}: answers must be strings, got {type(answer).__name__}")
        rows.append(render_chat(messages + [{"role": "assistant", "content": answer}], tokenizer))
    return names, rows


def score_file(checkpoint: str, input_path: str | Path, batch_size: int = 16) -> tuple[list[dict], list[float]]:
    """Scores a .jsonl file's records with the reward model in `checkpoint` (a train.stage=reward workdir):
    {prompt|messages, response|answer|completion} records get 'score', {prompt, chosen, rejected} ones get
    chosen_score/rejected_score. Returns (the scored records, every score in order)."""
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    path = Path(input_path)
    if not path.is_file():
        raise UsageError(f"input file {path} does not exist")
    records = [(record.where, record.data) for record in iter_records(f"jsonl:{path}")]
    if not records:
        raise UsageError(f"input file {path} has no records")
    config, graphdef, params, tokenizer = generate_lib.load_model_for_inference(checkpoint)
    if "reward" not in params.get(model_lib.HEADS_KEY, {}):
        raise UsageError(f"{checkpoint} is not a reward model (its stage is '{config.train.stage}'); train one "
                         "with `jaxllm train configs/reward_tiny.yaml`")
    layout, rows = [], []
    for where, record in records:
        names, record_rows = _score_record_rows(record, where, tokenizer)
        layout.append(names)
        rows.extend(record_rows)
    scores = score_rows(config, graphdef, params, rows, batch_size).tolist()
    output, position = [], 0
    for (_, record), names in zip(records, layout):
        scored = dict(record)
        for name in names:
            scored[name] = scores[position]
            position += 1
        output.append(scored)
    return output, scores
