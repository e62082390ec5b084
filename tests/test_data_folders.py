"""Pair discovery in RESIDE SOTS / ITS and generic paired folders."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from PIL import Image

from minet_jax.data import folders
from minet_jax.data.folders import DatasetLayoutError
from minet_jax.image_io import ImageReadError, read_rgb


def _write(path: pathlib.Path, image: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path)


def _random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def sots_dir(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "RESIDE" / "SOTS" / "indoor"
  # Scene 7 has a GT with SOTS's 10 px border (like the 640x480 release), scene 8 does not.
  _write(root / "gt" / "7.png", _random_image(rng, 28, 30))
  _write(root / "gt" / "8.png", _random_image(rng, 8, 10))
  for name in ("7_1", "7_2", "7_10", "8_9"):
    _write(root / "hazy" / f"{name}.png", _random_image(rng, 8, 10))
  return tmp_path / "RESIDE"


def test_sots_fixture_pairs_and_crop(sots_dir):
  records = folders.find_sots_pairs(sots_dir, "indoor")
  assert [r.key for r in records] == ["7_1", "7_2", "7_10", "8_9"]  # natural order
  assert [r.scene for r in records] == ["7", "7", "7", "8"]
  assert [r.index for r in records] == [1, 2, 10, 9]
  assert all(r.clear.name == f"{r.scene}.png" for r in records)
  # Same records whether pointed at the RESIDE root, SOTS/ or SOTS/indoor.
  assert folders.find_sots_pairs(sots_dir / "SOTS", "indoor") == records
  assert folders.find_sots_pairs(sots_dir / "SOTS" / "indoor") == records
  assert folders.find_pairs(sots_dir / "SOTS" / "indoor") == records
  hazy, clear = folders.load_pair(records[0])
  full = np.asarray(Image.open(records[0].clear))
  assert hazy.shape == clear.shape == (8, 10, 3) and clear.dtype == np.uint8
  np.testing.assert_array_equal(clear, full[10:18, 10:20])
  np.testing.assert_array_equal(folders.load_pair(records[3])[1],
                                np.asarray(Image.open(records[3].clear)))


def test_sots_outdoor_names(tmp_path):
  rng = np.random.default_rng(1)
  _write(tmp_path / "gt" / "0001.png", _random_image(rng, 6, 6))
  _write(tmp_path / "hazy" / "0001_0.8_0.2.jpg", _random_image(rng, 6, 6))
  (record,) = folders.find_sots_pairs(tmp_path)
  assert (record.scene, record.airlight, record.beta, record.index) == ("0001", 0.8, 0.2, None)


def test_one_sots_subset_is_not_taken_for_the_other(tmp_path, sots_dir):
  """Given the indoor folder as the outdoor subset (or the other way), the pairs were
  built and scored under the wrong name, silently."""
  indoor = sots_dir / "SOTS" / "indoor"
  assert len(folders.find_sots_pairs(indoor, "indoor")) == 4
  with pytest.raises(folders.DatasetLayoutError, match="named as a SOTS indoor image "
                                                        ".*is this the outdoor folder"):
    folders.find_sots_pairs(indoor, "outdoor")
  rng = np.random.default_rng(1)
  _write(tmp_path / "out" / "gt" / "0001.png", _random_image(rng, 6, 6))
  _write(tmp_path / "out" / "hazy" / "0001_0.8_0.2.jpg", _random_image(rng, 6, 6))
  assert len(folders.find_sots_pairs(tmp_path / "out", "outdoor")) == 1
  with pytest.raises(folders.DatasetLayoutError, match="is this the indoor folder"):
    folders.find_sots_pairs(tmp_path / "out", "indoor")
  with pytest.raises(ValueError, match="subset must be one of"):
    folders.find_sots_pairs(indoor, "Indoor")


def test_its_fixture(tmp_path):
  rng = np.random.default_rng(2)
  _write(tmp_path / "ITS" / "clear" / "3.png", _random_image(rng, 6, 8))
  _write(tmp_path / "ITS" / "hazy" / "3_2_0.81.png", _random_image(rng, 6, 8))
  _write(tmp_path / "ITS" / "hazy" / "3_1_0.93.png", _random_image(rng, 6, 8))
  records = folders.find_its_pairs(tmp_path)
  assert [(r.key, r.index, r.airlight) for r in records] == [("3_1_0.93", 1, 0.93),
                                                            ("3_2_0.81", 2, 0.81)]
  assert folders.find_pairs(tmp_path / "ITS") == records


def test_generic_paired_folder(tmp_path):
  rng = np.random.default_rng(3)
  for i in ("01", "02"):
    _write(tmp_path / "o" / "hazy" / f"{i}_outdoor_hazy.jpg", _random_image(rng, 5, 5))
    _write(tmp_path / "o" / "GT" / f"{i}_outdoor_GT.jpg", _random_image(rng, 5, 5))
  records = folders.find_paired_folder(tmp_path / "o")
  assert [(r.scene, r.clear.name) for r in records] == [("01", "01_outdoor_GT.jpg"),
                                                        ("02", "02_outdoor_GT.jpg")]
  # Identical stems win over scene ids.
  _write(tmp_path / "s" / "hazy" / "a_b.png", _random_image(rng, 5, 5))
  _write(tmp_path / "s" / "clear" / "a_b.png", _random_image(rng, 5, 5))
  _write(tmp_path / "s" / "clear" / "a_c.png", _random_image(rng, 5, 5))
  (record,) = folders.find_paired_folder(tmp_path / "s")
  assert record.clear.name == "a_b.png"
  # A ground truth named the scene id serves each of its hazy images.
  for name in ("1400_1.png", "1400_2.png"):
    _write(tmp_path / "id" / "hazy" / name, _random_image(rng, 5, 5))
  _write(tmp_path / "id" / "gt" / "1400.png", _random_image(rng, 5, 5))
  assert [r.clear.name for r in folders.find_paired_folder(tmp_path / "id")] == ["1400.png"] * 2
  # Ground truths named the scene with more after it, or less (D-HAZY, Middlebury, ITS-like).
  for hazy, gt in [("0001_0.8_0.2.png", "0001_GT.png"), ("1_Hazy.png", "1_Image_.png"),
                   ("Adirondack_Hazy.png", "Adirondack_im0.png")]:
    _write(tmp_path / hazy / "hazy" / hazy, _random_image(rng, 5, 5))
    _write(tmp_path / hazy / "gt" / gt, _random_image(rng, 5, 5))
    assert [r.clear.name for r in folders.find_paired_folder(tmp_path / hazy)] == [gt]
  # Two datasets in one folder: the equal name wins (01_hazy is 01_GT's, not 01_outdoor_GT's).
  for sub, name in [("hazy", "01_outdoor_hazy.jpg"), ("hazy", "01_hazy.png"),
                    ("GT", "01_outdoor_GT.jpg"), ("GT", "01_GT.png")]:
    _write(tmp_path / "mixed" / sub / name, _random_image(rng, 5, 5))
  assert sorted((r.hazy.name, r.clear.name) for r in folders.find_paired_folder(
      tmp_path / "mixed")) == [("01_hazy.png", "01_GT.png"),
                               ("01_outdoor_hazy.jpg", "01_outdoor_GT.jpg")]
  # Another photograph of the same id prefix is no match: a missing ground truth stays missing.
  for sub, name in [("hazy", "IMG_0001.jpg"), ("hazy", "IMG_0002.jpg"), ("gt", "IMG_0001.jpg")]:
    _write(tmp_path / "cam" / sub / name, _random_image(rng, 5, 5))
  with pytest.raises(DatasetLayoutError, match="have no ground truth.*IMG_0002.jpg"):
    folders.find_paired_folder(tmp_path / "cam")
  # Flat NH-HAZE style.
  _write(tmp_path / "nh" / "03_hazy.png", _random_image(rng, 5, 5))
  _write(tmp_path / "nh" / "03_GT.png", _random_image(rng, 5, 5))
  (record,) = folders.find_pairs(tmp_path / "nh")
  assert (record.scene, record.clear.name) == ("03", "03_GT.png")
  # Two ground truths of one id: refused, as in the hazy/ + gt/ layout, not one picked.
  _write(tmp_path / "nh" / "03_GT.jpg", _random_image(rng, 5, 5))
  with pytest.raises(DatasetLayoutError, match="two ground truths for id '03': 03_GT.jpg and "
                                               "03_GT.png; keep one"):
    folders.find_pairs(tmp_path / "nh")


def _assert_layout_error(excinfo, *needles):
  message = str(excinfo.value)
  assert "Expected layout:" in message
  for needle in needles:
    assert needle in message, message


def test_missing_and_malformed_folders(tmp_path, sots_dir):
  with pytest.raises(DatasetLayoutError) as e:
    folders.find_sots_pairs(tmp_path / "nowhere", "indoor")
  _assert_layout_error(e, "not found", folders.RESIDE_URL, "gt/<scene>.png")
  with pytest.raises(DatasetLayoutError) as e:
    folders.find_its_pairs(sots_dir)  # a RESIDE root with SOTS but no ITS
  _assert_layout_error(e, "no hazy/ folder", folders.RESIDE_URL, "clear/<scene>.png")
  # Two ground truths of one scene: refused, not one of them picked.
  _write(sots_dir / "SOTS" / "indoor" / "gt" / "7_copy.png", np.zeros((8, 10, 3), np.uint8))
  with pytest.raises(DatasetLayoutError) as e:
    folders.find_sots_pairs(sots_dir, "indoor")
  _assert_layout_error(e, "two ground truths for scene '7': 7.png and 7_copy.png; keep one")
  (sots_dir / "SOTS" / "indoor" / "gt" / "7_copy.png").unlink()
  (sots_dir / "SOTS" / "indoor" / "gt" / "8.png").unlink()
  with pytest.raises(DatasetLayoutError) as e:
    folders.find_sots_pairs(sots_dir, "indoor")
  _assert_layout_error(e, "8_9.png", "no ground truth")
  bad = tmp_path / "its_bad"
  _write(bad / "clear" / "1.png", np.zeros((4, 4, 3), np.uint8))
  _write(bad / "hazy" / "1_x.png", np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(DatasetLayoutError) as e:
    folders.find_its_pairs(bad)
  _assert_layout_error(e, "1_x.png", "<scene>_<k>_<A>")
  nogt = tmp_path / "nogt"
  _write(nogt / "hazy" / "1_1.png", np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(DatasetLayoutError) as e:
    folders.find_paired_folder(nogt)
  _assert_layout_error(e, "no gt/")
  small = tmp_path / "small"
  _write(small / "hazy" / "1_1.png", np.zeros((6, 6, 3), np.uint8))
  _write(small / "gt" / "1.png", np.zeros((4, 6, 3), np.uint8))
  with pytest.raises(DatasetLayoutError, match="do not align"):
    folders.load_pair(folders.find_sots_pairs(small)[0])
  with pytest.raises(ValueError, match="unknown layout"):
    folders.find_pairs(small, layout="nope")


def _edges(image: np.ndarray) -> np.ndarray:
  grey = image.astype(np.float64).mean(-1)
  gy, gx = np.gradient(grey)
  return np.hypot(gx, gy)


def test_reside_sample(shared_dir):
  reside = shared_dir / "data" / "RESIDE"
  sots = folders.find_sots_pairs(reside, "indoor")
  assert len(sots) == 10 and sorted({r.scene for r in sots}) == [str(s) for s in range(1400, 1406)]
  assert [r.key for r in sots if r.scene == "1400"] == ["1400_1", "1400_2", "1400_3", "1400_9"]
  for record in sots:
    hazy, clear = folders.load_pair(record)
    assert hazy.shape == clear.shape == (460, 620, 3)
  # The centre crop of a 640x480 GT aligns with its hazy image: the edge maps
  # correlate best at the centre offset (10, 10) among nearby offsets.
  record = sots[0]
  hazy = read_rgb(record.hazy, dtype=np.uint8)
  full = read_rgb(record.clear, dtype=np.uint8)
  assert full.shape == (480, 640, 3)
  target = _edges(hazy).ravel()
  scores = {}
  for dy in range(7, 14):
    for dx in range(7, 14):
      scores[dy, dx] = np.corrcoef(target, _edges(full[dy:dy + 460, dx:dx + 620]).ravel())[0, 1]
  assert max(scores, key=scores.get) == (10, 10)

  its = folders.find_its_pairs(reside)
  assert [r.key for r in its] == ["1_1_0.90179", "1_2_0.97842", "2_1_0.99082", "2_2_0.76381"]
  # The number in an ITS name is the atmospheric light: with the right A the
  # transmission (I - A) / (J - A) is the same in all three channels.
  for record in its:
    hazy, clear = (x.astype(np.float64)[::4, ::4] / 255 for x in folders.load_pair(record))
    spread = {}
    for a in np.round(np.arange(0.6, 1.1, 0.01), 2):
      keep = np.all(np.abs(clear - a) > 0.15, axis=-1)
      t = (hazy[keep] - a) / (clear[keep] - a)
      spread[a] = t.std(axis=-1).mean()
    assert abs(min(spread, key=spread.get) - record.airlight) <= 0.015


@pytest.mark.parametrize("gt_hw, crop", [((8, 10), False), ((28, 30), True), ((12, 14), None),
                                         ((80, 16), None), ((28, 10), None)])
def test_only_the_sots_border_is_cropped(tmp_path, gt_hw, crop):
  # A centre crop of any other larger ground truth (another aspect, another border)
  # pairs pixels that do not correspond: it used to be taken silently.
  rng = np.random.default_rng(2)
  gt = _random_image(rng, *gt_hw)
  _write(tmp_path / "gt" / "5.png", gt)
  _write(tmp_path / "hazy" / "5_1.png", _random_image(rng, 8, 10))
  (record,) = folders.find_sots_pairs(tmp_path)
  if crop is None:
    with pytest.raises(DatasetLayoutError) as e:
      folders.load_pair(record)
    message = str(e.value)
    assert str(record.hazy) in message and str(record.clear) in message
    assert f"({gt_hw[0]}x{gt_hw[1]}) do not align" in message and "28x30" in message
    assert "\n" not in message
  else:
    hazy, clear = folders.load_pair(record)
    np.testing.assert_array_equal(clear, gt[10:18, 10:20] if crop else gt)


def test_two_files_of_one_name_are_refused(tmp_path):
  # 01.png and 01.jpg used to reach the dataset build as two examples of one key.
  rng = np.random.default_rng(3)
  for sub in ("hazy", "gt"):
    _write(tmp_path / "twice" / sub / "01.png", _random_image(rng, 6, 6))
  _write(tmp_path / "twice" / "hazy" / "01.jpg", _random_image(rng, 6, 6))
  with pytest.raises(DatasetLayoutError, match="two hazy images are both named '01': "
                                               "01.jpg and 01.png"):
    folders.find_paired_folder(tmp_path / "twice")
  (tmp_path / "twice" / "hazy" / "01.jpg").unlink()
  _write(tmp_path / "twice" / "gt" / "01.jpg", _random_image(rng, 6, 6))
  with pytest.raises(DatasetLayoutError, match="two ground truths are both named '01'"):
    folders.find_paired_folder(tmp_path / "twice")


def test_unreadable_images_name_the_file(tmp_path):
  rng = np.random.default_rng(4)
  for sub in ("hazy", "gt"):
    _write(tmp_path / sub / "01.png", _random_image(rng, 6, 6))
  data = (tmp_path / "gt" / "01.png").read_bytes()
  (tmp_path / "gt" / "01.png").write_bytes(data[:len(data) // 2])
  (record,) = folders.find_paired_folder(tmp_path)
  with pytest.raises(ImageReadError, match=f"cannot read image {tmp_path / 'gt' / '01.png'}"):
    folders.load_pair(record)
  # A link to nothing is a pair that fails to read, not a pair left out in silence.
  _write(tmp_path / "gt" / "02.png", _random_image(rng, 6, 6))
  (tmp_path / "hazy" / "02.png").symlink_to(tmp_path / "gone.png")
  records = folders.find_paired_folder(tmp_path)
  assert [r.key for r in records] == ["01", "02"]
  with pytest.raises(ImageReadError, match=f"cannot read image {tmp_path / 'hazy' / '02.png'}"):
    folders.load_pair(records[1])


def test_a_file_given_as_the_folder_is_named(tmp_path):
  (tmp_path / "pairs.zip").write_bytes(b"PK")
  with pytest.raises(DatasetLayoutError, match="pairs.zip is not a folder"):
    folders.find_paired_folder(tmp_path / "pairs.zip")
