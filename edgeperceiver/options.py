"""One parser for ``-O key=value`` options: a frozen dataclass's fields say the types.

A target declares its options as a frozen dataclass; :func:`parse_options` turns the CLI's
strings (or a library caller's real values) into it, by each field's annotation:

- ``bool`` (``true/false/yes/no/on/off/1/0``), ``bool | None`` (also ``auto``/``none``);
- ``int``, ``int | None`` (also ``auto``/``none``), ``float`` (finite); a field's
  ``metadata={"min": m, "max": M}`` bounds it;
- ``str``, ``str | None``; ``tuple[str, ...]`` (a comma-separated list);
- one nested dataclass field (e.g. the quantizer's settings) whose own fields are
  accepted as top-level keys.

Unknown keys and bad values raise :class:`~edgeperceiver.errors.InputError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from .errors import InputError

T = TypeVar("T")

_TRUE = frozenset({"true", "yes", "1", "on"})
_FALSE = frozenset({"false", "no", "0", "off"})
_AUTO = frozenset({"", "none", "auto"})


def _split_optional(hint: Any) -> tuple[Any, bool]:
    """``(inner type, optional)`` of a type hint (``X | None`` -> ``(X, True)``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def coerce(name: str, raw: Any, hint: Any, bounds: Mapping[str, Any] | None = None) -> Any:
    """``raw`` (a CLI string or a real value) as the type ``hint`` says, within ``bounds``."""
    kind, optional = _split_optional(hint)
    text = raw.strip() if isinstance(raw, str) else None
    if raw is None or (optional and text is not None and text.lower() in _AUTO and kind is not str):
        if optional:
            return None
        raise InputError(f"option {name} needs a value")
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        low = (text if text is not None else str(raw)).lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise InputError(f"option {name} must be true or false, not {raw!r}")
    if kind is int or kind is float:
        value: Any
        if isinstance(raw, bool):
            value = None
        elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = kind(raw) if kind is float or float(raw).is_integer() else None
        else:
            try:
                value = kind(text if text is not None else raw)
            except (TypeError, ValueError):
                value = None
        lo, hi = (bounds or {}).get("min"), (bounds or {}).get("max")
        if (value is None or not math.isfinite(value) or (lo is not None and value < lo)
                or (hi is not None and value > hi)):
            noun = "an integer" if kind is int else "a finite number"
            if lo == 1 and hi is None and kind is int:
                noun = "a positive integer"
            elif lo is not None and hi is not None:
                noun += f" in {lo}..{hi}"
            elif lo is not None:
                noun += f" >= {lo}"
            raise InputError(f"{name} must be {noun}, not {raw!r}")
        return value
    if kind is str:
        return str(raw) if text is None else text
    if typing.get_origin(kind) is tuple:
        if isinstance(raw, (list, tuple)):
            return tuple(str(v) for v in raw)
        return tuple(p.strip() for p in str(raw).split(",") if p.strip())
    return raw


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_options(cls: type[T], options: Mapping[str, Any], *, what: str = "", nested: str | None = None) -> T:
    """The frozen options dataclass ``cls`` from ``options`` (see the module docstring).

    ``what`` names the target in the unknown-key message ("unknown TensorRT option(s)");
    ``nested`` is the name of a dataclass field whose own fields are top-level keys too.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    own = {f.name: f for f in dataclasses.fields(cls) if f.name != nested}
    inner_cls: Any = None
    inner: dict[str, dataclasses.Field[Any]] = {}
    if nested is not None:
        inner_cls = _hints(cls)[nested]
        inner = {f.name: f for f in dataclasses.fields(inner_cls)}
    unknown = sorted(set(options) - set(own) - set(inner))
    if unknown:
        label = f"{what} " if what else ""
        raise InputError(f"unknown {label}option(s) {', '.join(unknown)}; known: {', '.join(sorted({*own, *inner}))}")
    own_hints = _hints(cls)
    values = {k: coerce(k, v, own_hints[k], own[k].metadata) for k, v in options.items() if k in own}
    if inner_cls is not None:
        inner_hints = _hints(inner_cls)
        sub = {k: coerce(k, v, inner_hints[k], inner[k].metadata) for k, v in options.items() if k in inner}
        nested_field = next(f for f in dataclasses.fields(cls) if f.name == nested)
        base = (nested_field.default_factory() if nested_field.default_factory is not dataclasses.MISSING
                else inner_cls())
        values[nested] = dataclasses.replace(base, **sub)  # type: ignore[index]
    return cls(**values)
