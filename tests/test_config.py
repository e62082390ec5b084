"""Config plumbing: the base config is derived from the records, bad fields are refused."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

import minet_jax
from configs import paper_text
from minet_jax.data import synthetic
from minet_jax.train import config_file, defaults

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_config_sections_are_derived_from_the_records():
  config = defaults.get_config()
  assert minet_jax.model_config(config) == minet_jax.ModelConfig()
  assert set(config.model) == {f.name for f in dataclasses.fields(minet_jax.ModelConfig)}
  assert synthetic.SyntheticHazeConfig(**config.data.synthetic) == synthetic.SyntheticHazeConfig()


def test_overridden_sections_build_the_records():
  # What `--config.model.iterations=(4,4,4)` and a JSON round trip (lists) produce.
  config = defaults.get_config()
  config.model.iterations = (4, 4, 4)
  config.data.synthetic.image_size = [32, 48]
  config.data.synthetic.beta_range = [1, 2]
  assert minet_jax.model_config(config).iterations == (4, 4, 4)
  built = synthetic.SyntheticHazeConfig(**config.data.synthetic)
  assert built.image_size == (32, 48) and built.beta_range == (1.0, 2.0)
  assert hash(built) == hash(synthetic.SyntheticHazeConfig(image_size=(32, 48),
                                                            beta_range=(1.0, 2.0)))


def test_optional_and_several_type_fields_take_overrides():
  # A None default takes its declared type; unroll takes "auto", "full", an int or a bool.
  config = defaults.get_config()
  assert config.data.synthetic.depth_scale_m is None
  config.data.synthetic.depth_scale_m = 5.0
  assert synthetic.SyntheticHazeConfig(**config.data.synthetic).depth_scale_m == 5.0
  # numpy's bools as bools (np.True_ used to give the rolled loop, 1).
  for unroll, held in ((1, 1), (True, "full"), ("auto", "auto"), ("full", "full"),
                       (np.True_, "full"), (np.False_, 1), (np.int64(4), 4)):
    config.model.unroll = unroll
    assert minet_jax.model_config(config).unroll == held
  # Per-block fields take one number or a tuple (`--config.model.contractive_target=(...)`);
  # their defaults are one number, so another block count needs no override of them.
  assert defaults.get_config().model.contractive_target == 0.9
  two_blocks = defaults.get_config()
  two_blocks.model.dilations, two_blocks.model.iterations = (1, 2), (3, 3)
  assert minet_jax.model_config(two_blocks).contractive_target == (0.9, 0.9)
  for name in ("contractive_target", "stage_fraction"):
    setattr(config.model, name, 0.5)
    assert getattr(minet_jax.model_config(config), name) == (0.5, 0.5, 0.5)
    setattr(config.model, name, (0.85, 0.65, 0.8))
    assert getattr(minet_jax.model_config(config), name) == (0.85, 0.65, 0.8)
  # The number of stages too (`--config.model.stages=2` or `=(1,2,1)`), from its default 1.
  assert defaults.get_config().model.stages == 1
  for stages, expected in ((2, (2, 2, 2)), ((1, 2, 1), (1, 2, 1)), ([2, 1, 1], (2, 1, 1))):
    config.model.stages = stages
    assert minet_jax.model_config(config).stages == expected


def test_paper_text_variant_is_a_config():
  assert minet_jax.model_config(paper_text.get_config()) == minet_jax.paper_text_variant()
  assert minet_jax.paper_text_variant().iterations == (12, 12, 12)
  assert minet_jax.paper_text_variant().dilations == (1, 2, 5)


def test_model_config_accepts_dicts_and_is_hashable():
  cfg = minet_jax.model_config({"iterations": [4, 4], "dilations": [1, 3]})
  assert cfg.iterations == (4, 4) and hash(cfg) == hash(minet_jax.ModelConfig(
      iterations=(4, 4), dilations=(1, 3)))
  section = ml_collections.ConfigDict({"features": 16})
  assert minet_jax.model_config(section).features == 16


@pytest.mark.parametrize("fields, pattern", [
    ({"featurs": 8}, "unknown model config field"),
    ({"iterations": (8, 8)}, "same length"),
    ({"iterations": (8, -1, 8)}, "iterations must be >= 0"),
    ({"dilations": (1, 0, 4)}, "dilations must be >= 1"),
    ({"input_format": "bgr"}, "input_format must be one of"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"unroll": "yes"}, "unroll must be"),
    ({"unroll": 2.0}, "unroll must be 'auto', 'full', a bool or an int >= 1, got 2.0"),
    ({"pad_mode": "wrap"}, "pad_mode"),
    ({"stage_fraction": 0.0}, r"stage_fraction must lie in \[0.01, 1\]"),
    ({"stage_fraction": 1e-30}, r"stage_fraction must lie in \[0.01, 1\]"),
    ({"stage_fraction": (0.5, 1.5, 1.0)}, r"stage_fraction must lie in \[0.01, 1\]"),
    ({"stage_fraction": (0.5, float("nan"), 1.0)}, r"stage_fraction must lie in \[0.01, 1\]"),
    ({"stage_fraction": (0.5, 0.5)}, "one entry per IM-block"),
    ({"stage_fraction": "0.5"}, "a number or one number per IM-block"),
    ({"stage_fraction": {"a": 0.5}}, "a number or one number per IM-block"),
    ({"stage_fraction": True}, "a number or one number per IM-block"),
    ({"stage_fraction": ((0.5,), (0.5,), (0.5,))}, "a number or one number per IM-block"),
    ({"stage_fraction": None}, "a number or one number per IM-block"),
    ({"stages": 3}, r"stages must be one of \(1, 2\)"),
    ({"stages": (1, 2)}, "stages needs one entry per IM-block"),
    ({"stages": "2"}, r"stages must be one of \(1, 2\)"),
    ({"stages": True}, r"stages must be one of \(1, 2\)"),
    ({"stages": 2.0, "stage_fraction": 0.5}, r"stages must be one of \(1, 2\)"),
    ({"stages": (1, 2, 1)}, "a two-stage block needs a stage_fraction below 1"),
    ({"stages": 2, "stage_fraction": 0.5, "correction_weight": 1.0},
     "correction loss .* one-stage blocks only"),
    ({"stages": 2, "stage_fraction": 0.5, "contractive_weight": 1.0,
      "contractive_point": "iterate"}, "random Picard iterates .* one-stage blocks only"),
    ({"contractive_target": -0.1}, "contractive_target must be finite and >= 0"),
    ({"contractive_target": (0.8, float("nan"), 0.8)}, "contractive_target must be finite"),
    ({"contractive_target": (0.8, 0.7)}, "contractive_target needs one entry per IM-block"),
    ({"contractive_target": "0.8"}, "contractive_target must be a number or one number"),
])
def test_bad_fields_are_refused(fields, pattern):
  with pytest.raises(ValueError, match=pattern):
    minet_jax.model_config(fields)


@pytest.mark.parametrize("fields, pattern", [
    ({"features": "8"}, "features must be an integer, got '8'"),
    ({"pre_blocks": 1.5}, "pre_blocks must be an integer"),
    ({"anderson_m": True}, "anderson_m must be an integer"),
    ({"norm_eps": -1}, "norm_eps must be > 0"),
    ({"norm_eps": 0.0}, "norm_eps must be > 0"),
    ({"eta": float("nan")}, "eta must be a finite number, got nan"),
    ({"eta": 0}, "eta and norm_eps must be > 0"),
    ({"leaky_slope": float("nan")}, "leaky_slope must be a finite number"),
    ({"rtol": float("inf")}, "rtol must be a finite number"),
    ({"init_kaiming_a": "0.1"}, "init_kaiming_a must be a finite number"),
    # Used to be cut to whole numbers (8, 1, 1) or taken as true in silence.
    ({"iterations": (8.7, 8, 8)}, "iterations must be integers, one per IM-block"),
    ({"iterations": (True, 8, 8)}, "iterations must be integers"),
    ({"iterations": 8.0}, "iterations must be integers"),
    ({"dilations": (1.9, 2, 4)}, "dilations must be integers"),
    ({"best_so_far": "no"}, "best_so_far must be True or False, got 'no'"),
    ({"smoothed_dilation": "False"}, "smoothed_dilation must be True or False"),
])
def test_wrong_types_and_non_finite_values_are_refused(fields, pattern):
  # Each used to pass (NaN fails no `>= 0` test; a negative eps gives NaN norms) or to end
  # in a TypeError from a comparison.
  with pytest.raises(ValueError, match=pattern) as e:
    minet_jax.ModelConfig(**fields)
  assert "\n" not in str(e.value)


def test_stage_fraction_is_one_per_block_and_part_of_the_architecture():
  cfg = minet_jax.ModelConfig(stage_fraction=0.3)
  assert cfg.stage_fraction == (0.3, 0.3, 0.3)
  assert minet_jax.model_config({"stage_fraction": [0.3, 0.5, 1]}).stage_fraction == (0.3, 0.5, 1.0)
  assert minet_jax.ModelConfig().stage_fraction == (1.0, 1.0, 1.0)
  assert not cfg.same_architecture(minet_jax.ModelConfig())
  assert minet_jax.ModelConfig(stage_fraction=np.float32(0.5)).stage_fraction == (0.5,) * 3
  assert minet_jax.ModelConfig(stage_fraction=np.asarray([0.5, 0.25, 1])).stage_fraction == (
      0.5, 0.25, 1.0)
  # Implicit Euler everywhere is the default, and records leave it out (older versions read them).
  assert "stage_fraction" not in minet_jax.ModelConfig(stage_fraction=1).stored()
  assert cfg.architecture()["stage_fraction"] == [0.3, 0.3, 0.3]


def test_stages_are_one_per_block_part_of_the_architecture_and_left_out_at_one():
  cfg = minet_jax.model_config({"stages": [1, 2, 1], "stage_fraction": [0.3, 0.5, 0.7]})
  assert cfg.stages == (1, 2, 1)
  assert minet_jax.ModelConfig(stages=2, stage_fraction=0.5).stages == (2, 2, 2)
  assert minet_jax.ModelConfig(stages=np.int64(1)).stages == (1, 1, 1)
  assert cfg.architecture()["stages"] == [1, 2, 1]
  assert not cfg.same_architecture(dataclasses.replace(cfg, stages=1))
  # One stage everywhere is the default and records leave it out: a record written before
  # the field existed reads as one-stage blocks, and older versions read these records.
  assert "stages" not in minet_jax.ModelConfig(stage_fraction=0.5).stored()
  old_record = minet_jax.ModelConfig(stage_fraction=0.5).stored()
  assert minet_jax.model_config(old_record).stages == (1, 1, 1)
  assert minet_jax.model_config(cfg.stored()) == cfg
  # The same weights in other roles: what init_from may start from.
  assert cfg.same_weights(minet_jax.ModelConfig())
  assert not cfg.same_weights(minet_jax.ModelConfig(dilations=(1, 2, 3)))


def test_contractive_target_is_one_per_block_and_a_solve_setting():
  cfg = minet_jax.ModelConfig(contractive_target=0.85)
  assert cfg.contractive_target == (0.85, 0.85, 0.85)
  mixed = minet_jax.model_config({"contractive_target": [0.85, 0.7, 0.85]})
  assert mixed.contractive_target == (0.85, 0.7, 0.85)
  # A penalty setting: the same weights whatever the targets.
  assert mixed.same_architecture(minet_jax.ModelConfig())
  # One common target is stored as the one number it was before (older versions read
  # it); different ones as a list, and both load back.
  assert cfg.stored()["contractive_target"] == 0.85
  assert mixed.stored()["contractive_target"] == [0.85, 0.7, 0.85]
  for record in (cfg, mixed):
    assert minet_jax.model_config(json.loads(json.dumps(record.stored()))) == record


def test_numpy_scalars_are_numbers():
  cfg = minet_jax.ModelConfig(features=np.int64(8), eta=np.float32(0.5), norm_eps=1e-6,
                              anderson_m=np.int32(3), rtol=np.float32(0.25),
                              iterations=np.int64(4), best_so_far=np.bool_(True))
  assert cfg.features == 8 and cfg.eta == 0.5 and cfg.iterations == (4, 4, 4)
  # Stored as plain Python values: a checkpoint's config.json used to fail on them.
  assert json.loads(json.dumps(cfg.stored())) == cfg.stored()
  assert minet_jax.model_config(cfg.stored()) == cfg


def test_duplicate_dilations_cannot_map_to_the_authors_names():
  from minet_jax.convert.torch_names import torch_name_table
  with pytest.raises(ValueError, match="distinct dilations"):
    torch_name_table(minet_jax.ModelConfig(dilations=(2, 2, 4)))


def test_architecture_and_solve_settings_partition_the_fields():
  from minet_jax.core import config as config_lib
  names = [f.name for f in dataclasses.fields(minet_jax.ModelConfig)]
  assert sorted(names) == sorted(config_lib.ARCHITECTURE_FIELDS + config_lib.SOLVE_FIELDS)
  assert not set(config_lib.ARCHITECTURE_FIELDS) & set(config_lib.SOLVE_FIELDS)
  released = minet_jax.ModelConfig()
  solved = dataclasses.replace(released, solver="anderson", iterations=(30, 30, 30), rtol=1e-4,
                               backward="phantom", contractive_weight=1.0, dtype="bfloat16")
  assert solved.same_architecture(released) and solved.stored() != released.stored()
  for field, value in (("features", 32), ("eta", 0.5), ("dilations", (1, 2, 5)),
                       ("input_format", "rgb01")):
    assert not dataclasses.replace(released, **{field: value}).same_architecture(released)
  assert set(solved.solve_settings()) == set(config_lib.SOLVE_FIELDS) - set(
      config_lib.RUNTIME_FIELDS)


def test_checkpoints_written_before_the_new_solve_fields_still_load(tmp_path, random_params):
  import json
  cfg = minet_jax.ModelConfig(features=4, pre_blocks=0, iterations=(2, 2, 2))
  minet_jax.save(random_params(cfg), tmp_path / "old")
  meta_file = tmp_path / "old" / "minet_config.json"
  meta = json.loads(meta_file.read_text())
  for field in ("best_so_far", "phantom_steps", "phantom_damping", "contractive_kind",
                "contractive_point", "correction_weight"):
    del meta["model"][field]  # fields a checkpoint of the previous release does not have
  meta["format_version"] = 1  # and written as the previous release wrote them
  del meta["model_sha256"]
  meta_file.write_text(json.dumps(meta))
  loaded = minet_jax.load(tmp_path / "old")
  assert loaded.config == cfg


def test_tools_can_override_how_the_blocks_are_solved():
  import argparse
  from minet_jax.core import config as config_lib
  parser = argparse.ArgumentParser()
  config_lib.add_speed_arguments(parser)
  args = parser.parse_args(["--solver", "anderson", "--rtol", "1e-4", "--max-steps", "40"])
  changes = config_lib.speed_changes(args)
  assert changes == {"solver": "anderson", "rtol": 1e-4, "iterations": 40}
  cfg = dataclasses.replace(minet_jax.ModelConfig(), **changes)
  assert cfg.iterations == (40, 40, 40) and cfg.solver == "anderson"
  assert config_lib.speed_changes(parser.parse_args([])) == {}
  with pytest.raises(SystemExit):
    parser.parse_args(["--solver", "newton"])


def test_config_files_load_by_path_from_outside_the_checkout(tmp_path):
  copy = tmp_path / "elsewhere" / "configs"
  shutil.copytree(REPO / "configs", copy, ignore=shutil.ignore_patterns("__pycache__"))
  path_before, modules_before = list(sys.path), set(sys.modules)
  loaded = {p.name: config_file.load_module(p).get_config() for p in sorted(copy.glob("*.py"))
            if p.name != "__init__.py"}
  assert sys.path == path_before
  assert not {m for m in set(sys.modules) - modules_before if "config" in m}
  assert set(loaded) >= {"default.py", "its.py", "its_authors.py", "quickstart.py",
                         "stable.py", "stable_fullres.py", "stable_block3.py", "tiny.py",
                         "paper_text.py"}
  for name, config in loaded.items():
    here = config_file.load_module(REPO / "configs" / name).get_config()
    if config.init_from_config:  # The first run's config file: the one beside it.
      assert pathlib.Path(config.init_from_config).parent == copy
      config.init_from_config = here.init_from_config
    assert config.to_json_best_effort() == here.to_json_best_effort(), name
  assert loaded["default.py"].to_json_best_effort() == defaults.get_config().to_json_best_effort()
  # A config built on another reads the one beside it, not the checkout's.
  its = copy / "its.py"
  its.write_text(its.read_text().replace('"~/data/RESIDE"', '"/data/elsewhere"'))
  authors = config_file.load_module(copy / "its_authors.py").get_config()
  assert authors.data.manual_dir == "/data/elsewhere" and authors.loss == "l2"
  with pytest.raises(FileNotFoundError, match="no config file"):
    config_file.load_module(copy / "nope.py")


def test_train_reads_a_config_file_outside_the_checkout(tmp_path):
  copy = tmp_path / "configs"
  shutil.copytree(REPO / "configs", copy, ignore=shutil.ignore_patterns("__pycache__"))
  result = subprocess.run(
      [sys.executable, str(REPO / "train.py"), "--config", "configs/tiny.py", "--workdir",
       str(tmp_path / "w"), "--config.bogus=1"],
      capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert result.returncode == 2  # A usage error.
  assert "unknown config field" in result.stderr, result.stderr  # Loaded, then refused.
  assert not (tmp_path / "w").exists()
