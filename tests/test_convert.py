"""The converter: exact tensors, every checkpoint flavour, clear refusals, nothing half-written."""

from __future__ import annotations

import collections
import io
import os
import pickle
import tracemalloc
import pathlib
import zipfile

import jax
import numpy as np
import pytest

import minet_jax
from minet_jax import convert
from minet_jax.convert import torch_names, torch_pickle

import pth_writer


@pytest.fixture(scope="module")
def official(shared_dir):
  return (shared_dir / "weights" / "minet_its_official.pth",
          np.load(shared_dir / "weights" / "minet_its_official_state_dict.npz"))


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
  pth, _ = official
  out = tmp_path_factory.mktemp("ckpt") / "minet_its"
  assert convert.main([str(pth), str(out)]) == 0
  return out


def _flat(weights):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(weights)[0]}


def test_converted_checkpoint_equals_reference_npz(converted, official):
  _, ref = official
  params = minet_jax.load(converted)
  assert params.config.input_format == "bgr255"
  assert params.num_params() == 628_078
  back = torch_names.torch_state_dict_from_weights(params.weights, params.config)
  assert sorted(back) == sorted(ref.files)
  for name in ref.files:
    assert back[name].shape == ref[name].shape, name
    np.testing.assert_array_equal(back[name], ref[name], err_msg=name)
  # Layouts checked directly against PyTorch's conventions.
  w = params.weights
  np.testing.assert_array_equal(w["conv1"]["kernel"], ref["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(w["deconv3"]["kernel"],
                                ref["deconv3.weight"].transpose(2, 3, 0, 1)[::-1, ::-1])
  np.testing.assert_array_equal(w["layer1"]["fc1"]["kernel"], ref["layer1.2.weight"].T)


@pytest.mark.parametrize("legacy,prefix,wrapper", [(False, "", None), (False, "module.", "state_dict"),
                                                   (True, "module.", None)])
def test_zip_and_plain_state_dicts_convert_identically(tmp_path, official, legacy, prefix,
                                                        wrapper):
  pth, ref = official
  sd = {prefix + k: ref[k] for k in ref.files}
  path = tmp_path / "sd.pth"
  if wrapper:
    tree = {"epoch": 1, wrapper: {k: pth_writer.TensorRef(v) for k, v in sd.items()}}
    pth_writer.write_checkpoint(tree, path, legacy=legacy)
  else:
    pth_writer.save_state_dict(sd, path, legacy=legacy)
  got = _flat(convert.weights_from_checkpoint(path).weights)
  want = _flat(convert.weights_from_checkpoint(pth).weights)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_any_conv_backend_converts(tmp_path, official):
  # The backend is not stored (a RUNTIME_FIELD), so the read-back check compares the
  # architecture only; the loaded checkpoint gets the default backend.
  pth, _ = official
  params = convert.convert(pth, tmp_path / "out", config={"conv_backend": "xla"})
  assert params.config.conv_backend == "xla"
  assert minet_jax.load(tmp_path / "out").config.conv_backend == "auto"


def test_mismatched_state_dict_names_every_problem(tmp_path, official, capsys):
  _, ref = official
  sd = {k: ref[k] for k in ref.files if k != "gate.bias"}
  sd["extra.weight"] = np.zeros(3, np.float32)
  sd["conv1.weight"] = np.zeros((64, 3, 5, 5), np.float32)
  path = tmp_path / "bad.pth"
  pth_writer.save_state_dict(sd, path)
  out = tmp_path / "out"
  assert convert.main([str(path), str(out)]) == 1
  err = capsys.readouterr().err
  assert "missing: gate.bias" in err and "unexpected: extra.weight" in err
  assert "shape mismatch: conv1.weight" in err
  assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]


def test_malicious_checkpoint_writes_nothing(tmp_path, capsys):

  class Evil:

    def __reduce__(self):
      return (os.system, (f"touch {tmp_path / 'MARKER'}",))

  path = tmp_path / "evil.pth"
  path.write_bytes(pickle.dumps({"state_dict": Evil()}, protocol=2))
  out = tmp_path / "out"
  assert convert.main([str(path), str(out)]) == 1
  assert "system" in capsys.readouterr().err
  assert not (tmp_path / "MARKER").exists()
  assert not out.exists()


def test_refuses_to_overwrite_unless_forced(tmp_path, official, converted, capsys):
  pth, _ = official
  out = tmp_path / "taken"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  assert convert.main([str(pth), str(out)]) == 1
  assert "not a saved model (keep.txt)" in capsys.readouterr().err
  assert (out / "keep.txt").read_text() == "mine"
  with pytest.raises(FileExistsError, match="--force"):
    convert.convert(pth, converted)
  # --force replaces a converted model only: a folder of other files is never deleted.
  with pytest.raises(FileExistsError, match=r"not a saved model \(keep.txt\)"):
    convert.convert(pth, out, force=True)
  assert (out / "keep.txt").read_text() == "mine"
  (out / "keep.txt").unlink()
  convert.convert(pth, out)
  params = convert.convert(pth, out, force=True)
  assert minet_jax.load(out).num_params() == params.num_params()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temp folders left


def test_force_never_replaces_a_folder_holding_the_input_or_the_current_folder(
    tmp_path, official, monkeypatch, capsys):
  """``--force`` replaces a folder whole, so one that holds the checkpoint being
  converted, or the folder the user stands in (``.``, ``..``), would be deleted with
  everything in it: refused in one line, and nothing is touched."""
  pth, _ = official
  home = tmp_path / "home"
  (home / "sub").mkdir(parents=True)
  copy = home / "model_ITS.pth"
  copy.write_bytes(pathlib.Path(pth).read_bytes())
  (home / "notes.txt").write_text("mine")
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  monkeypatch.chdir(home)
  for source, out in [("model_ITS.pth", "."), (str(copy), str(home)), (str(pth), "."),
                      (str(pth), str(home))]:
    assert convert.main([source, out, "--force"]) == 1
    err = capsys.readouterr().err
    # home holds a file of the user's: no saved model, never replaced.
    assert err.count("\n") == 1 and "not a saved model" in err, err
  monkeypatch.chdir(home / "sub")
  for source, out in [("../model_ITS.pth", ".."), (str(pth), "..")]:
    assert convert.main([source, out, "--force"]) == 1
    assert "not a saved model" in capsys.readouterr().err
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
  assert (home / "notes.txt").read_text() == "mine"


def test_official_zip_checkpoint_gives_the_legacy_weights(official, shared_dir):
  pth, _ = official
  zipped = shared_dir / "weights" / "minet_its_official_zip.pth"
  assert zipfile.is_zipfile(zipped) and not zipfile.is_zipfile(pth)
  got = _flat(convert.weights_from_checkpoint(zipped).weights)
  want = _flat(convert.weights_from_checkpoint(pth).weights)
  assert got.keys() == want.keys() and len(want) == 73
  for k in want:
    assert got[k].dtype == want[k].dtype == np.float32, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# ------------------------------------------------------------------ hostile files: bounded memory

WEIGHTS_BYTES = 628_078 * 4  # the released architecture in float32, about 2.5 MB


class _ViewRef:
  """Pickles as a tensor of any size and stride over a given storage."""

  def __init__(self, storage, size, stride):
    self.storage, self.size, self.stride = storage, size, stride

  def __reduce__(self):
    return (pth_writer.Global("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, 0, self.size, self.stride, False, collections.OrderedDict()))


def _write_zip(path, tree, bombs: dict[str, int] = {}) -> None:
  """A torch zip checkpoint of ``tree``; storage ``key`` in ``bombs`` is instead that many
  deflated zero bytes."""
  buf = io.BytesIO()
  writer = pth_writer.Writer(buf, legacy=False)
  writer.dump(tree)
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/byteorder", "little")
    for key, array in writer.storages.values():
      if key not in bombs:
        zf.writestr(f"archive/data/{key}", array.tobytes())
        continue
      info = zipfile.ZipInfo(f"archive/data/{key}")
      info.compress_type = zipfile.ZIP_DEFLATED
      chunk = bytes(1 << 20)
      with zf.open(info, "w", force_zip64=True) as member:
        for _ in range(bombs[key] >> 20):
          member.write(chunk)


def _released_state_dict() -> dict[str, np.ndarray]:
  """Zeros of every tensor of the released architecture, in PyTorch names and layouts."""
  cfg = convert.released_config()
  shapes = minet_jax.core.params.param_shapes(cfg)
  return {name: np.ascontiguousarray(torch_names.to_torch_layout(np.zeros(shapes[path],
                                                                             np.float32), rule))
          for path, (name, rule) in torch_names.torch_name_table(cfg).items()}


def _peak_bytes(fn) -> int:
  """Peak Python + numpy heap while ``fn`` runs (numpy reports its buffers to tracemalloc)."""
  # Builds and caches the architecture's shapes outside the measurement.
  minet_jax.core.params.param_shapes(convert.released_config())
  tracemalloc.start()
  try:
    fn()
  except (torch_pickle.CheckpointFormatError, torch_pickle.UnsafePickleError,
          torch_names.StateDictMismatch):
    pass
  finally:
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
  return peak


def test_zero_stride_tensors_cannot_exhaust_memory(tmp_path, capsys):
  # Each tensor is 1024x1024 float64 (8 MB) over a 2-element storage: a 2 KB file.
  path = tmp_path / "stride0.pth"
  tree = collections.OrderedDict(
      (f"t{i}", _ViewRef(pth_writer.StorageRef(np.zeros(2)), (1024, 1024), (0, 0)))
      for i in range(16))
  _write_zip(path, tree)
  peak = _peak_bytes(lambda: convert.weights_from_checkpoint(path))
  assert peak < WEIGHTS_BYTES, f"peak {peak:,} bytes"
  assert convert.main([str(path), str(tmp_path / "out")]) == 1
  assert "more than once" in capsys.readouterr().err


@pytest.mark.parametrize("declared", ["honest", "inflated"])
def test_zip_bomb_storage_cannot_exhaust_memory(tmp_path, declared, capsys):
  # Every tensor of the architecture, right names and shapes; conv1.weight's storage member
  # inflates to 128 MiB (from 130 KB). "honest": the pickle declares the tensor's own 1728
  # elements; "inflated": it declares a storage as large as the member.
  sd = _released_state_dict()
  bomb = 128 << 20
  tree = collections.OrderedDict((k, pth_writer.TensorRef(v)) for k, v in sd.items())
  if declared == "inflated":
    storage = pth_writer.StorageRef(np.zeros(1, np.float32))
    storage.array = np.broadcast_to(np.float32(0), (bomb // 4,))  # Declares the size only.
    tree["conv1.weight"] = _ViewRef(storage, sd["conv1.weight"].shape, (27, 9, 3, 1))
  path = tmp_path / "bomb.pth"
  _write_zip(path, tree, bombs={"0": bomb})
  assert path.stat().st_size < 2 * WEIGHTS_BYTES
  peak = _peak_bytes(lambda: convert.weights_from_checkpoint(path))
  assert peak < WEIGHTS_BYTES, f"peak {peak:,} bytes"
  assert convert.main([str(path), str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("convert: error: ") and err.count("\n") == 1, err
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [np.complex64, np.int64])
def test_complex_and_integer_weights_are_refused_not_cast(tmp_path, dtype, capsys):
  sd = _released_state_dict()
  sd["gate.weight"] = sd["gate.weight"].astype(dtype)
  path = tmp_path / "typed.pth"
  pth_writer.save_state_dict(sd, path)
  out = tmp_path / "out"
  assert convert.main([str(path), str(out)]) == 1
  err = capsys.readouterr().err
  assert f"gate.weight: {np.dtype(dtype).name}" in err and "refusing to cast" in err
  assert not out.exists()


def test_nan_weights_leave_no_folder(tmp_path, capsys):
  sd = _released_state_dict()
  sd["deconv3.bias"][1] = np.nan
  path = tmp_path / "nan.pth"
  pth_writer.save_state_dict(sd, path)
  out = tmp_path / "out"
  assert convert.main([str(path), str(out)]) == 1
  assert "deconv3.bias: 1 of 64 values" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pth"]
