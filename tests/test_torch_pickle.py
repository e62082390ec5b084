"""Tests for the torch-free checkpoint reader: exact tensors, and nothing executed."""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
import struct
import zipfile

import numpy as np
import pytest

from minet_jax.convert import torch_pickle as tp

import pth_writer


# ------------------------------------------------------------------ fixtures built without torch


class FakeModule:
  """Pickles like an nn.Module: NEWOBJ of its class, then BUILD with its __dict__."""

  def __init__(self, cls_path, params=(), buffers=(), modules=(), non_persistent=(),
               attributes=None):
    self.cls_path = cls_path
    self.attributes = dict(attributes or {})  # Other entries of the module's __dict__.
    self.params = collections.OrderedDict(params)
    self.buffers = collections.OrderedDict(buffers)
    self.modules = collections.OrderedDict(modules)
    self.non_persistent = set(non_persistent)


class Device:
  """Pickles as torch.device('cuda', 0) does."""

  def __reduce__(self):
    return (pth_writer.Global("torch", "device"), ("cuda", 0))


class ParamRef:

  def __init__(self, array):
    self.tensor = pth_writer.TensorRef(array)

  def __reduce__(self):
    return (pth_writer.Global("torch._utils", "_rebuild_parameter"),
            (self.tensor, True, collections.OrderedDict()))


class ModuleWriter(pth_writer.Writer):
  dispatch = dict(pth_writer.Writer.dispatch)

  def save_module(self, obj):
    cls = pth_writer.Global(*obj.cls_path.rsplit(".", 1))
    if self.legacy:  # Legacy torch names module classes through a persistent id.
      self.save_pers(("module", cls, "/somewhere/module.py", ""))
    else:
      self.save(cls)
    self.save(())
    self.write(pickle.NEWOBJ)
    self.memoize(obj)
    self.save({
        "_backend": None, "training": False,
        "_parameters": collections.OrderedDict(
            (k, None if v is None else ParamRef(v)) for k, v in obj.params.items()),
        "_buffers": collections.OrderedDict(
            (k, None if v is None else pth_writer.TensorRef(v)) for k, v in obj.buffers.items()),
        "_non_persistent_buffers_set": obj.non_persistent,
        "_modules": obj.modules,
        **obj.attributes,
    })
    self.write(pickle.BUILD)

  dispatch[FakeModule] = save_module


def _tiny_model():
  rng = np.random.default_rng(0)
  conv = FakeModule("torch.nn.modules.conv.Conv2d", params=[
      ("weight", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
      ("bias", rng.normal(size=(4,)).astype(np.float32))])
  norm = FakeModule("torch.nn.modules.instancenorm.InstanceNorm2d", params=[
      ("weight", np.ones(4, np.float32)), ("bias", np.zeros(4, np.float32))],
      buffers=[("running_mean", None), ("scratch", np.arange(4.0)),
               ("steps", np.array(7, np.int64))], non_persistent=["scratch"])
  seq = FakeModule("torch.nn.modules.container.Sequential", modules=[
      ("0", FakeModule("MyNet.Block", params=[("w", np.eye(2, dtype=np.float64))])),
      ("1", FakeModule("torch.nn.modules.activation.ReLU"))])
  net = FakeModule("MyNet.Net", modules=[("conv", conv), ("norm", norm), ("body", seq),
                                         ("skip", None)])
  expect = {"conv.weight": conv.params["weight"], "conv.bias": conv.params["bias"],
            "norm.weight": norm.params["weight"], "norm.bias": norm.params["bias"],
            "norm.steps": norm.buffers["steps"], "body.0.w": seq.modules["0"].params["w"]}
  # DataParallel as torch >= 1.1 saves it on a GPU machine: with its source device.
  return FakeModule("torch.nn.parallel.data_parallel.DataParallel", modules=[("module", net)],
                    attributes={"dim": 0, "device_ids": [0], "output_device": 0,
                                "src_device_obj": Device()}), expect


def _assert_same(sd, expect):
  assert list(sd) == list(expect)
  for k, v in expect.items():
    assert sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
    np.testing.assert_array_equal(sd[k], v, err_msg=k)


# ------------------------------------------------------------------ the released checkpoint


def test_official_checkpoint_matches_npz_exactly(shared_dir):
  sd = tp.load_state_dict(shared_dir / "weights" / "minet_its_official.pth")
  ref = np.load(shared_dir / "weights" / "minet_its_official_state_dict.npz")
  assert len(ref.files) == 73
  _assert_same(sd, {k: ref[k] for k in ref.files})
  assert sum(v.size for v in sd.values()) == 628_078


def test_official_checkpoint_structure(shared_dir):
  obj = tp.load(shared_dir / "weights" / "minet_its_official.pth")
  assert obj["epoch"] == 175
  assert isinstance(obj["model"], tp.InertObject)
  assert obj["model"]._global_name == "torch.nn.parallel.data_parallel.DataParallel"
  assert vars(obj["model"])["_modules"]["module"]._global_name == "MINet.MI_Net"


# ------------------------------------------------------------------ formats and wrappers


@pytest.mark.parametrize("legacy", [False, True])
def test_plain_state_dict_roundtrip(tmp_path, legacy):
  rng = np.random.default_rng(1)
  sd = {"module.a.weight": rng.normal(size=(5, 2, 3, 3)).astype(np.float32),
        "module.b": rng.integers(-9, 9, size=(3,)).astype(np.int64),
        "module.c": np.float16([1.5, -2]), "module.flag": np.array([True, False])}
  path = tmp_path / "sd.pth"
  pth_writer.save_state_dict(sd, path, legacy=legacy)
  assert zipfile.is_zipfile(path) != legacy
  _assert_same(tp.load_state_dict(path), {k[len("module."):]: v for k, v in sd.items()})
  assert [p.name for p in tmp_path.iterdir()] == ["sd.pth"]


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict_of_module"])
def test_whole_module_checkpoints(tmp_path, legacy, wrap):
  module, expect = _tiny_model()
  tree = {"bare": module,
          "model": {"epoch": 3, "model": module},
          "state_dict_of_module": {"state_dict": module, "best": 1.0}}[wrap]
  path = tmp_path / "m.pth"
  pth_writer.write_checkpoint(tree, path, legacy=legacy, writer=ModuleWriter)
  _assert_same(tp.load_state_dict(path), expect)


def test_state_dict_wrapper_and_numpy_scalar(tmp_path):
  w = np.arange(6, dtype=np.float32).reshape(2, 3)
  tree = {"epoch": np.int64(12), "lr": np.float32(0.5),
          "state_dict": collections.OrderedDict(w=pth_writer.TensorRef(w))}
  path = tmp_path / "c.pth"
  pth_writer.write_checkpoint(tree, path, legacy=False)
  obj = tp.load(path)
  assert obj["epoch"] == 12 and obj["lr"] == 0.5
  _assert_same(tp.to_state_dict(obj), {"w": w})


def test_shared_storage_views(tmp_path):
  base = np.arange(10, dtype=np.float32)
  storage = pth_writer.StorageRef(base)
  tree = {"a": pth_writer.TensorRef(np.zeros((2, 2), np.float32), storage, offset=3),
          "b": pth_writer.TensorRef(np.zeros(10, np.float32), storage)}
  path = tmp_path / "v.pth"
  pth_writer.write_checkpoint(tree, path, legacy=True)
  sd = tp.load_state_dict(path)
  np.testing.assert_array_equal(sd["a"], [[3, 4], [5, 6]])
  np.testing.assert_array_equal(sd["b"], base)


def test_no_weights_is_a_clear_error(tmp_path):
  path = tmp_path / "x.pth"
  pth_writer.write_checkpoint({"epoch": 1, "optimizer": {"lr": 0.1}}, path, legacy=False)
  with pytest.raises(tp.CheckpointFormatError, match="top-level keys"):
    tp.load_state_dict(path)


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, pickle.dumps({"a": 1}),
                                     b"\x89PNG\r\n\x1a\n" + bytes(40), b"Lorem ipsum"])
def test_not_a_checkpoint(tmp_path, content):
  path = tmp_path / "bad.pth"
  path.write_bytes(content)
  with pytest.raises(tp.CheckpointFormatError, match="not a (readable )?PyTorch checkpoint"):
    tp.load(path)
  if content and content[:1] != b"\x80":  # An image, a text: no pickle to parse at all.
    with pytest.raises(tp.CheckpointFormatError, match=r"neither a zip archive nor a legacy "
                       r"torch.save file \(it begins b'"):
      tp.load(path)


def test_a_legacy_file_in_pickle_protocol_1_is_read(tmp_path):
  # torch.save(..., pickle_protocol=1) writes its magic number as a text LONG ("L..."),
  # not after a PROTO opcode: the first byte alone must not refuse it.
  path = tmp_path / "p1.pth"
  path.write_bytes(b"".join(pickle.dumps(part, protocol=1) for part in (
      0x1950a86a20f9469cfc6c, 1001, {"protocol_version": 1001, "little_endian": True},
      {"a": 1}, [])))
  assert path.read_bytes()[:1] == b"L"
  assert tp.load(path) == {"a": 1}


def test_truncated_legacy(tmp_path, shared_dir):
  data = (shared_dir / "weights" / "minet_its_official.pth").read_bytes()
  path = tmp_path / "cut.pth"
  path.write_bytes(data[:-1000])
  with pytest.raises(tp.CheckpointFormatError, match="truncated"):
    tp.load(path)


# ------------------------------------------------------------------ hostile pickles


class _Evil:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class _EvalEvil:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


def _hostile_payloads(marker):
  evil = {"model": _Evil(marker)}
  yield "os.system", pickle.dumps(evil, protocol=2), "system"
  yield "eval", pickle.dumps({"state_dict": _EvalEvil(marker)}, protocol=4), "eval"
  # Hand-assembled: GLOBAL posix system, argument tuple, REDUCE.
  raw = (b"\x80\x02cposix\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little") +
         f"touch {marker}".encode() + b"\x85R.")
  yield "posix.system", raw, "posix.system"
  # A CapWords class from the standard library is not admitted either.
  import subprocess
  yield "Popen", pickle.dumps(_Reduce(subprocess.Popen, (["touch", str(marker)],))), "Popen"


class _Reduce:

  def __init__(self, fn, args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return (self.fn, self.args)


@pytest.mark.parametrize("container", ["raw", "zip", "legacy"])
def test_malicious_pickles_are_refused_and_run_nothing(tmp_path, container):
  marker = tmp_path / "MARKER"
  for label, payload, needle in _hostile_payloads(marker):
    path = tmp_path / f"{label}.pth"
    if container == "zip":
      with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")
    elif container == "legacy":
      path.write_bytes(pickle.dumps(tp.LEGACY_MAGIC, protocol=2) +
                       pickle.dumps(tp.LEGACY_PROTOCOL, protocol=2) +
                       pickle.dumps({"little_endian": True}, protocol=2) + payload +
                       pickle.dumps([], protocol=2))
    else:
      path.write_bytes(payload)
    with pytest.raises(tp.UnsafePickleError, match=needle) as info:
      tp.load_state_dict(path)
    assert "nothing was executed" in str(info.value) or "refusing" in str(info.value)
    assert not marker.exists(), label


def test_inert_classes_cannot_be_called(tmp_path):
  # Admitted as an inert class, but a REDUCE that calls it is refused.
  path = tmp_path / "r.pth"
  path.write_bytes(b"\x80\x02csomepkg.tools\nRunner\nX\x01\x00\x00\x00x\x85R.")
  with pytest.raises(tp.UnsafePickleError, match="somepkg.tools.Runner"):
    tp.load(path)
  # A rebuild function fed something that is not a storage is refused too.
  path.write_bytes(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(X\x01\x00\x00\x00sK\x00)))tR.")
  with pytest.raises(tp.UnsafePickleError, match="not a storage"):
    tp.load(path)


# ------------------------------------------------------------------ tampering and malformed files


def _body(obj) -> bytes:
  """The opcodes that push ``obj`` (a protocol-2 pickle without its header and STOP)."""
  return pickle.dumps(obj, protocol=2)[2:-1]


def _global(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def test_build_cannot_change_the_readers_functions(tmp_path):
  # BUILD with a slot state would setattr() on the reader's own stand-in function.
  defaults = tp._rebuild_tensor_v2.__defaults__
  path = tmp_path / "tamper.pth"
  path.write_bytes(b"\x80\x02" + _global("torch._utils", "_rebuild_tensor_v2") +
                   _body((None, {"__defaults__": (True, 1, 2)})) + pickle.BUILD + pickle.STOP)
  try:
    with pytest.raises(tp.UnsafePickleError, match="refusing"):
      tp.load(path)
    assert tp._rebuild_tensor_v2.__defaults__ == defaults
  finally:
    tp._rebuild_tensor_v2.__defaults__ = defaults


def _legacy_file(path, main: bytes, keys=(), storages: bytes = b"") -> None:
  path.write_bytes(pickle.dumps(tp.LEGACY_MAGIC, protocol=2) +
                   pickle.dumps(tp.LEGACY_PROTOCOL, protocol=2) +
                   pickle.dumps({"little_endian": True}, protocol=2) + main +
                   pickle.dumps(list(keys), protocol=2) + storages)


def _zip_file(path, data_pkl: bytes) -> None:
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", data_pkl)
    zf.writestr("archive/version", "3\n")


def _tensor_pickle(size, stride, numel=4, header_numel=None) -> tuple[bytes, bytes]:
  """(main pickle, storage bytes) of {"w": tensor(size, stride)} over one float storage."""
  storage_id = (pickle.MARK + _body("storage") + _global("torch", "FloatStorage") +
                _body("0") + _body("cpu") + _body(numel) + pickle.NONE + pickle.TUPLE +
                pickle.BINPERSID)
  main = (b"\x80\x02" + pickle.EMPTY_DICT + _body("w") +
          _global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + storage_id +
          _body(0) + _body(size) + _body(stride) + pickle.TUPLE + pickle.REDUCE +
          pickle.SETITEM + pickle.STOP)
  data = struct.pack("<q", numel if header_numel is None else header_numel)
  return main, data + np.zeros(numel, np.float32).tobytes()


def _malformed(tmp_path, case: str) -> pathlib.Path:
  path = tmp_path / f"{case}.pth"
  if case == "negative size":
    main, data = _tensor_pickle((-2, 2), (2, 1))
    _legacy_file(path, main, ["0"], data)
  elif case == "size given as an int":
    main, data = _tensor_pickle(4, (1,))
    _legacy_file(path, main, ["0"], data)
  elif case == "header claims 2**60 elements":
    main, data = _tensor_pickle((2, 2), (2, 1), header_numel=2**60)
    _legacy_file(path, main, ["0"], data)
  elif case == "200k-deep nesting":
    _zip_file(path, b"\x80\x02" + pickle.EMPTY_LIST * 200_000 + pickle.APPEND * 199_999 +
              pickle.STOP)
  elif case == "40k-deep nesting":  # within the opcode allowance
    _zip_file(path, b"\x80\x02" + pickle.EMPTY_TUPLE + pickle.TUPLE1 * 40_000 + pickle.STOP)
  elif case == "BUILD assigns __class__":
    path.write_bytes(b"\x80\x02" + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE +
                     pickle.REDUCE + _body((None, {"__class__": 1})) + pickle.BUILD +
                     pickle.STOP)
  return path


@pytest.mark.parametrize("case", ["negative size", "size given as an int",
                                  "header claims 2**60 elements", "200k-deep nesting",
                                  "40k-deep nesting", "BUILD assigns __class__"])
def test_malformed_pickles_are_one_line_refusals(tmp_path, case, capsys):
  from minet_jax import convert
  path = _malformed(tmp_path, case)
  with pytest.raises((tp.CheckpointFormatError, tp.UnsafePickleError)):
    tp.load(path)
  assert convert.main([str(path), str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("convert: error: ") and err.count("\n") == 1, err
  assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("claimed", [200_000_000, 2**62])
def test_a_bytearray_longer_than_the_allowance_is_refused_before_allocating(tmp_path, claimed):
  # Protocol 5's BYTEARRAY8 declares its length first; 11 bytes must not cost 200 MB.
  import tracemalloc
  path = tmp_path / "big.pth"
  path.write_bytes(b"\x80\x05" + pickle.BYTEARRAY8 + struct.pack("<Q", claimed))
  tracemalloc.start()
  try:
    with pytest.raises(tp.CheckpointFormatError, match="larger than"):
      tp.load(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 20_000_000, peak
  # One within the allowance still reads.
  _legacy_file(path, pickle.dumps({"w": bytearray(b"abc")}, protocol=5))
  assert tp.load(path) == {"w": bytearray(b"abc")}


def test_flipped_bytes_never_give_a_raw_error(tmp_path):
  src = tmp_path / "sd.pth"
  pth_writer.save_state_dict({"a": np.arange(6, dtype=np.float32).reshape(2, 3),
                      "b": np.float16([1, 2])}, src, legacy=True)
  data = src.read_bytes()
  path = tmp_path / "flipped.pth"
  raw = {}
  for i in range(len(data)):
    path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    try:
      tp.load_state_dict(path)
    except (tp.CheckpointFormatError, tp.UnsafePickleError):
      pass
    except Exception as e:  # noqa: BLE001 - what the test looks for
      raw[i] = f"{type(e).__name__}: {e}"
  assert not raw, raw


def test_overlapping_views_are_refused_before_reading(tmp_path):
  # A stride-0 view would make a 2-element storage stand for a 1M-element tensor.
  path = tmp_path / "zero_stride.pth"
  main, data = _tensor_pickle((1024, 1024), (0, 0), numel=2)
  _legacy_file(path, main, ["0"], data)
  with pytest.raises(tp.CheckpointFormatError, match="more than once"):
    tp.load(path)
  main, data = _tensor_pickle((3, 3), (2, 1), numel=9)  # rows overlap by one element
  _legacy_file(path, main, ["0"], data)
  with pytest.raises(tp.CheckpointFormatError, match="more than once"):
    tp.load(path)
  main, data = _tensor_pickle((3, 3), (1, 3), numel=9)  # a transposed view is fine
  _legacy_file(path, main, ["0"], data)
  assert tp.load(path)["w"].shape == (3, 3)
