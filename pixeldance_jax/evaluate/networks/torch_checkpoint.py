"""Reads the state dict in a `torch.save` file into numpy arrays, without torch.

Frozen networks (FID's Inception-v3) ship their weights only as `torch.save` pickles, and the
library must not depend on torch. Both of torch's formats are read:
  - zip (torch >= 1.6): `<archive>/data.pkl` pickles the object; each storage is the record
    `<archive>/data/<key>`; `<archive>/byteorder` says the bytes' order (little if absent).
  - legacy: the pickles of a magic number, a protocol version and system info, then the object,
    then the list of storage keys, then each storage in that order as an int64 element count
    followed by its bytes.
In both, a tensor is pickled as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)` with the storage a persistent id. The unpickler is restricted to those few globals
(tensors, parameters, storage types, dtypes and `OrderedDict`): anything else, such as a whole
pickled `nn.Module`, is refused, which also makes loading an untrusted file run no code.

An untrusted file is also bounded in what it can make the reader allocate: a storage's bytes
must be in the file (no compressed zip member, no legacy element count beyond the file's end),
and the arrays it gives (stride-0 and overlapping views included) hold at most
`_EXPANSION` times the file's size. The objects a pickle gets for the allowed globals are made
anew for each lookup and refuse to have their state set, so one file cannot change how the next
is read. Every failure is a ValueError naming the file.
"""

import collections
import dataclasses
import io
import math
import os
import pathlib
import pickle
import struct
import sys
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER (legacy format).
_PROTOCOL_VERSION = 1001
# The arrays a file gives may hold at most this many times its bytes (plus 1 MiB): broadcast
# views (stride 0) of small storages are read, but no small file can ask for gigabytes.
_EXPANSION = 4
_EXPANSION_FLOOR = 2**20

# torch's storage classes (`torch.FloatStorage`, also `torch.cuda.*` in files saved from a GPU)
# and the dtype names `_rebuild_tensor_v3` pickles (`torch.float32`) -> numpy dtypes.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
_TORCH_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "int64": np.int64, "int32": np.int32, "int16": np.int16,
    "int8": np.int8, "uint8": np.uint8, "bool": np.bool_, "complex64": np.complex64,
    "complex128": np.complex128,
}


class _Refused(pickle.UnpicklingError):
  """A pickle asked for something this reader does not rebuild."""


class _NotTorch(ValueError):
  """The file is not in either `torch.save` format."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: np.dtype


class _Global:
  """What the unpickler hands a pickle for an allowed global: a new object at every lookup,
  calling through to the global (rebuild functions, `OrderedDict`) or standing for it (storage
  types, dtypes). A pickle's BUILD on it is refused: on the module-level object it would set
  state that every later load in the process sees."""
  __slots__ = ("value",)

  def __init__(self, value: Any):
    object.__setattr__(self, "value", value)

  def __setattr__(self, name: str, value: Any) -> None:
    raise _Refused(f"refusing to set {name!r} on a global")

  def __setstate__(self, state: Any) -> None:
    raise _Refused("refusing to set the state of a global (BUILD)")

  def __call__(self, *args: Any) -> Any:
    if not callable(self.value):
      raise _Refused(f"{self.value!r} is not callable")
    return self.value(*args)


def _unwrap(value: Any, kind: type, what: str) -> Any:
  """The global a `_Global` stands for, if it is a `kind`; else the pickle is refused."""
  if not isinstance(value, _Global) or not isinstance(value.value, kind):
    raise _Refused(f"expected a {what}, got {type(value).__name__}")
  return value.value


class _NoBuild:
  """Objects the rebuilders return: a pickle's BUILD on them (which would set their fields past
  the rebuilders' checks) is refused."""

  def __setstate__(self, state: Any) -> None:
    raise _Refused("refusing to set the state of a rebuilt object (BUILD)")


@dataclasses.dataclass
class _Storage(_NoBuild):
  """A flat buffer of `numel` elements of `dtype`; `data` (bytes) arrive once read."""
  dtype: np.dtype
  numel: int
  data: bytes | None = None
  root: "_Storage | None" = None  # Legacy views: the storage they slice,
  byte_offset: int = 0  # from this byte on.

  def buffer(self) -> np.ndarray:
    root = self.root or self
    if root.data is None:
      raise ValueError("a storage's data is missing from the file")
    end = self.byte_offset + self.numel * self.dtype.itemsize
    if end > len(root.data):
      raise ValueError(f"a storage needs {end} bytes, the file holds {len(root.data)}")
    return np.frombuffer(root.data, np.uint8, end - self.byte_offset, self.byte_offset)


@dataclasses.dataclass(frozen=True)
class _Tensor(_NoBuild):
  """A tensor awaiting its storage's bytes: `size`/`stride`/`offset` in elements."""
  storage: _Storage
  dtype: np.dtype
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _integers(values: Any, what: str) -> tuple[int, ...]:
  """A tensor's size or stride: a tuple of non-negative ints (refused otherwise)."""
  if not isinstance(values, (tuple, list)) or not all(
      type(v) is int and v >= 0 for v in values):  # pylint: disable=unidiomatic-typecheck
    raise _Refused(f"a tensor's {what} must be non-negative integers, got {str(values)[:80]}")
  return tuple(values)


def _tensor(storage: Any, dtype: np.dtype, storage_offset: Any, size: Any, stride: Any
            ) -> _Tensor:
  if not isinstance(storage, _Storage):
    raise _Refused(f"a tensor's storage must be a storage record, got {type(storage).__name__}")
  size, stride = _integers(size, "size"), _integers(stride, "stride")
  if type(storage_offset) is not int or storage_offset < 0 or len(size) != len(stride):  # pylint: disable=unidiomatic-typecheck
    raise _Refused(f"a tensor's offset {str(storage_offset)[:40]}, size {size} and stride "
                   f"{stride} do not describe a view")
  return _Tensor(storage, dtype, storage_offset, size, stride)


def _rebuild_tensor(storage: _Storage, storage_offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], *unused: Any) -> _Tensor:
  """`_rebuild_tensor` and `_rebuild_tensor_v2` (whose extra arguments are requires_grad,
  backward hooks and metadata, all irrelevant to the values)."""
  return _tensor(storage, getattr(storage, "dtype", None), storage_offset, size, stride)


def _rebuild_tensor_v3(storage: _Storage, storage_offset: int, size: tuple[int, ...],
                       stride: tuple[int, ...], requires_grad: bool, backward_hooks: Any,
                       dtype: Any, *unused: Any) -> _Tensor:
  """The variant for untyped storages: the tensor carries its own dtype."""
  del requires_grad, backward_hooks
  return _tensor(storage, _unwrap(dtype, np.dtype, "dtype"), storage_offset, size, stride)


def _rebuild_parameter(data: _Tensor, *unused: Any) -> _Tensor:
  """`nn.Parameter` (and `_rebuild_parameter_with_state`): the values are its data's."""
  if not isinstance(data, _Tensor):
    raise _Refused(f"a parameter's data must be a tensor, got {type(data).__name__}")
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{(module, name): _StorageType(np.dtype(dtype)) for name, dtype in _STORAGE_DTYPES.items()
       for module in ("torch", "torch.cuda", "torch.storage")},
    **{("torch", name): np.dtype(dtype) for name, dtype in _TORCH_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
  """Rebuilds only `_ALLOWED_GLOBALS`; storages come from `load_storage(storage_type, key,
  numel, view_metadata)` (None: the pickle must not reference any)."""

  def __init__(self, file: BinaryIO, load_storage=None):
    super().__init__(file, encoding="utf-8")  # As torch.load: Python 2 strings are UTF-8.
    self._load_storage = load_storage

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _ALLOWED_GLOBALS:
      raise _Refused(f"refusing to unpickle {str(module)[:80]}.{str(name)[:80]}: only tensors, "
                     "parameters, storages and (Ordered)dicts are read")
    return _Global(_ALLOWED_GLOBALS[(module, name)])

  def persistent_load(self, saved_id: Any) -> Any:
    typename = saved_id[0] if isinstance(saved_id, tuple) and saved_id else None
    if isinstance(typename, bytes):  # Files written by Python 2.
      typename = typename.decode("ascii")
    if typename != "storage" or self._load_storage is None:
      raise _Refused(f"refusing the persistent id {str(saved_id)[:80]}: only storages are read")
    if len(saved_id) < 5:
      raise _Refused(f"a storage id of {len(saved_id)} fields, expected 5 or more")
    storage_type, key, _, numel, *view_metadata = saved_id[1:]
    storage_type = _unwrap(storage_type, _StorageType, "storage type")
    if type(numel) is not int or numel < 0:  # pylint: disable=unidiomatic-typecheck
      raise _Refused(f"a storage of {str(numel)[:40]} elements")
    return self._load_storage(storage_type.dtype, str(key), numel,
                              view_metadata[0] if view_metadata else None)


class _Budget:
  """The bytes the arrays of one file may still take (`_EXPANSION` times the file's size)."""

  def __init__(self, file_bytes: int):
    self.left = self.total = _EXPANSION * file_bytes + _EXPANSION_FLOOR

  def take(self, nbytes: int, tensor: _Tensor) -> None:
    if nbytes > self.left:
      raise ValueError(f"a tensor of size {tensor.size} ({nbytes} bytes) takes the arrays past "
                       f"{self.total} bytes, {_EXPANSION}x the file's size: broadcast or "
                       "overlapping views that large are not read")
    self.left -= nbytes


def _materialize(obj: Any, byteorder: str, budget: _Budget) -> Any:
  """Replaces every `_Tensor` in dicts, lists and tuples by a numpy array (a copy);
  `byteorder` ("little" or "big") is the file's."""
  if isinstance(obj, _Tensor):
    return _tensor_array(obj, byteorder != sys.byteorder, budget)
  if isinstance(obj, dict):
    return type(obj)((key, _materialize(value, byteorder, budget)) for key, value in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(value, byteorder, budget) for value in obj)
  return obj


def _tensor_array(tensor: _Tensor, swap_bytes: bool, budget: _Budget) -> np.ndarray:
  """The strided view of the storage that torch's `set_(storage, offset, size, stride)`
  makes, copied (contiguous, writeable, in the host's byte order)."""
  itemsize = tensor.dtype.itemsize
  budget.take(math.prod(tensor.size) * itemsize, tensor)
  flat = tensor.storage.buffer()
  flat = flat[:len(flat) // itemsize * itemsize].view(tensor.dtype)
  if 0 in tensor.size:
    return np.zeros(tensor.size, tensor.dtype)
  last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
  if last >= len(flat):  # Offset, size and stride are non-negative (`_tensor`).
    raise ValueError(f"a tensor of size {tensor.size}, stride {tensor.stride} and offset "
                     f"{tensor.offset} reaches past its storage of {len(flat)} elements")
  view = np.lib.stride_tricks.as_strided(
      flat[tensor.offset:], tensor.size, tuple(s * itemsize for s in tensor.stride),
      writeable=False)
  array = np.array(view, order="C")  # A copy, even of a contiguous view.
  return array.byteswap() if swap_bytes else array


def _load_zip(archive: zipfile.ZipFile, budget: _Budget) -> Any:
  pickles = [name for name in archive.namelist()
             if name.endswith("/data.pkl") and name.count("/") == 1]
  if len(pickles) != 1:
    raise _NotTorch("a zip archive without one <archive>/data.pkl")
  prefix = pickles[0].removesuffix("data.pkl")
  names = set(archive.namelist())
  byteorder = (archive.read(f"{prefix}byteorder").decode() if f"{prefix}byteorder" in names
               else "little")
  storages: dict[str, _Storage] = {}

  def load_storage(dtype: np.dtype, key: str, numel: int, view_metadata: Any) -> _Storage:
    del view_metadata  # Zip files have none.
    if key not in storages:
      record = f"{prefix}data/{key}"
      if record not in names:
        raise ValueError(f"the storage record {record} is missing")
      storages[key] = _Storage(dtype, numel, _read_member(archive, record))
    return storages[key]

  obj = _Unpickler(io.BytesIO(_read_member(archive, pickles[0])), load_storage).load()
  return _materialize(obj, byteorder, budget)


def _read_member(archive: zipfile.ZipFile, name: str) -> bytes:
  """A member's bytes; torch stores members uncompressed, so a compressed one (which could
  expand far beyond the file) is refused before it is read."""
  info = archive.getinfo(name)
  if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
    raise ValueError(f"the zip member {name} is compressed: torch.save stores its members "
                     "uncompressed, and compressed ones are not read")
  return archive.read(info)


def _load_legacy(file: BinaryIO, budget: _Budget) -> Any:
  try:
    magic_number = _Unpickler(file).load()
  except _Refused as error:
    raise _NotTorch(f"a pickle, but not of torch.save ({error})") from error
  except Exception as error:  # Any bytes that are not a pickle.
    raise _NotTorch(f"neither a zip archive nor a pickle ({error})") from error
  if magic_number != _MAGIC_NUMBER:
    raise _NotTorch(f"a pickle, but not of torch.save (starts with {str(magic_number)[:40]})")
  protocol_version = _Unpickler(file).load()
  if protocol_version != _PROTOCOL_VERSION:
    raise ValueError(f"unknown legacy protocol version {protocol_version}")
  sys_info = _Unpickler(file).load()
  little_endian = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
  roots: dict[str, _Storage] = {}

  def load_storage(dtype: np.dtype, key: str, numel: int, view_metadata: Any) -> _Storage:
    root = roots.setdefault(key, _Storage(dtype, numel))
    if view_metadata is None:
      return root
    _, offset, view_numel = view_metadata  # Torch < 1.0's storage views, in elements.
    return _Storage(dtype, int(view_numel), root=root, byte_offset=int(offset) * dtype.itemsize)

  obj = _Unpickler(file, load_storage).load()
  for key in _Unpickler(file).load():
    if key not in roots:
      raise ValueError(f"the file lists the storage {key!r} that no tensor uses")
    root = roots[key]
    (numel,) = struct.unpack("<q" if little_endian else ">q", file.read(8))
    nbytes = numel * root.dtype.itemsize
    left = os.fstat(file.fileno()).st_size - file.tell()
    if numel < 0 or nbytes > left:
      raise ValueError(f"the storage {key!r} claims {numel} elements ({nbytes} bytes); the "
                       f"file has {left} bytes left")
    root.data = file.read(nbytes)
    if numel != root.numel or len(root.data) != nbytes:
      raise ValueError(f"the storage {key!r} holds {len(root.data)} bytes, expected "
                       f"{root.numel * root.dtype.itemsize}")
  return _materialize(obj, "little" if little_endian else "big", budget)


def load(path: str | os.PathLike) -> Any:
  """The object a `torch.save` file holds, tensors as numpy arrays (dicts, lists, tuples and
  `OrderedDict`s of tensors and plain values; nothing else is rebuilt).

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: naming `path`: not a torch.save file, a refused global, or corrupt contents.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No torch checkpoint file at {path}")
  budget = _Budget(path.stat().st_size)
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as archive:
        return _load_zip(archive, budget)
    with open(path, "rb") as file:
      if file.read(262)[257:] == b"ustar":  # torch < 0.4's tar format.
        raise ValueError("the tar format of torch < 0.4 is not read")
      file.seek(0)
      return _load_legacy(file, budget)
  except _NotTorch as error:
    raise ValueError(f"{path} is not a torch.save file: {error}") from error
  except RecursionError as error:
    raise ValueError(f"Cannot read the torch checkpoint {path}: its objects nest too "
                     "deeply") from error
  except MemoryError as error:
    raise ValueError(f"Cannot read the torch checkpoint {path}: out of memory") from error
  except (ValueError, pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile,
          AttributeError, TypeError, IndexError, KeyError) as error:
    raise ValueError(f"Cannot read the torch checkpoint {path}: {error}") from error
  except Exception as error:  # pylint: disable=broad-except
    # Whatever a crafted pickle makes the rebuilders or numpy raise (OverflowError,
    # NotImplementedError, ...): the file is unreadable, and says so.
    raise ValueError(f"Cannot read the torch checkpoint {path}: "
                     f"{type(error).__name__}: {error}") from error


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """`{tensor name: numpy array}` of a `torch.save(module.state_dict())` file.

  Arrays keep the file's dtype (bfloat16 as `ml_dtypes.bfloat16`) and shape, contiguous.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: naming `path`: not a torch.save file, or not a flat dict of tensors.
  """
  obj = load(path)
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict.")
  not_arrays = [str(key) for key, value in obj.items()
                if not isinstance(key, str) or not isinstance(value, np.ndarray)]
  if not_arrays:
    raise ValueError(f"{path} is not a state dict of tensors: {not_arrays[:5]} "
                     f"({len(not_arrays)} entries) are not tensors named by strings.")
  return dict(obj)

