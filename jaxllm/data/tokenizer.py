"""A sentencepiece tokenizer with the chat special tokens, and training one.

Ids 0-3 are fixed: pad=0, unk=1, bos=2, eos=3. Then come the chat role markers as user-defined
symbols (`<|system|>`, `<|user|>`, `<|assistant|>` by default), then the 256 byte pieces (byte
fallback), then the learned pieces. Normalisation is the identity, whitespace is kept as is and no
dummy prefix is added, so `decode(encode(text)) == text` for any Unicode text.

`Tokenizer.load("default")` loads the tokenizer shipped in `jaxllm/data/default/tokenizer.model`
(BPE, 512 ids, trained on the embedded default corpus by `tools/make_default_data.py`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from jaxllm.data.hf_tokenizer import HFTokenizer, is_hf_tokenizer_dir
from jaxllm.data.report import DataError
from jaxllm.data.sources import SOURCE_KINDS, read_texts

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
ROLE_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
MODEL_FILENAME = "tokenizer.model"


def _default_model_bytes() -> bytes:
    return resources.files("jaxllm.data").joinpath("default", MODEL_FILENAME).read_bytes()


class Tokenizer:
    """Sentencepiece model plus the ids the data pipeline and the chat template need."""

    def __init__(self, model_proto: bytes, name: str = ""):
        self._processor = spm.SentencePieceProcessor()
        self._processor.LoadFromSerializedProto(model_proto)
        self.name = name
        self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:16]
        processor = self._processor
        expected = {"pad": (processor.pad_id(), PAD_ID), "unk": (processor.unk_id(), UNK_ID),
                    "bos": (processor.bos_id(), BOS_ID), "eos": (processor.eos_id(), EOS_ID)}
        wrong = [f"{token}={actual} (expected {want})" for token, (actual, want) in expected.items() if actual != want]
        if wrong:
            raise DataError(f"tokenizer {name or '(in memory)'} has special ids {', '.join(wrong)}; "
                            "jaxllm needs pad=0, unk=1, bos=2, eos=3: retrain it with `jaxllm tokenizer train`")
        self.role_ids: dict[str, int] = {}
        for role, marker in ROLE_MARKERS.items():
            marker_id = processor.PieceToId(marker)
            if marker_id == UNK_ID:
                raise DataError(f"tokenizer {name or '(in memory)'} has no chat role marker {marker}; "
                                "retrain it with `jaxllm tokenizer train` (it adds the role markers)")
            self.role_ids[role] = marker_id

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike = "default") -> "Tokenizer":
        """`path` is "default" (the embedded tokenizer), a directory holding tokenizer.model, or the file.
        A Hugging Face tokenizer folder (tokenizer.json, or tokenizer.model with tokenizer_config.json)
        gives a `jaxllm.data.hf_tokenizer.HFTokenizer`, which has the same interface."""
        if str(path) == "default":
            return cls(_default_model_bytes(), name="default")
        location = Path(path)
        if is_hf_tokenizer_dir(location):  # a Hugging Face model's tokenizer (jaxllm convert from-hf)
            return HFTokenizer.load(location)  # type: ignore[return-value]
        model_file = location / MODEL_FILENAME if location.is_dir() else location
        if not model_file.is_file():
            raise DataError(f"no tokenizer at '{path}': expected a directory holding {MODEL_FILENAME} "
                            "(make one with `jaxllm tokenizer train --input FILES --vocab-size N --out DIR`) "
                            "or data.tokenizer=default")
        try:
            return cls(model_file.read_bytes(), name=str(model_file))
        except RuntimeError as error:  # sentencepiece's parse failure of a damaged or foreign file
            raise DataError(f"data.tokenizer={path}: not a readable sentencepiece model ({str(error).strip()[:200]}); "
                            "point it at a directory made by `jaxllm tokenizer train` or use data.tokenizer=default"
                            ) from None

    # -- ids ---------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._processor.GetPieceSize()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def prefix_ids(self) -> tuple[int, ...]:
        """The ids put before a plain text (a prompt to continue): BOS."""
        return (BOS_ID,)

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def system_id(self) -> int:
        return self.role_ids["system"]

    @property
    def user_id(self) -> int:
        return self.role_ids["user"]

    @property
    def assistant_id(self) -> int:
        return self.role_ids["assistant"]

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset([PAD_ID, UNK_ID, BOS_ID, EOS_ID, *self.role_ids.values()])

    # -- text <-> ids ----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added. Role-marker strings in the text become marker ids."""
        return self._processor.EncodeAsIds(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        """Encodes many texts in one call (sentencepiece's C++ thread pool; 0 = all cores)."""
        if not texts:
            return []
        return self._processor.Encode(list(texts), out_type=int, num_threads=num_threads or -1)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; pads are dropped, BOS/EOS decode to nothing, role markers to their text."""
        return self._processor.DecodeIds([int(i) for i in ids if int(i) != PAD_ID])

    def piece(self, token_id: int) -> str:
        return self._processor.IdToPiece(int(token_id))

    def piece_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes this token adds to decoded text (b"" for pad/unk/BOS/EOS; for bits per byte)."""
        token_id = int(token_id)
        processor = self._processor
        if processor.IsControl(token_id) or processor.IsUnknown(token_id):
            return b""
        if processor.IsByte(token_id):
            return bytes([int(processor.IdToPiece(token_id)[3:5], 16)])
        return processor.IdToPiece(token_id).replace("\u2581", " ").encode("utf-8")

    def __repr__(self) -> str:
        return f"Tokenizer({self.name or 'in memory'}, vocab_size={self.vocab_size})"


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raises a clear error when token ids could exceed the model's embedding table."""
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"the tokenizer ({tokenizer.name or 'in memory'}) has {tokenizer.vocab_size} ids but model.vocab_size is "
            f"{model_vocab_size}: ids >= {model_vocab_size} would index past the embedding table. Set "
            f"model.vocab_size={tokenizer.vocab_size} (or more), or train a tokenizer with "
            f"--vocab-size {model_vocab_size}")


# ----------------------------------------------------------------------------------------------
# Training


def train_tokenizer(input_files: Sequence[str | os.PathLike], vocab_size: int, out_dir: str | os.PathLike,
                    model_type: str = "bpe", *, character_coverage: float = 0.9995,
                    input_sentence_size: int = 2_000_000, num_threads: int = 1, seed: int = 0,
                    add_dummy_prefix: bool = False) -> Tokenizer:
    """Trains a sentencepiece model on text files (one sentence per line) into out_dir/tokenizer.model.

    Byte fallback (no unknown tokens), identity normalisation, whitespace kept, digits split, the
    fixed special ids and the chat role markers. `num_threads=1` and `seed` make training deterministic.
    add_dummy_prefix: encode every text as if it started with a space, so a word that opens a document
    gets the same tokens as inside a sentence (decoding drops that space again).
    """
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"model_type='{model_type}' must be 'bpe' or 'unigram'")
    files = [str(f) for f in input_files]
    if not files:
        raise DataError("train_tokenizer needs at least one input file")
    for file in files:
        if not Path(file).is_file():
            raise DataError(f"tokenizer input '{file}' is not a file")
        if Path(file).stat().st_size == 0:
            raise DataError(f"tokenizer input '{file}' is empty")
    minimum = 4 + len(ROLE_MARKERS) + 256 + 1
    if vocab_size < minimum:
        raise DataError(f"vocab_size={vocab_size} is too small: the special tokens, role markers and the 256 byte "
                        f"pieces alone take {minimum - 1} ids; use at least {minimum}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "tokenizer"
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.Train(
            input=files, model_prefix=str(prefix), vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=add_dummy_prefix, split_digits=True, allow_whitespace_only_pieces=True,
            character_coverage=character_coverage, max_sentence_length=1 << 16,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            user_defined_symbols=list(ROLE_MARKERS.values()), num_threads=num_threads,
            minloglevel=2, seed_sentencepiece_size=1_000_000,
        )
    except RuntimeError as error:
        raise DataError(f"sentencepiece could not train a {model_type} tokenizer with vocab_size={vocab_size} on "
                        f"{', '.join(files)}: {error}. The vocabulary must hold the {minimum - 1} special and byte "
                        "pieces plus every character kept by --character-coverage, and a small corpus supports only "
                        "a limited number of learned pieces: adjust --vocab-size or add text") from None
    _strip_paths(prefix.with_suffix(".model"))
    return Tokenizer.load(out)


def _strip_paths(model_file: Path) -> None:
    """Keeps only file names of the training inputs in the model, so the same data gives the same bytes."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_file.read_bytes())
    inputs = [Path(name).name for name in model.trainer_spec.input]
    del model.trainer_spec.input[:]
    model.trainer_spec.input.extend(inputs)
    model.trainer_spec.model_prefix = Path(model.trainer_spec.model_prefix).name
    model_file.write_bytes(model.SerializeToString())


def _materialise_inputs(inputs: Sequence[str], directory: str) -> list[str]:
    """Files stay files; a source spec (default:pretrain, jsonl:..., tfds:...) is written out as text lines."""
    files = []
    for number, spec in enumerate(inputs):
        if Path(spec).is_file():
            files.append(spec)
            continue
        if spec.split(":", 1)[0] not in SOURCE_KINDS:
            raise DataError(f"tokenizer input '{spec}' is neither a file nor a source "
                            f"({', '.join(kind + ':...' for kind in SOURCE_KINDS)})")
        path = Path(directory) / f"input_{number}.txt"
        with path.open("w", encoding="utf-8") as handle:
            for text in read_texts(spec):
                handle.write(text.replace("\r", "") + "\n")
        files.append(str(path))
    return files


def train_tokenizer_from_inputs(inputs: Sequence[str], vocab_size: int, out_dir: str | Path,
                                model_type: str = "bpe", character_coverage: float = 0.9995) -> Tokenizer:
    """`train_tokenizer` on files or source specs (default:pretrain, jsonl:PATH, ...), the sources written
    out as text lines in a temporary directory first."""
    with tempfile.TemporaryDirectory() as directory:
        files = _materialise_inputs(inputs, directory)
        return train_tokenizer(files, vocab_size, out_dir, model_type, character_coverage=character_coverage)
