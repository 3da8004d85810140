"""Safe reading and writing of PyTorch / safetensors checkpoint files as numpy state dicts.

Nothing here unpickles arbitrary objects: `.pt/.pth/.bin` files go through
`torch.load(..., weights_only=True)`, TorchScript archives (OpenAI's CLIP releases) are read by
a restricted unpickler that only rebuilds tensors, and detectron2 `.pkl` files by one that only
rebuilds numpy arrays. torch is imported lazily: it is needed for `.pt/.pth/.bin` files only.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file could not be read or does not fit the model; the message says why."""


def _import_torch(path: Path):
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        raise CheckpointError(
            f"{path}: reading PyTorch files needs torch; install the extra: "
            "pip install 'ovseg_jax[torch]' (or convert the file to safetensors first)"
        ) from None
    return torch


def tensor_to_numpy(t) -> np.ndarray:
    """torch.Tensor -> numpy, upcasting bfloat16 (which numpy lacks) to float32."""
    import torch  # noqa: PLC0415

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    """Flatten nested dicts of tensors/arrays to `{"a.b.c": array}`; other leaves are dropped."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out)
        return
    if isinstance(obj, np.ndarray):
        out[prefix[:-1]] = obj
        return
    if type(obj).__module__.startswith("torch") and hasattr(obj, "detach"):
        out[prefix[:-1]] = tensor_to_numpy(obj)


def load_torch_file(path: str | os.PathLike) -> Any:
    """Load a `.pt/.pth/.bin` file with `weights_only=True`; TorchScript archives are read
    without executing their code. Returns the raw (possibly nested) object."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        return read_torchscript_state_dict(path)
    torch = _import_torch(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to unpickle: the file holds objects other than tensors and plain "
            f"containers (loading it would run code from the file). Re-save only its state dict "
            f"(torch.save(model.state_dict(), ...)) or convert it to safetensors. Details: {e}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a checkpoint file into a flat `{key: np.ndarray}` dict.

    `.safetensors` files are read directly; `.pt/.pth/.bin` with `torch.load(weights_only=True)`
    (nested dicts such as `{"model": {...}}` or `{"state_dict": {...}}` are flattened with
    dotted keys); `.pkl` as a detectron2 pickle of numpy arrays.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix == ".pkl":
        return read_numpy_pickle(path)
    obj = load_torch_file(path)
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    if not out:
        raise CheckpointError(f"{path}: no tensors found in the file")
    return out


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `.safetensors` file (no torch needed)."""
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    except TypeError as e:  # bfloat16 tensors have no numpy dtype: go through torch
        torch = _import_torch(Path(path))
        from safetensors.torch import load_file as load_torch  # noqa: PLC0415

        del torch, e
        return {k: tensor_to_numpy(v) for k, v in load_torch(str(path)).items()}


def write_safetensors(state: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `{key: array}` to `.safetensors` atomically (temp file + rename)."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.array(v, order="C") for k, v in state.items()}, str(tmp),
              metadata=dict(metadata or {}))
    os.replace(tmp, path)


def write_torch_file(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` numpy arrays (converted to tensors, nested dicts kept) atomically."""
    path = Path(path)
    torch = _import_torch(path)

    def to_torch(x):
        if isinstance(x, Mapping):
            return {k: to_torch(v) for k, v in x.items()}
        if isinstance(x, np.ndarray):
            return torch.from_numpy(np.array(x, order="C"))
        return x

    tmp = path.with_name(path.name + ".tmp")
    torch.save(to_torch(obj), tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# detectron2 .pkl: a pickle of {"model": {name: np.ndarray}, ...}; only numpy may be rebuilt.

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def read_numpy_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a detectron2-style `.pkl` (numpy arrays in dicts) without running code."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to unpickle (only numpy arrays are allowed): {e}") from None
    except (EOFError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable pickle (truncated or corrupt?): {e}") from None
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    return {k: np.asarray(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# TorchScript archives (OpenAI CLIP's `ViT-B-16.pt`): a zip with `*/data.pkl` (the module tree,
# pickled with `__torch__.*` classes) and `*/data/<key>` raw tensor storages. We rebuild only
# tensors; every `__torch__` object becomes a plain attribute dict. No archive code runs.

_STORAGE_DTYPES = {
    "HalfStorage": np.float16, "FloatStorage": np.float32, "DoubleStorage": np.float64,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/code/__torch__.py") or "/code/__torch__/" in n for n in names) or any(
        n.endswith("constants.pkl") for n in names)


class _ScriptObject(dict):
    """Stand-in for a TorchScript module: its pickled attributes."""

    def __setstate__(self, state):
        if isinstance(state, Mapping):
            self.update(state)


class _StorageType:
    def __init__(self, name):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *unused):
    arr, = storage
    itemsize = arr.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        arr[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)).copy()


class _TorchScriptUnpickler(pickle.Unpickler):
    def __init__(self, f, zf: zipfile.ZipFile, root: str):
        super().__init__(f)
        self._zf, self._root = zf, root

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return dict
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_tensorlist",
                                                      "build_doublelist", "build_boollist"):
            return list
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid[:5]
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        raw = self._zf.read(f"{self._root}/data/{key}")
        dtype = _STORAGE_DTYPES[storage_type.name]
        if dtype == "bfloat16":
            u16 = np.frombuffer(raw, np.uint16)[:numel]
            return ((u16.astype(np.uint32) << 16).view(np.float32),)
        return (np.frombuffer(raw, dtype)[:numel],)


def read_torchscript_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a TorchScript archive as a flat state dict (attribute paths joined by '.')."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("/data.pkl")]
            if not pkl:
                raise CheckpointError(f"{path}: TorchScript archive without data.pkl")
            root = pkl[0][: -len("/data.pkl")]
            obj = _TorchScriptUnpickler(io.BytesIO(zf.read(pkl[0])), zf, root).load()
    except (pickle.UnpicklingError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path}: could not read the TorchScript archive's tensors ({e}). Convert it once "
            "with PyTorch: torch.save(torch.jit.load(path).state_dict(), 'weights.pt')") from None
    out: dict[str, np.ndarray] = {}

    def walk(o, prefix):
        if isinstance(o, np.ndarray):
            out[prefix[:-1]] = o
        elif isinstance(o, Mapping):
            for k, v in o.items():
                if isinstance(k, str) and k != "training":
                    walk(v, f"{prefix}{k}.")

    walk(obj, "")
    return out


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None


SIDECAR_SUFFIX = ".ovseg_jax.json"


def read_sidecar(path: str | os.PathLike, section: str) -> dict | None:
    """The `section` ("clip" / "segmenter") of `<path>.ovseg_jax.json`, the architecture record we
    write next to exported weights whose shapes alone do not determine it; None when absent."""
    sidecar = Path(str(path) + SIDECAR_SUFFIX)
    if not sidecar.is_file():
        return None
    data = read_json(sidecar)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise CheckpointError(f"{sidecar}: expected {{section: config}} JSON with sections 'clip' / 'segmenter'")
    return data.get(section)


def write_sidecar(path: str | os.PathLike, section: str, config: dict | None) -> None:
    """Set (or with None remove) one section of `<path>.ovseg_jax.json`, atomically; the file is
    deleted when no section is left."""
    sidecar = Path(str(path) + SIDECAR_SUFFIX)
    data = read_json(sidecar) if sidecar.is_file() else {}
    if config is None:
        data.pop(section, None)
    else:
        data[section] = config
    if not data:
        sidecar.unlink(missing_ok=True)
        return
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, sidecar)
