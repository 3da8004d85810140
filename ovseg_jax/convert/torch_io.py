"""Safe reading and writing of PyTorch / safetensors checkpoint files as numpy state dicts.

Nothing here unpickles arbitrary objects: `.pt/.pth/.bin` files go through
`torch.load(..., weights_only=True)`, TorchScript archives (OpenAI's CLIP releases) are read by
a restricted unpickler that only rebuilds tensors, and detectron2 `.pkl` files by one that only
rebuilds numpy arrays. torch is imported lazily: it is needed for `.pt/.pth/.bin` files only.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping, NamedTuple

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


_EXPECTED_TORCH = ("expected a file written by torch.save (a zip archive with <name>/data.pkl, or the legacy "
                   "pickle format), a TorchScript archive, or use .safetensors / detectron2 .pkl")
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER, the legacy format's first pickle


def _first_bytes(path: Path, n: int = 24) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _what_it_looks_like(head: bytes) -> str:
    """A hint for files that are not checkpoints (download pages, LFS pointers, text)."""
    text = head.lstrip().lower()
    if len(head) > 9 and head[8:10] in (b'{"', b"{}"):
        return "; it is a safetensors file: name it .safetensors"
    if text.startswith(b"version https://git-lfs"):
        return "; it is a Git LFS pointer: fetch the real file with `git lfs pull`"
    if text.startswith((b"<!doctype", b"<html", b"<?xml")):
        return "; it is an HTML/XML page (a failed download?)"
    if text.startswith((b"{", b"[")):
        return "; it looks like JSON"
    return f"; it starts with {head[:16]!r}" if head else "; it is empty"


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"global {module}.{name}")


def _check_torch_file_kind(path: Path) -> bool:
    """Raise `CheckpointError` saying what `path` is not unless it can be a torch file; True for a
    TorchScript archive (read without torch), False for a `torch.save` file."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: a damaged zip archive ({e}); {_EXPECTED_TORCH}") from None
        if not any(n.endswith("/data.pkl") for n in names):
            raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl; it holds "
                                  f"{sorted(names)[:5]}): {_EXPECTED_TORCH}")
        return _is_torchscript_names(names)
    head = _first_bytes(path)
    if not (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a zip archive or pickle): "
                              f"{_EXPECTED_TORCH}{_what_it_looks_like(head)}")
    try:
        with open(path, "rb") as f:
            first = _NoGlobals(f).load()
    except Exception:  # noqa: BLE001  (any failure means it is not torch's legacy header)
        first = None
    if first != _TORCH_MAGIC:
        raise CheckpointError(f"{path} is a pickle but not a PyTorch checkpoint (torch.save's legacy format starts "
                              f"with torch's magic number): {_EXPECTED_TORCH}")
    return False


def load_torch_file(path: str | os.PathLike) -> Any:
    """Load a `.pt/.pth/.bin` file with `weights_only=True`; TorchScript archives are read
    without executing their code. Returns the raw (possibly nested) object. A file that is not
    a torch file (text, random bytes, another zip or pickle) raises `CheckpointError` saying so."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if _check_torch_file_kind(path):
        return read_torchscript_state_dict(path)
    torch = _import_torch(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # not a refused class: a damaged pickle
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (its pickle is corrupt): {e}") from None
        raise CheckpointError(
            f"{path}: refused to unpickle: the file holds objects other than tensors and plain "
            f"containers (loading it would run code from the file). Re-save only its state dict "
            f"(torch.save(model.state_dict(), ...)) or convert it to safetensors. Details: {e}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None


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


class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a class or function we do not rebuild."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise _RefusedGlobal(f"global {module}.{name} is not allowed")


def read_numpy_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a detectron2-style `.pkl` (numpy arrays in dicts) without running code."""
    path = Path(path)
    expected = "expected a pickle of {'model': {name: numpy array}}"
    if zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a detectron2 .pkl (it is a zip archive, e.g. a torch.save file: "
                              f"name it .pth): {expected}")
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as e:
        raise CheckpointError(f"{path}: refused to unpickle (only numpy arrays are allowed): {e}") from None
    except Exception as e:  # noqa: BLE001  (a damaged pickle fails in many ways)
        raise CheckpointError(f"{path} is not a detectron2 .pkl (not a readable pickle: {type(e).__name__}: {e}): "
                              f"{expected}{_what_it_looks_like(_first_bytes(path))}") from None
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


def _is_torchscript_names(names: list[str]) -> bool:
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


class _Storage(NamedTuple):
    key: str           # the archive member `data/<key>`
    array: np.ndarray  # its elements, 1-D


class _PendingTensor(NamedTuple):
    """A tensor as the pickle describes it; checked against its storage and copied out only by
    `_checked_tensor`, once its name is known."""
    storage: Any
    offset: Any
    size: Any
    stride: Any


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return _PendingTensor(storage, offset, size, stride)


def _int_tuple(x) -> bool:
    return isinstance(x, (tuple, list)) and all(type(v) is int for v in x)


def _checked_tensor(t: _PendingTensor, name: str, path: Path) -> np.ndarray:
    """Copy tensor `name` out of its storage after checking that every element it addresses
    (offset + Σ (size_i - 1) · stride_i) lies inside the storage; else `CheckpointError`."""
    where = f"{path}: tensor {name or '<root>'!r}"
    if not isinstance(t.storage, _Storage):
        raise CheckpointError(f"{where}: its storage is not a tensor storage of the archive ({type(t.storage).__name__})")
    arr, size, stride, offset = t.storage.array, t.size, t.stride, t.offset
    where += f" (storage data/{t.storage.key}: {arr.size} elements of {arr.dtype})"
    if not (_int_tuple(size) and _int_tuple(stride) and type(offset) is int) or len(size) != len(stride):
        raise CheckpointError(f"{where}: malformed sizes {size!r}, strides {stride!r} or offset {offset!r}")
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise CheckpointError(f"{where}: negative size, stride or offset (sizes {list(size)}, strides "
                              f"{list(stride)}, offset {offset}); the file is corrupt or crafted")
    numel = math.prod(size)
    if numel == 0:
        return np.zeros(tuple(size), arr.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= arr.size:
        raise CheckpointError(f"{where}: sizes {list(size)}, strides {list(stride)} and offset {offset} reach "
                              f"element {last}, beyond the storage; the file is corrupt or crafted")
    if numel > arr.size:
        raise CheckpointError(f"{where}: {numel} elements with overlapping strides {list(stride)} from a storage "
                              f"of {arr.size}; a weights file does not hold such tensors")
    itemsize = arr.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        arr[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)).copy()


class _TorchScriptUnpickler(pickle.Unpickler):
    def __init__(self, f, zf: zipfile.ZipFile, root: str):
        super().__init__(f)
        self._zf, self._root = zf, root
        self._storages: dict[str, _Storage] = {}

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
        if not (isinstance(pid, tuple) and len(pid) >= 5):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        kind, storage_type, key, _location, numel = pid[:5]
        if kind != "storage" or not isinstance(storage_type, _StorageType) or not isinstance(key, str) \
                or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        if key not in self._storages:
            self._storages[key] = _Storage(key, self._read_storage(key, storage_type.name, numel))
        return self._storages[key]

    def _read_storage(self, key: str, type_name: str, numel: int) -> np.ndarray:
        dtype = _STORAGE_DTYPES[type_name]
        raw_dtype = np.dtype(np.uint16 if dtype == "bfloat16" else dtype)
        nbytes = numel * raw_dtype.itemsize
        with self._zf.open(f"{self._root}/data/{key}") as f:
            raw = f.read(nbytes)  # never more than the pickle declares
        if len(raw) < nbytes:
            raise CheckpointError(f"storage data/{key} holds {len(raw)} bytes; the archive declares {numel} "
                                  f"{type_name} elements ({nbytes} bytes)")
        arr = np.frombuffer(raw, raw_dtype)
        if dtype == "bfloat16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr


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
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001  (a crafted pickle can fail in many ways; none may escape)
        raise CheckpointError(
            f"{path}: could not read the TorchScript archive's tensors ({type(e).__name__}: {e}). Convert it "
            "once with PyTorch: torch.save(torch.jit.load(path).state_dict(), 'weights.pt')") from None
    out: dict[str, np.ndarray] = {}

    def walk(o, prefix):
        if isinstance(o, _PendingTensor):
            out[prefix[:-1]] = _checked_tensor(o, prefix[:-1], path)
        elif isinstance(o, np.ndarray):
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: a directory, expected a JSON file") from None


SIDECAR_SUFFIX = ".ovseg_jax.json"
SIDECAR_SECTIONS = ("clip", "segmenter")


def read_sidecar(path: str | os.PathLike, section: str) -> dict | None:
    """The `section` ("clip" / "segmenter") of `<path>.ovseg_jax.json`, the architecture record we
    write next to exported weights whose shapes alone do not determine it; None when absent."""
    sidecar = Path(str(path) + SIDECAR_SUFFIX)
    if not sidecar.is_file():
        return None
    data = read_json(sidecar)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise CheckpointError(f"{sidecar}: expected {{section: config}} JSON with sections 'clip' / 'segmenter'")
    unknown = sorted(set(data) - set(SIDECAR_SECTIONS))
    if unknown:
        raise CheckpointError(f"{sidecar}: unknown section(s) {', '.join(map(repr, unknown))}; expected "
                              f"{' / '.join(map(repr, SIDECAR_SECTIONS))}")
    return data.get(section)


def check_sidecar_fields(recorded: Mapping, dataclass_type, where: str) -> None:
    """`CheckpointError` naming `where` (the sidecar and its section) and every key of `recorded` that
    is not a field of `dataclass_type`, or whose value has another JSON type than the field's default."""
    fields = {f.name: f for f in dataclasses.fields(dataclass_type)}
    unknown = sorted(k for k in recorded if k not in fields)
    if unknown:
        raise CheckpointError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; expected some of "
                              f"{', '.join(fields)}")
    for key, value in recorded.items():
        default = fields[key].default
        if default is dataclasses.MISSING or default is None:
            continue
        kind = bool if isinstance(default, bool) else (int, float) if isinstance(default, float) else \
            list if isinstance(default, tuple) else type(default)
        bad_bool = isinstance(value, bool) and not isinstance(default, bool)
        if bad_bool or not isinstance(value, kind):
            raise CheckpointError(f"{where}: key {key!r} is {value!r}; expected a value like {default!r}")


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
