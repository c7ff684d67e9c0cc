"""Small file helpers shared by the library and the benchmarks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> Path:
    """Writes ``obj`` as JSON through a temporary name, so a reader never sees half a file.

    Creates the parent folders. ``dumps`` go to :func:`json.dumps` (default: ``indent=2``,
    numpy scalars and other numbers as floats).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, **{"indent": 2, "default": float, **dumps}) + "\n")
    os.replace(tmp, path)
    return path
