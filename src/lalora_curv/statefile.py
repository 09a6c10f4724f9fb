"""Nested training state (optimizer, scheduler, scaler, RNG) as safetensors + JSON, no pickle.

:func:`flatten` splits a nest of dicts, lists, tuples, numbers, strings, tensors and NumPy
arrays into ``{name: tensor}`` and a JSON skeleton in which every tensor is
``{"__tensor__": name}``, every array ``{"__ndarray__": name, "dtype": ...}`` and every tuple
``{"__tuple__": [...]}``; :func:`unflatten` inverts it. Reading either part runs no code
(``safetensors`` and ``json`` only), unlike ``torch.load`` of a pickle, which can execute
whatever the file holds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from lalora_curv.errors import LaloraError


class StateError(LaloraError):
    """A state file does not hold what :func:`flatten` writes."""


def flatten(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """``(tensors, skeleton)``: ``obj`` with its tensors and arrays taken out."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = x.detach().to("cpu").contiguous().clone()
            return {"__tensor__": name}
        if isinstance(x, np.ndarray):
            name = f"t{len(tensors)}"
            tensors[name] = torch.from_numpy(np.ascontiguousarray(x).astype(x.dtype, copy=True))
            return {"__ndarray__": name, "dtype": str(x.dtype)}
        if isinstance(x, dict):
            if not all(isinstance(k, str | int) and not isinstance(k, bool) for k in x):
                raise StateError(f"state keys must be strings or integers, got {list(x)[:3]}")
            # JSON keys are strings: integer keys (optimizer state ids) are tagged
            return {"__dict__": [[k, walk(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            return {"__float__": repr(x)}
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise StateError(f"cannot store a {type(x).__name__} in a state file")

    return tensors, walk(obj)


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The nest :func:`flatten` took apart; :class:`StateError` on anything else."""

    def tensor(name: Any) -> torch.Tensor:
        if not isinstance(name, str) or name not in tensors:
            raise StateError(f"the state refers to tensor {name!r}, which the file lacks")
        return tensors[name]

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if set(x) == {"__tensor__"}:
                return tensor(x["__tensor__"])
            if set(x) == {"__ndarray__", "dtype"}:
                try:
                    return tensor(x["__ndarray__"]).numpy().astype(np.dtype(x["dtype"]))
                except TypeError as e:
                    raise StateError(f"bad array dtype {x['dtype']!r} ({e})") from None
            if set(x) == {"__tuple__"} and isinstance(x["__tuple__"], list):
                return tuple(walk(v) for v in x["__tuple__"])
            if set(x) == {"__float__"} and x["__float__"] in ("inf", "-inf", "nan"):
                return float(x["__float__"])
            if set(x) == {"__dict__"} and isinstance(x["__dict__"], list):
                out = {}
                for item in x["__dict__"]:
                    if not (isinstance(item, list) and len(item) == 2):
                        raise StateError(f"malformed state entry {item!r}")
                    key, value = item
                    if isinstance(key, bool) or not isinstance(key, str | int):
                        raise StateError(f"malformed state key {key!r}")
                    out[key] = walk(value)
                return out
            raise StateError(f"malformed state node with keys {sorted(x)[:4]}")
        if isinstance(x, list):
            return [walk(v) for v in x]
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise StateError(f"malformed state value {x!r}")

    return walk(skeleton)


__all__ = ["StateError", "flatten", "unflatten"]
