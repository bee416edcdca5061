"""Models (docs/models.md): what folds, loaded by name.

A model is any object with ``initial(stream)`` and a pure ``apply(state, event)``; optionally
``render(state)`` (how a state appears in reports and exports), ``version`` (explicit model version),
and ``dump_state``/``load_state`` (how a state goes into a snapshot; identity by default).
:class:`Model` wraps the user's object with those defaults and a fingerprint of its code, so a
snapshot taken with other model code is never used.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..envelope import Event
from ..errors import ModelNotFound

__all__ = ["Model", "load_model", "render_json"]


_PLAIN = frozenset({str, int, float, bool, type(None)})
_STR = frozenset({str})


def render_json(value: Any) -> Any:
    """A JSON-compatible copy of a rendered state (tuples → lists, bytes → hex, keys → str)."""
    if type(value) is dict and _STR.issuperset(map(type, value)) and _PLAIN.issuperset(map(type, value.values())):
        return dict(value)  # already JSON: the common flat state, copied without a call per field
    if isinstance(value, dict):
        return {str(k): render_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [render_json(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class Model:
    """A loaded model: the user's object plus defaults for the optional members.

    ``fingerprint`` identifies the model's code (and explicit ``version``): a snapshot taken with a
    different fingerprint is never used.
    """

    def __init__(self, obj: Any, *, name: str, source: bytes | None = None) -> None:
        if not callable(getattr(obj, "initial", None)) or not callable(getattr(obj, "apply", None)):
            raise ModelNotFound(f"{name} is not a model: it needs initial(stream) and apply(state, event)")
        self.obj = obj
        self.name = name
        self.initial: Callable[[str], Any] = obj.initial
        self.apply: Callable[[Any, Event], Any] = obj.apply
        self._render = getattr(obj, "render", None)
        self._dump = getattr(obj, "dump_state", None)
        self._load = getattr(obj, "load_state", None)
        self.version = str(getattr(obj, "version", "") or "")
        h = hashlib.sha256()
        h.update(source if source is not None else _source_of(obj))
        h.update(b"\x00version:" + self.version.encode())
        self.fingerprint = h.hexdigest()

    def render(self, state: Any) -> Any:
        """The state as JSON (the model's ``render`` if it has one)."""
        return render_json(self._render(state) if self._render is not None else state)

    def dump_state(self, state: Any) -> Any:
        """The state as a CBOR-encodable value, for snapshots."""
        return self._dump(state) if self._dump is not None else state

    def load_state(self, value: Any) -> Any:
        """Inverse of :meth:`dump_state`."""
        return self._load(value) if self._load is not None else value


def _source_of(obj: Any) -> bytes:
    """The code a model's behaviour comes from: its module's source file (or the object's source)."""
    mod = inspect.getmodule(obj) if not inspect.ismodule(obj) else obj
    parts: list[bytes] = []
    for candidate in (mod, type(obj) if not inspect.ismodule(obj) else None):
        if candidate is None:
            continue
        try:
            parts.append(inspect.getsource(candidate).encode())
            break
        except (OSError, TypeError):
            continue
    if not parts:
        parts.append(repr(obj).encode())
    return b"\n".join(parts)


def load_model(ref: str | Any) -> Model:
    """Load a model from ``package.module:attribute``, ``path/to/file.py:attribute``, a module path
    (``package.module``, whose functions are the model) or an object that already is one.

    Raises :class:`ModelNotFound` saying what could not be loaded.
    """
    if not isinstance(ref, str):
        return Model(ref, name=getattr(ref, "__name__", type(ref).__name__))
    target, _, attr = ref.partition(":")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise ModelNotFound(f"model file not found: {target}")
        modname = "chainfold_model_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(modname, path)
        if spec is None or spec.loader is None:
            raise ModelNotFound(f"cannot import {target}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ModelNotFound(f"importing {target} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise ModelNotFound(f"cannot import {target!r}: {type(exc).__name__}: {exc}") from exc
    if attr:
        try:
            obj = getattr(module, attr)
        except AttributeError:
            raise ModelNotFound(f"{target} has no attribute {attr!r}") from None
    else:
        obj = module
    try:
        source = Path(inspect.getfile(module)).read_bytes()
    except (OSError, TypeError):
        source = None
    if attr and not inspect.ismodule(obj):
        source = (source or b"") + b"\x00attr:" + attr.encode()
    return Model(obj, name=ref, source=source)
