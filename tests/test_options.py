"""The one ``-O key=value`` parser: types from the dataclass annotations, bounds, nested settings."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from edgeperceiver.errors import InputError
from edgeperceiver.options import parse_options


@dataclass(frozen=True)
class Inner:
    preset: str = "performance"
    names: tuple[str, ...] = ()
    flag: bool = True


@dataclass(frozen=True)
class Opts:
    count: int = field(default=4, metadata={"min": 1})
    level: int | None = field(default=None, metadata={"min": 0, "max": 5})
    typed: bool | None = None
    path: str | None = None
    ratio: float = 0.5
    inner: Inner = field(default_factory=lambda: Inner(flag=False))


def test_cli_strings_become_typed_values() -> None:
    o = parse_options(Opts, {"count": "8", "level": "auto", "typed": "yes", "path": "none", "ratio": "0.25",
                             "names": "a, b,", "preset": "mixed"}, nested="inner")
    assert (o.count, o.level, o.typed, o.path, o.ratio) == (8, None, True, "none", 0.25)
    assert o.inner == Inner(preset="mixed", names=("a", "b"), flag=False)  # the field's own default kept
    assert parse_options(Opts, {"count": 3, "typed": False}, nested="inner").typed is False  # real values


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"cout": 1}, "unknown demo option"),
        ({"count": "0"}, "count must be a positive integer"),
        ({"count": True}, "count must be a positive integer"),
        ({"count": "2.5"}, "count must be a positive integer"),
        ({"level": 9}, r"level must be an integer in 0\.\.5"),
        ({"typed": "maybe"}, "typed must be true or false"),
        ({"ratio": "half"}, "ratio must be a finite number"),
        ({"ratio": "inf"}, "ratio must be a finite number"),  # would be written as Infinity: not JSON
        ({"ratio": float("nan")}, "ratio must be a finite number"),
        ({"flag": "sometimes"}, "flag must be true or false"),
    ],
)
def test_bad_values_name_the_key(options: dict[str, object], match: str) -> None:
    with pytest.raises(InputError, match=match):
        parse_options(Opts, options, what="demo", nested="inner")
