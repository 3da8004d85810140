"""Compilation: JAX's persistent compilation cache, and how many seconds a piece of work compiled.

    enable_cache(default_cache_dir())           # later runs load compiled steps from disk
    with CompileTimer() as timer:
        train.run(stage, workdir)
    timer.seconds                               # tracing + lowering + XLA compilation, in seconds
    timer.count                                 # XLA compilations (a persistent-cache hit is none)
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from jax import monitoring

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_active: list["CompileTimer"] = []
_listening = False


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/ovseg_jax/jax_cache` (default `~/.cache/ovseg_jax/jax_cache`): where the
    command-line tools keep JAX's persistent compilation cache unless told otherwise."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ovseg_jax" / "jax_cache"


def enable_cache(directory: str | Path, min_compile_seconds: float = 0.5) -> Path:
    """Store every compilation that takes >= `min_compile_seconds` under `directory` and reuse it
    in later processes (same program, shapes, JAX version and devices) -> the directory."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def _listener(event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event in _COMPILE_EVENTS:
        for timer in _active:
            timer.seconds += duration
            timer.count += event == _BACKEND_COMPILE


class CompileTimer:
    """Context manager summing JAX's tracing, lowering and compilation time (`seconds`) in its block
    and counting its XLA compilations (`count`)."""

    def __init__(self):
        self.seconds = 0.0
        self.count = 0

    def __enter__(self) -> "CompileTimer":
        global _listening
        if not _listening:
            monitoring.register_event_duration_secs_listener(_listener)
            _listening = True
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)
