"""Training in-process with configs/tiny.py: artefacts, resume, non-finite loss, config."""

from __future__ import annotations

import errno
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import minet_jax
from configs import its, tiny
from minet_jax.data import builders
from minet_jax.data.folders import DatasetLayoutError
from minet_jax.train import checkpointing, state as state_lib
from minet_jax.train import (ConfigError, NonFiniteLossError, reconstruction_loss,
                             train_and_evaluate, validate_config)
from minet_jax.train.inputs import synthetic_config
from minet_jax.train.lock import LOCK_FILE

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Runs share compiled steps (same HLO) through JAX's persistent cache."""
  previous = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield
  jax.config.update("jax_compilation_cache_dir", previous[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("tfds")


def tiny_config(data_dir: pathlib.Path, **overrides):
  config = tiny.get_config()
  config.data.data_dir = str(data_dir)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def read_checkpoint(workdir: pathlib.Path, step: int) -> tuple[dict, dict]:
  """(pure train state, data iterator state) saved at `step`, read with plain orbax."""
  folder = workdir / "checkpoints" / str(step)
  with ocp.StandardCheckpointer() as ckptr:
    pure = ckptr.restore(folder / "state")
  data = json.loads((folder / "data" / "metadata").read_text()) if (
      folder / "data" / "metadata").is_file() else None
  return pure, data


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir):
  """Four uninterrupted steps (validation and checkpoints at 2 and 4)."""
  workdir = tmp_path_factory.mktemp("straight")
  summary = train_and_evaluate(tiny_config(data_dir), workdir)
  return workdir, summary


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, data_dir):
  """The same run stopped after two steps (copy it before resuming it)."""
  workdir = tmp_path_factory.mktemp("two_steps")
  train_and_evaluate(tiny_config(data_dir, num_train_steps=2), workdir)
  return workdir


def test_run_writes_checkpoints_logs_grid_and_loads(straight_run, data_dir):
  workdir, summary = straight_run
  assert summary["step"] == 4 and summary["stopped_by"] is None
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [2, 4]
  assert len([p for p in (workdir / "best").iterdir() if p.name.isdigit()]) == 1
  assert list(workdir.glob("events.out.tfevents.*"))

  records = read_metrics(workdir)
  train = [r for r in records if r.get("split") == "train"]
  evals = [r for r in records if r.get("split") == "eval"]
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and r["learning_rate"] == pytest.approx(1e-3)
             for r in train)
  assert [r["step"] for r in evals] == [2, 4]

  grid = np.asarray(Image.open(workdir / "images" / "step_0000004.png"))
  size = tiny.get_config().data.synthetic.image_size
  gap = 4  # Two rows (grid_images) of hazy | dehazed | clear.
  assert grid.shape == (2 * size[0] + gap, 3 * size[1] + 2 * gap, 3)

  # load(workdir) gives the best checkpoint; score it independently with scikit-image.
  params = minet_jax.load(workdir)
  assert params.config == minet_jax.model_config(tiny.get_config().model)
  source = builders.load_source("synthetic_haze", "validation", data_dir,
                                synthetic_config=synthetic_config(tiny.get_config().data))
  psnrs, ssims, hazy_psnrs = [], [], []
  for i in range(len(source)):
    example = source[i]
    out = np.asarray(minet_jax.apply(params, example["hazy"])) * 255.0
    clear = example["clear"].astype(np.float64)
    psnrs.append(peak_signal_noise_ratio(clear, out.astype(np.float64), data_range=255))
    ssims.append(structural_similarity(clear, out.astype(np.float64), data_range=255,
                                       channel_axis=2, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))
    hazy_psnrs.append(peak_signal_noise_ratio(clear, example["hazy"].astype(np.float64),
                                              data_range=255))
  best = max(evals, key=lambda r: r["psnr"])
  assert summary["best_psnr"] == pytest.approx(best["psnr"])
  assert best["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-3)
  assert best["ssim"] == pytest.approx(np.mean(ssims), abs=1e-4)
  assert best["hazy_psnr"] == pytest.approx(np.mean(hazy_psnrs), abs=1e-3)


def test_resume_equals_uninterrupted_run(straight_run, two_step_run, data_dir, tmp_path):
  straight, _ = straight_run
  workdir = tmp_path / "resumed"
  shutil.copytree(two_step_run, workdir)
  summary = train_and_evaluate(tiny_config(data_dir), workdir)
  assert summary["step"] == 4
  records = read_metrics(workdir)
  assert {"step": 2, "event": "resume", "from_step": 2}.items() <= next(
      r for r in records if r.get("event") == "resume").items()

  # Same batches: the losses of steps 3 and 4 match the uninterrupted run's.
  def losses(records):
    return {r["step"]: r["loss"] for r in records if r.get("split") == "train"}
  expected, got = losses(read_metrics(straight)), losses(records)
  for step in (3, 4):
    assert got[step] == pytest.approx(expected[step], rel=1e-5)

  # Same weights, Adam moments, step and data position.
  a, data_a = read_checkpoint(straight, 4)
  b, data_b = read_checkpoint(workdir, 4)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  assert data_a == data_b == {"next_index": 4}



def test_turning_clipping_on_or_off_resumes_with_the_adam_moments(straight_run, two_step_run,
                                                                 data_dir, tmp_path):
  """Clipping wraps Adam in optax.chain: the saved state's layout changes, not its arrays."""
  straight, _ = straight_run
  clipped = tmp_path / "clipped"
  shutil.copytree(two_step_run, clipped)
  # A norm no gradient reaches leaves every update as it was: with the moments carried
  # over, steps 3 and 4 equal the uninterrupted unclipped run's; restarted moments or a
  # restart from step 0 would not.
  summary = train_and_evaluate(tiny_config(data_dir, **{"optimizer.grad_clip_norm": 1e9}),
                               clipped)
  assert summary["step"] == 4
  assert not (clipped / checkpointing.DAMAGED_DIR).exists()
  a, _ = read_checkpoint(straight, 4)
  b, _ = read_checkpoint(clipped, 4)
  assert jax.tree.structure(a) != jax.tree.structure(b)
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
  for (_, x), (path, y) in zip(flat_a, flat_b, strict=True):
    # The biases before an instance norm have a true gradient of zero: each program's
    # float noise there, which Adam scales up to full steps (tests/test_distributed.py).
    if not re.search(r"'deconv[23]'\]\['bias'", jax.tree_util.keystr(path)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  # And back: the clipped run's checkpoint resumes without clipping.
  summary = train_and_evaluate(tiny_config(data_dir, num_train_steps=5), clipped)
  assert summary["step"] == 5
  assert not (clipped / checkpointing.DAMAGED_DIR).exists()


def test_a_checkpoint_without_tree_metadata_still_resumes(two_step_run, data_dir, tmp_path):
  # The layout check reads orbax's tree metadata; where that file is missing the restore
  # itself decides, and a checkpoint whose arrays are whole is resumed, not set aside.
  workdir = tmp_path / "no_metadata"
  shutil.copytree(two_step_run, workdir)
  (workdir / "checkpoints" / "2" / "state" / "_METADATA").unlink()
  summary = train_and_evaluate(tiny_config(data_dir, num_train_steps=3), workdir)
  assert summary["step"] == 3
  assert not (workdir / checkpointing.DAMAGED_DIR).exists()


def test_another_optimizer_state_is_refused_and_nothing_is_moved(two_step_run, data_dir,
                                                                 tmp_path, monkeypatch):
  import optax
  workdir = tmp_path / "other_optimizer"
  shutil.copytree(two_step_run, workdir)
  before = _tree(workdir / "checkpoints")
  monkeypatch.setattr(state_lib, "make_optimizer",
                      lambda opt: optax.sgd(0.1, momentum=0.9))
  with pytest.raises(ConfigError, match="checkpoint 2 holds another training state"):
    train_and_evaluate(tiny_config(data_dir, num_train_steps=3), workdir)
  assert _tree(workdir / "checkpoints") == before
  assert not (workdir / checkpointing.DAMAGED_DIR).exists()


def test_rerunning_a_finished_run_says_there_is_nothing_to_train(straight_run, data_dir,
                                                                 tmp_path, capsys):
  workdir = tmp_path / "finished"
  shutil.copytree(straight_run[0], workdir)
  capsys.readouterr()
  summary = train_and_evaluate(tiny_config(data_dir), workdir)
  assert summary["step"] == 4
  captured = capsys.readouterr()
  assert (f"{workdir} is already trained to step 4 (config.num_train_steps = 4): nothing to "
          "train; raise --config.num_train_steps to go on") in captured.out + captured.err


def test_a_data_position_of_another_pipeline_is_refused_in_one_line(two_step_run, data_dir,
                                                                    tmp_path):
  # Saved without worker processes ({"next_index": 2}); grain's worker pipeline keeps
  # per-worker states and cannot take this one.
  workdir = tmp_path / "workers"
  shutil.copytree(two_step_run, workdir)
  before = _tree(workdir / "checkpoints")
  with pytest.raises(ConfigError, match=r"the data position saved with step 2 \(data.worker_"
                                        r"count = 0\) does not fit this input pipeline"):
    train_and_evaluate(tiny_config(data_dir, num_train_steps=3, **{"data.worker_count": 1}),
                       workdir)
  assert _tree(workdir / "checkpoints") == before


def test_bad_training_data_mid_run_is_one_line_and_keeps_the_checkpoints(two_step_run, data_dir,
                                                                          tmp_path, monkeypatch):
  # As a crop larger than the 40th image, or whole images of two sizes in one batch: the
  # start-up check reads the first image only.
  from minet_jax.train import inputs
  workdir = tmp_path / "bad_data"
  shutil.copytree(two_step_run, workdir)
  real = inputs.train_iterator

  def failing_after_one(*args, **kwargs):
    good = real(*args, **kwargs)

    class Iterator:
      calls = 0

      def __next__(self):
        self.calls += 1
        if self.calls > 1:
          raise ValueError("cannot batch images of different sizes: (48, 64) and (40, 48)")
        return next(good)

      def get_state(self):
        return good.get_state()

      def set_state(self, state):
        good.set_state(state)
    return Iterator()

  monkeypatch.setattr(inputs, "train_iterator", failing_after_one)
  with pytest.raises(ConfigError, match=r"the training data failed at step 4: ValueError: "
                                        r"cannot batch images of different sizes.*step 3 is "
                                        r"saved: a rerun resumes from it"):
    train_and_evaluate(tiny_config(data_dir), workdir)
  assert _steps(workdir / "checkpoints") == [2, 3]  # Step 3 trained and kept.


def test_a_failed_validation_keeps_the_state_it_was_given(two_step_run, data_dir, tmp_path,
                                                          monkeypatch):
  # Validation runs before the checkpoint of its step: failing there used to lose it.
  from minet_jax.train import evaluator
  workdir = tmp_path / "bad_eval"
  shutil.copytree(two_step_run, workdir)

  def failing(self, state):
    raise ValueError("validation images of two sizes: (64, 64) and (48, 64)")
  monkeypatch.setattr(evaluator.Evaluator, "__call__", failing)
  config = tiny_config(data_dir, num_train_steps=3, eval_every=3, checkpoint_every=10)
  with pytest.raises(ValueError, match="validation images of two sizes"):
    train_and_evaluate(config, workdir)
  assert _steps(workdir / "checkpoints") == [2, 3]
  assert checkpointing.validation_pending(workdir, 3)
  # A run that starts from this one (init_from_config) does not take it as finished.
  from minet_jax.train import loop
  prior_file = tmp_path / "prior.py"
  prior_file.write_text(
      "from minet_jax.train import config_file\n\n\ndef get_config():\n"
      f"  config = config_file.load_module({str(REPO / 'configs' / 'tiny.py')!r}).get_config()\n"
      "  config.num_train_steps = 3\n  return config\n")
  chained = tiny_config(data_dir, init_from=str(workdir), init_from_config=str(prior_file))
  cfg = validate_config(chained)
  assert loop._prior_run(chained, cfg, (tmp_path / "next",)) is not None
  monkeypatch.undo()  # Mended: the rerun validates the saved step, though none is left to train.
  summary = train_and_evaluate(config, workdir)
  assert summary["step"] == 3 and summary["psnr"] is not None
  assert [r["step"] for r in read_metrics(workdir) if r.get("split") == "eval"][-1] == 3
  assert not checkpointing.validation_pending(workdir, 3)  # Done: never validated again.
  assert loop._prior_run(chained, cfg, (tmp_path / "next",)) is None


def test_data_that_fail_before_the_first_step_leave_no_checkpoint(two_step_run, data_dir,
                                                                  tmp_path, monkeypatch,
                                                                  capsys):
  # A step-0 checkpoint would tie the workdir to a start that never trained. The workdir
  # is an earlier attempt's with its resumable checkpoints gone: its best stays, said so.
  from minet_jax.train import inputs
  workdir = tmp_path / "run"
  shutil.copytree(two_step_run, workdir)
  shutil.rmtree(workdir / "checkpoints")
  earlier = checkpointing.Checkpoints(workdir, async_save=False)
  best = earlier.best_psnr()
  earlier.close()

  def failing(*args, **kwargs):
    class Iterator:
      def __next__(self):
        raise ValueError("cannot batch images of different sizes")

      def get_state(self):
        return {}
    return Iterator()
  monkeypatch.setattr(inputs, "train_iterator", failing)
  with pytest.raises(ConfigError, match="a rerun resumes from the last checkpoint"):
    train_and_evaluate(tiny_config(data_dir), workdir)
  assert _steps(workdir / "checkpoints") == []
  assert f"the best checkpoint of an earlier attempt in this workdir ({best:.2f} dB) stays" in (
      capsys.readouterr().out)
  start = [r for r in read_metrics(workdir) if r.get("event") == "start"][-1]
  assert start["earlier_best_psnr"] == pytest.approx(best)


def test_a_sigterm_while_the_last_save_is_written_does_not_kill_the_run(straight_run, data_dir,
                                                                       tmp_path, monkeypatch):
  # Asynchronous saves finish in the final wait, after the loop: a SIGTERM there must meet
  # the run's handler, not Python's default (which would kill this test's process).
  import signal
  workdir = tmp_path / "term"
  shutil.copytree(straight_run[0], workdir)
  real_wait = checkpointing.Checkpoints.wait

  def wait_with_a_sigterm(self):
    os.kill(os.getpid(), signal.SIGTERM)
    real_wait(self)

  monkeypatch.setattr(checkpointing.Checkpoints, "wait", wait_with_a_sigterm)
  before = signal.getsignal(signal.SIGTERM)
  summary = train_and_evaluate(tiny_config(data_dir, num_train_steps=5,
                                           async_checkpointing=True), workdir)
  # Every step was trained: the SIGTERM stopped nothing, and the last save is whole.
  assert summary["step"] == 5 and summary["stopped_by"] is None
  assert _steps(workdir / "checkpoints")[-1] == 5
  assert signal.getsignal(signal.SIGTERM) == before


def test_validation_images_of_two_sizes_are_a_config_error():
  # Found at the first validation, mid-run: a one-line error from train.py, naming the fix.
  from minet_jax.train import sharding
  from minet_jax.train.evaluator import Evaluator
  config = tiny.get_config()
  config.data.eval_batch_size = 2
  source = [{"hazy": np.zeros((h, w, 3), np.uint8), "clear": np.zeros((h, w, 3), np.uint8)}
            for h, w in ((8, 10), (10, 8))]
  evaluator = Evaluator(config, source, sharding.make_mesh())
  with pytest.raises(ConfigError, match="set config.data.eval_batch_size=1"):
    list(evaluator._batches())


def _damage(checkpoint: pathlib.Path, how: str) -> None:
  if how == "truncated state":
    for f in (checkpoint / "state").rglob("*"):
      if f.is_file():
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  else:
    shutil.rmtree(checkpoint / "state")
    shutil.rmtree(checkpoint / "data")


def test_a_checkpoint_the_system_cannot_read_is_left_in_place(straight_run, data_dir, tmp_path,
                                                              monkeypatch):
  # Too many open files is no damage: moving every checkpoint aside would restart at 0.
  from minet_jax.train import checkpointing
  straight, _ = straight_run
  workdir = tmp_path / "limits"
  shutil.copytree(straight, workdir)
  before = {name: _tree(workdir / name) for name in ("checkpoints", "best")}

  def restore(self, *args, **kwargs):
    try:
      raise OSError(errno.EMFILE, "Too many open files")
    except OSError as e:
      raise ValueError("orbax: restore failed") from e
  monkeypatch.setattr(checkpointing.Checkpoints, "restore", restore)
  with pytest.raises(checkpointing.CheckpointUnreadableError,
                     match=r"checkpoint 4 \(.*checkpoints/4\) could not be read "
                           r".*nothing was moved"):
    train_and_evaluate(tiny_config(data_dir), workdir)
  assert {name: _tree(workdir / name) for name in ("checkpoints", "best")} == before
  assert not (workdir / "damaged_checkpoints").exists()
  assert checkpointing.not_damage(ValueError("PERMISSION_DENIED: error opening file"))
  assert not checkpointing.not_damage(FileNotFoundError(errno.ENOENT, "gone"))
  assert not checkpointing.not_damage(ValueError("DATA_LOSS: truncated"))


@pytest.mark.parametrize("damage", ["truncated state", "state and data deleted"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(straight_run, data_dir, tmp_path,
                                                            capsys, damage):
  straight, _ = straight_run
  workdir = tmp_path / "damaged"
  shutil.copytree(straight, workdir)
  _damage(workdir / "checkpoints" / "4", damage)
  damaged_files = sorted(p.relative_to(workdir / "checkpoints" / "4")
                         for p in (workdir / "checkpoints" / "4").rglob("*"))
  summary = train_and_evaluate(tiny_config(data_dir), workdir)
  assert summary["step"] == 4
  out = capsys.readouterr().out
  assert "checkpoint 4 could not be restored" in out
  assert "resuming from step 2, the newest intact checkpoint" in out
  # Moved aside whole, not deleted; a fresh step 4 took its place.
  moved = workdir / "damaged_checkpoints" / "4"
  assert sorted(p.relative_to(moved) for p in moved.rglob("*")) == damaged_files
  records = read_metrics(workdir)
  assert any(r.get("event") == "damaged_checkpoint" and r["step"] == 4 for r in records)
  resume = next(r for r in records if r.get("event") == "resume")
  assert resume["from_step"] == 2 and resume["skipped_damaged"] == [4]
  # Steps 3 and 4 were redone from step 2 exactly as the straight run did them.
  losses = {r["step"]: r["loss"] for r in records if r.get("split") == "train"}
  straight_losses = {r["step"]: r["loss"] for r in read_metrics(straight)
                     if r.get("split") == "train"}
  assert losses[4] == pytest.approx(straight_losses[4], rel=1e-5)
  read_checkpoint(workdir, 4)  # readable again


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(two_step_run, data_dir,
                                                             tmp_path):
  workdir = tmp_path / "diverging"
  shutil.copytree(two_step_run, workdir)
  before, _ = read_checkpoint(workdir, 2)
  # Step 3 applies an absurd rate; the loss of step 4 overflows.
  config = tiny_config(data_dir, **{"optimizer.learning_rate": 1e30})
  with pytest.raises(NonFiniteLossError, match=r"at step 4.*last good checkpoint is step 2"):
    train_and_evaluate(config, workdir)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2]
  after, _ = read_checkpoint(workdir, 2)
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(after))
  event = [r for r in read_metrics(workdir) if r.get("event") == "non_finite_loss"]
  assert event and event[0]["step"] == 4 and event[0]["last_checkpoint"] == 2


def _poison_after(monkeypatch, bad_step: int) -> None:
  """The loop's train step turns every float of the state NaN at `bad_step`, its loss
  still finite: weights ruined while training has not noticed yet."""
  from minet_jax.train import loop
  real = loop.make_train_step

  def make(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def poisoned(state, batch):
      state, metrics = step_fn(state, batch)
      if int(state.step) == bad_step:
        nan = lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x
        state = state.replace(state=jax.tree.map(nan, state.state))
      return state, metrics
    return poisoned

  monkeypatch.setattr(loop, "make_train_step", make)


def _steps(folder: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


@pytest.mark.parametrize("noticed_by", ["validation", "checkpoint"])
def test_non_finite_weights_never_replace_good_checkpoints(two_step_run, data_dir, tmp_path,
                                                          monkeypatch, noticed_by):
  workdir = tmp_path / "ruined"
  shutil.copytree(two_step_run, workdir)
  best_before = _steps(workdir / "best")
  assert best_before == [2]
  _poison_after(monkeypatch, 4)
  config = tiny_config(data_dir, checkpoint_every=1,
                       eval_every=2 if noticed_by == "validation" else 0)
  with pytest.raises(NonFiniteLossError, match=r"step 4.*last good checkpoint is step 3"):
    train_and_evaluate(config, workdir)
  assert _steps(workdir / "checkpoints") == [2, 3]
  assert _steps(workdir / "best") == best_before  # The good best checkpoint is kept.
  assert np.isfinite(minet_jax.core.checkpoint.step_record(
      workdir / "best" / "2" / "params")["psnr"])
  params = minet_jax.load(workdir)
  assert minet_jax.core.params.non_finite(params.weights) is None
  # A rerun (the weights no longer spoilt) continues from step 3 and finishes.
  monkeypatch.undo()
  summary = train_and_evaluate(tiny_config(data_dir, checkpoint_every=1), workdir)
  assert summary["step"] == 4 and np.isfinite(summary["psnr"])
  resume = [r for r in read_metrics(workdir) if r.get("event") == "resume"]
  assert resume[-1]["from_step"] == 3


def test_a_checkpoint_leading_to_a_non_finite_loss_is_set_aside(two_step_run, data_dir,
                                                               tmp_path, monkeypatch):
  # Step 3's update ruins the weights; checkpoint 3 is saved (the loss of step 3, from
  # before the update, was finite) and the loss of step 4 is NaN. A resume from 3 would
  # meet it again at once, so 3 is moved aside and 2 named.
  workdir = tmp_path / "diverged"
  shutil.copytree(two_step_run, workdir)
  from minet_jax.train import checkpointing as ckpt_lib
  monkeypatch.setattr(ckpt_lib, "non_finite_state", lambda state: None)  # an older version
  _poison_after(monkeypatch, 3)
  with pytest.raises(NonFiniteLossError, match=r"at step 4.*\[3\].*last good checkpoint is "
                     r"step 2"):
    train_and_evaluate(tiny_config(data_dir, checkpoint_every=1, eval_every=0), workdir)
  assert _steps(workdir / "checkpoints") == [2]
  assert _steps(workdir / "diverged_checkpoints") == [3]
  monkeypatch.undo()
  summary = train_and_evaluate(tiny_config(data_dir, checkpoint_every=1, eval_every=0),
                               workdir)
  assert summary["step"] == 4


@pytest.mark.parametrize("writing", ["checkpoint", "metrics", "events"])
def test_a_full_disk_stops_in_one_line_and_a_rerun_resumes(two_step_run, data_dir, tmp_path,
                                                            monkeypatch, train_cli, writing):
  workdir = tmp_path / "full"
  shutil.copytree(two_step_run, workdir)
  from minet_jax.train import logging as logging_lib
  if writing == "checkpoint":
    # As orbax reports tensorstore's ENOSPC.
    real_save = checkpointing.Checkpoints.save
    target = workdir / "checkpoints" / "4.orbax-checkpoint-tmp" / "state"

    def save(self, state, *args):
      if int(state.step) == 4:
        raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{target}": Failed '
                         "to write 414 bytes to file 13: No space left on device "
                         "[os_error_code='28']")
      return real_save(self, state, *args)
    monkeypatch.setattr(checkpointing.Checkpoints, "save", save)
    named = target
  elif writing == "events":
    # TensorBoard's event file: tensorboardX's writer thread died on this error and the
    # run then hung for good on its full queue, deaf to SIGTERM.
    from tensorboardX import record_writer
    from tensorboardX.proto import event_pb2
    real_record = record_writer.RecordWriter.write

    def write(self, data):
      if event_pb2.Event.FromString(data).step >= 4:
        raise OSError(errno.ENOSPC, "No space left on device")
      return real_record(self, data)
    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    named = workdir
  else:
    real_write = logging_lib.MetricWriter.write_scalars
    named = workdir / "metrics.jsonl"

    def write_scalars(self, step, *args):
      if step == 4:
        raise OSError(errno.ENOSPC, "No space left on device", str(named))
      return real_write(self, step, *args)
    monkeypatch.setattr(logging_lib.MetricWriter, "write_scalars", write_scalars)
  argv = ["train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
          f"--config.data.data_dir={data_dir}", "--config.checkpoint_every=1",
          "--config.eval_every=0"]
  monkeypatch.setattr(sys, "argv", argv)
  with pytest.raises(SystemExit) as exited:
    train_cli.main(train_cli.parse_flags(argv))
  message = str(exited.value.code)
  assert message == (f"train: error: no space left on the disk of {named}; training stopped. "
                     "Free space there and rerun with the same --workdir: training resumes "
                     "from step 3, its newest checkpoint"), message
  monkeypatch.undo()  # Space freed.
  summary = train_and_evaluate(tiny_config(data_dir, checkpoint_every=1, eval_every=0), workdir)
  assert summary["step"] == 4
  assert [r for r in read_metrics(workdir) if r.get("event") == "resume"][-1]["from_step"] == 3


def _replace_weights(params_dir: pathlib.Path, weights: dict, record_checksum: bool) -> None:
  """Rewrites a step's params/ with `weights` (and their checksum in its meta/)."""
  shutil.rmtree(params_dir)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(params_dir, weights)
  meta_file = params_dir.parent / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  if record_checksum:
    meta["weights_sha256"] = minet_jax.core.params.weights_checksum(weights)
  meta["psnr"] = float("nan") if record_checksum else meta["psnr"]
  meta_file.write_text(json.dumps(meta))


def _as_older_workdir(workdir: pathlib.Path) -> None:
  """Rewrites the workdir's minet_config.json as versions before ``weights_in`` wrote it."""
  record = json.loads((workdir / "minet_config.json").read_text())
  del record["weights_in"]
  (workdir / "minet_config.json").write_text(json.dumps(record, indent=2))


@pytest.mark.parametrize("written_by", ["this version", "an older version"])
@pytest.mark.parametrize("best", ["NaN best", "damaged best"])
def test_load_falls_back_to_the_newest_usable_weights(straight_run, tmp_path, best,
                                                      written_by):
  workdir = tmp_path / "w"
  shutil.copytree(straight_run[0], workdir)
  if written_by == "an older version":
    _as_older_workdir(workdir)
  (best_dir,) = [p / "params" for p in (workdir / "best").iterdir() if p.name.isdigit()]
  good, source = minet_jax.core.checkpoint.load_with_source(workdir)
  assert source == best_dir
  bad = jax.tree.map(lambda x: np.full_like(np.asarray(x), np.nan), good.weights)
  if best == "damaged best":
    bad = jax.tree.map(lambda x: np.asarray(x) + 1.0, good.weights)
  _replace_weights(best_dir, bad, record_checksum=best == "NaN best")
  with pytest.warns(UserWarning, match=f"{best_dir}.*newest usable weights instead"):
    params = minet_jax.load(workdir)
  expected = minet_jax.core.checkpoint.read_weights(workdir / "checkpoints" / "4" / "params",
                                               params.config)
  for x, y in zip(jax.tree.leaves(params.weights), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The source named is the step that was read, not the refused best.
  with pytest.warns(UserWarning, match="newest usable weights instead"):
    _, source = minet_jax.core.checkpoint.load_with_source(workdir)
  assert source == workdir / "checkpoints" / "4" / "params"
  # Nothing usable at all: one error naming the best's problem.
  for step in (2, 4):
    _replace_weights(workdir / "checkpoints" / str(step) / "params", bad, True)
  with pytest.raises(minet_jax.CheckpointError, match="no usable weights"):
    minet_jax.load(workdir)


def _tree(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file()}


@pytest.mark.parametrize("case", [
    "as recorded", "config.json deleted", "config.json edited",
    "eta, config.json deleted", "eta, both config files deleted",
    "both config files deleted, older step records", "minet_config.json edited"])
def test_resume_refuses_another_architecture(two_step_run, data_dir, tmp_path, case):
  workdir = tmp_path / "other"
  shutil.copytree(two_step_run, workdir)
  change = {"model.features": 4}
  if case.startswith("eta"):
    change = {"model.eta": 0.5}  # Same weight shapes, another model.
  train_json, model_json = workdir / "config.json", workdir / "minet_config.json"
  if case == "config.json edited":
    train = json.loads(train_json.read_text())
    train["model"]["features"] = 4
    train_json.write_text(json.dumps(train))
  elif "deleted" in case:
    train_json.unlink()
  if "both config files deleted" in case:
    model_json.unlink()
  if "older step records" in case:
    for meta in workdir.glob("*/*/meta/metadata"):  # As older versions wrote them:
      record = json.loads(meta.read_text())          # the weights' shapes must tell.
      del record["model"]
      meta.write_text(json.dumps(record))
  expected = "holds checkpoints of another architecture"
  if case == "minet_config.json edited":
    record = json.loads(model_json.read_text())
    record["model"]["features"] = 4
    model_json.write_text(json.dumps(record))
    expected = "minet_config.json is damaged or was edited"
  before = _tree(workdir)
  with pytest.raises(ConfigError, match=expected):
    train_and_evaluate(tiny_config(data_dir, **change), workdir)
  # Nothing moved, deleted or rewritten: the checkpoints are not damaged, only another model.
  assert _tree(workdir) == before


@pytest.mark.parametrize("field, value, expected", [
    ("num_train_steps", True, "config.num_train_steps must be an integer >= 1, got True"),
    ("eval_every", -1, "config.eval_every must be an integer >= 0, got -1"),
    ("data.eval_batch_size", 0, "config.data.eval_batch_size must be an integer >= 1"),
    ("data.num_eval_images", -1, "config.data.num_eval_images must be an integer >= 0"),
    ("data.worker_count", True, "config.data.worker_count must be an integer >= 0"),
    ("data.crop_size", 31, "config.data.crop_size must be 0 .full images. or an even"),
    ("seed", 2**31, "config.seed must be an integer in .0, 2..31."),
    ("seed", False, "config.seed must be an integer in .0, 2..31., got False")])
def test_counts_that_are_not_integers_in_range_are_refused(data_dir, field, value, expected):
  # A config file may set a bool where a count goes; int(True) would run one step.
  config = tiny_config(data_dir, **{field: value})
  with pytest.raises(ConfigError, match=expected):
    validate_config(config)


def test_a_saved_model_folder_is_not_taken_over_as_a_workdir(data_dir, tmp_path):
  folder = tmp_path / "saved"
  minet_jax.save(minet_jax.init(tiny.get_config()), folder)
  before = _tree(folder)
  with pytest.raises(ConfigError, match="saved model"):
    train_and_evaluate(tiny_config(data_dir), folder)
  assert _tree(folder) == before


HOLD_LOCK = """
import pathlib, sys, time
from minet_jax.train.lock import WorkdirLock
WorkdirLock.acquire(pathlib.Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_a_workdir_in_use_is_refused_naming_the_holder(two_step_run, data_dir,
                                                                        tmp_path):
  from minet_jax.train.lock import LOCK_FILE, WorkdirLock
  workdir = tmp_path / "busy"
  shutil.copytree(two_step_run, workdir)
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(workdir)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    before = _tree(workdir)
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
         f"--config.data.data_dir={data_dir}"], cwd=REPO, capture_output=True, text=True,
        timeout=300)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("train: error: ") and f"pid {holder.pid}" in lines[0], lines
    assert "in use by another training run" in lines[0]
    assert _tree(workdir) == before  # Nothing written, moved or removed.
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing: its lock went with it.
  lock = WorkdirLock.acquire(workdir)
  assert (workdir / LOCK_FILE).read_text().split()[0] == str(os.getpid())
  lock.release()
  assert not (workdir / LOCK_FILE).exists()


def test_a_refused_start_leaves_no_workdir_behind(data_dir, tmp_path):
  workdir = tmp_path / "new" / "run"
  with pytest.raises(ConfigError, match="unknown dataset"):
    train_and_evaluate(tiny_config(data_dir, **{"data.name": "bogus"}), workdir)
  assert not (tmp_path / "new").exists()


def test_a_teacher_that_cannot_serve_is_refused_before_any_write(data_dir, tmp_path):
  other = tiny.get_config()
  other.model.features = 4
  minet_jax.save(minet_jax.init(other), tmp_path / "narrow")
  for teacher, expected in [(tmp_path / "missing", r"^config.teacher: .*no such checkpoint"),
                            (tmp_path / "narrow", r"^config.teacher .*IM-blocks \(3 of 4 "
                                                  r"features\) do not match")]:
    config = tiny_config(data_dir, teacher=str(teacher), teacher_match_weight=1.0)
    with pytest.raises(ConfigError, match=expected):
      train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["--config.bogus=1", "--config.data.crop_siz=32"])
def test_unknown_config_field_is_an_error(train_cli, override, tmp_path, monkeypatch, capsys):
  # In this process; a real train.py refusing --config.bogus=1: test_config.py.
  argv = ["train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"), override]
  monkeypatch.setattr(sys, "argv", argv)
  with pytest.raises(SystemExit) as exited:
    train_cli.main(train_cli.parse_flags(argv))
  assert exited.value.code == 2  # A usage error, as argparse's.
  message = capsys.readouterr().err.rstrip("\n")
  assert message.startswith("train: error: unknown config field ") and "\n" not in message
  assert override in message
  assert not (tmp_path / "w").exists()


@pytest.fixture()
def train_cli():
  """train.py's flag parsing and main (minet_jax.train.cli), in this process; flags are
  reset afterwards."""
  from absl import flags
  from minet_jax.train import cli
  yield cli
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # The --config.<field> flags a parse defined.


@pytest.mark.parametrize("case", ["missing config file", "num_train_steps=0",
                                  "negative batch size", "crop larger than the images",
                                  "unwritable workdir", "workdir of another architecture",
                                  "deeply nested minet_config.json"])
def test_rejected_starts_are_one_line_and_keep_config_json(train_cli, case, two_step_run,
                                                           data_dir, tmp_path, monkeypatch,
                                                           capsys):
  workdir = tmp_path / "run"
  shutil.copytree(two_step_run, workdir)
  before = (workdir / "config.json").read_bytes()
  args = ["--config", "configs/tiny.py", "--workdir", str(workdir),
          f"--config.data.data_dir={data_dir}"]
  if case == "missing config file":
    args[1] = str(tmp_path / "nope.py")
  elif case == "num_train_steps=0":
    args.append("--config.num_train_steps=0")
  elif case == "negative batch size":
    args.append("--config.data.batch_size=-2")
  elif case == "crop larger than the images":
    args.append("--config.data.crop_size=128")
  elif case == "unwritable workdir":
    (tmp_path / "a_file").write_text("")
    args[3] = str(tmp_path / "a_file" / "run")
  elif case == "deeply nested minet_config.json":
    (workdir / "minet_config.json").write_text("[" * 200_000 + "]" * 200_000)
  else:
    args.append("--config.model.features=4")
  argv = ["train.py", *args]
  before_tree = _tree(workdir)
  monkeypatch.setattr(sys, "argv", argv)  # config_flags defines --config.<field> from sys.argv
  with pytest.raises(SystemExit) as exited:
    train_cli.main(train_cli.parse_flags(argv))
  # A command line refused before loading exits 2 (usage_error), any other refusal 1.
  usage = case == "missing config file"
  message = capsys.readouterr().err.rstrip("\n") if usage else str(exited.value.code)
  assert exited.value.code == 2 or not usage
  assert message.startswith("train: error: ") and "\n" not in message, message
  assert (workdir / "config.json").read_bytes() == before
  assert _tree(workdir) == before_tree


@pytest.mark.parametrize("override, expected", [
    ("model.unroll=-2", "unroll must be"),
    ("optimizer.schedule=bogus", "optimizer.schedule must be"),
    ("optimizer.name=sgd", "optimizer.name must be 'adam'"),
    ("optimizer.learning_rate=nan", "optimizer.learning_rate must be a finite number > 0"),
    ("optimizer.b2=2", r"optimizer.b2 must be in \[0, 1\)"),
    ("optimizer.eps=0", r"optimizer.eps must be a finite number > 0"),
    ("optimizer.warmup_steps=2147483648", r"optimizer.warmup_steps must be an integer in"),
    ("output_weight=nan", "output_weight must be a finite number >= 0, got nan"),
    ("output_weight=inf", "output_weight must be a finite number >= 0, got inf"),
    ("teacher_match_weight=nan", "teacher_match_weight must be a finite number >= 0"),
    ("data.name=bogus", "unknown dataset 'bogus'"),
    ("teacher_match_steps=0", "teacher_match_steps must be an integer >= 1, got 0"),
    ("teacher_inputs=mine", r"teacher_inputs must be one of \('teacher', 'student'\)"),
    ("teacher_inputs=student", "teacher_inputs='student' needs the teacher matching term"),
    ("init_from_config=MISSING", "trains config.init_from, which must then be a training "
                                 "workdir, got ''"),
    ("train_blocks=(4,)", r"train_blocks must be distinct IM-block numbers from 1 to 3"),
    ("data.synthetic.image_size=(8,8)", "image_size must be at least 16x16"),
    ("init_from=MISSING", "no such checkpoint folder"),
    ("init_from=OTHER", "different architecture"),
])
def test_rejected_fresh_starts_are_one_line_and_write_nothing(train_cli, override, expected,
                                                              data_dir, tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  if override == "init_from=OTHER":
    other = tiny.get_config()
    other.model.features = 4
    minet_jax.save(minet_jax.init(other), tmp_path / "other")
  override = override.replace("MISSING", str(tmp_path / "missing")).replace(
      "OTHER", str(tmp_path / "other"))
  argv = ["train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
          f"--config.data.data_dir={data_dir}", f"--config.{override}"]
  monkeypatch.setattr(sys, "argv", argv)
  with pytest.raises(SystemExit) as exited:
    train_cli.main(train_cli.parse_flags(argv))
  message = str(exited.value.code)
  assert message.startswith("train: error: ") and "\n" not in message, message
  assert re.search(expected, message), message
  assert not workdir.exists()


@pytest.mark.parametrize("case,expected", [
    ("no --workdir", "train: error: --workdir is required (see --help)"),
    ("no --config", "train: error: --config is required (see --help)"),
    ("batch_size=abc", "train: error: --config.data.batch_size=abc: invalid literal for int() "
                       "with base 10: 'abc' (see --help)"),
    ("a file as --workdir", "train: error: --workdir {file} is a file; name a folder (it is "
                            "created when it does not exist)"),
    ("an empty --workdir", "train: error: --workdir is empty; name a folder (it is created "
                           "when it does not exist)"),
    ("a stray argument", "train: error: unexpected arguments: extra (see --help)"),
    ("an argument its get_config does not take",
     "train: error: --config={tiny}:x: the config file failed: TypeError: get_config() takes "
     "0 positional arguments but 1 was given (see --help)"),
])
def test_flag_errors_are_one_line(train_cli, case, expected, tmp_path, monkeypatch, capsys):
  a_file = tmp_path / "a_file"
  a_file.write_text("kept")
  tiny_file = str(REPO / "configs" / "tiny.py")
  args = {"no --workdir": ["--config", tiny_file],
          "no --config": ["--workdir", str(tmp_path / "w")],
          "batch_size=abc": ["--config", tiny_file, "--workdir", str(tmp_path / "w"),
                             "--config.data.batch_size=abc"],
          "a file as --workdir": ["--config", tiny_file, "--workdir", str(a_file)],
          "an empty --workdir": ["--config", tiny_file, "--workdir="],
          "a stray argument": ["--config", tiny_file, "--workdir", str(tmp_path / "w"),
                               "extra"],
          "an argument its get_config does not take": ["--config", tiny_file + ":x",
                                                       "--workdir", str(tmp_path / "w")]}[case]
  argv = ["train.py", *args]
  monkeypatch.setattr(sys, "argv", argv)
  monkeypatch.chdir(tmp_path)  # Where an empty --workdir would train.
  with pytest.raises(SystemExit) as exited:
    train_cli.main(train_cli.parse_flags(argv))
  assert exited.value.code == 2
  assert capsys.readouterr().err == expected.format(file=a_file, tiny=tiny_file) + "\n"
  assert a_file.read_text() == "kept" and not (tmp_path / "w").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_init_from_starts_from_the_given_weights(tmp_path):
  config = tiny.get_config()
  config.seed = 3
  params = state_lib.create_train_state(config).params()
  config.seed = 0
  minet_jax.save(params, tmp_path / "start")
  config.init_from = str(tmp_path / "start")
  from minet_jax.train.loop import _initial_state
  state = _initial_state(config, minet_jax.model_config(config.model))
  for x, y in zip(jax.tree.leaves(state.params().weights), jax.tree.leaves(params.weights)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(state.step) == 0
  config.model.features = 4
  with pytest.raises(ValueError, match="different architecture"):
    _initial_state(config, minet_jax.model_config(config.model))


def test_a_run_that_trains_one_block_leaves_every_other_weight_as_it_started(data_dir,
                                                                               tmp_path):
  config = tiny_config(data_dir, num_train_steps=2, eval_every=0)
  start = state_lib.create_train_state(config).params()
  minet_jax.save(start, tmp_path / "start")
  config.train_blocks = (2,)
  with pytest.raises(ConfigError, match="train_blocks needs config.init_from"):
    validate_config(config)
  config.init_from = str(tmp_path / "start")
  train_and_evaluate(config, tmp_path / "run")
  trained = minet_jax.load(tmp_path / "run")
  moved = set()
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(trained.weights),
                          jax.tree.leaves(start.weights)):
    if not np.array_equal(np.asarray(x), np.asarray(y)):
      moved.add(jax.tree_util.keystr(path[:3]))
  assert moved == {"['im_blocks']['1']['f']"}, moved


def test_losses_match_closed_forms():
  rng = np.random.default_rng(0)
  out, target = rng.random((2, 4, 6, 3)), rng.random((2, 4, 6, 3))
  err = out - target
  got = {k: float(reconstruction_loss(jnp.asarray(out), jnp.asarray(target), k))
         for k in ("mse", "l2", "l1")}
  assert got["mse"] == pytest.approx(np.mean(err**2), rel=1e-5)
  # The authors' loss: the norm of the error on 0..255 pixel values.
  assert got["l2"] == pytest.approx(np.sqrt(np.sum((255.0 * err)**2)), rel=1e-5)
  assert got["l1"] == pytest.approx(np.mean(np.abs(err)), rel=1e-5)
  with pytest.raises(ValueError, match="unknown loss"):
    reconstruction_loss(jnp.asarray(out), jnp.asarray(target), "l3")


def test_its_schedule_is_the_papers():
  config = its.get_config()
  schedule = state_lib.learning_rate_schedule(config.optimizer)
  for step, lr in [(0, 1e-3), (19_999, 1e-3), (20_000, 1e-4), (40_000, 1e-5)]:
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-5)
  assert config.num_train_steps == 350_000 and config.data.crop_size == 0
  assert minet_jax.model_config(config.model) == minet_jax.ModelConfig()


def test_find_params_prefers_best(straight_run):
  workdir, _ = straight_run
  found = minet_jax.core.checkpoint.find_params(workdir)
  assert found is not None and found.parent.parent.name == "best"


def _same_weights(a: minet_jax.Params, b: minet_jax.Params) -> None:
  assert a.config == b.config
  for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_load_follows_the_weight_folders_the_workdir_records(straight_run, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(straight_run[0], workdir)
  record = json.loads((workdir / "minet_config.json").read_text())
  assert record["weights_in"] == ["best", "checkpoints"] == list(checkpointing.WEIGHTS_IN)
  expected = minet_jax.load(workdir)
  # The folder names are the trainer's to choose: renamed and recorded, they still load.
  (workdir / "best").rename(workdir / "kept")
  (workdir / "checkpoints").rename(workdir / "resumable")
  record["weights_in"] = ["kept", "resumable"]
  (workdir / "minet_config.json").write_text(json.dumps(record))
  _same_weights(minet_jax.load(workdir), expected)
  assert minet_jax.core.checkpoint.find_params(workdir).parent.parent.name == "kept"
  shutil.rmtree(workdir / "kept")
  latest = minet_jax.core.checkpoint.read_weights(workdir / "resumable" / "4" / "params",
                                                  expected.config)
  _same_weights(minet_jax.load(workdir), minet_jax.Params(weights=latest,
                                                          config=expected.config))


def test_a_workdir_of_an_older_version_loads_and_resumes(straight_run, two_step_run,
                                                         data_dir, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(straight_run[0], workdir)
  _as_older_workdir(workdir)
  _same_weights(minet_jax.load(workdir), minet_jax.load(straight_run[0]))
  resumed = tmp_path / "resumed"
  shutil.copytree(two_step_run, resumed)
  _as_older_workdir(resumed)
  assert train_and_evaluate(tiny_config(data_dir, num_train_steps=3), resumed)["step"] == 3
  assert json.loads((resumed / "minet_config.json").read_text())["weights_in"] == [
      "best", "checkpoints"]  # Rewritten as this version writes it.


def test_default_synthetic_section_is_the_default_dataset():
  """The quickstart trains on the same synthetic_haze that evaluate.py builds by default."""
  from configs import default, quickstart
  from minet_jax.data.synthetic import SyntheticHazeConfig
  assert synthetic_config(default.get_config().data) == SyntheticHazeConfig()
  assert synthetic_config(quickstart.get_config().data) == SyntheticHazeConfig()


def test_identity_tail_init():
  config = tiny.get_config()
  config.init_tail = "identity"
  state = state_lib.create_train_state(config)
  model, _ = state.merge()
  for name in ("conv_su1", "conv_su2", "deconv"):
    conv = getattr(model, name)
    np.testing.assert_array_equal(np.asarray(conv.kernel[...]).reshape(3, 3), np.eye(3))
    np.testing.assert_array_equal(np.asarray(conv.bias[...]), np.zeros(3))
  # Everything else keeps the authors' init (the same draws as "kaiming").
  config.init_tail = "kaiming"
  plain, _ = state_lib.create_train_state(config).merge()
  np.testing.assert_array_equal(np.asarray(plain.deconv1.kernel[...]),
                                np.asarray(model.deconv1.kernel[...]))
  assert not np.allclose(np.asarray(plain.conv_su2.kernel[...]).reshape(3, 3), np.eye(3))
  config.init_tail = "zeros"
  with pytest.raises(ValueError, match="init_tail"):
    state_lib.create_train_state(config)


def test_contractive_penalty_joins_the_loss():
  from minet_jax.stability import contractive
  from minet_jax.train import step as step_lib
  config = tiny.get_config()
  config.model.contractive_weight = 0.5
  config.model.contractive_target = 0.0  # Every block's norm is above 0: the term is > 0.
  config.model.contractive_iters = 1
  config.model.iterations = (1, 1, 1)  # A smaller step to compile.
  state = state_lib.create_train_state(config)
  rng = np.random.default_rng(0)
  batch = {"hazy": jnp.asarray(rng.random((2, 16, 16, 3)), jnp.float32),
           "clear": jnp.asarray(rng.random((2, 16, 16, 3)), jnp.float32)}
  model, _ = state.merge()
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)

  @jax.jit
  def reference(batch, key):
    return (reconstruction_loss(model(batch["hazy"]), batch["clear"], "mse"),
            0.5 * contractive.penalty(model, batch, key=key))

  reconstruction, expected = (float(x) for x in reference(batch, key))
  _, metrics = step_lib.make_train_step("mse")(state, batch)
  assert float(metrics["reconstruction_loss"]) == pytest.approx(reconstruction, rel=1e-5)
  assert float(metrics["contractive_penalty"]) == pytest.approx(expected, rel=1e-4)
  assert expected > 0
  assert float(metrics["loss"]) == pytest.approx(reconstruction + expected, rel=1e-5)


def test_psnr_monitor_is_capped_at_100_db():
  # A batch the model already reproduces (a saturated crop, say) logs 100 dB, not inf.
  from minet_jax.train import step as step_lib
  config = tiny.get_config()
  config.model.iterations = (1, 1, 1)  # A smaller step to compile.
  state = state_lib.create_train_state(config)
  model, _ = state.merge()
  hazy = jnp.asarray(np.random.default_rng(0).random((2, 16, 16, 3)), jnp.float32)
  batch = {"hazy": hazy, "clear": jnp.clip(jax.jit(lambda x: model(x))(hazy), 0.0, 1.0)}
  _, metrics = step_lib.make_train_step("mse")(state, batch)
  assert float(metrics["psnr"]) == 100.0


def test_a_typo_in_a_config_file_is_refused_not_trained_with_the_default():
  # --config.x overrides are checked by config_flags; assignments in a file are not.
  config = tiny.get_config()
  config.num_train_step = 10
  config.optimizer.learnig_rate = 5e-3
  with pytest.raises(ConfigError, match=r"unknown config fields config.num_train_step \(did "
                                        r"you mean config.num_train_steps\?\), "
                                        r"config.optimizer.learnig_rate \(did you mean "
                                        r"config.optimizer.learning_rate\?\)"):
    validate_config(config)


def test_ynn_fusions_setting_is_parsed_and_refused_when_unknown():
  from minet_jax.train import step as step_lib
  assert step_lib.parse_ynn_fusions("default") == ()
  assert step_lib.parse_ynn_fusions("dot, eltwise") == ("dot", "eltwise")
  assert step_lib.cpu_compiler_options("default") is None
  for bad in ("dots", "", "dot,,reduce", "dot,dot"):
    with pytest.raises(ValueError, match="dot, eltwise, reduce, convolution"):
      step_lib.parse_ynn_fusions(bad)
  config = tiny.get_config()
  config.xla_cpu_ynn_fusions = "conv"
  with pytest.raises(ConfigError, match="xla_cpu_ynn_fusions must be 'default' or"):
    validate_config(config)


def _conv_fusions(compiled_text: str) -> tuple[int, int]:
  """(convolutions in YNNPACK fusions, all convolutions) of a compiled CPU program."""
  ynn_computations = set(re.findall(r"calls=%?([\w.\-]+).*__ynn_fusion", compiled_text))
  blocks = re.split(r"\n(?=\S)", compiled_text)
  in_ynn = sum(block.count(" convolution(") for block in blocks
               if block.split(" ", 1)[0].lstrip("%") in ynn_computations)
  return in_ynn, compiled_text.count(" convolution(")


def test_training_step_is_compiled_with_the_configs_ynn_fusions():
  """The "dot" setting reaches XLA: none of the step's convolutions go to YNNPACK."""
  from minet_jax.train import step as step_lib
  if jax.default_backend() != "cpu":
    pytest.skip("a CPU-only option")
  options = step_lib.cpu_compiler_options("dot")
  if options is None:
    # The pinned jaxlib (0.10) takes the option; only another one may not.
    assert not jax.__version__.startswith("0.10."), "jaxlib 0.10 refused the option"
    pytest.skip("this jaxlib does not take xla_cpu_experimental_ynn_fusion_type")
  config = tiny.get_config()
  config.model.iterations = (1, 1, 1)  # A smaller step to compile.
  config.model.conv_backend = "xla"  # XLA's convolutions are what the option steers.
  state = state_lib.create_train_state(config)
  batch = {"hazy": jnp.zeros((2, 16, 16, 3)), "clear": jnp.zeros((2, 16, 16, 3))}
  counts = {}
  for setting in ("dot", "convolution"):
    step = step_lib.make_train_step("mse", ynn_fusions=setting)
    counts[setting] = _conv_fusions(step.lower(state, batch).compile().as_text())
  assert counts["dot"][0] == 0 and counts["dot"][1] > 0
  # Naming convolutions sends some there: the option's names are mapped to XLA's.
  assert counts["convolution"][0] > 0


def test_train_and_evaluate_compiles_the_step_with_the_configs_setting(tmp_path, monkeypatch,
                                                                        data_dir):
  from minet_jax.train import loop
  seen = []
  real = loop.make_train_step

  def spy(*args, **kwargs):
    seen.append(kwargs.get("ynn_fusions"))
    # The "dot" program itself is compiled in the test above; the default compiles faster.
    return real(*args, **{**kwargs, "ynn_fusions": "default"})

  monkeypatch.setattr(loop, "make_train_step", spy)
  config = tiny_config(data_dir, num_train_steps=1, xla_cpu_ynn_fusions="dot")
  train_and_evaluate(config, tmp_path / "run")
  assert seen == ["dot"]


def test_train_and_evaluate_parses_the_model_config_once(tmp_path, monkeypatch, data_dir):
  from minet_jax.train import checks, loop
  parsed = []

  def counting(fields):
    parsed.append(fields)
    return minet_jax.model_config(fields)

  for module in (checks, loop, state_lib):
    if hasattr(module, "model_config"):
      monkeypatch.setattr(module, "model_config", counting)
  train_and_evaluate(tiny_config(data_dir, num_train_steps=1), tmp_path / "run")
  assert len(parsed) == 1


def test_an_option_xla_does_not_take_warns_and_falls_back_to_defaults(monkeypatch):
  from minet_jax.train import step as step_lib
  if jax.default_backend() != "cpu":
    pytest.skip("a CPU-only option")
  monkeypatch.setattr(step_lib, "_YNN_OPTION", "xla_cpu_no_such_option_for_the_test")
  with pytest.warns(UserWarning, match="XLA does not take"):
    assert step_lib.cpu_compiler_options("dot") is None


def test_init_from_takes_other_solve_settings_but_not_another_architecture(tmp_path):
  config = tiny.get_config()
  params = state_lib.create_train_state(config).params()
  minet_jax.save(params, tmp_path / "start")
  config.init_from = str(tmp_path / "start")
  from minet_jax.train.loop import _initial_state
  for changes in ({"solver": "picard", "backward": "phantom", "iterations": (5, 5, 5)},
                  {"solver": "anderson", "rtol": 1e-4, "contractive_weight": 1.0,
                   "contractive_kind": "frobenius", "best_so_far": True}):
    run = tiny.get_config()
    run.init_from = config.init_from
    for k, v in changes.items():
      run.model[k] = v
    state = _initial_state(run, minet_jax.model_config(run.model))
    assert state.model_config.solver == changes["solver"]
    for x, y in zip(jax.tree.leaves(state.params().weights), jax.tree.leaves(params.weights)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The weights in another role (stage_fraction is free for init_from): same weights.
  run = tiny.get_config()
  run.init_from = config.init_from
  run.model.stage_fraction = (0.3, 0.5, 1.0)
  state = _initial_state(run, minet_jax.model_config(run.model))
  assert state.model_config.stage_fraction == (0.3, 0.5, 1.0)
  for x, y in zip(jax.tree.leaves(state.params().weights), jax.tree.leaves(params.weights)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # So is the number of stages: block 2's f becomes both stages' f.
  run.model.stages = (1, 2, 1)
  state = _initial_state(run, minet_jax.model_config(run.model))
  assert state.model_config.stages == (1, 2, 1)
  for x, y in zip(jax.tree.leaves(state.params().weights), jax.tree.leaves(params.weights)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The source's own solve settings do not veto the new roles: a penalty at random Picard
  # iterates (contractive_point "iterate") suits one-stage blocks only, but this run has none.
  source = tiny.get_config()
  source.model.contractive_weight = 0.1
  penalised = minet_jax.model_config(source.model)
  minet_jax.save(minet_jax.Params(weights=params.weights, config=penalised),
                 tmp_path / "penalised")
  run = tiny.get_config()
  run.init_from = str(tmp_path / "penalised")
  run.model.stages, run.model.stage_fraction = (1, 2, 1), (1.0, 0.5, 1.0)
  state = _initial_state(run, minet_jax.model_config(run.model))
  assert state.model_config.stages == (1, 2, 1) and state.model_config.contractive_weight == 0
  for field, value in (("eta", 0.5), ("dilations", (1, 2, 3)), ("input_format", "bgr255")):
    run = tiny.get_config()
    run.init_from = config.init_from
    run.model[field] = value
    run.model.stage_fraction = 0.5  # free, but not the field beside it
    with pytest.raises(ValueError, match="different architecture"):
      _initial_state(run, minet_jax.model_config(run.model))


def test_distillation_trains_towards_the_teachers_output_from_scaled_blocks(tmp_path):
  from minet_jax.train import step as step_lib
  from minet_jax.train.loop import _initial_state, _teacher
  config = tiny.get_config()
  config.model.iterations = (1, 1, 1)
  params = state_lib.create_train_state(config).params()
  minet_jax.save(params, tmp_path / "teacher")
  config.init_from = str(tmp_path / "teacher")
  config.teacher = "init_from"
  config.init_block_scale = (0.5, 0.25, 1.0)
  config.model.iterations = (3, 3, 3)  # the student runs its blocks differently
  validate_config(config)
  state = _initial_state(config, minet_jax.model_config(config.model))
  teacher = _teacher(config, minet_jax.model_config(config.model))
  assert teacher.config.iterations == (1, 1, 1)
  for i, s in enumerate(config.init_block_scale):
    for name in ("scale", "bias"):
      np.testing.assert_allclose(
          state.params().weights["im_blocks"][str(i)]["f"]["norm2"][name],
          s * np.asarray(params.weights["im_blocks"][str(i)]["f"]["norm2"][name]), rtol=1e-6)
  # Scaling the last IN of f scales f itself (relu is positively homogeneous).
  block_in = jax.random.normal(jax.random.key(0), (1, 6, 6, 8))
  f_teacher = minet_jax.model_from_params(params).im_blocks[1].f(block_in)
  f_student = state.merge()[0].im_blocks[1].f(block_in)
  np.testing.assert_allclose(f_student, 0.25 * f_teacher, rtol=1e-5, atol=1e-6)
  rng = np.random.default_rng(0)
  batch = {"hazy": jnp.asarray(rng.random((2, 16, 16, 3)), jnp.float32),
           "clear": jnp.asarray(rng.random((2, 16, 16, 3)), jnp.float32)}
  student = state.merge()[0]
  target = minet_jax.model_from_params(teacher)(batch["hazy"])
  output = student(batch["hazy"])
  _, metrics = step_lib.make_train_step("mse", teacher=teacher)(state, batch)
  assert float(metrics["loss"]) == pytest.approx(float(reconstruction_loss(output, target, "mse")),
                                                 rel=1e-5)
  assert float(metrics["psnr"]) == pytest.approx(float(step_lib._batch_psnr(output, target)),
                                                 rel=1e-4)
  assert float(metrics["psnr_clear"]) == pytest.approx(
      float(step_lib._batch_psnr(output, batch["clear"])), rel=1e-4)
  bad = tiny.get_config()
  bad.teacher = "init_from"
  with pytest.raises(ConfigError, match="needs config.init_from"):
    validate_config(bad)
  bad.teacher, bad.init_block_scale = "", (0.5, 0.5, 0.5)
  with pytest.raises(ConfigError, match="init_block_scale"):
    validate_config(bad)
  # With init_from, one positive factor per block, refused before anything loads.
  bad.init_from = "unused"
  for scale in ((0.5, 0.5), (0.5, 0.5, 0.5, 0.5), (0.5, 0.0, 1.0), (0.5, "x", 1.0)):
    bad.init_block_scale = scale
    with pytest.raises(ConfigError, match=r"one positive factor per IM-block \(3\)"):
      validate_config(bad)


def test_correction_loss_is_the_loss_of_one_step_after_random_iterates():
  from minet_jax.train import step as step_lib
  config = tiny.get_config()
  config.model.correction_weight = 0.5
  config.model.iterations = (3, 3, 3)
  state = state_lib.create_train_state(config)
  rng = np.random.default_rng(1)
  batch = {"hazy": jnp.asarray(rng.random((2, 16, 16, 3)), jnp.float32),
           "clear": jnp.asarray(rng.random((2, 16, 16, 3)), jnp.float32)}
  model, _ = state.merge()
  key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0), 1)

  @jax.jit
  def reference(batch):
    _, model_image, runs = model.forward_runs(batch["hazy"])
    states = []
    for block, run, k in zip(model.im_blocks, runs, jax.random.split(key, len(runs))):
      # The Picard iterate g_j from g0, j uniform in {0, ..., T}, written out by hand
      # (jnp.where picks g_j, so the draw stays a traced value), then one more step.
      j = jax.random.randint(k, (), 0, 4)
      g, iterates = run.g0, [run.g0]
      for _ in range(3):
        g = run.g0 + block.f(g)  # T(g) = g0 + eta f(g), eta = 1
        iterates.append(g)
      g = sum(jnp.where(j == i, it, 0.0) for i, it in enumerate(iterates))
      states.append(run.g0 + block.f(jax.lax.stop_gradient(g)))
    early = model.output_from_states(states, model_image, (16, 16))
    return 0.5 * reconstruction_loss(early, batch["clear"], "mse")

  expected = float(reference(batch))
  _, metrics = step_lib.make_train_step("mse")(state, batch)
  assert float(metrics["correction_loss"]) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["loss"]) == pytest.approx(
      float(metrics["reconstruction_loss"]) + expected, rel=1e-5)


def test_resume_takes_other_solve_settings(two_step_run, data_dir, tmp_path):
  workdir = tmp_path / "resolved"
  shutil.copytree(two_step_run, workdir)
  summary = train_and_evaluate(tiny_config(data_dir, num_train_steps=3, **{
      "model.solver": "picard", "model.rtol": 1e-2, "model.backward": "phantom"}), workdir)
  assert summary["step"] == 3
  assert minet_jax.load(workdir).config.solver == "picard"


def test_init_blocks_from_takes_those_blocks_from_other_models(tmp_path):
  from minet_jax.train.loop import _initial_state
  config = tiny.get_config()
  start = state_lib.create_train_state(config).params()
  config.seed = 5
  other = state_lib.create_train_state(config).params()
  config.seed = 0
  minet_jax.save(start, tmp_path / "start")
  minet_jax.save(other, tmp_path / "other")
  config.init_from = str(tmp_path / "start")
  config.init_blocks_from = ("", str(tmp_path / "other"), "")
  cfg = validate_config(config)
  weights = _initial_state(config, cfg).params().weights
  for name in weights:
    if name != "im_blocks":
      jax.tree.map(np.testing.assert_array_equal, weights[name], start.weights[name])
  for i, source in (("0", start), ("1", other), ("2", start)):
    jax.tree.map(np.testing.assert_array_equal, weights["im_blocks"][i],
                 source.weights["im_blocks"][i])
  # Applied before init_block_scale, which then scales the replaced block too.
  config.init_block_scale = (1.0, 0.5, 1.0)
  expected = state_lib.shrink_blocks(state_lib.replace_blocks(start, {1: other}), (1.0, 0.5, 1.0))
  jax.tree.map(np.testing.assert_array_equal, _initial_state(config, cfg).params().weights,
               expected.weights)
  block = expected.weights["im_blocks"]["1"]["f"]
  assert not np.array_equal(block["conv1"]["kernel"],
                            start.weights["im_blocks"]["1"]["f"]["conv1"]["kernel"])
  other_norm2 = other.weights["im_blocks"]["1"]["f"]["norm2"]
  np.testing.assert_allclose(block["norm2"]["scale"], 0.5 * np.asarray(other_norm2["scale"]))
  config.init_block_scale = ()
  config.init_blocks_from = ("", str(tmp_path / "missing"), "")
  with pytest.raises(ConfigError, match=r"init_blocks_from\[1\]: .*missing"):
    _initial_state(config, cfg)
  for bad in [("", "x"), ("", 1, "")]:
    config.init_blocks_from = bad
    with pytest.raises(ConfigError, match="init_blocks_from .* one entry per IM-block"):
      validate_config(config)
  config.init_blocks_from = ("", str(tmp_path / "other"), "")
  config.init_from = ""
  with pytest.raises(ConfigError, match="needs config.init_from"):
    validate_config(config)
  # A source whose block has other shapes is refused, naming the field.
  config.init_from = str(tmp_path / "start")
  config.model.features = 4
  minet_jax.save(state_lib.create_train_state(config).params(), tmp_path / "narrow")
  config.model.features = tiny.get_config().model.features
  config.init_blocks_from = ("", "", str(tmp_path / "narrow"))
  with pytest.raises(ConfigError, match="init_blocks_from: IM-block 3 of the source differs at"):
    _initial_state(config, cfg)


def test_init_from_config_trains_init_from_first_and_only_once(tmp_path, data_dir, monkeypatch):
  from minet_jax.train import loop
  prior_file = tmp_path / "prior.py"
  prior_file.write_text(
      "from minet_jax.train import config_file\n\n\n"
      "def get_config():\n"
      f"  config = config_file.load_module({str(REPO / 'configs' / 'tiny.py')!r}).get_config()\n"
      f"  config.data.data_dir = {str(data_dir)!r}\n"
      "  config.num_train_steps = 2\n"
      "  return config\n")
  prior_dir = tmp_path / "prior"
  config = tiny_config(data_dir, num_train_steps=1, init_from=str(prior_dir),
                       init_from_config=str(prior_file))
  # SIGTERM during the first run (this run's workdir locked meanwhile): it saves and
  # stops, and so does the command.
  def stop(self, step):
    assert (tmp_path / "next" / LOCK_FILE).exists()
    self.signal = 15
    return True
  with monkeypatch.context() as m:
    m.setattr(loop.StopRequest, "reached", stop)
    summary = train_and_evaluate(config, tmp_path / "next")
  assert summary["stopped_by"] == "SIGTERM" and summary["stopped_in"] == str(prior_dir)
  assert checkpointing.resumable_steps(prior_dir) == [1] and not (tmp_path / "next").exists()
  # Rerun: the first run resumes to its last step, then the second starts from it.
  summary = train_and_evaluate(config, tmp_path / "next")
  assert summary["step"] == 1 and summary["stopped_by"] is None
  assert checkpointing.resumable_steps(prior_dir) == [2, 1]
  events = [(r["event"], r["step"]) for r in read_metrics(prior_dir) if "event" in r]
  assert events == [("start", 0), ("stopped", 1), ("resume", 1)]
  start = [r for r in read_metrics(tmp_path / "next") if r.get("event") == "start"][0]
  assert start["init_from"] == str(prior_dir) and start["init_from_config"] == str(prior_file)
  # A finished first run is not run again.
  before = (prior_dir / "metrics.jsonl").read_text()
  assert train_and_evaluate(config, tmp_path / "again")["step"] == 1
  assert (prior_dir / "metrics.jsonl").read_text() == before
  # Its last step is the one its record names (a run resumed with another num_train_steps).
  recorded = json.loads((prior_dir / "config.json").read_text())
  (prior_dir / "config.json").write_text(json.dumps({**recorded, "num_train_steps": 3}))
  assert train_and_evaluate(config, tmp_path / "again_3")["step"] == 1
  assert checkpointing.resumable_steps(prior_dir) == [3, 2, 1]
  # A folder that a killed first run left with its lock file alone is a run to train.
  (tmp_path / "half").mkdir()
  (tmp_path / "half" / LOCK_FILE).write_text("")
  half = tiny_config(data_dir, num_train_steps=1, init_from=str(tmp_path / "half"),
                     init_from_config=str(prior_file))
  assert train_and_evaluate(half, tmp_path / "after_half")["step"] == 1
  assert checkpointing.resumable_steps(tmp_path / "half") == [2]
  # Nor when the second run resumes (init_from is ignored then), even with it gone.
  prior_dir.rename(tmp_path / "moved")
  config.num_train_steps = 2
  assert train_and_evaluate(config, tmp_path / "next")["step"] == 2
  assert not prior_dir.exists()
  # A saved model as init_from is weights to start from, not a run to train.
  minet_jax.save(minet_jax.load(tmp_path / "moved"), tmp_path / "saved")
  saved = sorted(p.name for p in (tmp_path / "saved").iterdir())
  config.init_from = str(tmp_path / "saved")
  assert train_and_evaluate(config, tmp_path / "from_saved")["step"] == 2
  assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == saved

  # Refused before anything trains: no such file, a file that fails, a release name,
  # this run's folder or one of a run waiting on it, a first run whose weights cannot
  # start this one.
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  (tmp_path / "loop.py").write_text(prior_file.read_text().replace(
      "  return config", f"  config.init_from = {str(tmp_path / 'bad')!r}\n"
      f"  config.init_from_config = {str(tmp_path / 'loop.py')!r}\n  return config"))
  for field, value, message in (
      ("init_from_config", str(tmp_path / "none.py"), "no config file"),
      ("init_from_config", str(tmp_path / "broken.py"), "broken.py: SyntaxError"),
      ("init_from_config", str(tmp_path / "loop.py"),
       "training config.init_from .*fresh with .*loop.py first: .*of this run or of a run "
       "waiting on it"),
      ("init_from", "its", "must then be a training workdir"),
      ("init_from", str(tmp_path / "w.pth"), "must then be a training workdir"),
      ("init_from", str(tmp_path / "bad"), "of this run or of a run waiting on it")):
    fields = {"init_from": str(tmp_path / "fresh"), "init_from_config": str(prior_file)}
    bad = tiny_config(data_dir, **{**fields, field: value})
    with pytest.raises(ConfigError, match=message):
      train_and_evaluate(bad, tmp_path / "bad")
  bad = tiny_config(data_dir, init_from=str(tmp_path / "fresh"), init_from_config=str(prior_file),
                    **{"data.name": "reside_its", "data.manual_dir": str(tmp_path / "no_data")})
  with pytest.raises(DatasetLayoutError):  # This run's data, before the first run trains.
    train_and_evaluate(bad, tmp_path / "bad")
  bad = tiny_config(data_dir, init_from=str(tmp_path / "fresh"), init_from_config=str(prior_file))
  bad.model.features = 4
  with pytest.raises(ConfigError, match="model of config.init_from_config .* different "
                     "architecture .*features"):
    train_and_evaluate(bad, tmp_path / "bad")
  assert not (tmp_path / "fresh").exists() and not (tmp_path / "bad").exists()


def _state_at(step: int, fill: float) -> state_lib.TrainState:
  config = tiny.get_config()
  state = state_lib.create_train_state(config)
  def filled(x):
    return jnp.full_like(x, fill) if jnp.issubdtype(x.dtype, jnp.floating) else x

  return state.replace(step=jnp.asarray(step, state.step.dtype),
                       state=jax.tree.map(filled, state.state))


def _best_record(workdir: pathlib.Path) -> tuple[list[int], float]:
  steps = sorted(int(p.name) for p in (workdir / checkpointing.BEST_DIR).iterdir()
                 if p.name.isdigit())
  meta = json.loads((workdir / checkpointing.BEST_DIR / str(steps[-1]) / "meta" /
                     "metadata").read_text())
  return steps, meta["psnr"]


def test_a_better_score_replaces_the_best_at_or_above_its_step(tmp_path):
  """A run resumed from a checkpoint older than the best (after a damaged checkpoint, a
  divergence, a kill between a validation and the next checkpoint) revalidates steps at
  or below the best's: a better score there used to be dropped silently (orbax saves no
  step at or below its latest), leaving the worse weights as what `load` gives."""
  ckpts = checkpointing.Checkpoints(tmp_path, async_save=True)
  try:
    assert ckpts.save_best(_state_at(6, 0.1), {"psnr": 6.2, "ssim": 0.1})
    assert not ckpts.save_best(_state_at(5, 0.2), {"psnr": 6.0, "ssim": 0.1})
    assert ckpts.save_best(_state_at(5, 0.3), {"psnr": 9.1, "ssim": 0.2})
    ckpts.wait()
    assert _best_record(tmp_path) == ([5], 9.1) and ckpts.best_psnr() == 9.1
    assert ckpts.save_best(_state_at(6, 0.4), {"psnr": 12.8, "ssim": 0.3})
    assert ckpts.save_best(_state_at(6, 0.5), {"psnr": 13.0, "ssim": 0.3})  # Same step.
    ckpts.wait()
    assert _best_record(tmp_path) == ([6], 13.0) and ckpts.best_psnr() == 13.0
  finally:
    ckpts.close()
  assert sorted(p.name for p in (tmp_path / checkpointing.BEST_DIR).iterdir()) == ["6"]
  meta = json.loads((tmp_path / checkpointing.BEST_DIR / "6" / "meta" / "metadata").read_text())
  kept = jax.tree.map(np.asarray, _state_at(6, 0.5).params().weights)
  assert meta["weights_sha256"] == minet_jax.core.params.weights_checksum(kept)


def test_an_unreadable_best_is_set_aside_and_replaced(tmp_path, capsys):
  """A damaged ``best/<step>/meta`` made every later validation (and the run's end)
  fail with a traceback, so a rerun could never get past it."""
  ckpts = checkpointing.Checkpoints(tmp_path)
  assert ckpts.save_best(_state_at(6, 0.1), {"psnr": 6.2, "ssim": 0.1})
  ckpts.close()
  (tmp_path / checkpointing.BEST_DIR / "6" / "meta" / "metadata").write_text('{"step": 6, "psn')
  ckpts = checkpointing.Checkpoints(tmp_path)
  try:
    assert ckpts.best_psnr() is None
    assert "the best checkpoint 6 cannot be read" in capsys.readouterr().err
    assert ckpts.save_best(_state_at(7, 0.2), {"psnr": 5.0, "ssim": 0.1})
    ckpts.wait()
    assert ckpts.best_psnr() == 5.0
  finally:
    ckpts.close()
  assert (tmp_path / checkpointing.DAMAGED_DIR / "best-6" / "meta").is_dir()
  assert _best_record(tmp_path) == ([7], 5.0)


def _events(workdir: pathlib.Path) -> list:
  """The events of a workdir's TensorBoard files (TFRecord framing: length, its CRC,
  the serialized Event, its CRC)."""
  import struct
  from tensorboardX.proto import event_pb2
  events = []
  for path in sorted(workdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
      at += 12 + length + 4
  return events


def test_tensorboard_events_hold_the_scalars_and_grids(tmp_path):
  from minet_jax.train import logging as logging_lib
  writer = logging_lib.MetricWriter(tmp_path)
  writer.write_scalars(3, "train", {"loss": 0.25, "note": "text"})
  writer.write_grid(3, [[np.zeros((4, 5, 3)), np.ones((4, 5, 3))]])
  # Written and flushed with each report: readable before the writer closes.
  summaries = [(e.step, v) for e in _events(tmp_path) for v in e.summary.value]
  assert [(step, v.tag) for step, v in summaries] == [(3, "train/loss"),
                                                      (3, "eval/hazy_dehazed_clear")]
  assert summaries[0][1].simple_value == 0.25
  grid = Image.open(io.BytesIO(summaries[1][1].image.encoded_image_string))
  assert grid.size == (14, 4)
  writer.close()


def test_a_failed_replacement_puts_the_old_best_back(tmp_path, monkeypatch):
  ckpts = checkpointing.Checkpoints(tmp_path, async_save=False)
  try:
    assert ckpts.save_best(_state_at(6, 0.1), {"psnr": 20.0, "ssim": 0.5})

    def full_disk(*args, **kwargs):
      raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpts.best, "save", full_disk)
    with pytest.raises(OSError):
      ckpts.save_best(_state_at(6, 0.2), {"psnr": 25.0, "ssim": 0.6})
    monkeypatch.undo()
    assert ckpts.best_psnr() == 20.0
    assert not ckpts.save_best(_state_at(7, 0.3), {"psnr": 5.0, "ssim": 0.1})
  finally:
    ckpts.close()
  assert sorted(p.name for p in (tmp_path / checkpointing.BEST_DIR).iterdir()) == ["6"]


def test_a_replacement_cut_short_by_a_crash_puts_the_old_best_back(tmp_path):
  # A process killed between setting the old best aside and finalising its successor.
  ckpts = checkpointing.Checkpoints(tmp_path, async_save=False)
  assert ckpts.save_best(_state_at(6, 0.1), {"psnr": 20.0, "ssim": 0.5})
  ckpts.close()
  best = tmp_path / checkpointing.BEST_DIR
  (best / "6").rename(best / ".replaced-6")
  ckpts = checkpointing.Checkpoints(tmp_path, async_save=False)
  try:
    assert ckpts.best_psnr() == 20.0  # Not hidden: a worse score is not the best.
    assert not ckpts.save_best(_state_at(7, 0.3), {"psnr": 5.0, "ssim": 0.1})
  finally:
    ckpts.close()
  assert sorted(p.name for p in best.iterdir()) == ["6"]


def test_a_resume_with_changed_settings_records_them(two_step_run, data_dir, tmp_path, capsys):
  workdir = tmp_path / "changed"
  shutil.copytree(two_step_run, workdir)
  train_and_evaluate(tiny_config(data_dir, num_train_steps=3, log_every=3), workdir)
  assert "resuming with 2 changed config field(s): log_every 1 -> 3, num_train_steps 2 -> 3" in (
      capsys.readouterr().out)
  event = [r for r in read_metrics(workdir) if r.get("event") == "config_changed"][-1]
  assert event["step"] == 2 and event["fields"] == {"log_every": [1, 3],
                                                    "num_train_steps": [2, 3]}
