"""Small helpers of the sweep layer (no Ray)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def dump_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a temp file, then a rename): a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def _finite(v: Any) -> Any:
    """NaN and infinities as null: JSON has no spelling for them."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v
