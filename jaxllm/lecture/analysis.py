"""What a model knows, and what alignment changed: `jaxllm analyze knowledge` and `jaxllm analyze shift`.

Knowledge categories (Gekhman et al. 2024, "Does Fine-Tuning LLMs on New Knowledge Encourage
Hallucinations?"). For each question with a reference answer, the model answers with few-shot
exemplars (other QA pairs as earlier chat turns) under `variants` different exemplar sets: one greedy
answer per set gives P_greedy (the fraction right), and `samples` answers per set at `temperature`
give P_sampled. Then
    HighlyKnown  P_greedy = 1            (greedy always right)
    MaybeKnown   0 < P_greedy < 1        (greedy sometimes right)
    WeaklyKnown  P_greedy = 0 < P_sampled (only sampling sometimes finds it)
    Unknown      P_greedy = P_sampled = 0
The paper finds fine-tuning on Unknown facts is learned slowly and raises hallucination, and
MaybeKnown facts help most — so the categories are also written as SFT files, one per category.

Token shift (Lin et al. 2024, URIAL, "The Unlocking Spell on Base LLMs"). The aligned model answers
greedily; at every position of its answer the base model, given the same prefix, ranks the token the
aligned model chose: rank 1 = unshifted, 2–3 = marginal, beyond = shifted. Alignment mostly shifts
style tokens (connectives, the end-of-sequence token), which the HTML page makes visible.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import html
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import model as model_lib
from jaxllm.data import DataError
from jaxllm.data.biographies import exact_match
from jaxllm.data.chat import prompt_ids, render_text
from jaxllm.data.sources import read_records
from jaxllm.errors import UsageError
from jaxllm.generate import SamplingSettings, host_rows, load_model_for_inference, mesh_of, place_rows
from jaxllm.lecture.selection import padded_batches, source_spec
from jaxllm.lecture.teacher import batched_generate, read_inputs, request_messages

CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
SHIFT_CATEGORIES = ("unshifted", "marginal", "shifted")


# ----------------------------------------------------------------------------------------------
# Knowledge categories


@dataclasses.dataclass
class KnowledgeSettings:
    shots: int = 4  # exemplars per prompt
    variants: int = 4  # exemplar sets; one greedy answer each (the paper: 10)
    samples: int = 4  # sampled answers per exemplar set (the paper: 16 at T=0.5)
    temperature: float = 0.5
    max_new_tokens: int = 24
    batch_size: int = 64
    seed: int = 0

    def validate(self) -> None:
        if self.shots < 0:
            raise UsageError(f"--shots must be 0 or more, got {self.shots}")
        for name in ("variants", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.samples < 0:
            raise UsageError(f"--samples must be 0 or more, got {self.samples}")
        if self.samples and not self.temperature > 0:
            raise UsageError(f"--temperature must be above 0 for sampling (the paper uses 0.5), got {self.temperature}")


@dataclasses.dataclass
class QA:
    index: int
    where: str
    question: str
    references: list  # any of them counts as right


def load_qa(path_or_source: str, limit: int | None = None) -> list[QA]:
    """QA records {"prompt"|"question", "reference"|"answer"} (a string or a list of accepted strings)."""
    items = []
    for record in read_records(source_spec(path_or_source, jsonl_only=True)):
        data, where = record.data, record.where
        question = next((data[f] for f in ("prompt", "question") if f in data), None)
        reference = next((data[f] for f in ("reference", "answer") if f in data), None)
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: a QA record needs a non-empty string 'prompt' (or 'question') "
                            f"(fields: {', '.join(sorted(data)) or 'none'})", "missing_field")
        references = [reference] if isinstance(reference, str) else reference
        if not isinstance(references, list) or not references or not all(isinstance(r, str) for r in references):
            raise DataError(f"{where}: a QA record needs 'reference' (or 'answer'): a string or a list of strings "
                            f"(fields: {', '.join(sorted(data)) or 'none'})", "missing_field")
        items.append(QA(len(items), where, question, references))
        if limit is not None and len(items) >= limit:
            break
    return items


def categorize(p_greedy: float, p_sampled: float) -> str:
    """Gekhman et al.'s four categories from the fraction of greedy and of sampled answers that are right."""
    if p_greedy >= 1.0:
        return "HighlyKnown"
    if p_greedy > 0.0:
        return "MaybeKnown"
    return "WeaklyKnown" if p_sampled > 0.0 else "Unknown"


def few_shot_messages(question: str, exemplars: Sequence[QA]) -> list[dict]:
    """Exemplars as earlier user/assistant turns, then the question."""
    messages = []
    for exemplar in exemplars:
        messages += [{"role": "user", "content": exemplar.question},
                     {"role": "assistant", "content": exemplar.references[0]}]
    return messages + [{"role": "user", "content": question}]


def _fitting_prompt(question: str, exemplars: list[QA], tokenizer, room: int) -> tuple[list[int], int] | None:
    """The chat prompt ids with as many exemplars as fit in `room` tokens (dropping from the front)."""
    for start in range(len(exemplars) + 1):
        ids = prompt_ids(few_shot_messages(question, exemplars[start:]), tokenizer)
        if len(ids) <= room:
            return ids, len(exemplars) - start
    return None


def knowledge_categories(model, qa: Sequence[QA], settings: KnowledgeSettings,
                         exemplars: Sequence[QA] | None = None) -> list[dict[str, Any]]:
    """One row per question: {"index", "question", "references", "category", "p_greedy", "p_sampled",
    "greedy_answers", "sampled_answers", "shots"}; "category" is None (with "error") when even the bare
    question does not fit in model.max_seq_len - max_new_tokens. `model` = (config, graphdef, params, tokenizer).
    Exemplars default to the other questions of `qa` (never the question itself)."""
    settings.validate()
    config, _, _, tokenizer = model
    pool = list(exemplars) if exemplars is not None else list(qa)
    room = config.model.max_seq_len - settings.max_new_tokens
    stops = (tokenizer.eos_id, tokenizer.user_id)  # a new user turn ends the answer too
    prompts: dict[tuple[int, int], tuple[list[int], int] | None] = {}
    for item in qa:
        candidates = [e for e in pool if e.question != item.question]
        for variant in range(settings.variants):
            rng = np.random.default_rng([settings.seed, item.index, variant])
            picked = rng.choice(len(candidates), size=min(settings.shots, len(candidates)), replace=False) \
                if candidates else []
            prompts[item.index, variant] = _fitting_prompt(item.question, [candidates[i] for i in picked], tokenizer,
                                                           room)
    # Greedy: one answer per distinct prompt (identical exemplar sets decode identically).
    distinct = sorted({tuple(p[0]) for p in prompts.values() if p is not None})
    greedy = batched_generate(model, [list(p) for p in distinct],
                              SamplingSettings(max_new_tokens=settings.max_new_tokens, temperature=0.0, stop_ids=stops),
                              batch_size=settings.batch_size, seed=settings.seed)
    greedy_text = dict(zip(distinct, (c.text for c in greedy)))
    keys = [key for key, p in prompts.items() if p is not None for _ in range(settings.samples)]
    sampled_text: dict[tuple[int, int], list[str]] = collections.defaultdict(list)
    if keys:
        sampled = batched_generate(model, [prompts[key][0] for key in keys],
                                   SamplingSettings(max_new_tokens=settings.max_new_tokens,
                                                    temperature=settings.temperature, stop_ids=stops),
                                   batch_size=settings.batch_size, seed=settings.seed + 1)
        for key, completion in zip(keys, sampled):
            sampled_text[key].append(completion.text)
    rows = []
    for item in qa:
        variants = [prompts[item.index, v] for v in range(settings.variants)]
        row: dict[str, Any] = {"index": item.index, "where": item.where, "question": item.question,
                               "references": item.references}
        if any(v is None for v in variants):
            row.update(category=None, error=f"the question alone is longer than model.max_seq_len - max_new_tokens "
                                            f"= {room} tokens")
            rows.append(row)
            continue
        answers = [greedy_text[tuple(v[0])] for v in variants]
        samples = [text for v in range(settings.variants) for text in sampled_text[item.index, v]]
        right = lambda text: any(exact_match(text, reference) for reference in item.references)  # noqa: E731
        p_greedy = float(np.mean([right(a) for a in answers]))
        p_sampled = float(np.mean([right(s) for s in samples])) if samples else 0.0
        row.update(category=categorize(p_greedy, p_sampled), p_greedy=p_greedy, p_sampled=p_sampled,
                   greedy_answers=answers, sampled_answers=samples, shots=[v[1] for v in variants])
        rows.append(row)
    return rows


def summarize_knowledge(rows: Sequence[dict], settings: KnowledgeSettings) -> dict[str, Any]:
    counts = collections.Counter(row["category"] for row in rows if row["category"] is not None)
    scored = sum(counts.values())
    return {"questions": len(rows), "scored": scored, "skipped": len(rows) - scored,
            "counts": {c: counts.get(c, 0) for c in CATEGORIES},
            "fractions": {c: counts.get(c, 0) / scored if scored else 0.0 for c in CATEGORIES},
            "greedy_accuracy": float(np.mean([r["p_greedy"] for r in rows if r["category"]])) if scored else 0.0,
            "sampled_accuracy": float(np.mean([r["p_sampled"] for r in rows if r["category"]])) if scored else 0.0,
            "settings": dataclasses.asdict(settings)}


def write_knowledge(rows: Sequence[dict], summary: dict, out_dir: str | Path) -> Path:
    """knowledge.jsonl (per question), summary.json, and sft/<Category>.jsonl ({"messages"}) per category."""
    out_dir = Path(out_dir)
    (out_dir / "sft").mkdir(parents=True, exist_ok=True)
    with (out_dir / "knowledge.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    for category in CATEGORIES:
        with (out_dir / "sft" / f"{category}.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                if row["category"] == category:
                    handle.write(json.dumps({"messages": [
                        {"role": "user", "content": row["question"]},
                        {"role": "assistant", "content": row["references"][0]}]}, ensure_ascii=False) + "\n")
    return out_dir


# ----------------------------------------------------------------------------------------------
# Token shift


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_ranks(graphdef, params, tokens, positions, segment_ids, tie_tolerance):
    """Rank (1 = the model's top choice) of every token t given tokens < t, and the model's own top choice.
    [B,T] ints -> ([B,T] int32 ranks, [B,T] int32 top ids, [B,T] float32 log-probs); position 0 gets 0.
    Logits within `tie_tolerance` of the token's own count as ties, not as ranked above it."""
    logits = model_lib.apply(graphdef, params, tokens, positions, segment_ids)[:, :-1].astype(jnp.float32)
    chosen = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)
    ranks = 1 + jnp.sum(logits > chosen + tie_tolerance, axis=-1).astype(jnp.int32)
    top = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logprobs = (chosen[..., 0] - jax.nn.logsumexp(logits, axis=-1))
    pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))  # noqa: E731
    return pad(ranks), pad(top), pad(logprobs)


def token_ranks(model, sequences: Sequence[Sequence[int]], *, batch_size: int = 16,
                tie_tolerance: float = 1e-4) -> list[dict[str, np.ndarray]]:
    """Per sequence {"rank", "top", "logprob"} [len]: each token's rank under `model` given its prefix."""
    config, graphdef, params, _ = model
    too_long = [i for i, s in enumerate(sequences) if len(s) > config.model.max_seq_len]
    if too_long:
        raise UsageError(f"sequence {too_long[0]} is longer than model.max_seq_len={config.model.max_seq_len}")
    mesh = mesh_of(params)
    out: list[dict[str, np.ndarray] | None] = [None] * len(sequences)
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        for indices, batch in padded_batches(sequences, batch_size, config.model.max_seq_len):
            arrays = [place_rows(batch[k], mesh) for k in ("tokens", "positions", "segment_ids")]
            ranks, top, logprobs = (host_rows(x, mesh) for x in
                                    _token_ranks(graphdef, params, *arrays, np.float32(tie_tolerance)))
            for row, index in enumerate(indices):
                length = len(sequences[index])
                out[index] = {"rank": ranks[row, :length], "top": top[row, :length], "logprob": logprobs[row, :length]}
    return out  # type: ignore[return-value]


def shift_category(rank: int) -> str:
    return "unshifted" if rank <= 1 else "marginal" if rank <= 3 else "shifted"


def _check_compatible(base, aligned) -> None:
    base_config, _, _, base_tokenizer = base
    aligned_config, _, _, aligned_tokenizer = aligned
    if base_config.model.vocab_size != aligned_config.model.vocab_size:
        raise UsageError(f"the base model's vocabulary ({base_config.model.vocab_size}) differs from the aligned "
                         f"model's ({aligned_config.model.vocab_size}); compare models that share a tokenizer")
    if base_tokenizer.fingerprint != aligned_tokenizer.fingerprint:
        raise UsageError("the base and aligned models use different tokenizers (token ids mean different pieces); "
                         "compare an aligned model with the base it was fine-tuned from")


def _token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token of a sequence adds (decoding prefixes, so multi-byte characters come out whole);
    EOS, which decodes to nothing, shows as ⟨eos⟩."""
    texts, previous = [], ""
    for end in range(1, len(ids) + 1):
        current = tokenizer.decode(ids[:end])
        texts.append(current[len(previous):] if current.startswith(previous) else _piece_text(tokenizer, ids[end - 1]))
        previous = current
    return [_piece_text(tokenizer, t) if int(t) == tokenizer.eos_id else text for t, text in zip(ids, texts)]


def _piece_text(tokenizer, token: int) -> str:
    return "⟨eos⟩" if int(token) == tokenizer.eos_id else tokenizer.decode([int(token)])


def token_shift(base, aligned, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                batch_size: int = 16, tie_tolerance: float = 1e-4) -> dict[str, Any]:
    """Greedy answers of `aligned` to token-id prompts, each token ranked under `base`.

    Returns {"summary": {"positions", "unshifted", "marginal", "shifted" (fractions), "counts",
    "top_shifted_tokens": [...]}, "answers": [{"prompt_ids", "tokens": [{"id", "text", "base_rank",
    "base_top", "base_logprob", "category"}], "finished"}]}. The stop token (EOS) is analysed too."""
    _check_compatible(base, aligned)
    tokenizer = aligned[3]
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=(tokenizer.eos_id,))
    completions = batched_generate(aligned, prompts, settings, batch_size=batch_size)
    sequences = [list(p) + c.ids + ([tokenizer.eos_id] if c.finished else []) for p, c in zip(prompts, completions)]
    ranked = token_ranks(base, sequences, batch_size=batch_size, tie_tolerance=tie_tolerance)
    answers, counts = [], collections.Counter()
    shifted_tokens, occurrences = collections.Counter(), collections.Counter()
    for prompt, completion, sequence, ranks in zip(prompts, completions, sequences, ranked):
        answer_ids = sequence[len(prompt):]
        texts = _token_texts(tokenizer, answer_ids)
        tokens = []
        for offset, (token, text) in enumerate(zip(answer_ids, texts)):
            position = len(prompt) + offset
            rank = int(ranks["rank"][position])
            category = shift_category(rank)
            top_id = int(ranks["top"][position])
            counts[category] += 1
            occurrences[text] += 1
            if category == "shifted":
                shifted_tokens[text] += 1
            tokens.append({"id": int(token), "text": text, "base_rank": rank,
                           "base_top": _piece_text(tokenizer, top_id), "base_top_id": top_id, "base_logprob": float(ranks["logprob"][position]),
                           "category": category})
        answers.append({"prompt_ids": list(map(int, prompt)), "prompt": tokenizer.decode(prompt), "tokens": tokens,
                        "finished": completion.finished})
    total = sum(counts.values())
    summary = {"positions": total, "counts": {c: counts.get(c, 0) for c in SHIFT_CATEGORIES},
               **{c: counts.get(c, 0) / total if total else 0.0 for c in SHIFT_CATEGORIES},
               "top_shifted_tokens": [{"token": text, "shifted": n, "occurrences": occurrences[text],
                                       "shifted_share": n / occurrences[text]}
                                      for text, n in shifted_tokens.most_common(20)],
               "tie_tolerance": tie_tolerance, "max_new_tokens": max_new_tokens}
    return {"summary": summary, "answers": answers}


_COLOURS = {"unshifted": "transparent", "marginal": "#ffe08a", "shifted": "#ff9c8a"}


def shift_html(result: dict[str, Any], title: str = "Token shift") -> str:
    """A self-contained page: proportions, the most often shifted tokens, and each answer coloured by token."""
    summary = result["summary"]
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>",
             "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.6}",
             ".answer{font-family:monospace;white-space:pre-wrap;border:1px solid #ccc;padding:.5em}",
             ".prompt{color:#666;font-size:90%}span.t{border-radius:3px}",
             "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd}",
             "</style></head><body>", f"<h1>{esc(title)}</h1>",
             f"<p>{summary['positions']} answer tokens of the aligned model, ranked under the base model: "
             + ", ".join(f"<span class=t style='background:{_COLOURS[c]}'>{c}</span> "
                         f"{summary[c]:.1%} ({summary['counts'][c]})" for c in SHIFT_CATEGORIES)
             + ". Unshifted: the base model's top choice; marginal: its 2nd or 3rd; shifted: lower. "
               "Hover over a token for its base rank and the base model's own choice.</p>"]
    if summary["top_shifted_tokens"]:
        parts.append("<h2>Most often shifted tokens</h2><table><tr><th>token</th><th>shifted</th>"
                     "<th>occurrences</th><th>share shifted</th></tr>")
        parts += [f"<tr><td><code>{esc(repr(t['token']))}</code></td><td>{t['shifted']}</td><td>{t['occurrences']}</td>"
                  f"<td>{t['shifted_share']:.0%}</td></tr>" for t in summary["top_shifted_tokens"]]
        parts.append("</table>")
    parts.append("<h2>Answers</h2>")
    for answer in result["answers"]:
        parts.append(f"<div class=prompt>{esc(answer['prompt'])}</div><div class=answer>")
        for token in answer["tokens"]:
            tip = f"base rank {token['base_rank']}; base top: {token['base_top']!r}"
            parts.append(f"<span class=t style='background:{_COLOURS[token['category']]}' title=\"{esc(tip)}\">"
                         f"{esc(token['text'])}</span>")
        parts.append("</div><br>")
    parts.append("</body></html>")
    return "".join(parts)


def read_prompts(path_or_source: str, tokenizer, limit: int | None = None) -> tuple[list[str], list[list[int]]]:
    """Prompts -> (display texts, chat-template ids). JSONL records {"prompt"|"question"|"messages"|"text"};
    a plain text file holds one prompt per line."""
    texts, ids = [], []
    for record in read_inputs(path_or_source, "distill"):
        messages = request_messages(record.data, record.where)
        texts.append(render_text(messages, add_generation_prompt=True))
        ids.append(prompt_ids(messages, tokenizer))
        if limit is not None and len(ids) >= limit:
            break
    if not ids:
        raise UsageError(f"{path_or_source} holds no prompts")
    return texts, ids


def shift_between(base_workdir: str, aligned_workdir: str, prompts: str, max_new_tokens: int = 64,
                  batch_size: int = 16, limit: int | None = None) -> dict:
    """`token_shift` of two training workdirs' models on a prompts file (.jsonl of prompt/messages records,
    or one prompt a line); checks that the models share a tokenizer and that every prompt leaves room for
    `max_new_tokens`."""
    if max_new_tokens < 1 or batch_size < 1:
        raise UsageError("--max-new-tokens and --batch-size must be at least 1")
    aligned = load_model_for_inference(aligned_workdir)
    base = load_model_for_inference(base_workdir)
    _check_compatible(base, aligned)
    _, prompt_ids_list = read_prompts(prompts, aligned[3], limit)
    room = min(base[0].model.max_seq_len, aligned[0].model.max_seq_len) - max_new_tokens
    long = [i for i, p in enumerate(prompt_ids_list) if len(p) > room]
    if long:
        raise UsageError(f"prompt {long[0] + 1} of {prompts} has {len(prompt_ids_list[long[0]])} tokens; with "
                         f"--max-new-tokens {max_new_tokens} at most {room} fit: shorten it or lower "
                         "--max-new-tokens")
    return token_shift(base, aligned, prompt_ids_list, max_new_tokens=max_new_tokens, batch_size=batch_size)


def write_shift(result: dict, out_dir: str | Path, title: str) -> Path:
    """Writes `shift.json` and `shift.html` into `out_dir` (created); returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shift.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    (out / "shift.html").write_text(shift_html(result, title), encoding="utf-8")
    return out


__all__ = ["CATEGORIES", "SHIFT_CATEGORIES", "KnowledgeSettings", "QA", "load_qa", "categorize", "few_shot_messages",
           "knowledge_categories", "summarize_knowledge", "write_knowledge", "token_ranks",
           "shift_category", "token_shift", "shift_html", "read_prompts", "shift_between",
           "write_shift"]
