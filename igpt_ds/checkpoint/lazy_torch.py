"""Read ``torch.save`` files tensor by tensor, without loading them.

A ``torch.save`` file is a zip archive: ``<name>/data.pkl`` (the pickled object, tensors as references
to storages) and one uncompressed entry ``<name>/data/<key>`` per storage. :class:`TorchFile`
unpickles only ``data.pkl``; every tensor in it becomes a :class:`LazyTensor` that knows its
storage entry, offset, shape and dtype, and :meth:`LazyTensor.read` reads just the bytes of the
elements asked for (``os.pread`` at the entry's offset in the file). So assembling one parameter
from the flat ZeRO partitions of 64 ranks costs that parameter's bytes, not 64 files' worth.

:class:`SafetensorsFile` does the same for a safetensors file (the consolidated export's and HF's
weights): its header is parsed, each tensor is a :class:`LazyTensor` read with ``os.pread`` (no
mmap, so a reader's resident memory is the tensors it holds). :class:`DerivedTensor` is a tensor
computed from such reads on demand (a transpose, a row range); :func:`materialize` reads either.

The objects in DeepSpeed's files (its enums, loss scaler, fragment addresses) are unpickled as
``torch.load(weights_only=False)`` would, which is how DeepSpeed itself reads them: open only
checkpoints you trust.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

PathLike = Union[str, os.PathLike]
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length
_LOCAL_HEADER_SIZE = 30


class CheckpointFileError(ValueError):
    """A checkpoint file that is missing, truncated or not a ``torch.save`` archive; the message names it."""


@dataclass
class _Storage:
    file: "TorchFile"
    key: str
    dtype: torch.dtype
    numel: int
    start: int = 0  # byte offset of its data in a SafetensorsFile's data section


@dataclass
class LazyTensor:
    """A tensor of a :class:`TorchFile`: metadata only, until :meth:`read`."""

    storage: _Storage
    offset: int  # in elements of the storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def read(self, start: int = 0, numel: Optional[int] = None) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of the flattened tensor, as a new 1-D CPU tensor."""
        total = self.numel()
        numel = total - start if numel is None else numel
        if start < 0 or numel < 0 or start + numel > total:
            raise IndexError(f"{self.storage.file.path}: elements [{start}, {start + numel}) outside 0..{total}")
        if not self.is_contiguous():
            return self.load().flatten()[start:start + numel].clone()
        return self.storage.file.read_elements(self.storage, self.offset + start, numel)

    def load(self) -> torch.Tensor:
        """The whole tensor, with its shape."""
        if self.is_contiguous():
            return self.read().view(self.shape)
        span = max((s - 1) * st for s, st in zip(self.shape, self.stride)) + 1 if self.shape else 1
        flat = self.storage.file.read_elements(self.storage, self.offset, span)
        return torch.as_strided(flat, self.shape, self.stride).clone()


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    return LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_):
    return data


def _rebuild_from_type(func, _new_type, args, _state):
    return func(*args)  # the plain tensor: subclass and attributes do not matter to a reader


class _Unpickler(pickle.Unpickler):
    def __init__(self, stream, file: "TorchFile"):
        super().__init__(stream)
        self._file = file

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _rebuild_from_type
        return super().find_class(module, name)

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"{self._file.path}: unknown persistent id {kind!r}")
        with warnings.catch_warnings():  # the legacy typed-storage classes warn when asked their dtype
            warnings.simplefilter("ignore")
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        return self._file.storage(str(key), dtype, int(numel))


class _LazyFile:
    """What both lazy readers share: one read-only descriptor (``self._fd``), closed by ``close()``,
    a ``with`` block, or garbage collection."""

    _fd: Optional[int] = None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class TorchFile(_LazyFile):
    """One ``torch.save`` file, opened lazily: ``TorchFile(path).obj`` is its object with LazyTensor leaves."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointFileError(f"{self.path}: missing (the checkpoint lacks this rank's file)")
        self.size = self.path.stat().st_size
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointFileError(f"{self.path}: not a readable torch.save archive ({e}); the file is "
                                      f"truncated or corrupt, e.g. a save that was killed half-way") from None
        pkl = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointFileError(f"{self.path}: no <name>/data.pkl inside; not a torch.save file")
        self._prefix = pkl[0][:-len("data.pkl")]
        byteorder = self._prefix + "byteorder"
        if byteorder in self._zip.namelist() and self._zip.read(byteorder) != b"little":
            raise CheckpointFileError(f"{self.path}: written on a big-endian machine; not supported")
        self._storages: dict[str, _Storage] = {}
        self._offsets: dict[str, int] = {}
        self._fd: Optional[int] = None
        try:
            with self._zip.open(pkl[0]) as stream:
                self.obj: Any = _Unpickler(stream, self).load()
        except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError) as e:
            raise CheckpointFileError(f"{self.path}: cannot unpickle its data.pkl ({e})") from None

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> _Storage:
        if key not in self._storages:
            self._storages[key] = _Storage(self, key, dtype, numel)
        return self._storages[key]

    def _data_offset(self, key: str) -> int:
        """Where storage ``key``'s bytes start in the file (after the entry's local zip header)."""
        if key not in self._offsets:
            name = f"{self._prefix}data/{key}"
            try:
                info = self._zip.getinfo(name)
            except KeyError:
                raise CheckpointFileError(f"{self.path}: storage entry {name} is missing") from None
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointFileError(f"{self.path}: entry {name} is compressed; torch.save never does that")
            header = os.pread(self._fileno(), _LOCAL_HEADER_SIZE, info.header_offset)
            signature, name_len, extra_len = _LOCAL_HEADER.unpack(header)
            if signature != b"PK\x03\x04":
                raise CheckpointFileError(f"{self.path}: bad zip header for {name}; the file is corrupt")
            start = info.header_offset + _LOCAL_HEADER_SIZE + name_len + extra_len
            if start + info.file_size > self.size:
                raise CheckpointFileError(f"{self.path}: truncated ({self.size} bytes; entry {name} needs "
                                          f"{start + info.file_size})")
            self._offsets[key] = start
        return self._offsets[key]

    def _fileno(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read_elements(self, storage: _Storage, start: int, numel: int) -> torch.Tensor:
        itemsize = torch.empty((), dtype=storage.dtype).element_size()
        if start + numel > storage.numel:
            raise CheckpointFileError(f"{self.path}: a tensor reaches past its storage {storage.key}")
        return _pread_tensor(self._fileno(), self._data_offset(storage.key) + start * itemsize, numel, storage.dtype,
                             f"{self.path}: truncated inside storage {storage.key}")

    def close(self) -> None:
        super().close()
        if getattr(self, "_zip", None) is not None:
            self._zip.close()


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsFile(_LazyFile):
    """One safetensors file, opened lazily: ``SafetensorsFile(path).tensors`` maps names to LazyTensors."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
        except FileNotFoundError:
            raise CheckpointFileError(f"{self.path}: missing") from None
        self._fd: Optional[int] = os.open(self.path, os.O_RDONLY)
        try:
            (length,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            if length > self.size - 8:
                raise ValueError(f"header of {length} bytes in a file of {self.size}")
            header = json.loads(os.pread(self._fd, length, 8))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            self.close()
            raise CheckpointFileError(f"{self.path}: not a readable safetensors file ({e})") from None
        self._base = 8 + length
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, LazyTensor] = {}
        for name, entry in header.items():
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
            if dtype is None:
                self.close()
                raise CheckpointFileError(f"{self.path}: tensor {name} has dtype {entry.get('dtype')!r}, not one of "
                                          f"{sorted(_SAFETENSORS_DTYPES)}")
            shape = tuple(int(x) for x in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
            itemsize = torch.empty((), dtype=dtype).element_size()
            numel = (end - start) // itemsize
            stride, expected = [], 1
            for size in reversed(shape):
                stride.insert(0, expected)
                expected *= size
            if end - start != expected * itemsize or self._base + end > self.size:
                self.close()
                raise CheckpointFileError(f"{self.path}: tensor {name} {shape} does not fit its data offsets "
                                          f"[{start}, {end}) (file of {self.size} bytes: truncated?)")
            storage = _Storage(self, name, dtype, numel, start)
            self.tensors[name] = LazyTensor(storage, 0, shape, tuple(stride))

    def read_elements(self, storage: _Storage, start: int, numel: int) -> torch.Tensor:
        itemsize = torch.empty((), dtype=storage.dtype).element_size()
        if start + numel > storage.numel:
            raise CheckpointFileError(f"{self.path}: a read reaches past tensor {storage.key}")
        return _pread_tensor(self._fd, self._base + storage.start + start * itemsize, numel, storage.dtype,
                             f"{self.path}: truncated inside tensor {storage.key}")


def _pread_tensor(fd: int, offset: int, numel: int, dtype: torch.dtype, truncated: str) -> torch.Tensor:
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(0, dtype=dtype)
    buffer = bytearray(nbytes)
    view, pos = memoryview(buffer), 0
    while pos < nbytes:
        got = os.preadv(fd, [view[pos:]], offset + pos)
        if got <= 0:
            raise CheckpointFileError(truncated)
        pos += got
    return torch.frombuffer(buffer, dtype=dtype)


@dataclass
class DerivedTensor:
    """A tensor made on demand (``make()``) from lazily read ones; its shape and dtype are known before."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    def load(self) -> torch.Tensor:
        t = self.make()
        if tuple(t.shape) != tuple(self.shape) or t.dtype != self.dtype:
            raise ValueError(f"a derived tensor gave {tuple(t.shape)} {t.dtype}, it promised {self.shape} {self.dtype}")
        return t


def materialize(t) -> torch.Tensor:
    """The tensor itself, for a tensor; read (whole, with its shape) for a LazyTensor or DerivedTensor."""
    return t if isinstance(t, torch.Tensor) else t.load()


def rows(t, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` (first dimension) of a tensor or lazy tensor, reading only them when it can."""
    if isinstance(t, LazyTensor) and t.is_contiguous() and t.shape:
        row = t.numel() // t.shape[0] if t.shape[0] else 0
        return t.read(start * row, (stop - start) * row).view((stop - start, *t.shape[1:]))
    return materialize(t)[start:stop].clone()
