"""Type checks of config fields against their annotations, naming the field.

Search spaces, ``--set`` and recorded configs hand values to the config dataclasses; a float
crop size, a string probability or ``--set tta=False`` read as the string ``'False'`` (true)
would otherwise fail deep inside a library, or worse, silently mean something else.
"""

from __future__ import annotations

import numbers
from typing import Any


def _matches(value: Any, kind: str) -> bool:
    if kind == "None":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind == "float":  # an int is a float here (--set optim.lr=1 is 1.0)
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == "str" or kind.startswith("Literal["):  # a Literal's values are checked by name
        return isinstance(value, str)
    return True  # nested configs and other types are checked where they are built


def checked(name: str, value: Any, annotation: str) -> Any:
    """``value`` if it fits ``annotation`` (a dataclass field's type string), else ValueError.

    A whole float where only an int fits becomes that int: tables of trials (pandas) hold a
    conditional int parameter as float (3.0), and ``--set epochs=3.0`` means 3.

    Args:
        name: The field's name in messages (``aug.crop_size``).
        value: Its value.
        annotation: The field's annotation as written, e.g. ``"float | None"`` (the modules
            use ``from __future__ import annotations``, so fields carry strings).
    """
    kinds = [k.strip() for k in _split_union(annotation)]
    if any(_matches(value, k) for k in kinds):
        return value
    if (
        "int" in kinds
        and isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and float(value).is_integer()
    ):
        return int(value)
    raise ValueError(f"{name}={value!r} must be of type {annotation}")


def _split_union(annotation: str) -> list[str]:
    """``"Literal['a', 'b'] | None"`` -> ``["Literal['a', 'b']", "None"]`` (bars at depth 0)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(annotation):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            parts.append(annotation[start:i])
            start = i + 1
    parts.append(annotation[start:])
    return parts
