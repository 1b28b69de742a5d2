"""Building configs from dicts, YAML recipes and `key.sub=value` overrides; writing them back."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from jaxllm import settings
from jaxllm.config.checks import check_ranges, validate
from jaxllm.config.recipes import resolve_recipe
from jaxllm.config.schema import MODEL_PRESETS, Config
from jaxllm.errors import ConfigError
from jaxllm.files import write_atomic

_TOP_LEVEL_ALIASES = {"init_from": "train.init_from", "stage": "train.stage", "steps": "train.steps"}


def _apply_model_preset(config: Config, explicit_model_keys: set[str]) -> None:
    preset = config.model.preset
    if not preset:
        return
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"model.preset '{preset}' is unknown{settings.closest(preset, list(MODEL_PRESETS))}; "
                          f"choose one of {', '.join(MODEL_PRESETS)}")
    for key, value in MODEL_PRESETS[preset].items():
        if key not in explicit_model_keys and key != "vocab_size":
            setattr(config.model, key, value)


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML scalar)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    key = _TOP_LEVEL_ALIASES.get(key, key)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


VOCAB_MULTIPLE = 128  # embedding rows padded to a multiple of this: MXU/tensor-core and sharding friendly


def vocab_size_for(tokenizer_ids: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The model's vocabulary size for a tokenizer of `tokenizer_ids` ids: rounded up to `multiple`."""
    return -(-tokenizer_ids // multiple) * multiple


def _resolve_vocab_size(config: Config, log) -> None:
    """model.vocab_size=0 (the recipe does not fix it) -> the configured tokenizer's size, rounded up."""
    if config.model.vocab_size:
        return
    from jaxllm.data.tokenizer import Tokenizer  # the tokenizer reads its own file; nothing is written

    ids = Tokenizer.load(config.data.tokenizer).vocab_size
    config.model.vocab_size = vocab_size_for(ids)
    if log is not None:
        log(f"model.vocab_size={config.model.vocab_size}: from the tokenizer {config.data.tokenizer} ({ids} ids, "
            f"rounded up to a multiple of {VOCAB_MULTIPLE}); set model.vocab_size to fix it")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None, log=None) -> Config:
    """Builds a Config from an optional YAML recipe, a dict and `key.sub=value` overrides (in that order).

    `path` is a YAML file or the name of a built-in recipe (`pretrain_tiny`; see `builtin_recipes`). A
    model.vocab_size left at 0 is taken from data.tokenizer (rounded up to a multiple of 128); `log`, when
    given, is told so."""
    config = Config()
    explicit_model: set[str] = set()
    layers: list[tuple[str, dict[str, Any]]] = []
    if base:
        layers.append(("config dict", base))
    if path is not None:
        path = resolve_recipe(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(loaded).__name__}")
        layers.append((str(path), loaded))
    if overrides:
        layers.append(("command line", _nest(dict(parse_override(o) for o in overrides))))
    for source, layer in layers:
        for key, value in layer.items():
            key = _TOP_LEVEL_ALIASES.get(key, key)
            if "." in key:
                layer_value = _nest({key: value})
                key, value = next(iter(layer_value.items()))
            if key == "model" and isinstance(value, dict):
                explicit_model.update(k for k in value if k != "preset")
            settings.update(config, {key: value}, source)
    _apply_model_preset(config, explicit_model)
    check_ranges(config)  # before the tokenizer is read for a vocab_size of 0 (a negative one is an error)
    _resolve_vocab_size(config, log)
    validate(config)
    return config


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> Config:
    config = Config()
    settings.update(config, data, "saved config")
    validate(config)
    return config


def save_config(config: Config, path: str | Path) -> None:
    write_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def config_json(config: Config) -> str:
    return json.dumps(to_dict(config), sort_keys=True)
