"""The public API: apply's contract, jit, save/load, and every documented input error."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minet_jax
from minet_jax.core import checkpoint
from conftest import checkout_env

TINY = minet_jax.ModelConfig(features=8, iterations=(2, 2, 2))
REPO = pathlib.Path(__file__).resolve().parent.parent


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@pytest.fixture(scope="module")
def params(random_params):
  return random_params(TINY, seed=1)


@pytest.fixture(scope="module")
def image():
  return np.random.default_rng(0).integers(0, 256, size=(19, 26, 3), dtype=np.uint8)


def test_done_when_example_shape(random_params):
  out = minet_jax.apply(random_params(), np.zeros((37, 53, 3), np.uint8))
  assert out.shape == (37, 53, 3)


def test_apply_layouts_and_range(params, image):
  out = minet_jax.apply(params, image)
  chex.assert_shape(out, image.shape)
  chex.assert_type(out, jnp.float32)
  chex.assert_tree_all_finite(out)
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  batch = minet_jax.apply(params, np.stack([image, image[::-1]]))
  chex.assert_shape(batch, (2,) + image.shape)
  np.testing.assert_allclose(batch[0], out, atol=1e-5)


def test_uint8_and_float_inputs_agree(params, image):
  np.testing.assert_allclose(minet_jax.apply(params, image),
                             minet_jax.apply(params, image.astype(np.float32) / 255.0), atol=1e-6)
  as16 = image.astype(np.uint16) * 257  # 0..255 -> 0..65535 exactly
  np.testing.assert_allclose(minet_jax.apply(params, image), minet_jax.apply(params, as16),
                             atol=1e-6)


def test_jit_equals_eager(params, image):
  eager = minet_jax.apply(params, image)
  jitted = jax.jit(minet_jax.apply)(params, image)
  np.testing.assert_allclose(jitted, eager, atol=1e-6)


def test_init_is_deterministic_by_seed():
  a, b, c = (minet_jax.init(TINY, seed=s) for s in (4, 4, 5))
  chex.assert_trees_all_equal(a.weights, b.weights)
  assert not np.array_equal(a.weights["conv1"]["kernel"], c.weights["conv1"]["kernel"])


def test_model_params_round_trip(params):
  back = minet_jax.params_from_model(minet_jax.model_from_params(params))
  chex.assert_trees_all_equal(back.weights, params.weights)
  assert back.config == params.config


def test_replace_config_keeps_the_weights_and_checks_the_change(params):
  fast = params.replace_config(dtype="bfloat16")
  assert fast.weights is params.weights and fast.config.dtype == "bfloat16"
  assert params.config.dtype == "float32"  # the original is untouched
  with pytest.raises(ValueError, match="dtype must be one of"):
    params.replace_config(dtype="int8")
  with pytest.raises(TypeError, match="unexpected keyword"):
    params.replace_config(dtypes="bfloat16")
  # What the weights are stays, whether or not the shapes would tell.
  for change in (dict(features=params.config.features + 1), dict(eta=0.5),
                 dict(input_format="rgb01", rtol=0.5)):
    with pytest.raises(ValueError, match=f"{next(iter(change))} belong to the weights' "
                                         "architecture"):
      params.replace_config(**change)
  assert params.replace_config(rtol=0.5).config.rtol == 0.5
  assert params.replace_config(eta=params.config.eta).config == params.config  # no change
  # The roles a fine-tune may give the same weights (INIT_FROM_FREE_FIELDS) may change.
  staged = params.replace_config(stage_fraction=0.5, stages=2)
  assert staged.config.stages == (2, 2, 2) and staged.weights is params.weights


def test_save_load_is_bit_exact(params, image, tmp_path):
  path = minet_jax.save(params, tmp_path / "ckpt")
  assert path.stat().st_mode & 0o755 == 0o755 & ~_umask()
  loaded = minet_jax.load(tmp_path / "ckpt")
  assert loaded.config == params.config
  chex.assert_trees_all_equal(loaded.weights, params.weights)
  np.testing.assert_array_equal(minet_jax.apply(loaded, image), minet_jax.apply(params, image))
  # A saved folder is no training step: no source step folder to name.
  _, source = minet_jax.core.checkpoint.load_with_source(tmp_path / "ckpt")
  assert source is None


def test_save_refuses_to_clobber(params, tmp_path):
  target = tmp_path / "ckpt"
  target.mkdir()
  (target / "keep.txt").write_text("precious")
  # Replacing deletes the folder's contents: only a saved model's are ever replaced.
  for overwrite in (False, True):
    with pytest.raises(FileExistsError, match=r"not a saved model \(keep.txt\)"):
      minet_jax.save(params, target, overwrite=overwrite)
  assert (target / "keep.txt").read_text() == "precious"
  with pytest.raises(FileExistsError, match="is a file"):
    minet_jax.save(params, target / "keep.txt", overwrite=True)
  (target / "keep.txt").unlink()
  minet_jax.save(params, target)
  with pytest.raises(FileExistsError, match="exists and is not empty; pass overwrite=True"):
    minet_jax.save(params, target)
  minet_jax.save(params, target, overwrite=True)
  (target / ".DS_Store").write_bytes(b"\0")  # A file manager's: no reason to refuse.
  minet_jax.save(params, target, overwrite=True)
  (target / "notes.txt").write_text("mine")  # A saved model with a file of the user's.
  with pytest.raises(FileExistsError, match=r"not a saved model \(notes.txt\)"):
    minet_jax.save(params, target, overwrite=True)
  assert (target / "notes.txt").read_text() == "mine"
  assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind


def test_save_load_and_write_name_their_mistakes(params, tmp_path):
  with pytest.raises(TypeError, match="save takes minet_jax.Params .*got dict"):
    minet_jax.save(params.weights, tmp_path / "w")
  with pytest.raises(minet_jax.CheckpointError, match="^file .*missing.pth does not exist$"):
    minet_jax.load(tmp_path / "missing.pth")
  (tmp_path / "out.png").mkdir()
  with pytest.raises(IsADirectoryError, match=r"cannot write .*out.png: it is a folder"):
    minet_jax.image_io.write_png(tmp_path / "out.png", np.zeros((4, 4, 3), np.uint8))
  assert not (tmp_path / "w").exists() and list((tmp_path / "out.png").iterdir()) == []


def test_save_and_load_expand_the_home_folder(params, tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  assert minet_jax.save(params, "~/model") == tmp_path / "model"
  assert minet_jax.load_config("~/model") == params.config
  assert minet_jax.load("~/model").num_params() == params.num_params()


def test_load_missing_path(tmp_path, monkeypatch):
  with pytest.raises(minet_jax.CheckpointError, match="does not exist$"):
    minet_jax.load(tmp_path / "nope")
  # A bare name that is no folder here may be a release's: where that loads from.
  monkeypatch.chdir(tmp_path)
  with pytest.raises(minet_jax.CheckpointError,
                     match="does not exist; a released model by name .* minet_jax.pretrained"):
    minet_jax.load("its")
  (tmp_path / "empty").mkdir()
  with pytest.raises(minet_jax.CheckpointError, match="not a minet-jax checkpoint"):
    minet_jax.load(tmp_path / "empty")


@pytest.mark.parametrize("inside", ["checkpoints", "checkpoints/20", "checkpoints/20/params",
                                    "best/20", "checkpoints/99"])
def test_a_folder_inside_a_training_workdir_asks_for_the_workdir(params, tmp_path, inside):
  workdir = tmp_path / "wd"
  (workdir / "checkpoints" / "20" / "params").mkdir(parents=True)
  (workdir / "best" / "20" / "params").mkdir(parents=True)
  checkpoint.write_config(workdir, params.config)
  with pytest.raises(minet_jax.CheckpointError) as e:
    minet_jax.load(workdir / inside)
  assert str(e.value) == (f"{workdir / inside} is part of the training workdir {workdir}; "
                          f"pass the workdir itself ({workdir}): its best, else latest, "
                          "weights load")


def test_a_folder_a_workdir_records_as_holding_weights_asks_for_the_workdir(params, tmp_path):
  workdir = tmp_path / "wd"
  (workdir / "kept" / "20" / "params").mkdir(parents=True)
  checkpoint.write_config(workdir, params.config, weights_in=["kept"])
  with pytest.raises(minet_jax.CheckpointError, match=r"pass the workdir itself"):
    minet_jax.load(workdir / "kept" / "20")
  (workdir / "checkpoints" / "20").mkdir(parents=True)  # Not one of this workdir's.
  with pytest.raises(minet_jax.CheckpointError, match="not a minet-jax checkpoint"):
    minet_jax.load(workdir / "checkpoints" / "20")


def test_a_workdir_without_finished_steps_says_so(params, tmp_path):
  workdir = tmp_path / "wd"
  (workdir / "best" / "3.orbax-checkpoint-tmp-1" / "params").mkdir(parents=True)
  checkpoint.write_config(workdir, params.config, weights_in=["best", "checkpoints"])
  with pytest.raises(minet_jax.CheckpointError) as e:
    minet_jax.load(workdir)
  assert str(e.value) == (f"no weights in the training workdir {workdir} yet: none of best, "
                          "checkpoints holds a finished step")


@pytest.mark.parametrize("weights_in", [[], "best", ["../elsewhere"], ["a/b"], [".."], [3],
                                        {"best": 1}])
def test_a_damaged_weights_in_is_refused(params, tmp_path, weights_in):
  workdir = tmp_path / "wd"
  workdir.mkdir()
  checkpoint.write_config(workdir, params.config)
  record = json.loads((workdir / "minet_config.json").read_text())
  record["weights_in"] = weights_in
  (workdir / "minet_config.json").write_text(json.dumps(record))
  with pytest.raises(minet_jax.CheckpointError,
                     match=r"minet_config.json is corrupt: weights_in must be a non-empty list"):
    minet_jax.load(workdir)
  if not isinstance(weights_in, dict):
    with pytest.raises(ValueError, match="weights_in must be"):
      checkpoint.write_config(workdir, params.config, weights_in=weights_in or [""])


def test_a_file_is_no_checkpoint_folder(tmp_path):
  (tmp_path / "weights.bin").write_bytes(b"")
  with pytest.raises(minet_jax.CheckpointError, match="is a file, not a checkpoint folder"):
    checkpoint.load(tmp_path / "weights.bin")


def test_load_corrupt_checkpoint(params, tmp_path):
  path = minet_jax.save(params, tmp_path / "ckpt")
  config_file = path / "minet_config.json"
  good = config_file.read_text()
  config_file.write_text("{not json")
  with pytest.raises(minet_jax.CheckpointError, match="corrupt"):
    minet_jax.load(path)
  meta = _as_format_1(json.loads(good))  # whose architecture record has no checksum
  meta["model"]["features"] = 16  # weights no longer fit the architecture
  config_file.write_text(json.dumps(meta))
  with pytest.raises(minet_jax.CheckpointError, match="could not read the weights"):
    minet_jax.load(path)
  config_file.write_text(good)
  for f in (path / "weights").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  with pytest.raises(minet_jax.CheckpointError, match="could not read the weights"):
    minet_jax.load(path)


@pytest.mark.parametrize("bad, error, pattern", [
    (np.zeros((8, 8), np.uint8), ValueError,
     r"HxWx3 or NxHxWx3, got shape \(8, 8\) \(grayscale\?\); convert it with np.repeat"),
    (np.zeros((1, 1, 8, 8, 3), np.uint8), ValueError, "HxWx3 or NxHxWx3"),
    (np.zeros((8, 8, 1), np.uint8), ValueError, "grayscale"),
    (np.zeros((8, 8, 4), np.uint8), ValueError, "alpha"),
    (np.zeros((3, 8, 8), np.uint8), ValueError,
     r"channels first .*; transpose to HxWx3 with np.transpose\(img, \(1, 2, 0\)\)"),
    (np.zeros((2, 3, 8, 8), np.float32), ValueError, r"np.transpose\(img, \(0, 2, 3, 1\)\)"),
    (np.zeros((0, 8, 3), np.uint8), ValueError, "empty"),
    (np.zeros((0, 8, 8, 3), np.float32), ValueError, "empty"),
    (np.full((8, 8, 3), np.nan, np.float32), ValueError, "NaN or infinite"),
    (np.full((8, 8, 3), np.inf, np.float32), ValueError, "NaN or infinite"),
    (np.full((8, 8, 3), 200.0, np.float32), ValueError, "divide 0..255 data by 255"),
    (np.zeros((8, 8, 3), bool), TypeError, "unsupported image dtype"),
    (np.zeros((8, 8, 3), np.int32), TypeError, "unsupported image dtype"),
    ([[[0, 0, 0]]], TypeError, "numpy or jax array"),
])
def test_bad_inputs_raise_the_documented_error(params, bad, error, pattern):
  with pytest.raises(error, match=pattern):
    minet_jax.apply(params, bad)


def test_apply_needs_params(image):
  with pytest.raises(TypeError, match="minet_jax.Params"):
    minet_jax.apply({"conv1": {}}, image)


# ------------------------------------------------------------------ damaged and foreign folders


def test_flipped_bytes_in_saved_weights_are_detected(params, tmp_path):
  path = minet_jax.save(params, tmp_path / "ckpt")
  largest = max((f for f in (path / "weights").rglob("*") if f.is_file()),
                key=lambda f: f.stat().st_size)
  data = bytearray(largest.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
  largest.write_bytes(bytes(data))
  with pytest.raises(minet_jax.CheckpointError, match="checksum|could not read"):
    minet_jax.load(path)


def test_non_finite_weights_are_refused_naming_the_tensor(params, tmp_path):
  import orbax.checkpoint as ocp
  path = minet_jax.save(params, tmp_path / "ckpt")
  weights = jax.tree.map(np.array, params.weights)
  weights["conv1"]["kernel"][0, 0, 0, 0] = np.nan
  shutil.rmtree(path / "weights")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / "weights", weights)
  meta = _as_format_1(json.loads((path / "minet_config.json").read_text()))
  meta.pop("weights_sha256", None)  # as in a folder saved before checksums were recorded
  (path / "minet_config.json").write_text(json.dumps(meta))
  with pytest.raises(minet_jax.CheckpointError, match=r"conv1\.kernel holds 1 NaN"):
    minet_jax.load(path)


def _as_format_1(meta: dict) -> dict:
  """A minet_config.json record as format 1 wrote it (no model_sha256)."""
  meta = dict(meta, format_version=1)
  meta.pop("model_sha256")
  return meta


@pytest.mark.parametrize("edit", ["iterations", "input_format", "eta", "weights_sha256 deleted",
                                  "model_sha256 deleted"])
def test_edits_to_the_config_record_are_refused(params, tmp_path, edit):
  path = minet_jax.save(params, tmp_path / "ckpt")
  config_file = path / "minet_config.json"
  meta = json.loads(config_file.read_text())
  changes = {"iterations": [1, 1, 1], "input_format": "rgb01", "eta": 0.5}
  if edit in changes:
    assert meta["model"][edit] != changes[edit]
    meta["model"][edit] = changes[edit]  # Weights of the same shapes, another output.
  else:
    del meta[edit.split()[0]]
  config_file.write_text(json.dumps(meta, indent=2))
  with pytest.raises(minet_jax.CheckpointError, match=f"{config_file} is damaged or was edited"):
    minet_jax.load(path)
  if edit != "weights_sha256 deleted":
    with pytest.raises(minet_jax.CheckpointError, match="damaged or was edited"):
      minet_jax.load_config(path)


def test_deeply_nested_config_record_is_one_clear_error(params, tmp_path):
  path = minet_jax.save(params, tmp_path / "ckpt")
  (path / "minet_config.json").write_text("[" * 200_000 + "]" * 200_000)
  with pytest.raises(minet_jax.CheckpointError, match="nested too deeply"):
    minet_jax.load(path)


def test_reformatted_and_format_1_config_records_still_load(params, tmp_path):
  path = minet_jax.save(params, tmp_path / "ckpt")
  config_file = path / "minet_config.json"
  meta = json.loads(config_file.read_text())
  config_file.write_text(json.dumps(meta, indent=4, sort_keys=True))  # Same content.
  chex.assert_trees_all_equal(minet_jax.load(path).weights, params.weights)
  config_file.write_text(json.dumps(_as_format_1(meta)))  # Written by an older version.
  chex.assert_trees_all_equal(minet_jax.load(path).weights, params.weights)


def test_params_refuse_weights_of_another_architecture(params):
  wide = minet_jax.init(minet_jax.ModelConfig(features=16, iterations=(2, 2, 2)))
  with pytest.raises(ValueError, match=r"do not fit the config's architecture: conv1\.kernel "
                     r"\(3, 3, 3, 16\) \(expected \(3, 3, 3, 8\)\)"):
    minet_jax.Params(weights=wide.weights, config=TINY)
  partial = {k: v for k, v in params.weights.items() if k != "gate"}
  with pytest.raises(ValueError, match=r"gate\.\w+ missing"):
    minet_jax.Params(weights=partial, config=TINY)
  # JAX rebuilds Params from placeholders and tracers in its transformations.
  assert jax.tree.structure(jax.tree.map(lambda x: None, params)) is not None
  grads = jax.grad(lambda p: jnp.sum(minet_jax.apply(p, jnp.zeros((8, 8, 3)))))(params)
  assert isinstance(grads, minet_jax.Params)


def test_newer_format_version_is_refused(params, tmp_path):
  path = minet_jax.save(params, tmp_path / "ckpt")
  meta = json.loads((path / "minet_config.json").read_text())
  meta["format_version"] = minet_jax.core.checkpoint.FORMAT_VERSION + 1
  (path / "minet_config.json").write_text(json.dumps(meta))
  with pytest.raises(minet_jax.CheckpointError, match="newer .* upgrade minet-jax"):
    minet_jax.load(path)


@pytest.mark.parametrize("dtype", [np.complex64, np.int64])
def test_save_refuses_complex_and_integer_weights(params, tmp_path, dtype):
  weights = jax.tree.map(np.array, params.weights)
  weights["gate"]["kernel"] = weights["gate"]["kernel"].astype(dtype)
  with pytest.raises(TypeError, match=r"gate\.kernel has dtype .*\(refusing to cast\)"):
    minet_jax.save(minet_jax.Params(weights=weights, config=params.config), tmp_path / "c")
  assert not list(tmp_path.iterdir())


def test_missing_weights_file_is_one_line_without_stray_tracebacks(params, tmp_path):
  path = minet_jax.save(params, tmp_path / "ckpt")
  (path / "weights" / "manifest.ocdbt").unlink()
  env = checkout_env()
  result = subprocess.run([sys.executable, "-m", "minet_jax.dehaze", "--ckpt", str(path),
                           str(tmp_path / "x.png"), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 2
  assert result.stderr.startswith("dehaze: error: could not read the weights")
  assert result.stderr.count("\n") == 1, result.stderr


# ------------------------------------------------------------------ odd arrays, checks under jit


class _DuckImage:
  """Array-like with a dtype numpy cannot interpret (as a torch tensor has)."""
  shape = (8, 8, 3)
  ndim = 3
  dtype = "torch.float32"


def test_duck_typed_dtype_gets_a_clear_error(params):
  with pytest.raises(TypeError, match="not a numpy dtype"):
    minet_jax.apply(params, _DuckImage())


def test_big_endian_floats_are_accepted(params, image):
  native = image.astype(np.float32) / 255.0
  np.testing.assert_array_equal(minet_jax.apply(params, native.astype(">f4")),
                                minet_jax.apply(params, native))


def test_big_endian_integers_and_long_doubles_are_accepted(params, image):
  # '>u2' used to be refused as an unsupported dtype, np.longdouble to fail inside JAX.
  want = minet_jax.apply(params, image.astype(np.uint16) * 257)
  np.testing.assert_array_equal(minet_jax.apply(params, (image.astype(np.uint16) * 257)
                                                .astype(">u2")), want)
  np.testing.assert_array_equal(minet_jax.apply(params, image.astype(">u1")),
                                minet_jax.apply(params, image))
  wide = (image / 255.0).astype(np.longdouble)
  np.testing.assert_array_equal(minet_jax.apply(params, wide),
                                minet_jax.apply(params, (image / 255.0).astype(np.float32)))
  err, out = minet_jax.apply_checked(params, wide)
  assert err.get() is None


def test_apply_checked_catches_bad_values_under_jit(params, image):
  checked = jax.jit(minet_jax.apply_checked)
  scaled = image.astype(np.float32)  # 0..255: plain jit(apply) clips it silently
  err, _ = checked(params, scaled)
  with pytest.raises(ValueError, match="divide 0..255 data by 255"):
    err.throw()
  err, _ = checked(params, np.where(image > 128, np.nan, scaled / 255.0).astype(np.float32))
  with pytest.raises(ValueError, match="NaN or infinite"):
    err.throw()
  err, out = checked(params, scaled / 255.0)
  assert err.get() is None
  np.testing.assert_allclose(out, minet_jax.apply(params, image), atol=1e-6)
  assert "apply_checked" in minet_jax.apply.__doc__


def test_apply_checked_eagerly_compiles_once_and_checks_as_under_jit(params, image, caplog):
  """Called without jit, checkify traced the whole forward again on every call (a new
  compilation each time, about a hundred times `apply`'s cost)."""
  x = (image / 255.0).astype(np.float32)
  for value in (x, image):  # Compiles, once per dtype.
    err, out = minet_jax.apply_checked(params, value)
    assert err.get() is None
    np.testing.assert_array_equal(out, minet_jax.apply(params, value))
  with jax.log_compiles(), caplog.at_level("WARNING"):
    caplog.clear()
    for value in (x, image, 1.0 - x):
      err, _ = minet_jax.apply_checked(params, value)
      assert err.get() is None
    assert not [r for r in caplog.records if "ompil" in r.getMessage()], caplog.text
  for bad, message in ((x * 255.0, "divide 0..255 data by 255"),
                       (np.where(image > 128, np.nan, x).astype(np.float32), "NaN or infinite")):
    err, out = minet_jax.apply_checked(params, bad)
    with pytest.raises(ValueError, match=message):
      err.throw()
    assert out.shape == bad.shape


def test_a_missing_weight_is_named(params, image):
  # Weights lacking a tensor used to end in a bare KeyError: 'bias'.
  weights = {k: dict(v) if isinstance(v, dict) else v for k, v in params.weights.items()}
  del weights["deconv"]["bias"]
  with pytest.raises(ValueError, match="deconv.bias missing"):
    minet_jax.apply(minet_jax.Params(weights=weights, config=params.config), image)
def test_reports_of_orbax_work_abandoned_after_a_failure_are_dropped(monkeypatch):
  passed_on = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: passed_on.append(u.exc_value))
  minet_jax.core.checkpoint.quiet_abandoned_reads()

  def report(error):
    sys.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error,
                                             exc_traceback=None, err_msg=None, object=None))
  report(RuntimeError("Event loop is closed"))  # after a failed read
  report(ImportError("sys.meta_path is None, Python is likely shutting down"))  # failed save
  other = ValueError("something else")
  report(other)
  assert passed_on == [other]
