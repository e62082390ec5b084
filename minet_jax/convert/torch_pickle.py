"""Reading PyTorch checkpoints without importing torch.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the pickle
names. This module reads both formats ``torch.save`` writes with a restricted
unpickler that never imports anything and never calls anything a pickle names:
every global goes through an allow-list and is replaced by a local stand-in.

* legacy format (torch < 1.6, or ``_use_new_zipfile_serialization=False``):
  pickled magic number, protocol version and system info, the main pickle, a
  pickled list of storage keys, then each storage as an int64 element count
  followed by its raw bytes;
* zip format (torch >= 1.6): ``<root>/data.pkl`` plus ``<root>/data/<key>``.

What the allow-list admits:

* the tensor rebuild functions of ``torch._utils``, typed storage classes
  (``torch.FloatStorage`` ...), ``collections.OrderedDict``, ``builtins.set``,
  numpy scalars (``epoch`` counters are often numpy ints);
* module classes: ``torch.nn.*`` classes and CapWords classes from non-standard-
  library modules (the authors' ``MINet.MI_Net``). They become inert objects
  that only hold their pickled ``__dict__``; calling one is refused.

Anything else, in particular functions such as ``os.system``, ``builtins.eval``
or ``posix.system``, raises ``UnsafePickleError`` naming the global before any
of it runs. The pickle's BUILD opcode (set an object's state) is only obeyed on
objects the reader itself created as containers (inert modules, ordered dicts,
numpy dtypes), never on the stand-in functions or classes, so a file cannot
change the reader for later files.

Memory is bounded before anything large is read: the pickle may hold at most
`MAX_PICKLE_BYTES` bytes and `MAX_PICKLE_OPS` opcodes, a zip's directory at most
`MAX_ZIP_DIRECTORY_BYTES`; tensors are lazy views whose declared sizes, strides
and offsets must describe a non-overlapping view inside their storage's declared
length (no zero strides), each storage's declared byte count must match what the
file holds, and `read_tensors` refuses up front to read more than ``max_bytes``
(storages plus the tensor copies). Tensors come back as numpy arrays in PyTorch
layouts. Every failure is an `UnsafePickleError` or a `CheckpointFormatError`.
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
import os
import pathlib
import pickle
import re
import struct
import sys
import tarfile
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import numpy as np

PathLike = str | os.PathLike

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# The released MI-Net checkpoint's pickles take 21 KB and 7,800 opcodes; a state dict
# with optimizer state a few times that. An opcode creates at most one object (a set,
# 232 bytes, is the largest), so these bounds keep a hostile pickle to about 12 MB.
MAX_PICKLE_BYTES = 1 << 20
MAX_PICKLE_OPS = 50_000
# A torch zip has one directory entry per storage (about 100 bytes each).
MAX_ZIP_DIRECTORY_BYTES = 256 << 10
MAX_TENSOR_DIMS = 16
_NAME_LIMIT = 120  # Characters of a pickled name quoted in an error message.


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle names a global outside the allow-list (nothing was executed)."""


class CheckpointFormatError(ValueError):
  """The file is not a PyTorch checkpoint this reader understands (or is implausibly large)."""


def _bfloat16():
  import ml_dtypes  # Shipped with jax; only needed for bf16 checkpoints.
  return np.dtype(ml_dtypes.bfloat16)


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128,
    "UntypedStorage": np.uint8, "BFloat16Storage": None,
}


def _short(text: Any) -> str:
  text = str(text)
  return text if len(text) <= _NAME_LIMIT else text[:_NAME_LIMIT] + "..."


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


# --------------------------------------------------------------------------- stand-ins


class _StorageType:
  """Stands for ``torch.<X>Storage``: only records the element dtype."""

  def __init__(self, name: str):
    self.name = name

  @property
  def dtype(self) -> np.dtype:
    dt = _STORAGE_DTYPES[self.name]
    return _bfloat16() if dt is None else np.dtype(dt)

  def __call__(self, *args, **kwargs):
    raise UnsafePickleError(f"pickle tries to call torch.{self.name}; refusing")


class _Storage:
  """A storage's declared type and length; its bytes are read only on demand."""

  def __init__(self, key: str, dtype: np.dtype, numel: Any, byteorder: str = "<"):
    if not _is_int(numel) or numel < 0:
      raise CheckpointFormatError(f"storage {_short(key)!r} declares {_short(numel)} elements")
    self.key, self.dtype, self.numel, self.byteorder = key, dtype, numel, byteorder
    self._reader: Callable[[int], bytes] | None = None
    self._data: np.ndarray | None = None

  @property
  def nbytes(self) -> int:
    return self.numel * self.dtype.itemsize

  @property
  def root(self) -> _Storage:
    return self

  def locate(self, reader: Callable[[int], bytes]) -> None:
    """Where the bytes are: ``reader(nbytes)`` returns them."""
    self._reader = reader

  def array(self) -> np.ndarray:
    if self._data is None:
      if self._reader is None:
        raise CheckpointFormatError(f"storage {self.key!r} is referenced but its data is missing")
      raw = self._reader(self.nbytes)
      if len(raw) != self.nbytes:
        raise CheckpointFormatError(f"storage {self.key!r} is truncated")
      dtype = self.dtype
      if self.byteorder != ("<" if sys.byteorder == "little" else ">"):
        dtype = dtype.newbyteorder(self.byteorder)
      self._data = np.frombuffer(raw, dtype=dtype)
    return self._data

  def release(self) -> None:
    self._data = None


class _StorageView:
  """A slice of another storage (legacy ``view_metadata``)."""

  def __init__(self, root: _Storage, offset: Any, numel: Any):
    if not (_is_int(offset) and _is_int(numel) and offset >= 0 and numel >= 0
            and offset + numel <= root.numel):
      raise CheckpointFormatError(f"storage view ({_short(offset)}, {_short(numel)}) does not fit "
                                  f"storage {root.key!r} of {root.numel} elements")
    self.root, self.offset, self.numel = root, offset, numel
    self.dtype = root.dtype

  def array(self) -> np.ndarray:
    return self.root.array()[self.offset:self.offset + self.numel]


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
    raise CheckpointFormatError(f"tensor {what} must be a tuple of integers, got "
                                f"{type(value).__name__}")
  if len(value) > MAX_TENSOR_DIMS:
    raise CheckpointFormatError(f"tensor with {len(value)} dimensions")
  return tuple(value)


class LazyTensor:
  """A tensor declared by the pickle: shape and dtype now, values on `read`.

  Construction checks that size, stride and offset describe a view that fits
  its storage's declared length and never visits an element twice (zero or
  overlapping strides would let a tiny storage stand for a huge tensor).
  """

  def __init__(self, storage: Any, offset: Any, size: Any, stride: Any):
    if not isinstance(storage, (_Storage, _StorageView)):
      raise UnsafePickleError("tensor rebuild called with something that is not a storage")
    self.storage = storage
    self.shape = _int_tuple(size, "size")
    self.stride = _int_tuple(stride, "stride")
    if not _is_int(offset) or offset < 0:
      raise CheckpointFormatError(f"tensor storage offset must be an integer >= 0, got "
                                  f"{_short(offset)}")
    self.offset = offset
    if len(self.shape) != len(self.stride):
      raise CheckpointFormatError(f"tensor size {self.shape} and stride {self.stride} disagree")
    if any(n < 0 for n in self.shape) or any(s < 0 for s in self.stride):
      raise CheckpointFormatError(f"tensor size {self.shape} or stride {self.stride} is negative")
    if self.size == 0:
      return
    # Non-overlapping: ordered by stride, each dimension steps over everything the
    # smaller-stride dimensions cover.
    span = 1
    for step, n in sorted((s, n) for n, s in zip(self.shape, self.stride) if n > 1):
      if step < span:
        raise CheckpointFormatError(
            f"tensor of size {self.shape} with stride {self.stride} visits storage elements "
            "more than once (zero or overlapping strides); refusing to expand it")
      span += step * (n - 1)
    if offset + span > storage.numel:
      raise CheckpointFormatError(
          f"tensor of size {self.shape} (offset {offset}, stride {self.stride}) does not fit "
          f"its storage of {storage.numel} elements")

  @property
  def dtype(self) -> np.dtype:
    return self.storage.dtype

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  def read(self) -> np.ndarray:
    """The tensor as a new C-contiguous native-endian array (reads its storage once)."""
    if self.size == 0:
      return np.zeros(self.shape, self.dtype)
    flat = self.storage.array()
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.shape, strides=tuple(s * item for s in self.stride),
        writeable=False)
    return np.array(view, dtype=self.dtype, copy=True)

  def __repr__(self):
    return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


def _rebuild_tensor(storage, storage_offset, size, stride):
  return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


def _thnn_backend():
  return None  # Old torch pickled a backend handle into every module; it carries no data.


class _NumpyDType:
  """Stands for ``numpy.dtype``; BUILD sets the byte order."""

  def __init__(self, name, align=False, copy=True):
    del align, copy
    if not isinstance(name, str) or not re.fullmatch(r"[a-zA-Z]+[0-9]*", name):
      raise UnsafePickleError(f"unsupported numpy dtype {_short(name)!r} in pickle")
    self.name, self.order = name, "="

  def __setstate__(self, state):
    if (isinstance(state, tuple) and len(state) > 1 and isinstance(state[1], str)
        and state[1] in ("<", ">", "|", "=")):
      self.order = state[1]

  def resolve(self) -> np.dtype:
    dt = np.dtype(self.name)
    if dt.kind not in "biufc":
      raise UnsafePickleError(f"unsupported numpy dtype {self.name!r} in pickle")
    return dt.newbyteorder(self.order) if self.order in "<>" else dt


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
    raise UnsafePickleError("numpy scalar with unexpected arguments in pickle")
  return np.frombuffer(data, dtype=dtype.resolve())[0].item()


def _torch_device(kind, index=None):
  # A module saved whole on a GPU machine holds devices (DataParallel's src_device_obj,
  # torch.device('cuda', 0)); they carry no weights: kept as their name.
  if not isinstance(kind, str) or not (index is None or (isinstance(index, int)
                                                          and not isinstance(index, bool))):
    raise UnsafePickleError("torch.device with unexpected arguments in pickle")
  return kind if index is None else f"{kind}:{index}"


def _codecs_encode(text, encoding="latin1"):
  # Protocol 2 has no bytes opcode: bytes (e.g. in numpy scalars) travel as _codecs.encode.
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafePickleError("_codecs.encode with unexpected arguments in pickle")
  return text.encode("latin1")


def _plain_attributes(state: Any) -> dict[str, Any] | None:
  """The attributes a BUILD state sets; None when it is not a dict state."""
  if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
    if state[0] is not None and not isinstance(state[0], dict):
      return None
    state = {**(state[0] or {}), **state[1]}  # (dict state, slot state)
  if not isinstance(state, dict):
    return None
  for key in state:
    if not isinstance(key, str) or (key.startswith("__") and key.endswith("__")):
      raise UnsafePickleError(f"pickle tries to set the attribute {_short(key)!r}; refusing")
  return state


class _InertMeta(type):

  def __call__(cls, *args, **kwargs):
    raise UnsafePickleError(f"pickle tries to call {cls._global_name}; refusing")


class InertObject(metaclass=_InertMeta):
  """An object of a pickled class that is never imported: just its state."""

  _global_name = "?"

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return object.__new__(cls)

  def __setstate__(self, state):
    attributes = _plain_attributes(state)
    if attributes is None:
      self.__dict__["_pickled_state"] = state
    else:
      self.__dict__.update(attributes)

  def __repr__(self):
    return f"<inert {self._global_name}>"


_INERT_CLASSES: dict[tuple[str, str], type] = {}


def _inert_class(module: str, name: str) -> type:
  key = (module, name)
  if key not in _INERT_CLASSES:
    _INERT_CLASSES[key] = _InertMeta(name, (InertObject,), {
        "__module__": "minet_jax.convert.torch_pickle.inert", "_global_name": f"{module}.{name}"})
  return _INERT_CLASSES[key]


def _copyreg_reconstructor(cls, base, state):
  if not (isinstance(cls, type) and issubclass(cls, InertObject)) or base is not object:
    raise UnsafePickleError("copyreg._reconstructor used with a class outside the allow-list")
  obj = cls.__new__(cls)
  if state is not None:
    InertObject.__setstate__(obj, state)
  return obj


_ALLOWED_CALLABLES = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.nn.backends.thnn", "_get_thnn_function_backend"): _thnn_backend,
    ("torch", "device"): _torch_device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("numpy", "dtype"): _NumpyDType,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _copyreg_reconstructor,
    ("copy_reg", "_reconstructor"): _copyreg_reconstructor,
}

# Top-level packages whose classes are never treated as inert model classes.
_NEVER_MODULE_CLASSES = frozenset(sys.stdlib_module_names) | {
    "builtins", "__builtin__", "torch", "numpy", "posix", "nt"}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _is_module_class(module: str, name: str) -> bool:
  parts = module.split(".")
  if not all(_IDENT.fullmatch(p) for p in parts) or not _IDENT.fullmatch(name):
    return False
  if not name[0].isupper():  # Functions and factories are never inert classes.
    return False
  if module.startswith("torch.nn."):
    return True
  return parts[0] not in _NEVER_MODULE_CLASSES or parts[0] == "__main__"


# --------------------------------------------------------------------------- unpickler


class _Budget:
  """What is left of the pickle byte and opcode allowances of one file."""

  def __init__(self, max_bytes: int = MAX_PICKLE_BYTES, max_ops: int = MAX_PICKLE_OPS):
    self.bytes, self.ops = max_bytes, max_ops


class _LimitedReader:
  """A file view for the unpickler that refuses to read past the pickle allowance."""

  def __init__(self, f, budget: _Budget):
    self._f, self._budget = f, budget

  def _take(self, n: int) -> None:
    if n > self._budget.bytes:
      raise CheckpointFormatError(f"the pickle is larger than {MAX_PICKLE_BYTES:,} bytes; no "
                                  "state dict needs that much")
    self._budget.bytes -= n

  def read(self, n: int) -> bytes:  # The unpickler always asks for a length.
    self._take(n)
    data = self._f.read(n)
    self._budget.bytes += n - len(data)
    return data

  def readline(self) -> bytes:
    line = self._f.readline(self._budget.bytes + 1)
    self._take(len(line))
    return line


def _counted(op: Callable) -> Callable:
  def run(self):
    self._budget.ops -= 1
    if self._budget.ops < 0:
      raise CheckpointFormatError(f"the pickle has more than {MAX_PICKLE_OPS:,} opcodes; no "
                                  "state dict needs that many")
    op(self)
  return run


def _load_build(self) -> None:
  """BUILD (set an object's state), only on containers the reader created itself."""
  state = self.stack.pop()
  inst = self.stack[-1]
  if isinstance(inst, InertObject):
    InertObject.__setstate__(inst, state)
  elif isinstance(inst, _NumpyDType):
    _NumpyDType.__setstate__(inst, state)
  elif type(inst) is collections.OrderedDict:  # torch state dicts carry a _metadata attribute
    attributes = _plain_attributes(state)
    if attributes is None:
      raise CheckpointFormatError("pickle sets an OrderedDict's state to a non-dict")
    inst.__dict__.update(attributes)
  else:
    raise UnsafePickleError(f"pickle tries to set the state of a {type(inst).__name__} "
                            f"({_short(getattr(inst, '__name__', '') or type(inst).__name__)}); "
                            "refusing (nothing was changed)")


def _load_bytearray8(self) -> None:
  """BYTEARRAY8 read through the byte allowance: the standard one allocates its declared
  length (up to 2**64) before reading a byte."""
  (length,) = struct.unpack("<Q", self.read(8))
  data = self.read(length)  # Refused past the allowance before anything is allocated.
  if len(data) != length:
    raise CheckpointFormatError("the pickle ends inside a bytearray")
  self.append(bytearray(data))


class _RestrictedUnpickler(pickle._Unpickler):  # The pure-Python unpickler: opcodes can be policed.
  """Allow-list unpickler; ``load_storage(args)`` resolves persistent storage ids."""

  dispatch = {code: _counted(op) for code, op in pickle._Unpickler.dispatch.items()}
  dispatch[pickle.BUILD[0]] = _counted(_load_build)
  dispatch[pickle.BYTEARRAY8[0]] = _counted(_load_bytearray8)

  def __init__(self, file, budget: _Budget, load_storage=None):
    super().__init__(file, encoding="utf-8")
    self._budget = budget
    self._load_storage = load_storage

  def find_class(self, module: str, name: str):
    key = (module, name)
    if key in _ALLOWED_CALLABLES:
      return _ALLOWED_CALLABLES[key]
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if _is_module_class(module, name):
      return _inert_class(module, name)
    raise UnsafePickleError(
        f"refusing to load global '{_short(module)}.{_short(name)}': it is not on the allow-list "
        "of a PyTorch checkpoint reader (nothing was executed). If this is a genuine "
        "checkpoint, re-save its state_dict() with plain tensors.")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or not isinstance(pid[0], (str, bytes)):
      raise CheckpointFormatError(f"unexpected persistent id of type {type(pid).__name__}")
    kind = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
    if kind == "module" and len(pid) > 1:  # Legacy: ('module', class, source file, source).
      cls = pid[1]
      if not (isinstance(cls, type) and issubclass(cls, InertObject)):
        raise UnsafePickleError("persistent 'module' id names something that is not a module")
      return cls
    if kind == "storage" and self._load_storage is not None:
      if len(pid) < 5:
        raise CheckpointFormatError(f"storage id with {len(pid) - 1} fields")
      return self._load_storage(pid[1:])
    raise CheckpointFormatError(f"unsupported persistent id kind {_short(kind)!r}")


def _unpickle(f, budget: _Budget, load_storage=None) -> Any:
  return _RestrictedUnpickler(_LimitedReader(f, budget), budget, load_storage).load()


# --------------------------------------------------------------------------- readers


def _storage_type(obj) -> _StorageType:
  if not isinstance(obj, _StorageType):
    raise CheckpointFormatError(f"storage id names a {type(obj).__name__}, not a torch "
                                "storage type")
  return obj


def _storage_key(key: Any) -> str:
  if not isinstance(key, (str, int)) or isinstance(key, bool):
    raise CheckpointFormatError(f"storage key of type {type(key).__name__}")
  return _short(key)


def _read_legacy(f, size: int) -> Any:
  budget = _Budget()
  magic = _unpickle(f, budget)
  if magic != LEGACY_MAGIC:
    raise CheckpointFormatError("not a PyTorch checkpoint (bad magic number)")
  protocol = _unpickle(f, budget)
  if protocol != LEGACY_PROTOCOL:
    raise CheckpointFormatError(f"unsupported legacy protocol version {_short(protocol)}")
  sys_info = _unpickle(f, budget)
  little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
  order = "<" if little else ">"
  storages: dict[str, _Storage] = {}

  def load_storage(args):
    storage_type, key, _location, numel = args[:4]
    view = args[4] if len(args) > 4 else None
    key = _storage_key(key)
    dtype = _storage_type(storage_type).dtype
    if key not in storages:
      storages[key] = _Storage(key, dtype, numel, order)
    elif storages[key].dtype != dtype or storages[key].numel != numel:
      raise CheckpointFormatError(f"storage {key!r} is declared twice, differently")
    if view is not None:
      if not isinstance(view, tuple) or len(view) != 3:
        raise CheckpointFormatError(f"storage {key!r}: malformed view")
      _view_key, offset, view_numel = view
      return _StorageView(storages[key], offset, view_numel)
    return storages[key]

  result = _unpickle(f, budget, load_storage)
  keys = _unpickle(f, budget)
  if not isinstance(keys, list):
    raise CheckpointFormatError("legacy checkpoint: storage key list missing")
  # Each storage follows as an element count and its bytes: note where, read nothing yet.
  position = f.tell()
  for key in keys:
    key = _storage_key(key)
    if key not in storages:
      raise CheckpointFormatError(f"legacy checkpoint: data for unknown storage {key!r}")
    st = storages[key]
    f.seek(position)
    head = f.read(8)
    if len(head) != 8:
      raise CheckpointFormatError(f"legacy checkpoint truncated before storage {key!r}")
    numel = struct.unpack(order + "q", head)[0]
    if numel != st.numel:
      raise CheckpointFormatError(f"legacy checkpoint: storage {key!r} holds {numel} elements "
                                  f"but the pickle declares {st.numel}")
    start = position + 8
    position = start + st.nbytes
    if position > size:
      raise CheckpointFormatError(f"legacy checkpoint truncated inside storage {key!r}")

    def reader(nbytes: int, start: int = start) -> bytes:
      f.seek(start)
      return f.read(nbytes)

    st.locate(reader)
  return result


def _zip_directory_size(f, size: int) -> int:
  """Bytes of a zip's central directory, found as `zipfile` finds them, without parsing it."""
  tail_size = min(size, 22 + 0xFFFF)
  f.seek(size - tail_size)
  tail = f.read(tail_size)
  # An end record without a comment first, else the last one in the tail.
  if tail[-22:-18] == b"PK\x05\x06" and tail[-2:] == b"\0\0":
    at = tail_size - 22
  else:
    at = tail.rfind(b"PK\x05\x06")
  if at < 0 or at + 22 > tail_size:
    raise CheckpointFormatError("zip end-of-directory record missing")
  dir_size = struct.unpack("<4s4H2LH", tail[at:at + 22])[5]
  # A zip64 locator right before it (then the zip64 record right before that) overrides it.
  end = size - tail_size + at
  if end >= 20 + 56:
    f.seek(end - 20)
    if f.read(4) == b"PK\x06\x07":
      f.seek(end - 20 - 56)
      record = f.read(56)
      if record[:4] == b"PK\x06\x06":
        dir_size = struct.unpack("<4sQ2H2L4Q", record)[8]
  return dir_size


def _read_zip(zf: zipfile.ZipFile) -> Any:
  infos = {info.filename: info for info in zf.infolist()}
  pkls = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pkls) != 1:
    raise CheckpointFormatError("zip file without exactly one <root>/data.pkl")
  root = pkls[0][:-len("data.pkl")]
  order = "<"
  byteorder = infos.get(root + "byteorder")
  if byteorder is not None and byteorder.file_size <= 16 and zf.read(byteorder).strip() == b"big":
    order = ">"
  if infos[pkls[0]].file_size > MAX_PICKLE_BYTES:
    raise CheckpointFormatError(f"data.pkl holds {infos[pkls[0]].file_size:,} bytes, more than "
                                f"the {MAX_PICKLE_BYTES:,} a state dict could need")
  storages: dict[str, _Storage] = {}

  def load_storage(args):
    storage_type, key, _location, numel = args[:4]
    key = _storage_key(key)
    dtype = _storage_type(storage_type).dtype
    if key in storages:
      if storages[key].dtype != dtype or storages[key].numel != numel:
        raise CheckpointFormatError(f"storage {key!r} is declared twice, differently")
      return storages[key]
    info = infos.get(f"{root}data/{key}")
    if info is None:
      raise CheckpointFormatError(f"storage file {root}data/{key} missing")
    st = _Storage(key, dtype, numel, order)
    # The zip's own record of the member's size, checked before anything is inflated.
    if info.file_size != st.nbytes:
      raise CheckpointFormatError(f"storage {key!r} holds {info.file_size:,} bytes but the pickle "
                                  f"declares {st.numel:,} elements of {dtype.itemsize} bytes")

    def reader(nbytes: int, info: zipfile.ZipInfo = info) -> bytes:
      with zf.open(info) as member:
        return member.read(nbytes)

    st.locate(reader)
    storages[key] = st
    return st

  return _unpickle(io.BytesIO(zf.read(pkls[0])), _Budget(), load_storage)


@contextlib.contextmanager
def _named(path: pathlib.Path) -> Iterator[None]:
  """Puts the file's name in front of the reader's errors."""
  try:
    yield
  except (UnsafePickleError, CheckpointFormatError) as e:
    if str(e).startswith(f"{path}:"):
      raise
    raise type(e)(f"{path}: {e}") from e


@contextlib.contextmanager
def open_checkpoint(path: PathLike) -> Iterator[Any]:
  """Parses a checkpoint's pickle; yields its object tree with `LazyTensor` leaves.

  Nothing but the pickle is read; the file stays open until the block ends, so
  tensors can be read inside it (with `read_tensors`).

  Raises:
    FileNotFoundError: no such file.
    UnsafePickleError: the pickle names something outside the allow-list.
    CheckpointFormatError: anything else wrong with the file (never a raw parser error).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint not found: {path}")
  size = path.stat().st_size
  with contextlib.ExitStack() as stack:
    f = stack.enter_context(open(path, "rb"))
    with _named(path):
      try:
        if zipfile.is_zipfile(f):
          dir_size = _zip_directory_size(f, size)
          if dir_size > MAX_ZIP_DIRECTORY_BYTES:
            raise CheckpointFormatError(f"the zip directory takes {dir_size:,} bytes; a "
                                        f"checkpoint's needs far less than "
                                        f"{MAX_ZIP_DIRECTORY_BYTES:,}")
          tree = _read_zip(stack.enter_context(zipfile.ZipFile(f)))
        else:
          f.seek(0)
          if tarfile.is_tarfile(path):
            raise CheckpointFormatError("tar-format checkpoints (torch < 0.1.10) are not supported")
          f.seek(0)
          # A legacy torch.save file opens with its pickled magic number: PROTO then
          # LONG1 (pickle protocol 2, the default) or a text LONG, "L" and its digits
          # (protocols 0 and 1).
          head = f.read(2)
          if not (head[:1] == b"\x80" or (head[:1] == b"L" and head[1:2].isdigit())):
            f.seek(0)
            raise CheckpointFormatError(
                f"not a readable PyTorch checkpoint: neither a zip archive nor a legacy "
                f"torch.save file (it begins {f.read(8)!r})")
          f.seek(0)
          tree = _read_legacy(f, size)
      except (UnsafePickleError, CheckpointFormatError):
        raise
      except Exception as e:  # A malformed file can fail the parser anywhere; all mean this.
        raise CheckpointFormatError(f"not a readable PyTorch checkpoint "
                                    f"({type(e).__name__}: {_short(e)})") from e
    yield tree


def _walk_tensors(obj: Any) -> dict[int, LazyTensor]:
  """Every LazyTensor in a loaded tree, by id (iterative: trees may be deep)."""
  found: dict[int, LazyTensor] = {}
  seen: set[int] = set()
  todo = [obj]
  while todo:
    node = todo.pop()
    if id(node) in seen:
      continue
    seen.add(id(node))
    if isinstance(node, LazyTensor):
      found[id(node)] = node
    elif isinstance(node, dict):
      todo.extend(node.values())
    elif isinstance(node, (list, tuple, set, frozenset)):
      todo.extend(node)
    elif isinstance(node, InertObject):
      todo.extend(vars(node).values())
  return found


def read_tensors(tensors: Mapping[str, LazyTensor], *, max_bytes: int) -> dict[str, np.ndarray]:
  """Reads lazy tensors into numpy arrays, refusing up front to use more than ``max_bytes``.

  The bytes counted are every storage the tensors view (each read once) plus the
  tensors' own copies: the peak this takes, whatever the file claims.
  """
  roots = {id(t.storage.root): t.storage.root for t in tensors.values()}
  need = sum(r.nbytes for r in roots.values()) + sum(t.nbytes for t in tensors.values())
  if need > max_bytes:
    raise CheckpointFormatError(
        f"reading {len(tensors)} tensor(s) would take {need:,} bytes (storages and copies), "
        f"more than the limit of {max_bytes:,}")
  try:
    return {name: t.read() for name, t in tensors.items()}
  except (UnsafePickleError, CheckpointFormatError):
    raise
  except Exception as e:  # Damaged storage data (a bad CRC, a short read, ...).
    raise CheckpointFormatError(f"could not read the tensor data ({type(e).__name__}: "
                                f"{_short(e)})") from e
  finally:
    for r in roots.values():
      r.release()


def _replace_tensors(obj, arrays: dict[int, np.ndarray], memo: dict[int, Any]):
  """Swaps each LazyTensor for its array throughout a loaded object tree."""
  if id(obj) in memo:
    return memo[id(obj)]
  if isinstance(obj, LazyTensor):
    out = arrays[id(obj)]
  elif isinstance(obj, dict):
    out = memo[id(obj)] = obj
    for k in list(obj):
      obj[k] = _replace_tensors(obj[k], arrays, memo)
  elif isinstance(obj, list):
    out = memo[id(obj)] = obj
    obj[:] = [_replace_tensors(v, arrays, memo) for v in obj]
  elif isinstance(obj, tuple):
    out = tuple(_replace_tensors(v, arrays, memo) for v in obj)
  elif isinstance(obj, InertObject):
    out = memo[id(obj)] = obj
    for k, v in list(vars(obj).items()):
      vars(obj)[k] = _replace_tensors(v, arrays, memo)
  else:
    out = obj
  memo[id(obj)] = out
  return out


def default_max_bytes(path: PathLike) -> int:
  """The read limit `load` uses: twice the file (storages, copies) plus 64 MiB.

  Storages are stored raw in both formats, so an honest checkpoint never needs more.
  """
  return 2 * pathlib.Path(path).stat().st_size + (64 << 20)


def load(path: PathLike, *, max_bytes: int | None = None) -> Any:
  """Loads a checkpoint's object tree: tensors as numpy arrays, modules inert.

  Args:
    max_bytes: refuse files whose tensors need more memory (default: `default_max_bytes`).

  Raises:
    UnsafePickleError: the pickle names something outside the allow-list.
    CheckpointFormatError: not a (supported, plausibly sized) PyTorch checkpoint.
  """
  with open_checkpoint(path) as tree, _named(pathlib.Path(path)):
    lazy = _walk_tensors(tree)
    limit = default_max_bytes(path) if max_bytes is None else max_bytes
    arrays = read_tensors({str(k): v for k, v in lazy.items()}, max_bytes=limit)
    try:
      return _replace_tensors(tree, {int(k): v for k, v in arrays.items()}, {})
    except RecursionError as e:
      raise CheckpointFormatError("the pickle nests objects too deeply") from e


def module_state_dict(module: InertObject, prefix: str = "") -> dict[str, Any]:
  """``nn.Module.state_dict()`` for an inert module: parameters, then buffers, then children."""
  out: dict[str, Any] = {}
  state = vars(module)
  skip = state.get("_non_persistent_buffers_set", ()) or ()
  if not isinstance(skip, (set, frozenset, list, tuple)):
    raise CheckpointFormatError(f"module {prefix or '<root>'} has a malformed buffer list")
  for field in ("_parameters", "_buffers"):
    tensors = state.get(field) or {}
    if not isinstance(tensors, Mapping):
      raise CheckpointFormatError(f"module {prefix or '<root>'}: {field} is not a dict")
    for name, value in tensors.items():
      if value is None or (field == "_buffers" and name in skip):
        continue
      if not isinstance(value, (LazyTensor, np.ndarray)):
        raise CheckpointFormatError(f"{prefix}{_short(name)} is a {type(value).__name__}, "
                                    "not a tensor")
      out[f"{prefix}{name}"] = value
  children = state.get("_modules") or {}
  if not isinstance(children, Mapping):
    raise CheckpointFormatError(f"module {prefix or '<root>'}: _modules is not a dict")
  for name, child in children.items():
    if child is None:
      continue
    if not isinstance(child, InertObject):
      raise CheckpointFormatError(f"submodule {prefix}{_short(name)} is not a module: "
                                  f"{type(child).__name__}")
    out.update(module_state_dict(child, f"{prefix}{name}."))
  return out


def _is_state_dict(obj) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(
      isinstance(k, str) and isinstance(v, (LazyTensor, np.ndarray)) for k, v in obj.items())


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "params")


def to_state_dict(obj, strip_prefix: str = "module.") -> dict[str, Any]:
  """Finds the weights in a loaded checkpoint and returns a flat state dict.

  Accepts a (DataParallel-wrapped) module, ``{"model": module}`` /
  ``{"state_dict": ...}`` style wrappers, or a plain state dict. When every key
  starts with ``strip_prefix`` (DataParallel's ``module.``), it is removed.
  Values are what the tree holds: arrays after `load`, `LazyTensor` inside
  `open_checkpoint`.
  """
  if isinstance(obj, InertObject):
    try:
      sd = module_state_dict(obj)
    except RecursionError as e:
      raise CheckpointFormatError("modules nest too deeply") from e
  elif _is_state_dict(obj):
    sd = dict(obj)
  elif isinstance(obj, Mapping):
    for key in _WRAPPER_KEYS:
      if key in obj and (isinstance(obj[key], InertObject) or _is_state_dict(obj[key])):
        return to_state_dict(obj[key], strip_prefix)
    keys = sorted(_short(k) for k in list(obj)[:20])
    raise CheckpointFormatError(
        f"no weights found: top-level keys are {keys}; expected a module, "
        f"a state dict, or a dict with one of {_WRAPPER_KEYS}")
  else:
    raise CheckpointFormatError(f"no weights found in a checkpoint holding {type(obj).__name__}")
  if not sd:
    raise CheckpointFormatError("the checkpoint holds no tensors")
  if strip_prefix and all(k.startswith(strip_prefix) for k in sd):
    sd = {k[len(strip_prefix):]: v for k, v in sd.items()}
  return sd


@contextlib.contextmanager
def open_state_dict(path: PathLike, strip_prefix: str = "module.",
                    ) -> Iterator[dict[str, LazyTensor]]:
  """The checkpoint's flat state dict as `LazyTensor`s: names, shapes, dtypes, nothing read.

  Check them first, then `read_tensors` what is needed, inside the block.
  """
  with open_checkpoint(path) as tree:
    with _named(pathlib.Path(path)):
      sd = to_state_dict(tree, strip_prefix)
    yield sd


def load_state_dict(path: PathLike, *, max_bytes: int | None = None) -> dict[str, np.ndarray]:
  """Reads a PyTorch checkpoint's weights into ``{name: array}`` in PyTorch layouts."""
  with open_state_dict(path) as lazy, _named(pathlib.Path(path)):
    return read_tensors(lazy, max_bytes=default_max_bytes(path) if max_bytes is None
                        else max_bytes)
