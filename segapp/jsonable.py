"""Results (dataclasses, plain objects) as JSON-ready dicts for the REST server, UI and jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def as_dict(value: Any) -> dict[str, Any]:
    """A dataclass (ConceptInfo, VideoResult) or object as a JSON-ready dict."""
    import dataclasses

    if hasattr(value, "to_dict"):
        return dict(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        raw = dataclasses.asdict(value)
    else:
        raw = dict(vars(value))
    return {k: jsonable(v) for k, v in raw.items() if not isinstance(v, np.ndarray)}


def jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
