"""Stable training on the released weights: a short self-distillation on one crop."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import minet_jax
from minet_jax.stability import contractive
from minet_jax import metrics
from minet_jax.core.config import model_config
from minet_jax.core.params import Params, model_from_params
from minet_jax.train import state as state_lib
from minet_jax.train import step as step_lib
from configs import stable

REPO = pathlib.Path(__file__).resolve().parent.parent


# The model is an argument: models of one config share the compiled program.
_solve_blocks = nnx.jit(lambda model, x: model.solve_blocks(model.model_input(x)))


def _radii(params: Params, image: jax.Array) -> np.ndarray:
  """rho(eta J) estimate of every block at its solution (60 power-iteration steps)."""
  model = model_from_params(params)
  runs = _solve_blocks(model, image)
  return np.array([float(contractive.block_radius(block, run.g0, run.result.value,
                                                  jax.random.key(i), 60)[0])
                   for i, (block, run) in enumerate(zip(model.im_blocks, runs))])


@pytest.mark.slow
def test_short_stable_fine_tune_contracts_and_moves_towards_the_teacher(released_params,
                                                                        shared_dir):
  # configs/stable.py on one crop: the released weights as stage blocks are contractions
  # where the released implicit Euler blocks are not, and a few steps of its training
  # bring the solved model's output towards the teacher's while they stay contractions.
  crop = np.load(shared_dir / "parity" / "official_outputs.npz")["crop_input_rgb"]
  hazy = jnp.asarray(crop[None, :64, :96] / 255.0, jnp.float32)
  config = stable.get_config()
  cfg = model_config(config.model)
  assert cfg.same_architecture(dataclasses.replace(released_params.config,
                                                   stage_fraction=cfg.stage_fraction))
  released = _radii(released_params, hazy)
  assert released.max() > 1.0, released  # block 2 expands on this crop
  start = Params(weights=released_params.weights, config=cfg)
  before = _radii(start, hazy)
  assert before.max() < 1.0, before

  config.optimizer.schedule = "constant"
  state = state_lib.create_train_state(config, params=start)
  train_step = step_lib.make_train_step(
      config.loss, teacher=released_params, match_weight=config.teacher_match_weight,
      output_weight=config.output_weight, match_steps=config.teacher_match_steps)
  mismatch = []
  for _ in range(12):
    state, m = train_step(state, {"hazy": hazy, "clear": hazy})
    mismatch.append(float(m["fixed_point_mismatch"]))
  trained = state.params()
  assert np.mean(mismatch[-3:]) < 0.9 * np.mean(mismatch[:3]), mismatch
  after = _radii(trained, hazy)
  assert after.max() < 1.0, after

  # minet_jax.apply: the model's clipped output, compiled once per config.
  teacher_out = np.asarray(minet_jax.apply(released_params, hazy, strip_rows=0)) * 255
  def psnr(params):
    out = np.asarray(minet_jax.apply(params, hazy, strip_rows=0)) * 255
    return float(metrics.psnr(out, teacher_out).mean())
  assert psnr(trained) > psnr(start) + 0.3, (psnr(start), psnr(trained))


def test_apply_and_dehaze_report_how_the_blocks_were_solved(random_params, tmp_path, capsys):
  from minet_jax import dehaze, image_io
  from minet_jax.core import fixed_point as fp
  from minet_jax.core.api import describe_solves
  cfg = minet_jax.ModelConfig(features=4, pre_blocks=0, iterations=(12, 12, 12),
                              solver="picard", rtol=1e-2)
  params = state_lib.shrink_blocks(random_params(cfg), (0.05, 0.05, 0.05))
  image = np.random.default_rng(0).random((20, 24, 3)).astype(np.float32)
  whole, strips_ = [], []
  out = minet_jax.apply(params, image, strip_rows=0, solves=whole)
  out_strips = minet_jax.apply(params, image, strip_rows=8, solves=strips_)
  np.testing.assert_allclose(out, minet_jax.apply(params, image), atol=1e-6)
  np.testing.assert_allclose(out_strips, out, atol=1e-4)
  assert len(whole) == len(strips_) == 3
  for a, b in zip(whole, strips_):
    assert isinstance(a, fp.SolveSummary)
    np.testing.assert_array_equal(a.status, [fp.RESULTS.successful])
    assert 1 <= int(a.num_steps[0]) < 12 and float(a.residual[0]) <= 1e-2
    np.testing.assert_array_equal(a.num_steps, b.num_steps)
  line = describe_solves(whole, params.config)
  worst = max(float(a.residual[0]) for a in whole)
  assert line == (f"picard to rtol 0.01: {' / '.join(str(int(a.num_steps[0])) for a in whole)}"
                  f" steps, all converged (residuals <= {worst:.1e})")
  capped = params.replace_config(iterations=(1, 1, 1), rtol=1e-9)
  missed = []
  minet_jax.apply(capped, image, solves=missed)
  assert "max_steps_reached" in describe_solves(missed, capped.config)
  # A two-stage block reports each stage's steps and, when it misses, which stage: with
  # one step per stage and a tolerance neither meets, "1+1" and "stage 1+2"; solved,
  # "k1+k2" summing to its steps. Whole and in strips alike.
  two = params.replace_config(stage_fraction=(1.0, 0.5, 1.0), stages=(1, 2, 1))
  for rows in (0, 8):
    for cfg_two, solved in ((two, True), (two.replace_config(iterations=(1, 1, 1),
                                                             rtol=1e-9), False)):
      solves = []
      minet_jax.apply(cfg_two, image, strip_rows=rows, solves=solves)
      stage_steps = np.asarray(solves[1].stage_steps)[0]
      assert solves[0].stage_steps is None and solves[1].stage_steps.shape == (1, 2)
      assert int(solves[1].num_steps[0]) == stage_steps.sum()
      line = describe_solves(solves, cfg_two.config)
      assert f" / {stage_steps[0]}+{stage_steps[1]} / " in line, line
      if solved:
        assert "all converged" in line and min(stage_steps) >= 1, line
      else:
        assert list(stage_steps) == [1, 1]
        assert ("; block 2 stage 1 max_steps_reached, stage 2 max_steps_reached (residual "
                in line), line

  minet_jax.save(params, tmp_path / "ckpt")
  image_io.write_png(tmp_path / "in.png", image)
  assert dehaze.main([str(tmp_path / "in.png"), "-o", str(tmp_path / "out"), "--ckpt",
                      str(tmp_path / "ckpt"), "--no-progress"]) == 0
  assert "in.png: IM-blocks picard to rtol 0.01: " in capsys.readouterr().out


def test_training_some_blocks_moves_only_them_as_the_whole_run_does(random_params):
  # configs/stable.py's block-wise distillation on a small model: each block's terms
  # touch only its own f, so training some blocks gives them the weights the run that
  # trains every block gives them, and leaves every other parameter exactly in place.
  config = stable.get_config()
  config.model.features = 4
  config.model.pre_blocks = 0
  config.optimizer.schedule = "constant"
  config.model.contractive_target = 0.0  # every block's hinge active
  cfg = model_config(config.model)
  teacher = random_params(dataclasses.replace(cfg, stage_fraction=1.0, solver="unrolled",
                                              iterations=(3, 3, 3), best_so_far=False))
  start = Params(weights=teacher.weights, config=cfg)
  hazy = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3))

  steps = {}  # One compiled step per block set (a new jitted function compiles anew).

  def run(blocks, state=None):
    state = state or state_lib.create_train_state(config, params=start)
    if blocks not in steps:
      steps[blocks] = step_lib.make_train_step(
          config.loss, teacher=teacher, match_weight=config.teacher_match_weight,
          output_weight=config.output_weight, train_blocks=blocks)
    train_step = steps[blocks]
    first = None
    for _ in range(3):
      state, metrics = train_step(state, {"hazy": hazy, "clear": hazy})
      first = first or metrics
    return state, first

  full_state, full_first = run(None)
  full = full_state.params().weights
  firsts = {}
  for train_blocks in [(1,), (0, 2)]:
    part_state, firsts[train_blocks] = run(train_blocks)
    part = part_state.params().weights
    trained_paths = set()
    for path, got in jax.tree_util.tree_leaves_with_path(part):
      keys = [getattr(k, "key", None) for k in path]
      initial = _leaf(start.weights, keys)
      if keys[0] == "im_blocks" and int(keys[1]) in train_blocks and keys[2] == "f":
        trained_paths.add(keys[1])
        np.testing.assert_allclose(got, _leaf(full, keys), rtol=1e-6, atol=0)
        assert not np.array_equal(got, initial), keys
      else:
        np.testing.assert_array_equal(got, initial)
    assert len(trained_paths) == len(train_blocks)
    # Resumed from a state that trained every block (Adam's moments are not zero): the
    # frozen parameters still do not move.
    resumed = run(train_blocks, jax.tree.map(jnp.copy, full_state))[0].params().weights
    frozen = step_lib.frozen_mask(resumed, train_blocks)
    for was, now, keep in zip(jax.tree.leaves(full), jax.tree.leaves(resumed),
                              jax.tree.leaves(frozen)):
      assert np.array_equal(was, now) == keep
  # The terms of the blocks not trained are not computed: the two complementary runs'
  # first-step terms add up to the full run's.
  for term in ("fixed_point_mismatch", "contractive_penalty"):
    parts = [float(firsts[b][term]) for b in firsts]
    assert min(parts) > 0, (term, parts)
    assert sum(parts) == pytest.approx(float(full_first[term]), rel=1e-5), term


def _leaf(tree, keys):
  for k in keys:
    tree = tree[k]
  return np.asarray(tree)


def test_train_blocks_must_name_blocks():
  from minet_jax.train.checks import ConfigError, trained_blocks
  config = stable.get_config()
  assert trained_blocks(config, 3) is None
  config.train_blocks = (3, 1)
  assert trained_blocks(config, 3) == (2, 0)
  for bad in [(0,), (4,), (2, 2), (1.5,), (True,)]:
    config.train_blocks = bad
    with pytest.raises(ConfigError, match="config.train_blocks must be distinct IM-block"):
      trained_blocks(config, 3)


def test_penalty_at_points_of_some_blocks_is_their_share(random_params):
  cfg = model_config(stable.get_config().model)
  cfg = dataclasses.replace(cfg, features=4, pre_blocks=0)
  params = random_params(cfg)
  model = model_from_params(params)
  runs = model.solve_blocks(model.model_input(
      jax.random.uniform(jax.random.key(1), (1, 16, 16, 3))))
  points = [(run.g0, run.result.value) for run in runs]
  key = jax.random.key(0)
  _, every = contractive.penalty_at_points(params, points, key=key, target=0.0, per_block=True)
  total, some = contractive.penalty_at_points(params, points, key=key, target=0.0,
                                              per_block=True, blocks=[2, 0])
  np.testing.assert_allclose(some, every[jnp.array([0, 2])], rtol=1e-6)
  np.testing.assert_allclose(total, np.sum(np.square(some)), rtol=1e-5)
  for bad in ([], [3]):
    with pytest.raises(ValueError, match="must name one or more of the 3 IM-blocks"):
      contractive.penalty_at_points(params, points, key=key, blocks=bad)


def test_stable_fullres_starts_from_the_released_block_2(released_params, shared_dir, tmp_path):
  # After configs/stable.py's run: its model with block 2 replaced by the released
  # one at fraction 0.5, trained alone on whole renders, the released model the teacher.
  from minet_jax.core import checkpoint
  from minet_jax.train.checks import trained_blocks, validate_config
  from minet_jax.train.loop import _initial_state, _prior_run, _teacher
  from configs import stable_fullres
  first = model_config(stable.get_config().model)
  # A stand-in for configs/stable.py's model: its config, every block weight x 0.9.
  weights = dict(released_params.weights)
  weights["im_blocks"] = jax.tree.map(lambda w: 0.9 * w, weights["im_blocks"])
  checkpoint.save(Params(weights=weights, config=first), tmp_path / "stable")
  pth = str(shared_dir / "weights" / "minet_its_official.pth")
  config = stable_fullres.get_config()
  assert (config.init_from, tuple(config.init_blocks_from), config.teacher) == (
      "workdirs/stable", ("", "its", ""), "its")
  config.init_from = str(tmp_path / "stable")
  config.init_blocks_from = ("", pth, "")
  config.teacher = pth
  cfg = validate_config(config)
  assert cfg.stage_fraction == (first.stage_fraction[0], 0.5, first.stage_fraction[2])
  assert cfg.same_architecture(dataclasses.replace(first, stage_fraction=cfg.stage_fraction))
  assert trained_blocks(config, 3) == (1,)
  assert config.data.crop_size == 0 and tuple(config.data.synthetic.image_size) == (460, 620)
  assert cfg.contractive_target[1] == 0.85 and cfg.contractive_weight == 4.0
  start = _initial_state(config, cfg).params().weights
  expected = dict(weights)
  expected["im_blocks"] = {**weights["im_blocks"], "1": released_params.weights["im_blocks"]["1"]}
  jax.tree.map(np.testing.assert_array_equal, start, expected)
  assert _teacher(config, cfg).config.stage_fraction == (1.0, 1.0, 1.0)
  # One command: without a finished run in init_from, configs/stable.py trains there first.
  assert config.init_from_config == str(REPO / "configs" / "stable.py")
  config.init_from = str(tmp_path / "not_yet")
  prior, where = _prior_run(config, validate_config(config), (tmp_path / "next",))
  assert where == tmp_path / "not_yet" and prior.to_dict() == stable.get_config().to_dict()


def test_student_inputs_match_the_teacher_output_from_the_models_own_states(random_params):
  # config.teacher_inputs = "student": block i's matching term takes the model's own
  # solved block input with the teacher's block output.
  config = stable.get_config()
  config.model.features = 4
  config.model.pre_blocks = 0
  config.model.contractive_target = 0.0
  cfg = model_config(config.model)
  teacher = random_params(dataclasses.replace(cfg, stage_fraction=1.0, solver="unrolled",
                                              iterations=(3, 3, 3), best_so_far=False))
  # The student's blocks differ from the teacher's, so its block inputs do too.
  start = state_lib.shrink_blocks(Params(weights=teacher.weights, config=cfg), (0.5, 0.5, 0.5))
  hazy = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3))
  student = model_from_params(start)
  own = student.forward_runs(hazy)[2]
  theirs = model_from_params(teacher).forward_runs(hazy)[2]
  assert float(jnp.max(jnp.abs(own[2].g0 - theirs[2].g0))) > 1e-3
  expected = {}
  # (With an output term the student's inputs come from the loss's own forward pass:
  # the loss_and_grads comparison below.)
  for inputs, g0, output_weight in (("student", own[2].g0, 0.0),
                                    ("teacher", theirs[2].g0, 0.0)):
    state = state_lib.create_train_state(config, params=start)
    train_step = step_lib.make_train_step(
        config.loss, teacher=teacher, match_weight=1.0, output_weight=output_weight,
        train_blocks=(2,), teacher_inputs=inputs)
    _, metrics = train_step(state, {"hazy": hazy, "clear": hazy})
    expected[inputs] = float(jnp.mean(contractive.fixed_point_mismatch(
        student.im_blocks[2], g0, theirs[2].output)))
    assert float(metrics["fixed_point_mismatch"]) == pytest.approx(expected[inputs], rel=1e-4)
  assert abs(expected["student"] - expected["teacher"]) > 1e-2 * expected["teacher"]
  # Every block trained, with an output term: the same loss and gradients as the
  # teacher's inputs replaced by the model's own beforehand, so no gradient reaches the
  # earlier blocks through the inputs of the later ones.
  batch = {"hazy": hazy, "clear": model_from_params(teacher)(hazy)}
  common = dict(loss=config.loss, key=jax.random.key(5), match_weight=1.0, output_weight=1.0)
  # One compiled program for both (eager dispatch of the solves is the slow part).
  both = nnx.jit(lambda m, b, t, o: (
      step_lib.loss_and_grads(m, b, teacher_blocks=t, teacher_inputs="student", **common),
      step_lib.loss_and_grads(m, b, teacher_blocks=o, **common)))
  ((value, _), grads), ((want, _), want_grads) = both(
      student, batch, [(t.g0, t.output) for t in theirs],
      [(o.g0, t.output) for o, t in zip(own, theirs)])
  assert float(value) == pytest.approx(float(want), rel=1e-5)
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="unknown teacher_inputs 'mine'"):
    step_lib.train_step(state_lib.create_train_state(config, params=start),
                        {"hazy": hazy, "clear": hazy}, teacher=teacher, match_weight=1.0,
                        output_weight=0.0, teacher_inputs="mine")


def test_stable_block3_refits_block_3_after_the_two_earlier_runs(tmp_path):
  # The third run of the recipe: after configs/stable_fullres.py's (which runs
  # configs/stable.py first), block 3 alone on configs/stable.py's crops, its input from
  # the model's own solved blocks, the released model's block-3 output the target.
  from minet_jax.train.checks import trained_blocks, validate_config
  from minet_jax.train.loop import _prior_run
  from configs import stable_block3, stable_fullres
  config = stable_block3.get_config()
  assert config.init_from == "workdirs/stable_fullres"
  assert config.init_from_config == str(REPO / "configs" / "stable_fullres.py")
  assert stable_fullres.get_config().init_from_config == str(REPO / "configs" / "stable.py")
  cfg = validate_config(config)
  fullres = model_config(stable_fullres.get_config().model)
  assert (cfg.stage_fraction, cfg.contractive_target) == (fullres.stage_fraction,
                                                          fullres.contractive_target)
  assert cfg.contractive_weight == stable.get_config().model.contractive_weight
  assert trained_blocks(config, 3) == (2,) and config.teacher_inputs == "student"
  assert config.teacher == "its" and tuple(config.init_blocks_from) == ()
  assert config.data.to_dict() == stable.get_config().data.to_dict()
  # Without a finished run in init_from, configs/stable_fullres.py trains there first.
  config.init_from = str(tmp_path / "not_yet")
  prior, where = _prior_run(config, cfg, (tmp_path / "next",))
  assert where == tmp_path / "not_yet"
  assert prior.to_dict() == stable_fullres.get_config().to_dict()


def test_stable_two_stage_trains_block_2s_second_stage_and_users_run_it(random_params, tmp_path,
                                                                        capsys):
  # configs/stable_two_stage.py is configs/stable_fullres.py with block 2 two-stage.
  from minet_jax import dehaze, image_io
  from minet_jax.train.checks import validate_config
  from configs import stable_fullres, stable_two_stage
  config = stable_two_stage.get_config()
  assert validate_config(config).stages == (1, 2, 1)
  expected = stable_fullres.get_config()
  expected.model.stages = (1, 2, 1)
  assert config.to_dict() == expected.to_dict()

  # Its training on a small model: block 2's terms are those of its stages in the step
  # that answers the teacher's block-2 output from the teacher's block-2 input.
  config.model.features = 4
  config.model.pre_blocks = 0
  config.model.contractive_target = 0.0  # the hinge active at both stages
  cfg = model_config(config.model)
  teacher = random_params(dataclasses.replace(cfg, stage_fraction=1.0, stages=1,
                                              solver="unrolled", iterations=(3, 3, 3),
                                              best_so_far=False))
  start = Params(weights=teacher.weights, config=cfg)
  hazy = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3))
  state = state_lib.create_train_state(config, params=start)
  train_step = step_lib.make_train_step(config.loss, teacher=teacher, match_weight=1.0,
                                        output_weight=0.0, train_blocks=(1,))
  state, metrics_ = train_step(state, {"hazy": hazy, "clear": hazy})
  student = model_from_params(start)
  theirs = model_from_params(teacher).forward_runs(hazy)[2]
  points = student.im_blocks[1].stage_points(theirs[1].g0, theirs[1].output)
  assert len(points) == 2
  mismatch = contractive.fixed_point_mismatch(student.im_blocks[1], theirs[1].g0,
                                              theirs[1].output)
  assert float(metrics_["fixed_point_mismatch"]) == pytest.approx(float(jnp.mean(mismatch)),
                                                                  rel=1e-4)
  # The penalty's key is the step's: its value is the hinge at both stages of block 2.
  key = jax.random.fold_in(jax.random.wrap_key_data(
      state_lib.create_train_state(config, params=start).rng), 0)
  two = contractive.penalty_at_points(
      student, [(theirs[0].g0, theirs[0].output), points, (theirs[2].g0, theirs[2].output)],
      key=key, blocks=[1], per_block=True)
  first_only = contractive.penalty_at_points(
      student, [(theirs[0].g0, theirs[0].output), points[:1], (theirs[2].g0, theirs[2].output)],
      key=key, blocks=[1])
  assert float(metrics_["contractive_penalty"]) == pytest.approx(
      cfg.contractive_weight * float(two[0]), rel=1e-4)
  assert float(two[0]) > float(first_only) > 0
  trained = state.params()
  for path, got in jax.tree_util.tree_leaves_with_path(trained.weights):
    keys = [getattr(k, "key", None) for k in path]
    moved = not np.array_equal(got, _leaf(start.weights, keys))
    assert moved == (keys[:3] == ["im_blocks", "1", "f"]), keys

  # Saved, loaded and run by users as it was trained: two stages in block 2.
  minet_jax.save(trained, tmp_path / "ckpt")
  loaded = minet_jax.load(tmp_path / "ckpt")
  assert loaded.config.stages == (1, 2, 1)
  image = np.random.default_rng(0).random((20, 24, 3)).astype(np.float32)
  solves = []
  out = minet_jax.apply(loaded, image, strip_rows=0, solves=solves)
  np.testing.assert_allclose(minet_jax.apply(loaded, image, strip_rows=8), out, atol=1e-4)
  one_stage = minet_jax.apply(loaded.replace_config(stages=1), image, strip_rows=0)
  assert np.abs(np.asarray(one_stage) - np.asarray(out)).max() > 1e-4
  image_io.write_png(tmp_path / "in.png", image)
  assert dehaze.main([str(tmp_path / "in.png"), "-o", str(tmp_path / "out"), "--ckpt",
                      str(tmp_path / "ckpt"), "--no-progress"]) == 0
  assert "in.png: IM-blocks picard to rtol 0.001: " in capsys.readouterr().out


def test_stable_sdirk_refits_block_3_as_two_stages_after_the_two_stage_run(tmp_path):
  # configs/stable_sdirk.py: configs/stable_block3.py's refit of block 3, with block 3
  # two-stage, after configs/stable_two_stage.py's run (and that run's own prior run).
  from minet_jax.train.checks import trained_blocks, validate_config
  from minet_jax.train.loop import _prior_run
  from configs import stable_block3, stable_sdirk, stable_two_stage
  config = stable_sdirk.get_config()
  cfg = validate_config(config)
  assert cfg.stages == (1, 2, 2) and cfg.stage_fraction == (0.3, 0.5, 0.7)
  assert trained_blocks(config, 3) == (2,)  # block 3, counted from 0
  assert config.teacher_inputs == "student" and tuple(config.init_blocks_from) == ()
  assert config.init_from == "workdirs/stable_two_stage"
  assert config.init_from_config == str(REPO / "configs" / "stable_two_stage.py")
  # Everything else is configs/stable_block3.py's refit.
  refit = stable_block3.get_config()
  mine, theirs = config.to_dict(), refit.to_dict()
  assert {k for k in mine if mine[k] != theirs[k]} == {"init_from", "init_from_config", "model"}
  assert {k for k in mine["model"] if mine["model"][k] != theirs["model"][k]} == {"stages"}
  config.init_from = str(tmp_path / "not_yet")
  prior, where = _prior_run(config, cfg, (tmp_path / "next",))
  assert where == tmp_path / "not_yet"
  assert prior.to_dict() == stable_two_stage.get_config().to_dict()


def test_stable_sdirk_fullres_trains_block_3_as_two_stages_on_whole_renders(tmp_path):
  # configs/stable_sdirk_fullres.py: configs/stable_two_stage.py's whole-render recipe for
  # block 2, applied to block 3 made two-stage, from that run's model and its own block 3.
  from minet_jax.train.checks import trained_blocks, validate_config
  from minet_jax.train.loop import _prior_run
  from configs import stable_sdirk_fullres, stable_two_stage
  config = stable_sdirk_fullres.get_config()
  cfg = validate_config(config)
  assert cfg.stages == (1, 2, 2) and cfg.stage_fraction == (0.3, 0.5, 0.7)
  assert trained_blocks(config, 3) == (2,)  # block 3, counted from 0
  assert cfg.contractive_target[2] == 0.85 and cfg.contractive_weight == 4.0
  assert config.teacher_inputs == "teacher" and tuple(config.init_blocks_from) == ()
  assert (config.data.crop_size, config.data.synthetic.image_size) == (0, (460, 620))
  assert config.init_from == "workdirs/stable_two_stage"
  assert config.init_from_config == str(REPO / "configs" / "stable_two_stage.py")
  # Everything else is configs/stable_two_stage.py's run.
  recipe = stable_two_stage.get_config()
  mine, theirs = config.to_dict(), recipe.to_dict()
  assert {k for k in mine if mine[k] != theirs[k]} == {
      "init_from", "init_from_config", "init_blocks_from", "train_blocks", "model"}
  assert {k for k in mine["model"] if mine["model"][k] != theirs["model"][k]} == {
      "stages", "contractive_target"}
  config.init_from = str(tmp_path / "not_yet")
  prior, where = _prior_run(config, cfg, (tmp_path / "next",))
  assert where == tmp_path / "not_yet"
  assert prior.to_dict() == stable_two_stage.get_config().to_dict()
