"""The tokenizer of a Hugging Face model folder, behind the interface of `jaxllm.data.tokenizer.Tokenizer`.

`HFTokenizer.load(directory)` reads `tokenizer.json` (the `tokenizers` library) or else a sentencepiece
`tokenizer.model`, the special tokens from `tokenizer_config.json` / `special_tokens_map.json` /
`config.json` / `generation_config.json`, and the model's chat template (`chat_template.jinja` or
`tokenizer_config.json`'s "chat_template"). `Tokenizer.load(path)` hands such folders here.

Same interface as jaxllm's own tokenizer: `encode` (no BOS/EOS added; special-token strings in the text
become their ids), `encode_batch`, `decode` (pad/BOS/EOS dropped, other special tokens kept as text),
`vocab_size`, `pad_id`, `bos_id`, `eos_id`, `unk_id`, `piece`, `piece_bytes`, `fingerprint`, and
`prefix_ids`: what the tokenizer itself puts before a plain text (its add-BOS rule; empty for Qwen). Models
without a BOS token use their EOS id for `bos_id` (Qwen's `<|endoftext|>` does both jobs); models without
a pad token pad with EOS (padding is masked by segment ids, so the id does not matter).

The chat template (`HFChatTemplate`, on `tokenizer.chat_template`) renders conversations the way
`transformers`' `apply_chat_template` does (Jinja2 sandbox, trim_blocks, lstrip_blocks), and finds
the answer tokens for the loss mask by rendering each conversation prefix: an assistant message's text is
the difference between the conversation up to it and the conversation before it with the generation
prompt, so its end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, `</s>`) is trained too. `user_id` (the
id the chat loop also stops at) is that end-of-turn token. A folder without a chat template gets
`DEFAULT_TEMPLATE` ("User: ...\\nAssistant: ...<eos>").
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from jaxllm.data.report import DataError

DEFAULT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
MODES = ("normal", "response_only", "all_tokens")


def is_hf_tokenizer_dir(path: str | os.PathLike) -> bool:
    """A folder with a Hugging Face tokenizer (tokenizer.json, or tokenizer.model next to tokenizer_config.json)."""
    path = Path(path)
    return path.is_dir() and ((path / "tokenizer.json").is_file() or (
        (path / "tokenizer.model").is_file() and (path / "tokenizer_config.json").is_file()))


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise DataError(f"{path} is not valid JSON ({error})") from None
    return data if isinstance(data, dict) else {}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (ByteLevel BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


class _TokenizersBackend:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as FastTokenizer

        self.tokenizer = FastTokenizer.from_file(str(path))
        spec = json.loads(path.read_text(encoding="utf-8"))
        decoder = json.dumps(spec.get("decoder") or {})
        self.byte_level = '"ByteLevel"' in decoder
        self.added = {token["content"]: token["id"] for token in spec.get("added_tokens", [])}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def special_prefix(self) -> list[int]:
        """The ids the tokenizer's post-processor puts before a text (e.g. Llama 3's <|begin_of_text|>;
        none for Qwen), found by encoding a probe text with and without special tokens."""
        plain = self.tokenizer.encode("a", add_special_tokens=False).ids
        full = self.tokenizer.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return full[:start]
        return []

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, list(encoding.offsets)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id) or ""

    @property
    def size(self) -> int:
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        return max(vocab.values()) + 1 if vocab else 0


class _SentencePieceBackend:
    """tokenizer.model with the special tokens of tokenizer_config.json split out first (as transformers'
    sentencepiece tokenizers do); pieces after a special token get no dummy-prefix space (legacy=False)."""

    def __init__(self, path: Path, added: dict[str, int]):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        # transformers' converted tokenizers do not apply sentencepiece's normaliser (NFKC, whitespace
        # collapsing): only spaces -> "▁" and a dummy prefix at the start of the text.
        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(path.read_bytes())
        spec = model.normalizer_spec
        spec.name, spec.precompiled_charsmap, spec.remove_extra_whitespaces = "identity", b"", False
        self.first = spm.SentencePieceProcessor()
        self.first.LoadFromSerializedProto(model.SerializeToString())
        spec.add_dummy_prefix = False
        self.rest = spm.SentencePieceProcessor()
        self.rest.LoadFromSerializedProto(model.SerializeToString())
        self.byte_level = False
        specials = {self.first.IdToPiece(i): i for i in range(self.first.GetPieceSize())
                    if self.first.IsControl(i) or self.first.IsUnknown(i)}
        specials = {k: v for k, v in specials.items() if k}
        self.added = {**specials, **added}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True))
                                 + ")") if self.added else None

    def _pieces(self, text: str) -> list[tuple[str, bool]]:
        if self._split is None:
            return [(text, False)]
        return [(part, part in self.added) for part in self._split.split(text) if part]

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        position = 0
        for number, (part, special) in enumerate(self._pieces(text)):
            if special:
                ids.append(self.added[part])
                offsets.append((position, position + len(part)))
            else:
                # the dummy prefix goes only before the text's first piece, unless it already starts with a space
                processor = self.first if number == 0 and not part.startswith((" ", "\u2581")) else self.rest
                proto = processor.encode(part, return_type="proto")
                encoded = part.encode("utf-8")
                for piece in proto.pieces:  # begin/end are byte offsets into `part`
                    begin = len(encoded[:piece.begin].decode("utf-8", errors="ignore"))
                    end = len(encoded[:piece.end].decode("utf-8", errors="ignore"))
                    ids.append(piece.id)
                    offsets.append((position + begin, position + end))
            position += len(part)
        return ids, offsets

    def encode(self, text: str) -> list[int]:
        return self.encode_offsets(text)[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: list[int]) -> str:
        out, run = [], []
        by_id = {v: k for k, v in self.added.items()}
        for token in ids:
            if token in by_id and not self.first.IsControl(token):
                if run:
                    out.append(self.first.DecodeIds(run))
                    run = []
                out.append(by_id[token])
            else:
                run.append(token)
        if run:
            out.append(self.first.DecodeIds(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        token_id = self.first.PieceToId(token)
        return None if token_id == self.first.unk_id() and token != self.first.IdToPiece(token_id) else token_id

    def id_to_token(self, token_id: int) -> str:
        return self.first.IdToPiece(token_id)

    @property
    def size(self) -> int:
        return max([self.first.GetPieceSize(), *(i + 1 for i in self.added.values())])


def _prefix_ids(backend, bos: int | None, config: dict[str, Any]) -> list[int]:
    """The ids `transformers` (5.x) prepends to a plain text: [bos] or [] as tokenizer_config.json's
    "add_bos_token" says (Llama 2, Mistral and Gemma folders say true); without that key, what a
    tokenizer.json post-processor adds (a TemplateProcessing "<bos> $A" gives [bos]; Qwen's adds
    nothing), and nothing for a bare sentencepiece model. Never the EOS that stands in for a missing BOS."""
    add_bos = config.get("add_bos_token")
    if isinstance(add_bos, bool) and bos is not None:
        return [bos] if add_bos else []
    if isinstance(backend, _TokenizersBackend):
        return backend.special_prefix()
    return []


class HFTokenizer:
    """A Hugging Face tokenizer with jaxllm's tokenizer interface (see the module docstring)."""

    def __init__(self, backend, special: dict[str, int | None], template: str | None, name: str,
                 fingerprint: str, special_texts: dict[str, str], prefix_ids: Sequence[int] = ()):
        self._backend = backend
        self.name = name
        self.fingerprint = fingerprint
        eos = special.get("eos")
        if eos is None:
            raise DataError(f"tokenizer {name}: no end-of-sequence token (eos_token in tokenizer_config.json or "
                            "eos_token_id in config.json); jaxllm needs one to end answers and documents")
        self._eos = eos
        self._bos = special.get("bos") if special.get("bos") is not None else eos
        self._pad = special.get("pad") if special.get("pad") is not None else eos
        self._unk = special.get("unk")
        self.prefix_ids = tuple(prefix_ids)  # what `transformers` puts before a plain text (its add-BOS rule)
        self.special_texts = special_texts
        self.has_chat_template = template is not None
        self.chat_template = HFChatTemplate(template or DEFAULT_TEMPLATE, self)
        self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()} if backend.byte_level else None

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "HFTokenizer":
        directory = Path(path)
        if not directory.is_dir():
            raise DataError(f"no Hugging Face tokenizer at '{path}': expected a folder with tokenizer.json or "
                            "tokenizer.model (+ tokenizer_config.json)")
        config = _read_json(directory / "tokenizer_config.json")
        special_map = _read_json(directory / "special_tokens_map.json")
        model_config = _read_json(directory / "config.json")
        generation = _read_json(directory / "generation_config.json")
        source = _read_json(directory / "hf_source.json").get("special_ids") or {}
        added = {}
        for key, token in (config.get("added_tokens_decoder") or {}).items():
            text = _token_text(token)
            if text is not None:
                added[text] = int(key)
        json_file, model_file = directory / "tokenizer.json", directory / "tokenizer.model"
        if json_file.is_file():
            backend = _TokenizersBackend(json_file)
            fingerprint_bytes = json_file.read_bytes()
        elif model_file.is_file():
            backend = _SentencePieceBackend(model_file, added)
            fingerprint_bytes = model_file.read_bytes()
        else:
            raise DataError(f"{directory} has neither tokenizer.json nor tokenizer.model")
        texts: dict[str, str] = {}
        ids: dict[str, int | None] = {}
        for role in ("bos", "eos", "pad", "unk"):
            text = _token_text(config.get(f"{role}_token")) or _token_text(special_map.get(f"{role}_token"))
            token_id = backend.token_to_id(text) if text else None
            if token_id is None:
                for fallback in (generation, model_config, source):
                    value = fallback.get(f"{role}_token_id")
                    if isinstance(value, list):
                        value = value[0] if value else None
                    if isinstance(value, int):
                        token_id = value
                        break
            if token_id is not None and text is None:
                text = backend.id_to_token(token_id)
            ids[role] = token_id
            if text is not None:
                texts[f"{role}_token"] = text
        template = _read_template(directory, config)
        digest = hashlib.sha256(fingerprint_bytes + (template or "").encode()).hexdigest()[:16]
        return cls(backend, ids, template, str(directory), digest, texts, _prefix_ids(backend, ids.get("bos"), config))

    # -- ids ---------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._backend.size

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def unk_id(self) -> int | None:
        return self._unk

    @property
    def user_id(self) -> int:
        """Where a chat answer ends besides EOS: the template's end-of-turn token."""
        return self.chat_template.end_of_turn_id

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i in (self._pad, self._bos, self._eos, self._unk) if i is not None) | \
            frozenset(self._backend.added.values())

    # -- text <-> ids ----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added. Special-token strings in the text become their ids."""
        return self._backend.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        del num_threads  # the tokenizers library uses its own thread pool
        return self._backend.encode_batch(texts) if texts else []

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, (start, end) character offsets of each token in `text`)."""
        return self._backend.encode_offsets(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; pad, BOS and EOS are dropped, other special tokens decode to their text."""
        dropped = {self._pad, self._bos, self._eos}
        return self._backend.decode([int(i) for i in ids if int(i) not in dropped])

    def piece(self, token_id: int) -> str:
        return self._backend.id_to_token(int(token_id))

    def piece_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes this token adds to decoded text (b"" for special tokens; for bits per byte)."""
        token_id = int(token_id)
        if token_id in self.special_ids:
            return b""
        piece = self.piece(token_id)
        if self._byte_decoder is not None:
            return bytes(self._byte_decoder.get(c, 0) for c in piece)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name}, vocab_size={self.vocab_size})"


def _read_template(directory: Path, config: dict[str, Any]) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template") or _read_json(directory / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template.strip() else None


# ----------------------------------------------------------------------------------------------
# Chat templates.


class TemplateError(DataError):
    """The chat template refused a conversation (for example roles that do not alternate)."""


class HFChatTemplate:
    """A Jinja chat template bound to its tokenizer: conversations -> (ids, loss mask), prompts, answers."""

    def __init__(self, source: str, tokenizer: HFTokenizer):
        import jinja2
        import jinja2.ext
        import jinja2.sandbox

        def raise_exception(message: str):
            raise TemplateError(f"the chat template of {tokenizer.name} refused the conversation: {message}")

        def tojson(value, indent=None, ensure_ascii=False, sort_keys=False, separators=None):
            return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys,
                              separators=separators)

        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        environment.filters["tojson"] = tojson
        environment.globals["raise_exception"] = raise_exception
        environment.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateError as error:
            raise DataError(f"the chat template of {tokenizer.name} is not valid Jinja: {error}") from None
        self.source = source
        self.tokenizer = tokenizer
        self._end_of_turn: int | None = None

    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.tokenizer.special_texts)
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, KeyError, IndexError) as error:
            raise TemplateError(f"the chat template of {self.tokenizer.name} failed on a conversation of "
                                f"{len(messages)} messages: {error}") from None

    def answer_spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(the conversation's text, [start, end) character spans of every assistant message, each from
        after the generation prompt to the end of its turn)."""
        full = self.render_text(messages)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render_text(messages[:index], add_generation_prompt=True)
            upto = self.render_text(messages[:index + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise TemplateError(f"the chat template of {self.tokenizer.name} renders message {index} differently "
                                    "once later messages follow (or differently from its generation prompt), so "
                                    "the answer tokens cannot be located for the loss mask")
            spans.append((len(before), len(upto)))
        return full, spans

    def render(self, messages: Sequence[dict], mode: str = "normal") -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a conversation, as `jaxllm.data.chat.render_chat` documents for each mode."""
        if mode not in MODES:
            raise DataError(f"chat mode '{mode}' must be one of {', '.join(MODES)}")
        if mode == "response_only":
            messages = [m for m in messages if m["role"] == "assistant"]
        full, spans = self.answer_spans(messages)
        ids, offsets = self.tokenizer.encode_offsets(full)
        if mode == "all_tokens":
            return ids, [0] + [1] * (len(ids) - 1)
        mask = [int(any(start <= begin < end for start, end in spans)) for begin, _ in offsets]
        return ids, mask

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """The conversation so far plus the generation prompt: what an answer continues."""
        return self.tokenizer.encode(self.render_text(messages, add_generation_prompt=True))

    def answer_ids(self, messages: Sequence[dict], answer: str) -> list[int]:
        """The tokens that follow `prompt_ids(messages)` for this answer, end of turn included."""
        prompt = self.prompt_ids(messages)
        full, spans = self.answer_spans(list(messages) + [{"role": "assistant", "content": answer}])
        ids = self.tokenizer.encode(full[:spans[-1][1]])
        if ids[:len(prompt)] == prompt:
            return ids[len(prompt):]
        return self.tokenizer.encode(full[spans[-1][0]:spans[-1][1]])

    @property
    def end_of_turn_id(self) -> int:
        """The first token after an answer's text (`<|im_end|>`, `<|eot_id|>`, `</s>` ...), else EOS."""
        if self._end_of_turn is None:
            self._end_of_turn = self.tokenizer.eos_id
            try:
                full, spans = self.answer_spans([{"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Fine"}])
            except DataError:
                return self._end_of_turn
            text = full[spans[-1][0]:spans[-1][1]]
            at = text.find("Fine")
            tail = text[at + len("Fine"):] if at >= 0 else ""
            ids = self.tokenizer.encode(tail.strip() or tail) if tail else []
            if ids:
                self._end_of_turn = ids[0]
        return self._end_of_turn


__all__ = ["HFTokenizer", "HFChatTemplate", "TemplateError", "DEFAULT_TEMPLATE", "is_hf_tokenizer_dir"]
