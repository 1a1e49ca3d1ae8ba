"""The generic config loader every schema goes through: YAML files, dotted `key=value` overrides,
unknown-key rejection and type checks driven by the dataclass annotations.

Every error is a `ConfigError` whose message names the field (and the file, where the caller adds
it), so a wrong value fails at start-up in one line instead of deep inside megatron-core. The
schemas (model.py, train.py, eval.py, data_plan.py) only add their cross-field rules.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field."""


def require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


@dataclass(frozen=True)
class Wording:
    """How a kind of file words its structural errors. The training config and the data plan
    predate this loader with different wordings that users (and their scripts) know; both stay."""

    not_found: str = "{path}: config file not found"
    invalid_yaml: str = "{path}: invalid YAML: {error}"
    not_a_mapping: str = "{path}: top level must be a mapping"
    # {known}: the fields sorted; {allowed}: in the schema's order
    unknown_fields: str = "{where}: unknown field(s) {unknown}; known: {known}"


CONFIG_WORDING = Wording()


def load_yaml(path: str | Path, wording: Wording = CONFIG_WORDING) -> Dict[str, Any]:
    """A YAML file whose top level is a mapping (safe_load: nothing in it executes)."""
    if not Path(path).is_file():
        raise ConfigError(wording.not_found.format(path=path))
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(wording.invalid_yaml.format(path=path, error=exc, first_line=str(exc).splitlines()[0])) from None
    if not isinstance(data, dict):
        raise ConfigError(wording.not_a_mapping.format(path=path))
    return data


def keys_of(cls) -> List[str]:
    """The YAML keys of schema `cls`: its fields but those it derives itself (metadata `derived`)."""
    return [f.name for f in fields(cls) if not f.metadata.get("derived")]


def check_keys(data: Dict[str, Any], allowed, where: str, wording: Wording = CONFIG_WORDING) -> None:
    """Reject keys that `allowed` (names, in the schema's order) does not have, naming them."""
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(wording.unknown_fields.format(where=where, unknown=", ".join(unknown),
                                                         known=", ".join(sorted(allowed)),
                                                         allowed=", ".join(allowed)))


def from_dict(cls, data: Dict[str, Any], where: str, wording: Wording = CONFIG_WORDING):
    """Build dataclass `cls` from a mapping, rejecting unknown keys by name.

    An absent field whose metadata has `required` (the message's tail) is reported as
    `<where>.<field>: required<tail>`; other absent fields without a default name themselves too."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    check_keys(data, keys_of(cls), where, wording)
    for f in fields(cls):
        if f.name not in data and "required" in f.metadata:
            raise ConfigError(f"{where}.{f.name}: required{f.metadata['required']}")
    try:
        return cls(**data)
    except TypeError as exc:  # a missing required field
        raise ConfigError(f"{where}: {exc}") from None


def check_types(obj, where: str):
    """Check (and convert) every field of dataclass `obj` against its annotation, naming the field.

    YAML reads `3e-4` as a string and `1e12` may arrive as a float; both are accepted where a
    number is meant (an integral float where an int is meant), but a value that is not a number at
    all, a non-boolean flag or a value outside a Literal's choices is reported here, by name.
    A field whose metadata has `check` (a function of the value and the field's name) is checked by
    that instead: the data plan's own rules for numbers, globs and paths.
    """
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        if f.metadata.get("derived"):
            continue
        name = f"{where}.{f.name}" if where else f.name
        check: Callable[[Any, str], Any] = f.metadata.get("check") or (lambda v, n, k=hints[f.name]: _checked(v, k, n))
        setattr(obj, f.name, check(getattr(obj, f.name), name))
    return obj


def _checked(value, kind, name: str):
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        if value is None:
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        require(value in choices, name, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if kind is bool:
        require(isinstance(value, bool), name, f"must be true or false, got {value!r}")
    elif kind is str:
        require(isinstance(value, str), name, f"must be a string, got {value!r}")
    elif kind in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        ok = isinstance(number, (int, float)) and not isinstance(number, bool)
        if ok and kind is int:
            ok = float(number).is_integer()
            number = int(number) if ok else number
        require(ok, name, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        return float(number) if kind is float else number
    elif origin in (list, List):
        require(isinstance(value, list), name, f"must be a list, got {value!r}")
        item = (typing.get_args(kind) or (Any,))[0]
        if item is not Any and not dataclasses.is_dataclass(item):
            return [_checked(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    return value


def parse_override(text: str):
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so 2 is an int and true a bool)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: Dict[str, Any], overrides) -> Dict[str, Any]:
    """Set `a.b.c=v` paths in the raw config; list entries are addressed by name (or index)."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, list):
                match = [s for s in node if isinstance(s, dict) and s.get("name") == part]
                if match:
                    idx = node.index(match[0])
                elif part.isdigit() and int(part) < len(node):
                    idx = int(part)
                else:
                    raise ConfigError(f"override {text!r}: no list entry named {part!r}")
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(f"override {text!r}: {'.'.join(path[:i])} is not a section")
    return data


def load_file(path: str | Path, build: Callable[[Dict[str, Any]], Any], overrides=(),
              wording: Wording = CONFIG_WORDING):
    """Read `path`, apply `overrides`, hand the mapping to `build` (a schema's constructor and
    validation); any error comes back as one ConfigError that starts with the file's path."""
    data = load_yaml(path, wording)
    try:
        apply_overrides(data, overrides)
        return build(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:  # e.g. a string where a number belongs
        raise ConfigError(f"{path}: {exc}") from None
