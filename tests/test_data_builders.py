"""TFDS builders: array_record output read back without TensorFlow."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from minet_jax.data import builders
from minet_jax.data import folders
from minet_jax.data import synthetic

TINY = synthetic.SyntheticHazeConfig(image_size=(20, 28), train_rooms=2, validation_rooms=1,
                                     motorcycle_views=1, hazes_per_scene=2, seed=5)
REPO = pathlib.Path(__file__).resolve().parent.parent


def test_synthetic_round_trip(tmp_path):
  expected = {split: {ex["key"]: ex for ex in synthetic.generate(split, TINY)}
              for split in synthetic.SPLITS}
  for split in synthetic.SPLITS:
    source = builders.load_source("synthetic_haze", split, tmp_path, synthetic_config=TINY)
    assert len(source) == TINY.num_examples(split)
    seen = set()
    for i in range(len(source)):
      ex = source[i]
      ref = expected[split][ex["key"]]
      for field in ("hazy", "clear", "depth"):
        assert ex[field].dtype == ref[field].dtype
        np.testing.assert_array_equal(ex[field], ref[field])
      assert ex["scene"] == ref["scene"] and isinstance(ex["scene"], str)
      assert (ex["beta"], ex["airlight"], ex["index"]) == (ref["beta"], ref["airlight"],
                                                           ref["index"])
      seen.add(ex["key"])
    assert seen == set(expected[split])
  # A custom config gets its own folder; the default one is not touched.
  assert (tmp_path / "synthetic_haze" / builders.synthetic_builder_config(TINY).name).is_dir()
  assert not (tmp_path / "synthetic_haze" / "default").exists()
  # Already built: no manual folder or rebuild needed, and slicing works.
  again = builders.load_source("synthetic_haze", "train[:3]", tmp_path, synthetic_config=TINY,
                               build_if_missing=False)
  assert len(again) == 3


def test_synthetic_set_names_are_stable():
  """A built set is found again by its name: a new field that is off must not rename
  the sets built before it (configs/stable.py's larger set is 85d84d5209)."""
  larger = synthetic.SyntheticHazeConfig(image_size=(288, 384), train_rooms=200,
                                         hazes_per_scene=2)
  assert builders.synthetic_builder_config().name == "default"
  assert builders.synthetic_builder_config(larger).name == "custom_85d84d5209"
  exposed = synthetic.SyntheticHazeConfig(**{**larger.__dict__, "exposure_range": (1.0, 2.5)})
  assert builders.synthetic_builder_config(exposed).name == "custom_215383dd16"


def test_builds_and_reads_with_tensorflow_blocked(tmp_path):
  # The path finder is swapped for one that cannot see TensorFlow, as if it were not
  # installed (a None entry in sys.modules would not do: TFDS takes any entry to mean
  # TF is loaded).
  script = textwrap.dedent(f"""
      import importlib.machinery
      import sys

      class PathFinderWithoutTF(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
          if name.split(".")[0] == "tensorflow":
            return None
          return importlib.machinery.PathFinder.find_spec(name, path, target)

      sys.meta_path = [PathFinderWithoutTF if f is importlib.machinery.PathFinder else f
                       for f in sys.meta_path]
      try:
        import tensorflow
        raise SystemExit("tensorflow importable")
      except ImportError:
        pass
      from minet_jax.data import builders, synthetic
      cfg = synthetic.SyntheticHazeConfig(image_size=(16, 16), train_rooms=1,
                                          validation_rooms=1, motorcycle_views=0,
                                          hazes_per_scene=1)
      src = builders.load_source("synthetic_haze", "validation", {str(tmp_path)!r},
                                 synthetic_config=cfg)
      ex = src[0]
      assert ex["hazy"].shape == (16, 16, 3), ex["hazy"].shape
      import tensorflow_datasets as tfds
      ds = tfds.data_source("synthetic_haze/" + builders.synthetic_builder_config(cfg).name,
                            data_dir={str(tmp_path)!r}, split="train")
      assert len(ds) == 1
      assert "tensorflow" not in sys.modules
      print("OK")
      """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_reside_sample(shared_dir, tmp_path):
  reside = shared_dir / "data" / "RESIDE"
  for name, split, records in (
      ("reside_sots/indoor", "test", folders.find_sots_pairs(reside, "indoor")),
      ("reside_its", "train", folders.find_its_pairs(reside))):
    source = builders.load_source(name, split, tmp_path, manual_dir=reside)
    assert len(source) == len(records)
    by_key = {r.key: r for r in records}
    for i in range(len(source)):
      ex = source[i]
      record = by_key[ex["key"]]
      hazy, clear = folders.load_pair(record)  # Pillow read + centre crop
      np.testing.assert_array_equal(ex["hazy"], hazy)
      np.testing.assert_array_equal(ex["clear"], clear)
      assert ex["hazy"].shape == (460, 620, 3) and ex["scene"] == record.scene
      assert ex["index"] == record.index
      if name == "reside_its":
        assert ex["airlight"] == np.float32(record.airlight)
      else:
        assert np.isnan(ex["airlight"]) and np.isnan(ex["beta"])
  # The 640x480 ground truth of 1400 is stored cropped by 10 px on each side.
  full = np.asarray(Image.open(reside / "SOTS" / "indoor" / "gt" / "1400.png").convert("RGB"))
  source = builders.load_source("reside_sots/indoor", "test", tmp_path)
  ex = next(source[i] for i in range(len(source)) if source[i]["scene"] == "1400")
  np.testing.assert_array_equal(ex["clear"], full[10:470, 10:630])
  # The same files through another of the folders DATA.md allows are the same build
  # (it was refused as "built from another folder").
  info = next((tmp_path / "reside_sots" / "indoor").glob("*/dataset_info.json"))
  built = info.stat().st_mtime_ns
  for folder in (reside / "SOTS", reside / "SOTS" / "indoor"):
    assert len(builders.load_source("reside_sots/indoor", "test", tmp_path,
                                    manual_dir=folder)) == 10
  assert info.stat().st_mtime_ns == built


def _pairs_folder(root: pathlib.Path, n: int = 3) -> pathlib.Path:
  rng = np.random.default_rng(0)
  for i in range(n):
    for sub, tag in (("hazy", "hazy"), ("GT", "GT")):
      (root / sub).mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)).save(
          root / sub / f"{i:02d}_outdoor_{tag}.png")
  return root


def test_paired_folder(tmp_path):
  manual = _pairs_folder(tmp_path / "My O-HAZE", n=10)
  source = builders.load_source("paired_folder", "train", tmp_path / "data", manual_dir=manual)
  assert len(source) == 10
  # In file order, so a slice is the published division (O-HAZE: 1-40 / 41-45).
  assert [source[i]["key"] for i in range(10)] == [f"{i:02d}_outdoor_hazy" for i in range(10)]
  assert (tmp_path / "data" / "paired_folder" / "my_o_haze").is_dir()
  records = {r.key: r for r in folders.find_paired_folder(manual)}
  for i in range(10):
    ex = source[i]
    hazy, clear = folders.load_pair(records[ex["key"]])
    np.testing.assert_array_equal(ex["hazy"], hazy)
    np.testing.assert_array_equal(ex["clear"], clear)
    assert ex["index"] == -1
  named = builders.load_source("paired_folder/my_o_haze", "train[8:]", tmp_path / "data",
                               build_if_missing=False)
  assert [named[i]["key"] for i in range(2)] == ["08_outdoor_hazy", "09_outdoor_hazy"]
  # A build of an earlier version (shuffled) alone: without the source folder it is not
  # "not built", it is too old; with it, it is built again.
  built = tmp_path / "data" / "paired_folder" / "my_o_haze"
  (version,) = [p for p in built.iterdir() if p.is_dir()]
  version.rename(built / "1.0.0")
  with pytest.raises(folders.DatasetLayoutError, match=r"built by an earlier version \(1.0.0\); "
                                                       r"this one is 1.1.0 .*manual_dir"):
    builders.load_source("paired_folder/my_o_haze", "train", tmp_path / "data")
  rebuilt = builders.load_source("paired_folder/my_o_haze", "train", tmp_path / "data",
                                 manual_dir=manual)
  assert len(rebuilt) == 10 and (built / "1.1.0" / "dataset_info.json").is_file()


def test_errors(tmp_path):
  with pytest.raises(folders.DatasetLayoutError) as e:
    builders.load_source("reside_its", "train", tmp_path)  # no manual_dir
  assert folders.RESIDE_URL in str(e.value) and "clear/<scene>.png" in str(e.value)
  for name, named in [("paired_folder/other", "paired_folder/other"),
                      ("reside_sots", "reside_sots/indoor")]:  # The whole name, as built.
    with pytest.raises(folders.DatasetLayoutError, match=f"^{named} is not built yet") as e:
      builders.load_source(name, "train", tmp_path)
    # The command that builds it, into the data_dir given.
    assert (f"`python -m minet_jax.data.builders {named} --manual_dir FOLDER --data_dir "
            f"{tmp_path}`") in str(e.value)
  with pytest.raises(folders.DatasetLayoutError) as e:
    builders.load_source("reside_sots/outdoor", "test", tmp_path, manual_dir=tmp_path / "nope")
  assert "not found" in str(e.value) and folders.RESIDE_URL in str(e.value)
  broken = _pairs_folder(tmp_path / "broken")
  (broken / "GT" / "01_outdoor_GT.png").unlink()
  with pytest.raises(folders.DatasetLayoutError, match="01_outdoor_hazy.png"):
    builders.load_source("paired_folder", "train", tmp_path, manual_dir=broken)
  with pytest.raises(ValueError, match="unknown dataset"):
    builders.load_source("reside", "train", tmp_path)
  # A link to nothing among the pairs fails the build by name (it used to be left out).
  linked = _pairs_folder(tmp_path / "linked")
  gone = linked / "hazy" / "01_outdoor_hazy.png"
  gone.unlink()
  gone.symlink_to(tmp_path / "moved.png")
  with pytest.raises(folders.DatasetLayoutError,
                     match=f"cannot read {gone} \\(a link to nothing\\)"):
    builders.load_source("paired_folder/linked", "train", tmp_path / "built", manual_dir=linked)
  # The command names an OS error in one line (a data_dir that is a file), exit 1.
  (tmp_path / "a_file").write_text("")
  with pytest.raises(SystemExit) as exit_info:
    builders.main(["paired_folder/linked", "--data_dir", str(tmp_path / "a_file"),
                   "--manual_dir", str(_pairs_folder(tmp_path / "fine"))])
  assert exit_info.value.code == 1
  with pytest.raises(ValueError, match="indoor' or 'outdoor"):
    builders.get_builder("reside_sots/attic", tmp_path)
  with pytest.raises(FileNotFoundError, match="not built"):
    builders.load_source("synthetic_haze", "train", tmp_path / "empty", build_if_missing=False)
  source_dir = _pairs_folder(tmp_path / "ok")
  with pytest.raises(ValueError, match="no split 'test'"):
    builders.load_source("paired_folder", "test", tmp_path, manual_dir=source_dir)
  with pytest.raises(ValueError, match=r"split 'train\[:0\]' of paired_folder selects no"):
    builders.load_source("paired_folder", "train[:0]", tmp_path, manual_dir=source_dir)


def test_a_build_says_what_where_and_how_long_and_nothing_else(tmp_path):
  """TFDS's own reports (stdout lines, absl warnings, nested progress bars that leave blank
  lines) are replaced by two lines; a second call builds nothing and says nothing."""
  script = textwrap.dedent(f"""
      from minet_jax.data import builders, synthetic
      tiny = synthetic.{TINY!r}
      for _ in range(2):
        builders.build("synthetic_haze", {str(tmp_path)!r}, synthetic_config=tiny)
      """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout == ""
  lines = result.stderr.splitlines()
  assert len(lines) == 2, result.stderr
  assert lines[0].startswith(f"building dataset synthetic_haze into {tmp_path}/synthetic_haze/")
  assert "$TFDS_DATA_DIR" in lines[0]
  counts = ", ".join(f"{TINY.num_examples(s)} {s}" for s in synthetic.SPLITS)
  assert re.fullmatch(rf"built synthetic_haze in \d+ s: {counts} pairs", lines[1]), lines[1]
def test_a_build_follows_its_folder(tmp_path, caplog):
  # The build used to be keyed on the folder's name alone: files added later, another
  # folder of the same name, or a folder that no longer exists all reused it silently.
  data = tmp_path / "data"
  first = _pairs_folder(tmp_path / "one" / "O-HAZE", n=2)
  assert len(builders.load_source("paired_folder", "train", data, manual_dir=first)) == 2
  _pairs_folder(first, n=3)  # One more pair (the two others rewritten as they were).
  with caplog.at_level("WARNING"):
    source = builders.load_source("paired_folder", "train", data, manual_dir=first)
  assert len(source) == 3 and "rebuilding it" in caplog.text
  # Nothing changed: the build is used as it is.
  built = next((data / "paired_folder" / "o_haze").glob("*/dataset_info.json")).stat().st_mtime_ns
  assert len(builders.load_source("paired_folder", "train", data, manual_dir=first)) == 3
  assert next((data / "paired_folder" / "o_haze").glob("*/dataset_info.json")
              ).stat().st_mtime_ns == built
  second = _pairs_folder(tmp_path / "two" / "O-HAZE", n=1)
  with pytest.raises(builders.StaleBuildError, match=f"built from {first.resolve()}"):
    builders.load_source("paired_folder", "train", data, manual_dir=second)
  with pytest.raises(folders.DatasetLayoutError, match="not found"):
    builders.load_source("paired_folder/o_haze", "train", data, manual_dir=tmp_path / "gone")
  # A built dataset opened by name alone is used as it is.
  assert len(builders.load_source("paired_folder/o_haze", "train", data)) == 3
  (first / "hazy" / "02_outdoor_hazy.png").unlink()
  (first / "GT" / "02_outdoor_GT.png").unlink()
  with pytest.raises(builders.StaleBuildError, match="is stale"):
    builders.load_source("paired_folder", "train", data, manual_dir=first,
                         build_if_missing=False)


def test_a_failed_rebuild_keeps_the_build_it_replaces(tmp_path):
  """A stale build was deleted before its rebuild read the new files: one bad new pair
  cost the whole good build (for ITS, hours)."""
  data = tmp_path / "data"
  folder = _pairs_folder(tmp_path / "O-HAZE", n=2)
  assert len(builders.load_source("paired_folder", "train", data, manual_dir=folder)) == 2
  before = sorted(p.relative_to(data) for p in data.rglob("*"))
  Image.fromarray(np.zeros((6, 9, 3), np.uint8)).save(folder / "hazy" / "02_outdoor_hazy.png")
  Image.fromarray(np.zeros((16, 9, 3), np.uint8)).save(folder / "GT" / "02_outdoor_GT.png")
  with pytest.raises(folders.DatasetLayoutError, match="do not align"):
    builders.load_source("paired_folder", "train", data, manual_dir=folder)
  assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
  assert len(builders.load_source("paired_folder/o_haze", "train", data)) == 2


def test_bad_pairs_fail_the_build_naming_the_file(tmp_path):
  broken = _pairs_folder(tmp_path / "broken", n=2)
  path = broken / "hazy" / "01_outdoor_hazy.png"
  path.write_bytes(path.read_bytes()[:60])  # A header, and half the pixels.
  with pytest.raises(folders.DatasetLayoutError, match=f"cannot read image {path}"):
    builders.load_source("paired_folder", "train", tmp_path / "data", manual_dir=broken)
  misaligned = _pairs_folder(tmp_path / "misaligned", n=1)
  Image.fromarray(np.zeros((16, 9, 3), np.uint8)).save(misaligned / "GT" / "00_outdoor_GT.png")
  with pytest.raises(folders.DatasetLayoutError, match="00_outdoor_hazy.png .6x9. and its "
                                                       "ground truth .*16x9. do not align"):
    builders.load_source("paired_folder", "train", tmp_path / "data", manual_dir=misaligned)
