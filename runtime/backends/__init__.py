"""Backend registry: one :class:`BackendEntry` per backend, declared in the backend's own module.

Adding a backend is one module (its :class:`Backend` subclass, options dataclass, availability check
and ``ENTRY``) plus its name in ``_BUILTIN`` below, or a call to :func:`register_backend` from outside
the package. The CLI's choices and options, ``auto``, parity and the tests all read this registry.

Backend modules import only NumPy at module level; their heavy library (onnxruntime, torch,
TensorRT) is imported when a backend is built or its availability checked on a device that needs it.
``auto`` picks the highest-ranked backend that is available for the device and takes the options
given, and logs which; a backend asked
for by name that cannot run raises :class:`BackendUnavailableError`, it never falls back silently.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import logging
from collections.abc import Mapping
from typing import Any

from ..bundle import Bundle
from ..errors import BackendUnavailableError, ForgetRTError, InvalidInputError, unknown
from .base import TOLERANCES, Backend, BackendEntry, NoOptions

__all__ = [
    "Backend",
    "BackendEntry",
    "NoOptions",
    "TOLERANCES",
    "DEVICES",
    "register_backend",
    "list_backends",
    "get_backend",
    "backend_names",
    "make_options",
    "create_backend",
    "choose_backend",
    "resolve_device",
    "cuda_device_count",
]

log = logging.getLogger("forgetrt.runtime")

DEVICES = ("auto", "cpu", "cuda")
_BUILTIN = ("onnxruntime_backend", "torch_backend", "tensorrt_backend")
_REGISTRY: dict[str, BackendEntry] = {}


def register_backend(entry: BackendEntry) -> BackendEntry:
    """Add a backend to the registry (its name must be new)."""
    if entry.name in _REGISTRY or entry.name == "auto":
        raise InvalidInputError(f"backend {entry.name!r} is already registered")
    if not (dataclasses.is_dataclass(entry.options) and entry.options.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise InvalidInputError(f"backend {entry.name!r}: options must be a frozen dataclass")
    _REGISTRY[entry.name] = entry
    return entry


for _mod in _BUILTIN:
    register_backend(importlib.import_module(f"{__name__}.{_mod}").ENTRY)


def list_backends() -> tuple[BackendEntry, ...]:
    return tuple(_REGISTRY.values())


def backend_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_backend(name: str) -> BackendEntry:
    if name not in _REGISTRY:
        raise unknown("backend", name, (*_REGISTRY, "auto"))
    return _REGISTRY[name]


def cuda_device_count() -> int:
    """CUDA devices visible through the driver API (no torch import)."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        n = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(n)) != 0:
            return 0
        return n.value
    return 0


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise unknown("device", device, DEVICES)
    if device == "auto":
        return "cuda" if cuda_device_count() > 0 else "cpu"
    if device == "cuda" and cuda_device_count() == 0:
        raise BackendUnavailableError("device 'cuda' requested but no CUDA device is visible")
    return device


def make_options(name: str, options: Any = None) -> Any:
    """The options dataclass of backend ``name`` from an instance, a mapping or None (defaults).

    A key the backend does not take is an :class:`InvalidInputError` naming the backend's options.
    """
    entry = get_backend(name)
    if isinstance(options, entry.options):
        return options
    if options is not None and not isinstance(options, Mapping):
        raise InvalidInputError(
            f"backend {name!r} options must be a {entry.options.__name__} or a mapping, got {type(options).__name__}"
        )
    opts = dict(options or {})
    valid = [f.name for f in dataclasses.fields(entry.options)]
    bad = sorted(set(opts) - set(valid))
    if bad:
        raise InvalidInputError(
            f"backend {name!r} takes no option {', '.join(map(repr, bad))} (its options: "
            f"{', '.join(valid) or 'none'}); "
            "options are backend-specific, so name the backend"
        )
    return entry.options(**opts)


def choose_backend(bundle: Bundle, device: str, options: Any = None) -> str:
    """The highest-ranked backend that takes ``options`` and can run ``bundle`` with them on (resolved)
    ``device``."""
    reasons = {}
    for entry in sorted((e for e in _REGISTRY.values() if device in e.rank), key=lambda e: -e.rank[device]):
        try:
            why = entry.available(bundle, device, make_options(entry.name, options))
        except ForgetRTError as e:  # it does not take these options
            why = str(e)
        if why is None:
            return entry.name
        reasons[entry.name] = why
    raise BackendUnavailableError(f"no backend can run this bundle on {device}: {reasons}")


def create_backend(name: str, bundle: Bundle, device: str = "auto", options: Any = None) -> Backend:
    """Build backend ``name`` (or ``"auto"``: the best available, logged) for ``bundle`` on ``device``.

    ``options``: the backend's options dataclass, or a mapping of its fields.
    """
    device = resolve_device(device)
    if name == "auto":
        name = choose_backend(bundle, device, options)
        log.info("backend auto: chose %s on %s", name, device)
    entry = get_backend(name)
    opts = make_options(name, options)
    why = entry.available(bundle, device, opts)
    if why is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device}: {why}")
    backend = entry.factory(bundle, device, opts)
    backend.name = entry.name  # the registry's name, also for subclasses registered under another one
    return backend
