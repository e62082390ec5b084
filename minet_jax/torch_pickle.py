"""Reading (and writing) PyTorch checkpoints without importing torch.

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
of it runs. Tensors come back as numpy arrays in PyTorch layouts.
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import re
import secrets
import struct
import sys
import tarfile
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

PathLike = str | os.PathLike

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle names a global outside the allow-list (nothing was executed)."""


class CheckpointFormatError(ValueError):
  """The file is not a PyTorch checkpoint this reader understands."""


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
  """A storage whose bytes may arrive after the pickle (legacy format)."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, int(numel)
    self.data: np.ndarray | None = None

  def array(self) -> np.ndarray:
    if self.data is None:
      raise CheckpointFormatError(f"storage {self.key!r} is referenced but its data is missing")
    return self.data


class _StorageView:
  """A slice of another storage (legacy ``view_metadata``)."""

  def __init__(self, root: _Storage, offset: int, numel: int):
    self.root, self.offset, self.numel = root, int(offset), int(numel)
    self.dtype = root.dtype

  def array(self) -> np.ndarray:
    return self.root.array()[self.offset:self.offset + self.numel]


class _LazyTensor:
  """A tensor to cut out of its storage once all storages are read."""

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, (_Storage, _StorageView)):
      raise UnsafePickleError("tensor rebuild called with something that is not a storage")
    self.storage, self.offset = storage, int(offset)
    self.size = tuple(int(s) for s in size)
    self.stride = tuple(int(s) for s in stride)
    if len(self.size) != len(self.stride):
      raise CheckpointFormatError(f"tensor size {self.size} and stride {self.stride} disagree")

  def materialize(self) -> np.ndarray:
    flat = self.storage.array()
    if any(s == 0 for s in self.size):
      return np.zeros(self.size, flat.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if self.offset < 0 or min(self.stride, default=0) < 0 or last >= flat.shape[0]:
      raise CheckpointFormatError(
          f"tensor of size {self.size} (offset {self.offset}, stride {self.stride}) "
          f"does not fit its storage of {flat.shape[0]} elements")
    if int(np.prod(self.size, dtype=np.float64)) > 64 * flat.shape[0] + 2**20:
      # Zero strides can make a tiny storage look huge; no state dict needs that.
      raise CheckpointFormatError(f"tensor of size {self.size} is implausibly large for its "
                                  f"storage of {flat.shape[0]} elements")
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size, strides=tuple(s * item for s in self.stride),
        writeable=False)
    return np.array(view, copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _LazyTensor(storage, storage_offset, size, stride)


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
      raise UnsafePickleError(f"unsupported numpy dtype {name!r} in pickle")
    self.name, self.order = name, "="

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) > 1 and state[1] in "<>|=":
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


def _codecs_encode(text, encoding="latin1"):
  # Protocol 2 has no bytes opcode: bytes (e.g. in numpy scalars) travel as _codecs.encode.
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafePickleError("_codecs.encode with unexpected arguments in pickle")
  return text.encode("latin1")


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
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
      state = {**(state[0] or {}), **state[1]}  # (dict state, slot state)
    if isinstance(state, dict):
      self.__dict__.update({k: v for k, v in state.items() if isinstance(k, str)})
    else:
      self.__dict__["_pickled_state"] = state

  def __repr__(self):
    return f"<inert {self._global_name}>"


_INERT_CLASSES: dict[tuple[str, str], type] = {}


def _inert_class(module: str, name: str) -> type:
  key = (module, name)
  if key not in _INERT_CLASSES:
    _INERT_CLASSES[key] = _InertMeta(name, (InertObject,), {
        "__module__": "minet_jax.torch_pickle.inert", "_global_name": f"{module}.{name}"})
  return _INERT_CLASSES[key]


def _copyreg_reconstructor(cls, base, state):
  if not (isinstance(cls, type) and issubclass(cls, InertObject)) or base is not object:
    raise UnsafePickleError("copyreg._reconstructor used with a class outside the allow-list")
  obj = cls.__new__(cls)
  if state is not None:
    obj.__setstate__(state)
  return obj


_ALLOWED_CALLABLES = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.nn.backends.thnn", "_get_thnn_function_backend"): _thnn_backend,
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


class _RestrictedUnpickler(pickle.Unpickler):
  """Allow-list unpickler; storages come from ``storages`` (key -> _Storage)."""

  def __init__(self, file, load_storage=None):
    super().__init__(file, encoding="utf-8")
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
        f"refusing to load global '{module}.{name}': it is not on the allow-list of a "
        "PyTorch checkpoint reader (nothing was executed). If this is a genuine "
        "checkpoint, re-save its state_dict() with plain tensors.")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid:
      raise CheckpointFormatError(f"unexpected persistent id {pid!r}")
    kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
    if kind == "module":  # Legacy: ('module', class, source file, source).
      cls = pid[1]
      if not (isinstance(cls, type) and issubclass(cls, InertObject)):
        raise UnsafePickleError(f"persistent 'module' id names a non-module {cls!r}")
      return cls
    if kind == "storage" and self._load_storage is not None:
      return self._load_storage(pid[1:])
    raise CheckpointFormatError(f"unsupported persistent id kind {kind!r}")


def _restricted_loads(data: bytes | io.BufferedIOBase, load_storage=None):
  f = io.BytesIO(data) if isinstance(data, bytes) else data
  return _RestrictedUnpickler(f, load_storage).load()


# --------------------------------------------------------------------------- readers


def _storage_type(obj) -> _StorageType:
  if not isinstance(obj, _StorageType):
    raise CheckpointFormatError(f"storage id names {obj!r}, not a torch storage type")
  return obj


def _read_legacy(f) -> Any:
  magic = _restricted_loads(f)
  if magic != LEGACY_MAGIC:
    raise CheckpointFormatError("not a PyTorch checkpoint (bad magic number)")
  protocol = _restricted_loads(f)
  if protocol != LEGACY_PROTOCOL:
    raise CheckpointFormatError(f"unsupported legacy protocol version {protocol!r}")
  sys_info = _restricted_loads(f)
  little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
  storages: dict[str, _Storage] = {}

  def load_storage(args):
    storage_type, key, _location, numel = args[:4]
    view = args[4] if len(args) > 4 else None
    key = str(key)
    if key not in storages:
      storages[key] = _Storage(key, _storage_type(storage_type).dtype, numel)
    if view is not None:
      view_key, offset, view_numel = view
      return _StorageView(storages[key], offset, view_numel)
    return storages[key]

  result = _restricted_loads(f, load_storage)
  keys = _restricted_loads(f)
  if not isinstance(keys, list):
    raise CheckpointFormatError("legacy checkpoint: storage key list missing")
  for key in keys:
    key = str(key)
    if key not in storages:
      raise CheckpointFormatError(f"legacy checkpoint: data for unknown storage {key!r}")
    st = storages[key]
    head = f.read(8)
    if len(head) != 8:
      raise CheckpointFormatError(f"legacy checkpoint truncated before storage {key!r}")
    numel = struct.unpack("<q" if little else ">q", head)[0]
    nbytes = numel * st.dtype.itemsize
    raw = f.read(nbytes)
    if numel < 0 or len(raw) != nbytes:
      raise CheckpointFormatError(f"legacy checkpoint truncated inside storage {key!r}")
    st.data = np.frombuffer(raw, dtype=st.dtype.newbyteorder("<" if little else ">"))
  return result


def _read_zip(path: pathlib.Path) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      raise CheckpointFormatError(f"{path}: zip file without exactly one <root>/data.pkl")
    root = pkls[0][:-len("data.pkl")]
    order = "<"
    if root + "byteorder" in names and zf.read(root + "byteorder").strip() == b"big":
      order = ">"
    storages: dict[str, _Storage] = {}

    def load_storage(args):
      storage_type, key, _location, numel = args[:4]
      key = str(key)
      if key not in storages:
        dtype = _storage_type(storage_type).dtype
        name = f"{root}data/{key}"
        if name not in names:
          raise CheckpointFormatError(f"{path}: storage file {name} missing")
        raw = zf.read(name)
        if len(raw) % dtype.itemsize:
          raise CheckpointFormatError(f"{path}: storage {key} has a partial element")
        st = _Storage(key, dtype, numel)
        st.data = np.frombuffer(raw, dtype=dtype.newbyteorder(order))
        if st.data.shape[0] < st.numel:
          raise CheckpointFormatError(f"{path}: storage {key} shorter than declared")
        storages[key] = st
      return storages[key]

    return _restricted_loads(zf.read(pkls[0]), load_storage)


def _materialize(obj, memo=None):
  """Replaces lazy tensors by numpy arrays throughout a loaded object tree."""
  memo = {} if memo is None else memo
  if id(obj) in memo:
    return memo[id(obj)]
  if isinstance(obj, _LazyTensor):
    out = obj.materialize()
  elif isinstance(obj, dict):
    out = obj
    memo[id(obj)] = out
    for k in list(obj):
      obj[k] = _materialize(obj[k], memo)
  elif isinstance(obj, list):
    out = obj
    memo[id(obj)] = out
    obj[:] = [_materialize(v, memo) for v in obj]
  elif isinstance(obj, tuple):
    out = tuple(_materialize(v, memo) for v in obj)
  elif isinstance(obj, InertObject):
    out = obj
    memo[id(obj)] = out
    for k, v in list(vars(obj).items()):
      setattr(obj, k, _materialize(v, memo))
  else:
    out = obj
  memo[id(obj)] = out
  return out


def load(path: PathLike) -> Any:
  """Loads a checkpoint's object tree: tensors as numpy arrays, modules inert.

  Raises:
    UnsafePickleError: the pickle names something outside the allow-list.
    CheckpointFormatError: not a (supported) PyTorch checkpoint.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if zipfile.is_zipfile(path):
    result = _read_zip(path)
  else:
    if tarfile.is_tarfile(path):
      raise CheckpointFormatError(
          f"{path}: tar-format checkpoints (torch < 0.1.10) are not supported")
    with open(path, "rb") as f:
      try:
        result = _read_legacy(f)
      except (EOFError, struct.error, pickle.UnpicklingError) as e:
        if isinstance(e, UnsafePickleError):
          raise
        raise CheckpointFormatError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
  return _materialize(result)


def module_state_dict(module: InertObject, prefix: str = "") -> dict[str, np.ndarray]:
  """``nn.Module.state_dict()`` for an inert module: parameters, then buffers, then children."""
  out: dict[str, np.ndarray] = {}
  state = vars(module)
  skip = set(state.get("_non_persistent_buffers_set", ()) or ())
  for field in ("_parameters", "_buffers"):
    for name, value in (state.get(field) or {}).items():
      if value is None or (field == "_buffers" and name in skip):
        continue
      out[prefix + name] = value
  for name, child in (state.get("_modules") or {}).items():
    if child is None:
      continue
    if not isinstance(child, InertObject):
      raise CheckpointFormatError(f"submodule {prefix + name} is not a module: {type(child)}")
    out.update(module_state_dict(child, prefix + name + "."))
  return out


def _is_state_dict(obj) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "params")


def to_state_dict(obj, strip_prefix: str = "module.") -> dict[str, np.ndarray]:
  """Finds the weights in a loaded checkpoint and returns a flat state dict.

  Accepts a (DataParallel-wrapped) module, ``{"model": module}`` /
  ``{"state_dict": ...}`` style wrappers, or a plain state dict. When every key
  starts with ``strip_prefix`` (DataParallel's ``module.``), it is removed.
  """
  if isinstance(obj, InertObject):
    sd = module_state_dict(obj)
  elif _is_state_dict(obj):
    sd = dict(obj)
  elif isinstance(obj, Mapping):
    for key in _WRAPPER_KEYS:
      if key in obj and (isinstance(obj[key], InertObject) or _is_state_dict(obj[key])):
        return to_state_dict(obj[key], strip_prefix)
    raise CheckpointFormatError(
        f"no weights found: top-level keys are {sorted(map(str, obj))}; expected a module, "
        f"a state dict, or a dict with one of {_WRAPPER_KEYS}")
  else:
    raise CheckpointFormatError(f"no weights found in a checkpoint holding {type(obj).__name__}")
  if not sd:
    raise CheckpointFormatError("the checkpoint holds no tensors")
  if strip_prefix and all(k.startswith(strip_prefix) for k in sd):
    sd = {k[len(strip_prefix):]: v for k, v in sd.items()}
  return sd


def load_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch checkpoint into ``{name: array}`` in PyTorch layouts."""
  return to_state_dict(load(path))


# --------------------------------------------------------------------------- writer


class _Global:
  """A name to emit as a pickle GLOBAL without importing it."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise TypeError(f"{self.module}.{self.name} is only a name to write into a pickle")


class _StorageRef:
  """A flat array stored once, however many tensors view it."""

  def __init__(self, array: np.ndarray):
    array = np.ascontiguousarray(array).reshape(-1)
    if array.dtype not in _TORCH_STORAGE_NAMES:
      raise TypeError(f"dtype {array.dtype} has no torch storage type")
    self.array = array.astype(array.dtype.newbyteorder("<"))


class _TensorRef:
  """Pickles as ``torch._utils._rebuild_tensor_v2`` over a storage."""

  def __init__(self, array: np.ndarray, storage: _StorageRef | None = None, offset: int = 0):
    self.shape = tuple(np.shape(array))
    self.storage = _StorageRef(array) if storage is None else storage
    self.offset = offset

  def __reduce__(self):
    stride = tuple(int(np.prod(self.shape[i + 1:], dtype=np.int64))
                   for i in range(len(self.shape)))
    return (_Global("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, self.offset, self.shape, stride, False, collections.OrderedDict()))


_TORCH_STORAGE_NAMES = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items()
                        if v is not None and k != "UntypedStorage"}


class _Writer(pickle._Pickler):  # The pure-Python pickler lets us emit GLOBALs by name.

  dispatch = dict(pickle._Pickler.dispatch)

  def __init__(self, file, legacy: bool):
    super().__init__(file, protocol=2)
    self.legacy = legacy
    self.storages: dict[int, tuple[str, np.ndarray]] = {}

  def save_name(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[_Global] = save_name

  def persistent_id(self, obj):
    if not isinstance(obj, _StorageRef):
      return None
    key = self.storages.setdefault(id(obj), (str(len(self.storages)), obj.array))[0]
    kind = _Global("torch", _TORCH_STORAGE_NAMES[obj.array.dtype])
    if self.legacy:
      return ("storage", kind, key, "cpu", obj.array.size, None)
    return ("storage", kind, key, "cpu", obj.array.size)


def _write_checkpoint(tree, path: PathLike, *, legacy: bool, writer=_Writer) -> None:
  """Pickles ``tree`` (with _TensorRef leaves) into a torch.save-style file."""
  path = pathlib.Path(path)
  buf = io.BytesIO()
  w = writer(buf, legacy)
  w.dump(tree)
  storages = list(w.storages.values())
  tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
  os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # honours the umask
  try:
    if legacy:
      with open(tmp, "wb") as f:
        for header in (LEGACY_MAGIC, LEGACY_PROTOCOL,
                       {"protocol_version": LEGACY_PROTOCOL, "little_endian": True,
                        "type_sizes": {"short": 2, "int": 4, "long": 4}}):
          pickle.dump(header, f, protocol=2)
        f.write(buf.getvalue())
        pickle.dump([key for key, _ in storages], f, protocol=2)
        for _, arr in storages:
          f.write(struct.pack("<q", arr.size))
          f.write(arr.tobytes())
    else:
      root = "archive/"
      with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(root + "data.pkl", buf.getvalue())
        zf.writestr(root + "byteorder", "little")
        for key, arr in storages:
          zf.writestr(f"{root}data/{key}", arr.tobytes())
        zf.writestr(root + "version", "3\n")
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: PathLike, *,
                    legacy: bool = False) -> None:
  """Writes ``{name: array}`` in the layout ``torch.save(state_dict)`` produces.

  Zip format by default, the pre-1.6 legacy stream with ``legacy=True``;
  arrays are stored C-contiguous little-endian; the file appears atomically.
  """
  tree = collections.OrderedDict((name, _TensorRef(np.asarray(v))) for name, v in state_dict.items())
  _write_checkpoint(tree, path, legacy=legacy)
