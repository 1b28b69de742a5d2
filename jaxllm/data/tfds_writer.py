"""Building a TFDS dataset in array_record format from local JSONL (offline), e.g. for tests.

Read it back as the data source `tfds:NAME:SPLIT` (see jaxllm.data.sources).
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.data.report import DataError
from jaxllm.data.sources import read_records


def _feature_for(value: Any, field: str):
    import tensorflow_datasets as tfds

    if isinstance(value, str):
        return tfds.features.Text()
    if isinstance(value, bool):
        return tfds.features.Scalar(np.bool_)
    if isinstance(value, int):
        return tfds.features.Scalar(np.int64)
    if isinstance(value, float):
        return tfds.features.Scalar(np.float32)
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        keys = sorted({key for item in value for key in item})
        return tfds.features.Sequence({key: tfds.features.Text() for key in keys})
    raise DataError(f"build_tfds_from_jsonl: field '{field}' has a value of type {type(value).__name__} that has no "
                    "TFDS feature here (strings, numbers, booleans and lists of string dicts are supported)")


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def build_tfds_from_jsonl(splits: dict[str, str | os.PathLike] | str | os.PathLike, data_dir: str | os.PathLike,
                          name: str = "jaxllm_jsonl", version: str = "1.0.0") -> Path:
    """Writes local JSONL files as a TFDS dataset in array_record format; returns the dataset directory.

    `splits` maps a split name to a JSONL file (a single path means {"train": path}). Features are
    inferred from the first record (all records must have the same fields); record order is kept
    (`disable_shuffling`). Read it back with `tfds:NAME:SPLIT` and TFDS_DATA_DIR=data_dir, or with
    `tfds:<returned dir>:SPLIT`.
    """
    import tensorflow_datasets as tfds

    if not isinstance(splits, dict):
        splits = {"train": splits}
    if name != name.lower() or not name.replace("_", "").isalnum() or not name[0].isalpha():
        raise DataError(f"TFDS dataset name '{name}' must be snake_case letters and digits, e.g. my_corpus")
    rows = {split: [record.data for record in read_records(f"jsonl:{path}")] for split, path in splits.items()}
    first = next(iter(rows.values()))[0]
    features = {field: _feature_for(value, field) for field, value in first.items()}
    for split, records in rows.items():
        for number, record in enumerate(records):
            if set(record) != set(features):
                raise DataError(f"{splits[split]}: record {number} has fields {sorted(record)} but the first record "
                                f"has {sorted(features)}; every record must have the same fields")

    def info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                     disable_shuffling=True, description=f"Built by jaxllm from {dict(splits)}")

    def split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in rows}

    def generate_examples(self, split):
        for index, record in enumerate(rows[split]):
            yield index, record

    def body(namespace):
        namespace.update(VERSION=tfds.core.Version(version), _info=info, _split_generators=split_generators,
                         _generate_examples=generate_examples)

    builder_class = types.new_class(_camel(name), (tfds.core.GeneratorBasedBuilder,), {"skip_registration": True},
                                    body)
    builder = builder_class(data_dir=str(data_dir), file_format="array_record")
    if builder.name != name:
        raise DataError(f"TFDS dataset name '{name}' does not survive TFDS's CamelCase round trip "
                        f"(it became '{builder.name}'); use lower-case words separated by underscores")
    builder.download_and_prepare()
    return Path(builder.data_dir)
