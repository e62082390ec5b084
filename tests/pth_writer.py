"""Writes files in the layouts ``torch.save`` produces, without torch: the tests' fixtures.

The tests need checkpoints shaped like the authors' (both formats, wrapped state dicts,
pickled modules, shared storages) and hostile ones (zero strides, tampered pickles), so
this builds them from numpy arrays. The package itself only reads such files
(`minet_jax.convert.torch_pickle`).
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import secrets
import struct
import zipfile
from collections.abc import Mapping

import numpy as np

from minet_jax.convert import torch_pickle

PathLike = str | os.PathLike


class Global:
  """A name to emit as a pickle GLOBAL without importing it."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise TypeError(f"{self.module}.{self.name} is only a name to write into a pickle")


# numpy dtype -> the typed storage class torch names for it (bf16 has no numpy dtype).
STORAGE_NAMES = {np.dtype(v): k for k, v in torch_pickle._STORAGE_DTYPES.items()
                 if v is not None and k != "UntypedStorage"}


class StorageRef:
  """A flat array stored once, however many tensors view it."""

  def __init__(self, array: np.ndarray):
    array = np.ascontiguousarray(array).reshape(-1)
    if array.dtype not in STORAGE_NAMES:
      raise TypeError(f"dtype {array.dtype} has no torch storage type")
    self.array = array.astype(array.dtype.newbyteorder("<"))


class TensorRef:
  """Pickles as ``torch._utils._rebuild_tensor_v2`` over a storage."""

  def __init__(self, array: np.ndarray, storage: StorageRef | None = None, offset: int = 0):
    self.shape = tuple(np.shape(array))
    self.storage = StorageRef(array) if storage is None else storage
    self.offset = offset

  def __reduce__(self):
    stride = tuple(int(np.prod(self.shape[i + 1:], dtype=np.int64))
                   for i in range(len(self.shape)))
    return (Global("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, self.offset, self.shape, stride, False, collections.OrderedDict()))


class Writer(pickle._Pickler):  # The pure-Python pickler lets us emit GLOBALs by name.
  """Pickles `Global` names as GLOBAL opcodes and `StorageRef`s as torch persistent ids."""

  dispatch = dict(pickle._Pickler.dispatch)

  def __init__(self, file, legacy: bool):
    super().__init__(file, protocol=2)
    self.legacy = legacy
    self.storages: dict[int, tuple[str, np.ndarray]] = {}

  def save_name(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[Global] = save_name

  def persistent_id(self, obj):
    if not isinstance(obj, StorageRef):
      return None
    key = self.storages.setdefault(id(obj), (str(len(self.storages)), obj.array))[0]
    kind = Global("torch", STORAGE_NAMES[obj.array.dtype])
    if self.legacy:
      return ("storage", kind, key, "cpu", obj.array.size, None)
    return ("storage", kind, key, "cpu", obj.array.size)


def write_checkpoint(tree, path: PathLike, *, legacy: bool, writer=Writer) -> None:
  """Pickles ``tree`` (with `TensorRef` leaves) into a torch.save-style file: zip format,
  or the pre-1.6 legacy stream with ``legacy=True``; the file appears atomically."""
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
        for header in (torch_pickle.LEGACY_MAGIC, torch_pickle.LEGACY_PROTOCOL,
                       {"protocol_version": torch_pickle.LEGACY_PROTOCOL, "little_endian": True,
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
  """Writes ``{name: array}`` as ``torch.save(state_dict)`` would; arrays are stored
  C-contiguous little-endian."""
  tree = collections.OrderedDict((name, TensorRef(np.asarray(v))) for name, v in state_dict.items())
  write_checkpoint(tree, path, legacy=legacy)
