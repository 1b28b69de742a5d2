"""The one loader from plain data (YAML, JSON, `key=value` overrides) to typed settings dataclasses.

Every settings class in jaxllm (the training config, pipeline recipes, the knowledge experiment, eval
tasks, the quality filter's rules) is built here, so they all reject an unknown key the same way (naming
the closest valid one), coerce values by the field's type annotation (int, float, str, bool, `Literal`
choices, tuples, optional values, nested dataclasses) and name the field in every error.

Why in-house and not pydantic/dacite/draccus: the schemas are plain dataclasses used inside jitted code
(ModelConfig is a static, hashable argument), the coercion rules are a page long, and the messages are
the product: "'train.setps' is not a known key (did you mean 'steps'?)". A dependency would add a second
type system and its own messages for no gain in what users see.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from jaxllm.errors import ConfigError

_NONE_TYPE = type(None)


def closest(name: str, options: typing.Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the option closest to `name`, or ""."""
    match = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type annotation of each dataclass field (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}


def check_keys(keys: typing.Iterable[str], valid: typing.Iterable[str], where: str,
               error: type[Exception] = ConfigError, noun: str = "key") -> None:
    """Raises `error` when a key is not in `valid`: "{where}: unknown key(s) a, b (did you mean ...?);
    valid keys: ..."."""
    valid = sorted(valid)
    unknown = [str(key) for key in keys if key not in valid]
    if unknown:
        raise error(f"{where}: unknown {noun}(s) {', '.join(unknown)}{closest(unknown[0], valid)}; "
                    f"valid {noun}s: {', '.join(valid)}")


def coerce(value: Any, annotation: Any, where: str, error: type[Exception] = ConfigError) -> Any:
    """`value` as the type `annotation` describes; `where` names the field in the error."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        text = str(value).lower() if isinstance(value, bool) else str(value)  # YAML true/false -> 'true'/'false'
        if text not in args:
            choices = ", ".join(map(str, args))
            raise error(f"{where}: '{text}' is not one of {choices}{closest(text, map(str, args))}")
        return text
    if origin in (typing.Union, types.UnionType):
        if value is None and _NONE_TYPE in args:
            return None
        inner = [a for a in args if a is not _NONE_TYPE]
        return coerce(value, inner[0], where, error) if len(inner) == 1 else value
    if origin in (tuple, list):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise error(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args and (origin is list or args[-1] is Ellipsis or len(args) == 1) else None
        items = [coerce(v.strip() if isinstance(v, str) else v, item_type, where, error) if item_type else v
                 for v in items]
        return tuple(items) if origin is tuple else list(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise error(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise error(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise error(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise error(f"{where}: expected an integer, got {value!r}") from None
            if number.is_integer():
                return int(number)
        raise error(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise error(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise error(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise error(f"{where}: expected a string, got {value!r}")
    if annotation is Any or annotation is object:
        return value
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, where, error)
    raise error(f"{where}: unsupported field type {annotation!r}")


def update(obj: Any, data: dict[str, Any], where: str = "", *, prefix: str = "",
           error: type[Exception] = ConfigError) -> None:
    """Applies `data` to the dataclass instance `obj` in place; nested dataclass fields take mappings.
    Error messages read "{where}: '{prefix}{key}' ..."."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected a mapping, got {data!r}")
    field_type = field_types(type(obj))
    lead = f"{where}: " if where else ""
    for key, value in data.items():
        name = f"{lead}'{prefix}{key}'"
        if key not in field_type:
            valid = sorted(field_type)
            raise error(f"{name} is not a known key{closest(key, valid)}; valid keys here: {', '.join(valid)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise error(f"{name} is a section; give it a mapping, not {value!r}")
            update(current, value, where, prefix=f"{prefix}{key}.", error=error)
        else:
            setattr(obj, key, coerce(value, field_type[key], name, error))


def build(cls: type, data: Any, where: str, error: type[Exception] = ConfigError, *,
          exclude: typing.Iterable[str] = (), noun: str = "key") -> Any:
    """A `cls` instance from a mapping of its fields (defaults for the rest). `exclude`: fields that
    cannot come from data (e.g. a Python callable); `noun` names a key in errors ("experiment setting")."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected a mapping, got {data!r}")
    field_type = {k: v for k, v in field_types(cls).items() if k not in set(exclude)}
    check_keys(data, field_type, where, error, noun)
    missing = [f.name for f in dataclasses.fields(cls) if f.name in field_type and f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise error(f"{where}: missing {noun}(s) {', '.join(missing)}")
    return cls(**{key: coerce(value, field_type[key], f"{where}: '{key}'", error) for key, value in data.items()})


def check_choices(obj: Any, prefix: str = "", error: type[Exception] = ConfigError) -> None:
    """Checks every `Literal`-typed field of a (nested) dataclass instance holds one of its choices, e.g.
    after `dataclasses.replace` or direct construction, which bypass `coerce`."""
    for name, annotation in field_types(type(obj)).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}{name}.", error)
        elif typing.get_origin(annotation) is Literal:
            coerce(value, annotation, f"{prefix}{name}", error)
