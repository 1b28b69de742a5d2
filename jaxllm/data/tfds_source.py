"""`tfds:NAME[/CONFIG][:SPLIT]` sources: a prepared TensorFlow-Datasets dataset in array_record format, read
with `tfds.data_source` (no TensorFlow needed; never downloads). See `jaxllm.data.sources` for the spec;
`jaxllm.data.tfds_writer` builds such datasets from JSONL."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import numpy as np

from jaxllm.data.report import DataError


def parse_tfds(rest: str) -> tuple[str, str]:
    """'name/config:split' -> ('name/config', 'split'); the split may hold a slice ('train[:10%]')."""
    name, sep, split = rest.partition(":")
    return name, (split if sep and split else "train")


def open_tfds(rest: str):
    import tensorflow_datasets as tfds

    name, split = parse_tfds(rest)
    try:
        if name.startswith(("/", ".", "~")):
            builder = tfds.builder_from_directory(os.path.expanduser(name))
            return builder.as_data_source(split=split), f"{name}:{split}"
        data_dir = os.environ.get("TFDS_DATA_DIR") or None
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False), f"{name}:{split}"
    except Exception as error:  # TFDS raises many types; turn them into one clear message
        text = str(error).split("\n")[0]
        hint = ("prepare it first (jaxllm reads TFDS datasets in array_record format without TensorFlow; a dataset "
                "that only exists as tfrecord needs `pip install tensorflow` and a rebuild with "
                "file_format='array_record'); the data dir is $TFDS_DATA_DIR or ~/tensorflow_datasets")
        raise DataError(f"tfds:{rest}: cannot open the dataset: {text}. {hint}") from None


def to_python(value: Any, where: str, field: str) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where}: field '{field}' is not valid UTF-8", "not_utf8") from None
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "OSU":
            return [to_python(item, where, field) for item in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [to_python(item, where, field) for item in value]
    if isinstance(value, dict):
        converted = {key: to_python(item, where, f"{field}.{key}" if field else key) for key, item in value.items()}
        columns = list(converted.values())
        if field and columns and all(isinstance(c, list) for c in columns) and len({len(c) for c in columns}) == 1:
            # A TFDS Sequence of dicts arrives as a dict of equal-length lists: turn it back into rows.
            return [dict(zip(converted, row)) for row in zip(*columns)]
        return converted
    return value


def tfds_records(rest: str, on_bad: Callable[[str, str], None]) -> Iterator[tuple[int, Any, str]]:
    """(index in the split, the record as plain Python, "tfds:NAME:SPLIT record N") for every record; a
    record with undecodable text goes to `on_bad("not_utf8", message)`."""
    source, label = open_tfds(rest)
    chunk = 1024
    for start in range(0, len(source), chunk):
        indices = list(range(start, min(start + chunk, len(source))))
        items = source.__getitems__(indices) if hasattr(source, "__getitems__") else [source[i] for i in indices]
        for index, item in zip(indices, items):
            where = f"tfds:{label} record {index}"
            try:
                yield index, to_python(item, where, ""), where
            except DataError as error:
                on_bad("not_utf8", str(error))


__all__ = ["open_tfds", "parse_tfds", "tfds_records", "to_python"]
