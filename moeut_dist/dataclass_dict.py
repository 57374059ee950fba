"""Dataclasses to and from plain dicts (JSON, YAML): the one checker of configs and manifests.

`from_dict(cls, values)` builds a dataclass tree from decoded JSON or YAML, checking each value
against its field's annotation: nested dataclasses, `X | None`, `Literal[...]`, `tuple[X, ...]`
and fixed-length tuples, `list[X]` (lists of dataclasses included), `dict[str, X]`, `int`,
`float`, `bool`, `str` and `Any`. Errors name the dotted key (`optim.lr`,
`splits.train.shards[0].samples`). `to_dict` is the inverse: the plain dict (lists, not tuples)
that `from_dict` reads back to an equal instance, and that `yaml.safe_dump` and `json.dumps`
can write.

A dataclass whose plain layout is not one key per field (the run config's `model` section)
defines the classmethod `from_dict(values, where)` and the method `to_dict()`; fields of its type
use them. `DictConvertible` gives a dataclass those methods in the standard layout.
"""

from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from typing import Any, Literal, Self

# Values in messages stay short: a damaged file may hold a huge one.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60


class ConfigError(ValueError):
    """Input that cannot describe a valid model, run or file: a key or value named, with why."""


def from_dict(cls: type, values: Any, where: str = "", *, complete: bool = False) -> Any:
    """An instance of the dataclass `cls` from the mapping `values`.

    `where` is the dotted key of `values` in the tree ("" at the root). Fields left out take
    their defaults; with `complete` every field must be given (a file our own writer wrote in
    full, where a missing key means damage).
    """
    if not isinstance(values, dict):
        raise ConfigError(
            f"{where or 'the top level'} must be a mapping, got {_SHORT.repr(values)}"
        )
    fields = dataclasses.fields(cls)
    known = [f.name for f in fields]
    unknown = sorted(set(values) - set(known), key=str)
    if unknown:
        section = f"{where} keys" if where else "top-level keys"
        raise ConfigError(
            f"unknown key(s) {[_join(where, str(key)) for key in unknown]}; {section} are "
            f"{sorted(known)}"
        )
    missing = [
        f.name
        for f in fields
        if f.name not in values
        and (
            complete
            or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        )
    ]
    if missing:
        raise ConfigError(f"missing key(s) {[_join(where, name) for name in missing]}")
    hints = typing.get_type_hints(cls)
    converted = {
        name: coerce(hints[name], value, _join(where, name), complete=complete)
        for name, value in values.items()
    }
    return cls(**converted)


def coerce(expected: Any, value: Any, where: str, *, complete: bool = False) -> Any:
    """`value` as the annotated type `expected`, or a ConfigError naming the key `where`.

    YAML 1.1 reads `2.5e-4` (no dot) as a string, so numeric strings are accepted for float
    fields, as are integers; nothing else is converted.
    """
    origin = typing.get_origin(expected)
    arguments = typing.get_args(expected)
    if expected is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        (inner,) = [option for option in arguments if option is not type(None)]
        return coerce(inner, value, where, complete=complete)
    if origin is Literal:
        if value not in arguments:
            raise ConfigError(f"{where} must be one of {list(arguments)}, got {_SHORT.repr(value)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {_SHORT.repr(value)}")
        if origin is tuple and arguments[-1:] != (...,):
            if len(value) != len(arguments):
                raise ConfigError(
                    f"{where} must be a list of {len(arguments)} values, got {_SHORT.repr(value)}"
                )
            item_types = arguments
        else:
            item_types = [arguments[0]] * len(value)
        items = (
            coerce(t, v, f"{where}[{i}]", complete=complete)
            for i, (t, v) in enumerate(zip(item_types, value, strict=True))
        )
        return tuple(items) if origin is tuple else list(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {_SHORT.repr(value)}")
        key_type, value_type = arguments
        return {
            coerce(key_type, k, where, complete=complete): coerce(
                value_type, v, _join(where, str(k)), complete=complete
            )
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(expected):
        own_layout = getattr(expected, "from_dict", None)
        if own_layout is not None:
            return own_layout(value, where)
        return from_dict(expected, value, where, complete=complete)
    if expected is float and not isinstance(value, bool):
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    if expected in (int, bool, str) and type(value) is expected:
        return value
    name = getattr(expected, "__name__", expected)
    raise ConfigError(f"{where} must be {name}, got {_SHORT.repr(value)}")


def to_dict(instance: Any) -> dict[str, Any]:
    """The plain dict of a dataclass instance, nested ones in their own layout."""
    return {f.name: _plain(getattr(instance, f.name)) for f in dataclasses.fields(instance)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        own_layout = getattr(value, "to_dict", None)
        return own_layout() if own_layout is not None else to_dict(value)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _has_default(field: dataclasses.Field) -> bool:
    return not (
        field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    )


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


class DictConvertible:
    """`from_dict`, `to_dict` and a checked `replace` for a dataclass in the standard layout."""

    @classmethod
    def from_dict(cls, values: Any, where: str = "") -> Self:
        return from_dict(cls, values, where)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes`, checked like `from_dict` (unknown keys, types, ranges)."""
        return from_dict(type(self), {**self.to_dict(), **changes})
