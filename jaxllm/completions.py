"""Prompt records -> completions, for `jaxllm generate --prompts-file`: reading the records (through the data
layer's record reader), their token ids (chat template or the tokenizer's own prefix) and sampling them in
batches with `jaxllm.generate.generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax

from jaxllm.data.chat import prompt_ids, render_text, validate_messages
from jaxllm.data.sources import iter_records
from jaxllm.errors import UsageError
from jaxllm.generate import SamplingSettings, generate


def read_prompt_records(path: Path) -> list[dict]:
    """A .jsonl file of {"prompt": str | messages} / {"messages": [...]} / {"text": str}, or plain text
    (one prompt a line), read by the data layer's record reader."""
    if not path.is_file():
        raise UsageError(f"prompts file {path} does not exist")
    records = list(iter_records(f"jsonl:{path}" if path.suffix == ".jsonl" else f"lines:{path}"))
    if not records:
        raise UsageError(f"prompts file {path} is empty")
    for record in records:
        if not any(k in record.data for k in ("prompt", "messages", "text")):
            raise UsageError(f"{record.where}: a prompt record needs a 'prompt', 'messages' or 'text' field")
    return [record.data for record in records]


def _prompt_ids(record: dict, tokenizer, chat: bool) -> tuple[str, list[int]]:
    """(display text, token ids): chat records through the chat template, plain text after the
    tokenizer's own prefix (`prefix_ids`: BOS for jaxllm's and Llama's tokenizers, nothing for Qwen's,
    as `transformers` encodes it; never the EOS that stands in for a missing BOS)."""
    if "messages" in record or isinstance(record.get("prompt"), list):
        messages = validate_messages(record.get("messages", record.get("prompt")), "prompt record")
        return render_text(messages), prompt_ids(messages, tokenizer)
    text = record.get("prompt", record.get("text"))
    if not isinstance(text, str):
        raise UsageError(f"prompt must be a string or a message list, got {type(text).__name__}")
    if chat:
        messages = [{"role": "user", "content": text}]
        return text, prompt_ids(messages, tokenizer)
    return text, [*getattr(tokenizer, "prefix_ids", (tokenizer.bos_id,)), *tokenizer.encode(text)]


def complete_prompts(model: tuple, records: Sequence[dict], settings: SamplingSettings, chat: bool = False,
                     batch_size: int = 16, seed: int = 0) -> list[dict]:
    """One {prompt, completion, tokens, finished, logprob} dict per prompt record ({"text"}, {"prompt"} or
    {"messages"}), sampled `batch_size` prompts at a time; `model` is `load_model_for_inference`'s tuple and
    `chat` wraps text prompts in the chat template as a user turn."""
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    config, graphdef, params, tokenizer = model
    prompts = [_prompt_ids(record, tokenizer, chat) for record in records]
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        output = generate(config.model, graphdef, params, [ids for _, ids in chunk], settings,
                          jax.random.fold_in(jax.random.key(seed), start), pad_id=tokenizer.pad_id)
        for row, (text, _) in enumerate(chunk):
            ids = output.completion(row)
            results.append({"prompt": text, "completion": tokenizer.decode(ids), "tokens": len(ids),
                            "finished": bool(output.finished[row]),
                            "logprob": float(output.logprobs[row].sum())})
    return results
