"""Discovery of hazy/clear image pairs on disk.

Three layouts are understood:

* RESIDE SOTS (``hazy/<scene>_<k>.png`` -> ``gt/<scene>.png`` indoors,
  ``hazy/<scene>_<A>_<beta>.jpg`` -> ``gt/<scene>.png`` outdoors). The original
  indoor release ships 640x480 ground truths with a 10 px border around the
  620x460 hazy images; `load_pair` crops that border. It is the only size
  difference taken for a crop (`ground_truth_needs_crop`): any other is refused.
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
import errno
import functools
import hashlib
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from minet_jax.image_io import centre_crop, is_image_entry, read_rgb

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
  hazy/<id>[_anything].<ext>      e.g. 01_outdoor_hazy.jpg, 1400_1.png
  gt/<id>[_anything].<ext>        e.g. 01_outdoor_GT.jpg, 1400.png   (or GT/, clear/, clean/)
  (a pair's names, less _hazy / _GT, are equal, or one is the other and _more)
or, flat (NH-HAZE style):
<root>/<id>_hazy.<ext> and <root>/<id>_GT.<ext>"""


class DatasetLayoutError(ValueError):
  """A dataset folder is missing or does not follow the expected layout."""


# The border around the hazy image that RESIDE SOTS's original ground truths carry
# (640x480 beside 620x460), on each side: the one size difference that is a crop.
SOTS_GT_BORDER = 10


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
  files = [p for p in folder.iterdir() if is_image_entry(p)]
  return sorted(files, key=lambda p: (_natural_key(p.stem), p.name))


def _first_dir(root: pathlib.Path, names: Sequence[str]) -> pathlib.Path | None:
  for name in names:
    if (root / name).is_dir():
      return root / name
  return None


def _scene_of(stem: str) -> str:
  return stem.split("_", 1)[0]


def _parse_float(text: str) -> float | None:
  try:
    return float(text)
  except ValueError:
    return None


class _Problem(Exception):
  """What is wrong with a dataset folder; `_find` adds the layout's tree to it."""


# (hazy images, clear images, the folder holding the clear ones)
_Files = tuple[list[pathlib.Path], list[pathlib.Path], pathlib.Path]


@dataclasses.dataclass(frozen=True)
class _Layout:
  """One folder layout, as the generic finder `_find` needs it.

  Attributes:
    name: what the messages call the dataset ("SOTS indoor", "ITS", "paired").
    tree: the expected tree, shown in every error.
    reside: whether errors point to the RESIDE download page.
    files: (root, layout) -> (hazy images, clear images, the clears' folder).
    index: the clear images -> a lookup for `match`.
    match: (hazy image, lookup) -> its record, or None when it has no ground truth.
    subdirs: where below the root the ``hazy/`` folder may also be.
    clear_dirs: names of the ground-truth folder beside ``hazy/``, first found wins.
    clear_names: how a missing ground-truth folder is named in the error.
  """
  name: str
  tree: str
  reside: bool
  files: Callable[[pathlib.Path, _Layout], _Files]
  index: Callable[[list[pathlib.Path]], Any]
  match: Callable[[pathlib.Path, Any], PairRecord | None]
  subdirs: tuple[str, ...] = ()
  clear_dirs: tuple[str, ...] = CLEAR_DIRS
  clear_names: str = "gt/"


def _find(root: str | pathlib.Path, layout: _Layout) -> list[PairRecord]:
  """The records of `root` in `layout`: resolve the folders, index the ground truths,
  match every hazy image, and report what does not fit."""
  root = pathlib.Path(root).expanduser()
  try:
    if not root.is_dir():
      raise _Problem(f"{layout.name} folder {root} is not a folder" if root.exists() else
                     f"{layout.name} folder not found: {root}")
    hazy, clears, clear_dir = layout.files(root, layout)
    lookup = layout.index(clears)
    records, unmatched = [], []
    for path in hazy:
      record = layout.match(path, lookup)
      if record is None:
        unmatched.append(path)
      else:
        records.append(record)
    if unmatched:
      names = ", ".join(p.name for p in unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
      raise _Problem(f"{len(unmatched)} hazy image(s) have no ground truth in {clear_dir}: "
                     f"{names}")
    by_key: dict[str, pathlib.Path] = {}
    for record in records:
      if record.key in by_key:
        raise _Problem(f"two hazy images are both named {record.key!r}: "
                       f"{by_key[record.key].name} and {record.hazy.name}; keep one")
      by_key[record.key] = record.hazy
  except _Problem as e:
    raise layout_error(str(e), layout.tree, reside=layout.reside) from None
  return records


# ------------------------------------------------------------------ where the images are


def _beside_each_other(root: pathlib.Path, layout: _Layout) -> _Files:
  """``hazy/`` and the ground-truth folder side by side, in root or one of its subdirs."""
  candidates = ("", *layout.subdirs)
  folder = next((root / sub for sub in candidates if _first_dir(root / sub, HAZY_DIRS)), None)
  if folder is None:
    tried = ", ".join(str(root / sub) for sub in candidates)
    raise _Problem(f"no hazy/ folder for {layout.name} under {root} (looked in {tried})")
  hazy_dir = _first_dir(folder, HAZY_DIRS)
  clear_dir = _first_dir(folder, layout.clear_dirs)
  if clear_dir is None:
    raise _Problem(f"no {layout.clear_names} folder beside {hazy_dir}")
  hazy = _images(hazy_dir)
  if not hazy:
    raise _Problem(f"no images in {hazy_dir}")
  return hazy, _images(clear_dir), clear_dir


_FLAT_HAZY = re.compile(r"^(?P<id>.+?)_(hazy|Hazy|HAZY)$")
_FLAT_CLEAR = re.compile(r"^(?P<id>.+?)_(gt|GT|clear|clean|Clear|Clean)$")


def _flat(root: pathlib.Path, layout: _Layout) -> _Files:
  """``<id>_hazy`` and ``<id>_GT`` files in one folder (NH-HAZE as released)."""
  del layout
  files = _images(root)
  hazy = [p for p in files if _FLAT_HAZY.match(p.stem)]
  if not hazy:
    raise _Problem(f"no hazy/ folder and no <id>_hazy images in {root}")
  return hazy, [p for p in files if _FLAT_CLEAR.match(p.stem)], root


# ------------------------------------------------------------------ how they pair


def _one_ground_truth_per(clears: list[pathlib.Path], key_of, what: str
                          ) -> dict[str, pathlib.Path]:
  """The clear images by ``key_of(stem)``; two for one key is a `_Problem`."""
  by_key: dict[str, pathlib.Path] = {}
  for path in clears:
    key = key_of(path.stem)
    if key in by_key:
      raise _Problem(f"two ground truths for {what} {key!r}: {by_key[key].name} and "
                     f"{path.name}; keep one")
    by_key[key] = path
  return by_key


def _by_scene(clears: list[pathlib.Path]) -> dict[str, pathlib.Path]:
  """One ground truth per scene, named ``<scene>[_anything]``."""
  return _one_ground_truth_per(clears, _scene_of, "scene")


# How each SOTS subset names its hazy images.
_SOTS_NAMES = {"indoor": "<scene>_<k>", "outdoor": "<scene>_<A>_<beta>"}


def _match_sots(path: pathlib.Path, gts: dict[str, pathlib.Path],
                subset: str | None = None) -> PairRecord | None:
  scene, *rest = path.stem.split("_")
  if scene not in gts:
    return None
  index = airlight = beta = None
  if len(rest) == 1 and rest[0].isdigit():
    index, named = int(rest[0]), "indoor"
  elif len(rest) == 2:
    airlight, beta = _parse_float(rest[0]), _parse_float(rest[1])
    named = "outdoor"
  else:
    raise _Problem(f"unexpected SOTS hazy file name {path.name}")
  if subset is not None and subset != named:  # The other subset's folder, given by mistake.
    raise _Problem(f"{path.name} is named as a SOTS {named} image ({_SOTS_NAMES[named]}), "
                   f"not as {subset} ones are ({_SOTS_NAMES[subset]}): is this the {subset} "
                   "folder?")
  return PairRecord(path, gts[scene], scene, path.stem, index, airlight, beta)


def _match_its(path: pathlib.Path, clears: dict[str, pathlib.Path]) -> PairRecord | None:
  parts = path.stem.split("_")
  airlight = _parse_float(parts[2]) if len(parts) == 3 else None
  if len(parts) != 3 or not parts[1].isdigit() or airlight is None:
    raise _Problem(f"unexpected ITS hazy file name {path.name} (want <scene>_<k>_<A>.png)")
  if parts[0] not in clears:
    return None
  return PairRecord(path, clears[parts[0]], parts[0], path.stem, index=int(parts[1]),
                    airlight=airlight)


def _by_stem_and_scene(clears: list[pathlib.Path]
                       ) -> tuple[dict[str, pathlib.Path], dict[str, list[pathlib.Path]]]:
  by_scene: dict[str, list[pathlib.Path]] = {}
  by_stem: dict[str, pathlib.Path] = {}
  for p in clears:
    if p.stem in by_stem:
      raise _Problem(f"two ground truths are both named {p.stem!r}: {by_stem[p.stem].name} "
                     f"and {p.name}; keep one")
    by_stem[p.stem] = p
    by_scene.setdefault(_scene_of(p.stem), []).append(p)
  return by_stem, by_scene


def _untagged(stem: str) -> str:
  """``stem`` without its ``_hazy`` or ``_GT`` (``_gt``, ``_clear``, ``_clean``) tag."""
  tagged = _FLAT_HAZY.match(stem) or _FLAT_CLEAR.match(stem)
  return tagged["id"] if tagged else stem


def _names_one_scene(a: str, b: str) -> bool:
  """Whether two untagged stems name one scene: equal, or one is the other followed by
  ``_`` and more (``1400`` and ``1400_1``, ``0001`` and ``0001_0.8_0.2``, ``1`` and
  ``1_Image_``), not two names that merely share a prefix (``IMG_0001``, ``IMG_0002``)."""
  return a == b or a.startswith(b + "_") or b.startswith(a + "_")


def _match_paired(path: pathlib.Path, lookup) -> PairRecord | None:
  """The clear image of identical stem; else the one of its scene id (the stem up to
  the first ``_``) whose name, once both lose their ``_hazy`` / ``_GT`` tags, names the
  same scene (`_names_one_scene`): ``01_outdoor_GT`` for ``01_outdoor_hazy``, ``1400``
  for ``1400_1``, ``0001_GT`` for ``0001_0.8_0.2``. Another image of the same id
  (``IMG_0001`` for ``IMG_0002``) is another photograph, not a match."""
  by_stem, by_scene = lookup
  scene = _scene_of(path.stem)
  if path.stem in by_stem:
    return PairRecord(path, by_stem[path.stem], scene, path.stem)
  mine = _untagged(path.stem)
  matches = [c for c in by_scene.get(scene, []) if _names_one_scene(_untagged(c.stem), mine)]
  # An equal name wins over longer or shorter ones (01_hazy: 01_GT, not 01_outdoor_GT).
  matches = [c for c in matches if _untagged(c.stem) == mine] or matches
  if len(matches) > 1:
    raise _Problem(f"{path.name} matches several ground truths: "
                   f"{', '.join(p.name for p in matches)}")
  return PairRecord(path, matches[0], scene, path.stem) if matches else None


def _by_flat_id(clears: list[pathlib.Path]) -> dict[str, pathlib.Path]:
  """One ground truth per id (``<id>_GT``, ...), as the other layouts insist."""
  return _one_ground_truth_per(clears, lambda stem: _FLAT_CLEAR.match(stem)["id"], "id")


def _match_flat(path: pathlib.Path, clears: dict[str, pathlib.Path]) -> PairRecord | None:
  scene = _FLAT_HAZY.match(path.stem)["id"]
  return PairRecord(path, clears[scene], scene, path.stem) if scene in clears else None


_SOTS = _Layout("SOTS", SOTS_TREE, True, _beside_each_other, _by_scene, _match_sots)
_ITS = _Layout("ITS", ITS_TREE, True, _beside_each_other, _by_scene, _match_its,
               subdirs=("ITS",), clear_dirs=("clear", "gt", "GT", "clean"),
               clear_names="clear/")
_PAIRED = _Layout("paired", PAIRED_TREE, False, _beside_each_other, _by_stem_and_scene,
                  _match_paired, clear_names="gt/, GT/, clear/ or clean/")
_PAIRED_FLAT = dataclasses.replace(_PAIRED, files=_flat, index=_by_flat_id, match=_match_flat)


# ------------------------------------------------------------------ finders


def source_fingerprint(root: str | pathlib.Path, records: Sequence[PairRecord]
                       ) -> dict[str, Any]:
  """What a dataset built from `records` found under `root` was built from.

  ``root``: the resolved folder; ``files``: how many; ``sha256``: a digest of every
  file's path below `root`, size and modification time, so adding, removing, replacing
  or editing a file changes it, and moving the whole folder does not.
  """
  given = pathlib.Path(root).expanduser()
  digest = hashlib.sha256()
  files = sorted({p for r in records for p in (r.hazy, r.clear)})
  for path in files:
    try:
      stat = path.stat()
    except OSError as e:  # A build must not leave a pair out in silence.
      link = " (a link to nothing)" if path.is_symlink() and e.errno == errno.ENOENT else ""
      raise DatasetLayoutError(f"cannot read {path}{link}: {e.strerror or e}") from e
    digest.update(f"{path.relative_to(given).as_posix()}\0{stat.st_size}\0"
                  f"{stat.st_mtime_ns}\n".encode())
  return {"root": str(given.resolve()), "files": len(files), "sha256": digest.hexdigest()}


def find_sots_pairs(root: str | pathlib.Path, subset: str | None = None) -> list[PairRecord]:
  """Pairs of RESIDE SOTS.

  Args:
    root: the folder holding ``hazy/`` and ``gt/`` (e.g. ``SOTS/indoor``), or a
      parent of it: ``SOTS`` or the RESIDE root, with `subset` naming the part.
    subset: ``"indoor"`` or ``"outdoor"`` when `root` is a parent folder.
  """
  if not subset:
    return _find(root, _SOTS)
  if subset not in _SOTS_NAMES:
    raise ValueError(f"SOTS subset must be one of {tuple(_SOTS_NAMES)}, got {subset!r}")
  return _find(root, dataclasses.replace(_SOTS, name=f"SOTS {subset}",
                                         subdirs=(subset, f"SOTS/{subset}"),
                                         match=functools.partial(_match_sots, subset=subset)))


def find_its_pairs(root: str | pathlib.Path) -> list[PairRecord]:
  """Pairs of RESIDE ITS; `root` is the ``ITS`` folder or the RESIDE root."""
  return _find(root, _ITS)


def find_paired_folder(root: str | pathlib.Path) -> list[PairRecord]:
  """Pairs of a generic folder (``hazy/`` + ``gt/``/``clear/``, or flat ``*_hazy``/``*_GT``).

  A hazy image pairs with the clear image of identical stem if there is one,
  else with the clear image whose scene id (stem before the first ``_``)
  matches its own.
  """
  folder = pathlib.Path(root).expanduser()
  flat = folder.is_dir() and _first_dir(folder, HAZY_DIRS) is None
  return _find(folder, _PAIRED_FLAT if flat else _PAIRED)


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


def ground_truth_needs_crop(record: PairRecord, hazy_hw: Sequence[int],
                            clear_hw: Sequence[int]) -> bool:
  """Whether a pair's ground truth is cropped to its hazy image: False for equal sizes,
  True for SOTS's border (`SOTS_GT_BORDER` on each side).

  Raises:
    DatasetLayoutError: any other sizes, naming the pair; a centre crop of them would
      pair pixels that do not correspond.
  """
  (h, w), (ch, cw) = tuple(hazy_hw), tuple(clear_hw)
  if (ch, cw) == (h, w):
    return False
  border = 2 * SOTS_GT_BORDER
  if (ch, cw) == (h + border, w + border):
    return True
  raise DatasetLayoutError(
      f"{record.hazy} ({h}x{w}) and its ground truth {record.clear} ({ch}x{cw}) do not "
      f"align: a ground truth must be the hazy size, or {h + border}x{w + border} (RESIDE "
      f"SOTS's {SOTS_GT_BORDER} px border, which is cropped)")


def load_pair(record: PairRecord) -> tuple[np.ndarray, np.ndarray]:
  """Reads a record as (hazy, clear) uint8 HxWx3 RGB arrays of equal size.

  A ground truth with SOTS's border is cropped to the hazy size; any other size
  difference is an error (`ground_truth_needs_crop`).
  """
  hazy = read_rgb(record.hazy, dtype=np.uint8)
  clear = read_rgb(record.clear, dtype=np.uint8)
  if ground_truth_needs_crop(record, hazy.shape[:2], clear.shape[:2]):
    clear = centre_crop(clear, *hazy.shape[:2])
  return hazy, clear
