"""Pickle-free state for river estimators: their attribute tree as JSON, loaded into a fresh twin.

river models pickle themselves; tidecast never loads pickles (a pickle from disk or the network runs arbitrary
code). Instead :func:`dump_state` walks an estimator's attributes down to numbers, strings, lists, dicts and
deques, and :func:`load_state` writes those values into an estimator *built by the same factory* — it sets
values, it never creates objects of a class named in the data. Floats survive exactly (``repr`` round-trips).

>>> from river import time_series
>>> a = time_series.HoltWinters(alpha=0.3, beta=0.1, gamma=0.5, seasonality=4)
>>> for i in range(20):
...     a.learn_one(float(i % 4) + 0.1 * i)
>>> b = time_series.HoltWinters(alpha=0.3, beta=0.1, gamma=0.5, seasonality=4)
>>> _ = load_state(b, json.loads(json.dumps(dump_state(a))))
>>> a.forecast(3) == b.forecast(3)
True
"""

from __future__ import annotations

import json
import random
import types
from collections import defaultdict, deque
from typing import Any

import numpy as np

_SCALARS = (type(None), bool, int, float, str)
_SKIP = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType, type)


def dump_state(obj: Any) -> Any:
    """The JSON-able value tree of ``obj``."""
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, deque):  # its bound too: a bounded window restored unbounded grew without end
        return {"__deque__": [dump_state(v) for v in obj], **({} if obj.maxlen is None else {"maxlen": obj.maxlen})}
    if isinstance(obj, random.Random):  # its attributes hold no draws: a restore restarted it from its seed
        version, internal, gauss_next = obj.getstate()
        return {"__random__": [version, list(internal), gauss_next]}
    if isinstance(obj, set | frozenset):
        return {"__set__": [dump_state(v) for v in obj]}
    if isinstance(obj, list | tuple):
        return {"__list__": [dump_state(v) for v in obj]}
    if isinstance(obj, dict) or _is_mapping(obj):
        return {"__dict__": [[dump_state(k), dump_state(v)] for k, v in obj.items()],
                **({"__attrs__": _attrs(obj)} if hasattr(obj, "__dict__") and vars(obj) else {})}
    if isinstance(obj, _SKIP) or callable(obj) and not hasattr(obj, "__dict__"):
        return {"__skip__": True}
    if hasattr(obj, "__dict__"):
        return {"__attrs__": _attrs(obj)}
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _is_mapping(obj: Any) -> bool:
    """Dict-like extension types (river's Rust ``VectorDict``) that have no ``__dict__``."""
    return all(hasattr(obj, name) for name in ("items", "keys", "clear", "__setitem__", "__getitem__"))


def _attrs(obj: Any) -> dict[str, Any]:
    return {name: dump_state(value) for name, value in vars(obj).items()}


def load_state(target: Any, state: Any) -> Any:
    """Write ``state`` into ``target`` in place where it is a container/object; return the value to assign."""
    if not isinstance(state, dict):
        return state
    if "__skip__" in state:
        return target
    if "__ndarray__" in state:
        return np.asarray(state["__ndarray__"], dtype=state["dtype"])
    if "__deque__" in state:
        items = [load_state(target[i] if target is not None and i < len(target) else None, v)
                 for i, v in enumerate(state["__deque__"])]
        maxlen = state.get("maxlen")
        if isinstance(target, deque) and target.maxlen == maxlen:
            target.clear()
            target.extend(items)
            return target
        return deque(items, maxlen=maxlen)
    if "__random__" in state:
        version, internal, gauss_next = state["__random__"]
        generator = target if isinstance(target, random.Random) else random.Random()
        generator.setstate((version, tuple(internal), gauss_next))
        return generator
    if "__set__" in state:
        items = {_hashable(load_state(None, v)) for v in state["__set__"]}
        return type(target)(items) if isinstance(target, set | frozenset) else frozenset(items)
    if "__list__" in state:
        items = [load_state(target[i] if target is not None and i < len(target) else None, v)
                 for i, v in enumerate(state["__list__"])]
        if isinstance(target, list):
            target[:] = items
            return target
        return tuple(items) if isinstance(target, tuple) else items
    if "__dict__" in state:
        target = {} if target is None else target
        _load_dict(target, state)
        if "__attrs__" in state:
            _load_attrs(target, state["__attrs__"])
        return target
    if "__attrs__" in state:
        if target is None:
            raise _NoTarget("state has an object where the target has none: build the target with the "
                            "same factory and parameters")
        _load_attrs(target, state["__attrs__"])
        return target
    raise ValueError(f"unrecognised state node with keys {sorted(state)[:5]}")


def _load_dict(target: Any, state: dict) -> None:
    old = {k: target[k] for k in list(target.keys())}
    target.clear()
    for key_state, value in state["__dict__"]:
        key = _hashable(load_state(None, key_state))
        if key in old:
            current = old[key]
        elif isinstance(target, defaultdict):
            current = target[key]  # the default factory builds the right kind of value for us
        else:
            current = None
        target[key] = load_state(current, value)


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list | tuple) else key


def _load_attrs(target: Any, attrs: dict[str, Any]) -> None:
    for name, value in attrs.items():
        current = getattr(target, name, None)
        try:
            new = load_state(current, value)
        except _NoTarget:
            continue  # a lazily built cache (e.g. a pipeline's plan) that the fresh twin rebuilds itself
        if new is not current:
            setattr(target, name, new)


class _NoTarget(ValueError):
    """The state holds an object where the fresh twin has none."""


def dumps(obj: Any) -> bytes:
    """JSON bytes of :func:`dump_state` (NaN/inf kept, as Python's json does)."""
    return json.dumps(dump_state(obj), separators=(",", ":")).encode()
