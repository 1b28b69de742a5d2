"""Data for every stage: tokenizer, sources, chat template, packing, batches (see pipeline.py).

Names are imported lazily, so `import jaxllm.data.tokenizer` does not pay for Grain and TFDS.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "report": ("DataError", "DataReport", "format_report"),
    "tokenizer": ("Tokenizer", "check_vocab", "train_tokenizer", "train_tokenizer_from_inputs"),
    "chat": ("prompt_ids", "record_to_messages", "render_chat", "render_chats", "render_text"),
    "sources": ("list_default_sets", "lookup_records", "read_records"),
    "tfds_writer": ("build_tfds_from_jsonl",),
    "pipeline": ("data_report", "data_stats", "infer_format", "load_prompts", "make_batch_iterator",
                 "make_eval_batches"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'jaxllm.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"jaxllm.data.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
