"""The converter: exact tensors, every checkpoint flavour, clear refusals, nothing half-written."""

from __future__ import annotations

import os
import pickle

import jax
import numpy as np
import pytest

import minet_jax
from minet_jax import convert, torch_names, torch_pickle


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
    tree = {"epoch": 1, wrapper: {k: torch_pickle._TensorRef(v) for k, v in sd.items()}}
    torch_pickle._write_checkpoint(tree, path, legacy=legacy)
  else:
    torch_pickle.save_state_dict(sd, path, legacy=legacy)
  got = _flat(convert.weights_from_checkpoint(path).weights)
  want = _flat(convert.weights_from_checkpoint(pth).weights)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_mismatched_state_dict_names_every_problem(tmp_path, official, capsys):
  _, ref = official
  sd = {k: ref[k] for k in ref.files if k != "gate.bias"}
  sd["extra.weight"] = np.zeros(3, np.float32)
  sd["conv1.weight"] = np.zeros((64, 3, 5, 5), np.float32)
  path = tmp_path / "bad.pth"
  torch_pickle.save_state_dict(sd, path)
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
  assert "--force" in capsys.readouterr().err
  assert (out / "keep.txt").read_text() == "mine"
  with pytest.raises(FileExistsError):
    convert.convert(pth, converted)
  params = convert.convert(pth, out, force=True)
  assert not (out / "keep.txt").exists()
  assert minet_jax.load(out).num_params() == params.num_params()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temp folders left
