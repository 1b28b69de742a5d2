"""The chat template: conversations -> token ids and the loss mask. Defined here and nowhere else.

Default template (role markers are single tokens, BOS/EOS are control tokens that decode to ""):

    <s><|system|>{system}<|user|>{user}<|assistant|>{answer}</s><|user|>{user}<|assistant|>{answer}</s>

`render_text` gives the same conversation as a string without BOS/EOS, so
`tokenizer.decode(render_chat(messages, tokenizer)[0]) == render_text(messages)`.

Loss masks (mask[i] = 1 means token i is a training target, predicted from tokens < i):
- "normal": 1 on the content tokens of every assistant message and on the EOS that closes it;
- "response_only" (Response Tuning): non-assistant messages are dropped, i.e. the answers are trained
  with an empty prompt: `<s><|assistant|>{answer}</s>`; the mask as in "normal";
- "all_tokens": 1 on every token except the first (nothing predicts BOS); for comparison.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from jaxllm.data.report import DataError
from jaxllm.data.tokenizer import ROLE_MARKERS, Tokenizer

ROLES = tuple(ROLE_MARKERS)
MODES = ("normal", "response_only", "all_tokens")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """Where the markers go. The markers themselves are the tokenizer's role markers (ROLE_MARKERS)."""

    add_bos: bool = True
    eos_after_assistant: bool = True


DEFAULT_TEMPLATE = ChatTemplate()


# ----------------------------------------------------------------------------------------------
# Records -> validated message lists


def validate_messages(messages: Any, where: str, field: str = "messages") -> list[dict[str, str]]:
    """Checks a message list; raises DataError naming the record (`where`), the field and the problem."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of {{\"role\", \"content\"}} "
                        f"messages, got {type(messages).__name__}", "wrong_type")
    checked = []
    for number, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: {field}[{number}] must be an object with 'role' and 'content', "
                            f"got {type(message).__name__}", "wrong_type")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{where}: {field}[{number}] has no field '{key}'", "missing_field")
            if not isinstance(message[key], str):
                raise DataError(f"{where}: {field}[{number}].{key} must be a string, "
                                f"got {type(message[key]).__name__}", "wrong_type")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: {field}[{number}] has unknown role '{message['role']}'; "
                            f"roles must be one of {', '.join(ROLES)}", "unknown_role")
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


def _string_field(record: dict, name: str, where: str) -> str:
    if name not in record:
        raise DataError(f"{where}: record has no field '{name}' (fields: {', '.join(sorted(record)) or 'none'})",
                        "missing_field")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}", "wrong_type")
    return value


def prompt_messages(record: dict, where: str) -> list[dict[str, str]]:
    """The prompt of a record: "messages" (all of them), or "prompt" as a string or a message list."""
    if "messages" in record:
        return validate_messages(record["messages"], where)
    if "prompt" not in record:
        raise DataError(f"{where}: record needs a 'prompt' or 'messages' field "
                        f"(fields: {', '.join(sorted(record)) or 'none'})", "missing_field")
    if isinstance(record["prompt"], list):
        return validate_messages(record["prompt"], where, "prompt")
    return [{"role": "user", "content": _string_field(record, "prompt", where)}]


def record_to_messages(record: dict, where: str = "record") -> list[dict[str, str]]:
    """An SFT record -> messages: {"messages": [...]} or {"prompt", "response"}."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}", "wrong_type")
    if "messages" in record:
        messages = validate_messages(record["messages"], where)
    else:
        if "prompt" not in record or "response" not in record:
            raise DataError(f"{where}: an SFT record needs 'messages' or both 'prompt' and 'response' "
                            f"(fields: {', '.join(sorted(record)) or 'none'})", "missing_field")
        messages = prompt_messages(record, where) + [
            {"role": "assistant", "content": _string_field(record, "response", where)}]
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: the conversation has no assistant message, so nothing would be trained",
                        "no_loss_tokens")
    return messages


# ----------------------------------------------------------------------------------------------
# Rendering


def _select(messages: Sequence[dict], mode: str) -> list[dict]:
    if mode not in MODES:
        raise DataError(f"chat mode '{mode}' must be one of {', '.join(MODES)}")
    if mode == "response_only":
        return [message for message in messages if message["role"] == "assistant"]
    return list(messages)


def _assemble(messages: Sequence[dict], contents: Sequence[list[int]], tokenizer: Tokenizer, mode: str,
              template: ChatTemplate) -> tuple[list[int], list[int]]:
    ids: list[int] = [tokenizer.bos_id] if template.add_bos else []
    mask: list[int] = [0] * len(ids)
    for message, content in zip(messages, contents):
        is_answer = message["role"] == "assistant"
        ids.append(tokenizer.role_ids[message["role"]])
        mask.append(0)
        ids.extend(content)
        mask.extend([int(is_answer)] * len(content))
        if is_answer and template.eos_after_assistant:
            ids.append(tokenizer.eos_id)
            mask.append(1)
    if mode == "all_tokens":
        mask = [0] + [1] * (len(ids) - 1)
    return ids, mask


def render_chat(messages: Sequence[dict], tokenizer: Tokenizer, mode: str = "normal",
                template: ChatTemplate = DEFAULT_TEMPLATE) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation; see the module docstring for the template and the modes."""
    if getattr(tokenizer, "chat_template", None) is not None:  # a model's own template (jaxllm.data.hf_tokenizer)
        return tokenizer.chat_template.render(messages, mode)
    selected = _select(messages, mode)
    contents = tokenizer.encode_batch([message["content"] for message in selected], num_threads=1)
    return _assemble(selected, contents, tokenizer, mode, template)


def render_chats(conversations: Sequence[Sequence[dict]], tokenizer: Tokenizer, mode: str = "normal",
                 template: ChatTemplate = DEFAULT_TEMPLATE) -> list[tuple[list[int], list[int]]]:
    """`render_chat` for many conversations with one batched encode call."""
    if getattr(tokenizer, "chat_template", None) is not None:
        return [tokenizer.chat_template.render(messages, mode) for messages in conversations]
    selected = [_select(messages, mode) for messages in conversations]
    flat = tokenizer.encode_batch([message["content"] for messages in selected for message in messages])
    out, start = [], 0
    for messages in selected:
        out.append(_assemble(messages, flat[start:start + len(messages)], tokenizer, mode, template))
        start += len(messages)
    return out


def prompt_ids(messages: Sequence[dict], tokenizer: Tokenizer, mode: str = "normal",
               template: ChatTemplate = DEFAULT_TEMPLATE) -> list[int]:
    """The conversation so far followed by the assistant marker: what generation continues from."""
    if getattr(tokenizer, "chat_template", None) is not None:
        return tokenizer.chat_template.prompt_ids(_select(messages, mode))
    ids, _ = render_chat(messages, tokenizer, mode, template) if _select(messages, mode) else (
        [tokenizer.bos_id] if template.add_bos else [], [])
    return ids + [tokenizer.assistant_id]


def render_text(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text (role markers inline); equals decode(render_chat(...)[0])."""
    text = "".join(ROLE_MARKERS[message["role"]] + message["content"] for message in messages)
    return text + (ROLE_MARKERS["assistant"] if add_generation_prompt else "")


def answer_ids(answer: str, tokenizer: Tokenizer, template: ChatTemplate = DEFAULT_TEMPLATE) -> list[int]:
    """Token ids of an assistant answer that follows `prompt_ids`: content then EOS."""
    return tokenizer.encode(answer) + ([tokenizer.eos_id] if template.eos_after_assistant else [])
