"""Discovery of hazy/clear image pairs on disk.

Three layouts are understood:

* RESIDE SOTS (``hazy/<scene>_<k>.png`` -> ``gt/<scene>.png`` indoors,
  ``hazy/<scene>_<A>_<beta>.jpg`` -> ``gt/<scene>.png`` outdoors). The original
  indoor release ships 640x480 ground truths with a 10 px border around the
  620x460 hazy images; `load_pair` centre-crops a larger ground truth to the
  hazy size.
* RESIDE ITS (``hazy/<scene>_<k>_<A>.png`` -> ``clear/<scene>.png``). The last
  number in an ITS file name is the atmospheric light A of that rendering (it
  lies in RESIDE's A range [0.7, 1.0], and fitting I = J*t + A*(1 - t) to the
  pixels of a pair recovers it to 0.01), not the scattering coefficient beta.
* Generic paired folders (O-HAZE, Dense-HAZE, NH-HAZE and the like): ``hazy/``
  beside ``gt/``, ``GT/``, ``clear/`` or ``clean/``, matched by identical stems
  or by the scene id (the stem before the first ``_``), so ``01_outdoor_hazy``
  pairs with ``01_outdoor_GT``. A single folder holding ``<id>_hazy`` and
  ``<id>_GT`` files (NH-HAZE as released) works too.

Every finder returns a sorted list of `PairRecord`; a missing or malformed
folder raises `DatasetLayoutError` with the expected tree and the download page.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Sequence

import numpy as np

from minet_jax.image_io import IMAGE_SUFFIXES, centre_crop, read_rgb

RESIDE_URL = "https://sites.google.com/view/reside-dehaze-datasets"
HAZY_DIRS = ("hazy", "Hazy", "HAZY")
CLEAR_DIRS = ("gt", "GT", "clear", "clean", "Clear", "Clean")

SOTS_TREE = """\
SOTS/
  indoor/
    hazy/<scene>_<k>.png          e.g. 1400_1.png ... 1400_10.png
    gt/<scene>.png                e.g. 1400.png (640x480 or 620x460)
  outdoor/
    hazy/<scene>_<A>_<beta>.jpg   e.g. 0001_0.8_0.2.jpg
    gt/<scene>.png                e.g. 0001.png"""

ITS_TREE = """\
ITS/
  hazy/<scene>_<k>_<A>.png        e.g. 1_1_0.90179.png
  clear/<scene>.png               e.g. 1.png"""

PAIRED_TREE = """\
<root>/
  hazy/<id>[_anything].<ext>      e.g. 01_outdoor_hazy.jpg
  gt/<id>[_anything].<ext>        e.g. 01_outdoor_GT.jpg   (or GT/, clear/, clean/)
or, flat (NH-HAZE style):
<root>/<id>_hazy.<ext> and <root>/<id>_GT.<ext>"""


class DatasetLayoutError(ValueError):
  """A dataset folder is missing or does not follow the expected layout."""


@dataclasses.dataclass(frozen=True)
class PairRecord:
  """One hazy image and the clear image it was made from.

  Attributes:
    hazy: path of the hazy image.
    clear: path of the haze-free ground truth (may be shared by several records).
    scene: scene id; records of one scene share a ground truth.
    key: unique name of the record within its dataset (the hazy file's stem).
    index: which rendering of the scene (SOTS indoor / ITS ``k``), if named.
    airlight: atmospheric light A from the file name (ITS, SOTS/OTS outdoor).
    beta: scattering coefficient from the file name (SOTS/OTS outdoor).
  """
  hazy: pathlib.Path
  clear: pathlib.Path
  scene: str
  key: str
  index: int | None = None
  airlight: float | None = None
  beta: float | None = None


def layout_error(problem: str, tree: str, *, reside: bool = True) -> DatasetLayoutError:
  """The error for `problem`, showing the expected `tree` and (RESIDE) the download page."""
  lines = [problem, "Expected layout:", tree]
  if reside:
    lines.append(f"RESIDE can be downloaded from {RESIDE_URL}")
  return DatasetLayoutError("\n".join(lines))


def _natural_key(text: str) -> list:
  # "1400_10" sorts after "1400_9", and "2" before "10".
  return [(0, int(part), "") if part.isdigit() else (1, 0, part)
          for part in re.split(r"(\d+)", text) if part]


def _images(folder: pathlib.Path) -> list[pathlib.Path]:
  files = [p for p in folder.iterdir()
           if p.is_file() and not p.name.startswith(".")
           and p.suffix.lower() in IMAGE_SUFFIXES]
  return sorted(files, key=lambda p: _natural_key(p.stem))


def _first_dir(root: pathlib.Path, names: Sequence[str]) -> pathlib.Path | None:
  for name in names:
    if (root / name).is_dir():
      return root / name
  return None


def _scene_of(stem: str) -> str:
  return stem.split("_", 1)[0]


def _index_by_scene(files: Sequence[pathlib.Path], tree: str,
                    reside: bool) -> dict[str, pathlib.Path]:
  by_scene: dict[str, pathlib.Path] = {}
  for path in files:
    scene = _scene_of(path.stem)
    if scene in by_scene:
      raise layout_error(
          f"two ground truths for scene {scene!r}: {by_scene[scene].name} and {path.name}",
          tree, reside=reside)
    by_scene[scene] = path
  return by_scene


def _resolve(root: str | pathlib.Path, candidates: Sequence[str], tree: str,
             what: str) -> pathlib.Path:
  """Finds the folder holding ``hazy/`` among ``root`` and some sub-paths."""
  root = pathlib.Path(root).expanduser()
  if not root.is_dir():
    raise layout_error(f"{what} folder not found: {root}", tree)
  for sub in ("", *candidates):
    folder = root / sub if sub else root
    if _first_dir(folder, HAZY_DIRS) is not None:
      return folder
  tried = ", ".join(str(root / c) for c in ("", *candidates))
  raise layout_error(f"no hazy/ folder for {what} under {root} (looked in {tried})", tree)


def _parse_float(text: str) -> float | None:
  try:
    return float(text)
  except ValueError:
    return None


def _unmatched_error(hazy: Sequence[pathlib.Path], clear_dir: pathlib.Path, tree: str,
                     reside: bool) -> DatasetLayoutError:
  names = ", ".join(p.name for p in hazy[:5]) + (" ..." if len(hazy) > 5 else "")
  return layout_error(
      f"{len(hazy)} hazy image(s) have no ground truth in {clear_dir}: {names}",
      tree, reside=reside)


def find_sots_pairs(root: str | pathlib.Path, subset: str | None = None) -> list[PairRecord]:
  """Pairs of RESIDE SOTS.

  Args:
    root: the folder holding ``hazy/`` and ``gt/`` (e.g. ``SOTS/indoor``), or a
      parent of it: ``SOTS`` or the RESIDE root, with `subset` naming the part.
    subset: ``"indoor"`` or ``"outdoor"`` when `root` is a parent folder.
  """
  candidates = [subset, f"SOTS/{subset}"] if subset else []
  folder = _resolve(root, candidates, SOTS_TREE, "SOTS" + (f" {subset}" if subset else ""))
  hazy_dir = _first_dir(folder, HAZY_DIRS)
  gt_dir = _first_dir(folder, CLEAR_DIRS)
  if gt_dir is None:
    raise layout_error(f"no gt/ folder beside {hazy_dir}", SOTS_TREE)
  hazy = _images(hazy_dir)
  if not hazy:
    raise layout_error(f"no images in {hazy_dir}", SOTS_TREE)
  gts = _index_by_scene(_images(gt_dir), SOTS_TREE, reside=True)
  records, unmatched = [], []
  for path in hazy:
    scene, *rest = path.stem.split("_")
    if scene not in gts:
      unmatched.append(path)
      continue
    index = airlight = beta = None
    if len(rest) == 1 and rest[0].isdigit():
      index = int(rest[0])
    elif len(rest) == 2:
      airlight, beta = _parse_float(rest[0]), _parse_float(rest[1])
    else:
      raise layout_error(f"unexpected SOTS hazy file name {path.name}", SOTS_TREE)
    records.append(PairRecord(path, gts[scene], scene, path.stem, index, airlight, beta))
  if unmatched:
    raise _unmatched_error(unmatched, gt_dir, SOTS_TREE, reside=True)
  return records


def find_its_pairs(root: str | pathlib.Path) -> list[PairRecord]:
  """Pairs of RESIDE ITS; `root` is the ``ITS`` folder or the RESIDE root."""
  folder = _resolve(root, ["ITS"], ITS_TREE, "ITS")
  hazy_dir = _first_dir(folder, HAZY_DIRS)
  clear_dir = _first_dir(folder, ("clear", "gt", "GT", "clean"))
  if clear_dir is None:
    raise layout_error(f"no clear/ folder beside {hazy_dir}", ITS_TREE)
  hazy = _images(hazy_dir)
  if not hazy:
    raise layout_error(f"no images in {hazy_dir}", ITS_TREE)
  clears = _index_by_scene(_images(clear_dir), ITS_TREE, reside=True)
  records, unmatched = [], []
  for path in hazy:
    parts = path.stem.split("_")
    airlight = _parse_float(parts[2]) if len(parts) == 3 else None
    if len(parts) != 3 or not parts[1].isdigit() or airlight is None:
      raise layout_error(f"unexpected ITS hazy file name {path.name} "
                          "(want <scene>_<k>_<A>.png)", ITS_TREE)
    if parts[0] not in clears:
      unmatched.append(path)
      continue
    records.append(PairRecord(path, clears[parts[0]], parts[0], path.stem,
                              index=int(parts[1]), airlight=airlight))
  if unmatched:
    raise _unmatched_error(unmatched, clear_dir, ITS_TREE, reside=True)
  return records


_FLAT_HAZY = re.compile(r"^(?P<id>.+?)_(hazy|Hazy|HAZY)$")
_FLAT_CLEAR = re.compile(r"^(?P<id>.+?)_(gt|GT|clear|clean|Clear|Clean)$")


def _flat_pairs(root: pathlib.Path) -> list[PairRecord]:
  files = _images(root)
  clears = {m["id"]: p for p in files if (m := _FLAT_CLEAR.match(p.stem))}
  records, unmatched = [], []
  for path in files:
    if (m := _FLAT_HAZY.match(path.stem)) is None:
      continue
    if m["id"] not in clears:
      unmatched.append(path)
      continue
    records.append(PairRecord(path, clears[m["id"]], m["id"], path.stem))
  if unmatched:
    raise _unmatched_error(unmatched, root, PAIRED_TREE, reside=False)
  return records


def find_paired_folder(root: str | pathlib.Path) -> list[PairRecord]:
  """Pairs of a generic folder (``hazy/`` + ``gt/``/``clear/``, or flat ``*_hazy``/``*_GT``).

  A hazy image pairs with the clear image of identical stem if there is one,
  else with the clear image whose scene id (stem before the first ``_``)
  matches its own.
  """
  root = pathlib.Path(root).expanduser()
  if not root.is_dir():
    raise layout_error(f"paired folder not found: {root}", PAIRED_TREE, reside=False)
  hazy_dir = _first_dir(root, HAZY_DIRS)
  if hazy_dir is None:
    records = _flat_pairs(root)
    if not records:
      raise layout_error(f"no hazy/ folder and no <id>_hazy images in {root}",
                          PAIRED_TREE, reside=False)
    return records
  clear_dir = _first_dir(root, CLEAR_DIRS)
  if clear_dir is None:
    raise layout_error(f"no gt/, GT/, clear/ or clean/ folder beside {hazy_dir}",
                        PAIRED_TREE, reside=False)
  hazy = _images(hazy_dir)
  if not hazy:
    raise layout_error(f"no images in {hazy_dir}", PAIRED_TREE, reside=False)
  clear_files = _images(clear_dir)
  by_stem = {p.stem: p for p in clear_files}
  by_scene: dict[str, list[pathlib.Path]] = {}
  for p in clear_files:
    by_scene.setdefault(_scene_of(p.stem), []).append(p)
  records, unmatched = [], []
  for path in hazy:
    scene = _scene_of(path.stem)
    if path.stem in by_stem:
      clear = by_stem[path.stem]
    elif len(by_scene.get(scene, [])) == 1:
      clear = by_scene[scene][0]
    elif scene in by_scene:
      names = ", ".join(p.name for p in by_scene[scene])
      raise layout_error(f"{path.name} matches several ground truths: {names}",
                          PAIRED_TREE, reside=False)
    else:
      unmatched.append(path)
      continue
    records.append(PairRecord(path, clear, scene, path.stem))
  if unmatched:
    raise _unmatched_error(unmatched, clear_dir, PAIRED_TREE, reside=False)
  return records


def find_pairs(root: str | pathlib.Path, layout: str = "auto",
               subset: str | None = None) -> list[PairRecord]:
  """Pairs under `root` in the given layout: ``sots``, ``its``, ``paired`` or ``auto``.

  ``auto`` picks ITS when a ``clear/`` folder holds the ground truths and the
  hazy names look like ``<scene>_<k>_<A>``, SOTS when the ground truths are in
  ``gt/`` and named ``<scene>``, and the generic rules otherwise.
  """
  if layout == "sots":
    return find_sots_pairs(root, subset)
  if layout == "its":
    return find_its_pairs(root)
  if layout == "paired":
    return find_paired_folder(root)
  if layout != "auto":
    raise ValueError(f"unknown layout {layout!r}; use 'sots', 'its', 'paired' or 'auto'")
  folder = pathlib.Path(root).expanduser()
  hazy_dir = _first_dir(folder, HAZY_DIRS) if folder.is_dir() else None
  if hazy_dir is not None:
    stems = [p.stem for p in _images(hazy_dir)]
    its_like = stems and all(re.fullmatch(r"[^_]+_\d+_[0-9.]+", s) for s in stems)
    if (folder / "clear").is_dir() and its_like:
      return find_its_pairs(folder)
    gt_dir = _first_dir(folder, ("gt", "GT"))
    if gt_dir is not None and all("_" not in p.stem for p in _images(gt_dir)):
      try:
        return find_sots_pairs(folder)
      except DatasetLayoutError:
        pass
  return find_paired_folder(root)


def _read_rgb(path: pathlib.Path) -> np.ndarray:
  return read_rgb(path, dtype=np.uint8)


def load_pair(record: PairRecord) -> tuple[np.ndarray, np.ndarray]:
  """Reads a record as (hazy, clear) uint8 HxWx3 RGB arrays of equal size.

  A larger ground truth is centre-cropped to the hazy size; a smaller one or
  one of a different aspect is an error.
  """
  hazy = _read_rgb(record.hazy)
  clear = _read_rgb(record.clear)
  if clear.shape != hazy.shape:
    try:
      clear = centre_crop(clear, *hazy.shape[:2])
    except ValueError as e:
      raise DatasetLayoutError(
          f"ground truth {record.clear} is {clear.shape[0]}x{clear.shape[1]} but hazy "
          f"{record.hazy} is {hazy.shape[0]}x{hazy.shape[1]}; a ground truth must be the "
          "hazy size or larger (then it is centre-cropped)") from e
  return hazy, clear
