"""Typed, checked TOML configs: every mistake is reported as one line naming the file, table and field.

A config section is a frozen dataclass; :func:`load_section` fills it from a TOML table, rejecting unknown
keys, missing required keys and values of the wrong type, then runs the dataclass's ``check`` method for
range checks (which raise ValueError with the field name; we add the file and table).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path

from amalab.errors import ConfigError


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_type(value, tp, where: str):
    """Return ``value`` if it fits ``tp`` (int, float, str, bool, list[...], unions), else raise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_type(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {' or '.join(map(_type_name, typing.get_args(tp)))}, "
                          f"got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is typing.Any or (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def load_section(cls, table, path, name: str = ""):
    """Build dataclass ``cls`` from TOML table ``name`` (dotted; "" for the top level) of file ``path``."""
    where = f"{path}: [{name}]" if name else f"{path}:"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(fields)}")
    values = {}
    for key, field in fields.items():
        if key in table:
            tp = hints[key]
            if dataclasses.is_dataclass(tp):
                values[key] = load_section(tp, table[key], path, f"{name}.{key}" if name else key)
            else:
                values[key] = _check_type(table[key], tp, f"{where} {key}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {key!r}")
    try:
        section = cls(**values)  # a section may run its check on construction (TokenizationConfig)
        check = getattr(section, "check", None)
        if check is not None:
            check()
    except ValueError as e:
        raise ConfigError(f"{where if name else path}: {e}") from None
    return section
