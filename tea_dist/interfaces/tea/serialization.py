"""The Edge Agent's JSON helpers: states and events holding results, as JSON text.

``ParallelFlowResult`` (a pydantic model) and dataclasses become plain objects; anything else
JSON cannot take still raises ``TypeError``, as ``json`` does.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


class TeaJSONEncoder(json.JSONEncoder):
    """``json.JSONEncoder`` that also encodes results (``to_dict``/``model_dump``) and
    dataclasses."""

    def default(self, o: Any) -> Any:
        for method in ("to_dict", "model_dump"):
            convert = getattr(o, method, None)
            if callable(convert):
                return convert()
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        return super().default(o)


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` with ``TeaJSONEncoder`` (another ``cls`` may be given)."""
    kwargs.setdefault("cls", TeaJSONEncoder)
    return json.dumps(obj, **kwargs)
