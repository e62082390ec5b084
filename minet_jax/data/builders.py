"""TFDS builders for hazy/clear pairs, written as array_record, read without TensorFlow.

Datasets (examples are dicts, see `PairSource`):

* ``reside_its``: RESIDE ITS (indoor training set), split ``train``.
* ``reside_sots/indoor``, ``reside_sots/outdoor``: RESIDE SOTS, split ``test``.
* ``paired_folder/<name>``: any folder `minet_jax.data.folders.find_paired_folder`
  understands (O-HAZE, Dense-HAZE, NH-HAZE, ...), split ``train`` holding every
  pair in file order; slice it (``train[:40]``, ``train[40:]``) for a train/test
  division.
* ``synthetic_haze``: the offline set of `minet_jax.data.synthetic`, splits
  ``train`` and ``validation``, built in seconds with no download.

RESIDE and paired folders are read from a manual folder (``manual_dir``): see
docs/DATA.md for the layout and https://sites.google.com/view/reside-dehaze-datasets
for the download. TFDS 4.9's builder machinery writes array_record and encodes
``Image`` features from encoded bytes without TensorFlow, so the builders are
ordinary ``GeneratorBasedBuilder`` subclasses; images are handed to TFDS as
PNG/JPEG bytes (the original file when it already decodes to the stored RGB
pixels, else a PNG we encode), and decoded here with Pillow.

Build from the command line::

  python -m minet_jax.data.builders synthetic_haze --data_dir ~/tensorflow_datasets
  python -m minet_jax.data.builders reside_its --manual_dir ~/data/RESIDE
  python -m minet_jax.data.builders reside_sots/indoor --manual_dir ~/data/RESIDE
  python -m minet_jax.data.builders paired_folder/o_haze --manual_dir ~/data/O-HAZE
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import logging as std_logging
import os
import pathlib
import re
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from minet_jax.data import folders
from minet_jax.data import synthetic
from minet_jax.image_io import ImageReadError, centre_crop, image_size, read_rgb

VERSION = tfds.core.Version("1.0.0")
RELEASE_NOTES = {"1.0.0": "Initial release."}
PathLike = str | os.PathLike

_RESIDE_INSTRUCTIONS = f"""\
Download RESIDE from {folders.RESIDE_URL} (ITS for reside_its, SOTS for
reside_sots), extract it and pass the folder as manual_dir (the RESIDE root, or
the ITS / SOTS folder itself). Expected layout:
{folders.ITS_TREE}
{folders.SOTS_TREE}
"""

# Where a folder dataset's metadata keeps `folders.source_fingerprint`.
_SOURCE_KEY = "source"

_PAIRED_INSTRUCTIONS = f"""\
Pass a folder of hazy/clear pairs as manual_dir. Expected layout:
{folders.PAIRED_TREE}
"""

_CITATION_RESIDE = """\
@article{li2019benchmarking,
  title={Benchmarking Single-Image Dehazing and Beyond},
  author={Li, Boyi and Ren, Wenqi and Fu, Dengpan and Tao, Dacheng and Feng, Dan and
          Zeng, Wenjun and Wang, Zhangyang},
  journal={IEEE Transactions on Image Processing}, volume={28}, number={1},
  pages={492--505}, year={2019}}"""


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  # Level 1: several times faster than the default, for files about 20 % larger.
  Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


def _stored_as_is(im: Image.Image) -> bool:
  """Whether Pillow decodes the file to exactly the RGB pixels `read_rgb` gives."""
  return (im.format in ("PNG", "JPEG") and im.mode == "RGB"
          and "transparency" not in im.info and im.getexif().get(0x0112, 1) == 1)


def _as_is(path: pathlib.Path) -> tuple[bytes, tuple[int, int]] | None:
  """(the file's bytes, (height, width)) when they can be stored as they are.

  The file is decoded once, so a truncated or corrupt file fails the build naming it,
  not a training run later.
  """
  hw = image_size(path)  # Refuses a file too large to decode, before decoding it.
  try:
    with Image.open(path) as im:
      if not _stored_as_is(im):
        return None
      im.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
    return None  # read_rgb says what is wrong with it.
  return path.read_bytes(), hw


def _encoded(path: pathlib.Path, *, crop_to: tuple[int, int] | None = None
             ) -> tuple[bytes, tuple[int, int]]:
  """(encoded RGB image, (height, width)), centre-cropped to `crop_to` if given."""
  if crop_to is None and (as_is := _as_is(path)) is not None:
    return as_is
  image = read_rgb(path, dtype=np.uint8)
  if crop_to is not None:
    image = centre_crop(image, *crop_to)
  return _png(image), image.shape[:2]


def _encode_pair(record: folders.PairRecord, cache: dict) -> tuple[bytes, bytes]:
  try:
    hazy, hw = _encoded(record.hazy)
    # Several hazy images share a ground truth: encode it once per size.
    key = (record.clear, hw)
    if key not in cache:
      crop = folders.ground_truth_needs_crop(record, hw, image_size(record.clear))
      cache.clear()
      cache[key] = _encoded(record.clear, crop_to=hw if crop else None)[0]
  except ImageReadError as e:
    # A dataset error (what the training command reports as such), naming the file.
    raise folders.DatasetLayoutError(str(e)) from e
  return hazy, cache[key]


def _pair_features(**extra) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "hazy": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
      "clear": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
      "scene": tfds.features.Text(doc="scene id (docs/DATA.md: RESIDE's share `clear`)"),
      "key": tfds.features.Text(doc="unique example name (the hazy file's stem)"),
      "index": tfds.features.Scalar(np.int32, doc="rendering of the scene (k), -1 if unnamed"),
      "airlight": tfds.features.Scalar(np.float32, doc="atmospheric light A, NaN if unknown"),
      "beta": tfds.features.Scalar(np.float32, doc="scattering coefficient, NaN if unknown"),
      **extra,
  })


def _none_to(value, default):
  return default if value is None else value


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common base: version, and a `code_path` that works without `importlib_resources`."""
  VERSION = VERSION
  RELEASE_NOTES = RELEASE_NOTES

  # TFDS 4.9.10 locates a builder's source through `importlib_resources`, a package it
  # only installs on Python < 3.9 (tensorflow/datasets#11212), so preparing any builder
  # defined in a package fails with ModuleNotFoundError. Its own fallback is this file.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)


class _FolderPairs(_Builder, skip_registration=True):
  """Shared example generation for datasets read from a manual folder.

  The build records what it was built from (`folders.source_fingerprint`) in its
  metadata, so `build` can tell a build of today's folder from a stale one.
  """

  def _info_with(self, **kwargs) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=_pair_features(),
                                 metadata=tfds.core.MetadataDict(), **kwargs)

  def _split_of(self, manual_dir: PathLike, records: list[folders.PairRecord]):
    self.info.metadata[_SOURCE_KEY] = folders.source_fingerprint(manual_dir, records)
    return self._generate_examples(records)

  def _generate_examples(self, records: list[folders.PairRecord]):
    cache: dict = {}
    for record in records:
      hazy, clear = _encode_pair(record, cache)
      yield record.key, {
          "hazy": hazy, "clear": clear, "scene": record.scene, "key": record.key,
          "index": np.int32(_none_to(record.index, -1)),
          "airlight": np.float32(_none_to(record.airlight, np.nan)),
          "beta": np.float32(_none_to(record.beta, np.nan)),
      }


class ResideIts(_FolderPairs):
  """RESIDE ITS: 13,990 hazy indoor images of 1,399 NYU Depth v2 scenes."""
  MANUAL_DOWNLOAD_INSTRUCTIONS = _RESIDE_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return self._info_with(homepage=folders.RESIDE_URL, citation=_CITATION_RESIDE)

  def _split_generators(self, dl_manager):
    manual_dir = dl_manager.manual_dir
    return {"train": self._split_of(manual_dir, folders.find_its_pairs(manual_dir))}


class ResideSots(_FolderPairs):
  """RESIDE SOTS: the synthetic objective test set (500 indoor / 500 outdoor hazy images)."""
  MANUAL_DOWNLOAD_INSTRUCTIONS = _RESIDE_INSTRUCTIONS
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="indoor", description="SOTS indoor (NYU Depth v2 scenes)"),
      tfds.core.BuilderConfig(name="outdoor", description="SOTS outdoor"),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self._info_with(homepage=folders.RESIDE_URL, citation=_CITATION_RESIDE)

  def _split_generators(self, dl_manager):
    manual_dir = dl_manager.manual_dir
    records = folders.find_sots_pairs(manual_dir, self.builder_config.name)
    return {"test": self._split_of(manual_dir, records)}


class PairedFolder(_FolderPairs):
  """Hazy/clear pairs from a folder (O-HAZE, Dense-HAZE, NH-HAZE style); name it per folder.

  Its examples keep the folder's file order (TFDS would otherwise shuffle them by key),
  so slices are the published divisions: ``train[:40]`` is O-HAZE's 1-40.
  """
  MANUAL_DOWNLOAD_INSTRUCTIONS = _PAIRED_INSTRUCTIONS
  VERSION = tfds.core.Version("1.1.0")  # A build of 1.0.0 (shuffled) is not reused.
  RELEASE_NOTES = {**RELEASE_NOTES, "1.1.0": "Examples in the folder's file order."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default")]

  def _info(self) -> tfds.core.DatasetInfo:
    return self._info_with(disable_shuffling=True)

  def _split_generators(self, dl_manager):
    manual_dir = dl_manager.manual_dir
    return {"train": self._split_of(manual_dir, folders.find_paired_folder(manual_dir))}


@dataclasses.dataclass(eq=False)
class SyntheticHazeBuilderConfig(tfds.core.BuilderConfig):
  synthetic: synthetic.SyntheticHazeConfig = dataclasses.field(
      default_factory=synthetic.SyntheticHazeConfig)


def synthetic_builder_config(config: synthetic.SyntheticHazeConfig | None = None
                             ) -> SyntheticHazeBuilderConfig:
  """The builder config of a synthetic set: ``default``, or ``custom_<hash of the fields>``."""
  config = config or synthetic.SyntheticHazeConfig()
  if config == synthetic.SyntheticHazeConfig():
    return SyntheticHaze.BUILDER_CONFIGS[0]
  fields = dataclasses.astuple(config)
  if config.exposure_range == (1.0, 1.0):
    # Added after sets were built: where it is off, the name stays what it was.
    names = [f.name for f in dataclasses.fields(config)]
    fields = fields[:names.index("exposure_range")] + fields[names.index("exposure_range") + 1:]
  digest = hashlib.sha256(repr(fields).encode()).hexdigest()[:10]
  return SyntheticHazeBuilderConfig(name=f"custom_{digest}", description=repr(config),
                                    synthetic=config)


class SyntheticHaze(_Builder):
  """Offline synthetic haze: I = J t + A (1 - t), t = exp(-beta d), over scenes with exact depth."""
  BUILDER_CONFIGS = [SyntheticHazeBuilderConfig(
      name="default", description="minet_jax.data.synthetic.SyntheticHazeConfig() defaults")]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=synthetic.__doc__,
        features=_pair_features(depth=tfds.features.Image(
            shape=(None, None, 1), dtype=np.uint16,
            doc="z-depth in millimetres (16-bit PNG, as Kinect / NYU store it)")))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config.synthetic
    # TFDS cannot write an empty split: a config with no validation rooms has none.
    return {split: self._generate_examples(split) for split in synthetic.SPLITS
            if config.num_examples(split) > 0}

  def _generate_examples(self, split: str):
    for ex in synthetic.generate(split, self.builder_config.synthetic):
      depth_mm = np.round(ex["depth"] * 1000.0).astype(np.uint16)
      yield ex["key"], {**ex, "hazy": _png(ex["hazy"]), "clear": _png(ex["clear"]),
                        "depth": _png(depth_mm), "index": np.int32(ex["index"])}


_BUILDERS = {"reside_its": ResideIts, "reside_sots": ResideSots,
             "paired_folder": PairedFolder, "synthetic_haze": SyntheticHaze}
_NEEDS_MANUAL = {"reside_its", "reside_sots", "paired_folder"}


def _slug(text: str) -> str:
  slug = re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")
  return slug or "default"


def _split_name(name: str) -> tuple[str, str | None]:
  dataset, _, config = name.partition("/")
  if dataset not in _BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(_BUILDERS)} "
                     "(with /indoor or /outdoor for reside_sots, /<name> for paired_folder)")
  return dataset, config or None


def get_builder(name: str, data_dir: PathLike | None = None,
                manual_dir: PathLike | None = None, *,
                synthetic_config: synthetic.SyntheticHazeConfig | None = None
                ) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `name` (not built; see `build`).

  Args:
    name: ``synthetic_haze``, ``reside_its``, ``reside_sots[/indoor|/outdoor]``
      or ``paired_folder[/<name>]`` (the name defaults to the folder's name).
    data_dir: where built datasets live (TFDS's default when None).
    manual_dir: the source folder, for RESIDE and paired folders.
    synthetic_config: the synthetic set to build (defaults when None).
  """
  dataset, config = _split_name(name)
  data_dir = None if data_dir is None else os.fspath(pathlib.Path(data_dir).expanduser())
  if dataset == "synthetic_haze":
    if config not in (None, "default") and synthetic_config is None:
      raise ValueError(f"synthetic_haze config {config!r}: pass synthetic_config to build it")
    return SyntheticHaze(data_dir=data_dir, config=synthetic_builder_config(synthetic_config),
                         file_format="array_record")
  if dataset == "reside_sots":
    config = config or "indoor"
    if config not in ("indoor", "outdoor"):
      raise ValueError(f"reside_sots config must be 'indoor' or 'outdoor', got {config!r}")
    return ResideSots(data_dir=data_dir, config=config, file_format="array_record")
  if dataset == "paired_folder":
    if config is None:
      if manual_dir is None:
        raise ValueError("paired_folder needs manual_dir (or a name: paired_folder/<name>)")
      config = _slug(pathlib.Path(manual_dir).expanduser().resolve().name)
    return PairedFolder(data_dir=data_dir, config=tfds.core.BuilderConfig(name=_slug(config)),
                        file_format="array_record")
  if config is not None:
    raise ValueError(f"{dataset} has no configs; use {dataset!r}")
  return ResideIts(data_dir=data_dir, file_format="array_record")


def _records(name: str, config: str | None, manual_dir: PathLike | None,
             data_dir: PathLike | None = None) -> list[folders.PairRecord]:
  """The pairs of `manual_dir` for dataset `name` (SOTS: its `config`); raises the layout
  error before TFDS does (its message names no layout, and ours the command that builds
  it into `data_dir`)."""
  dataset = _split_name(name)[0]
  if manual_dir is None:
    tree = folders.PAIRED_TREE if dataset == "paired_folder" else (
        folders.ITS_TREE if dataset == "reside_its" else folders.SOTS_TREE)
    named = name if config is None or "/" in name else f"{name}/{config}"  # SOTS's default
    problem = (f"{named} is not built yet and no source folder was given to build it "
               f"from: `python -m minet_jax.data.builders {named} --manual_dir FOLDER"
               + (f" --data_dir {shlex.quote(str(data_dir))}" if data_dir is not None else "")
               + "` "
               "builds it (in training: config.data.manual_dir; evaluate.py also takes "
               "the folder itself as --data)")
    raise folders.layout_error(problem, tree, reside=dataset != "paired_folder")
  if dataset == "reside_its":
    return folders.find_its_pairs(manual_dir)
  if dataset == "reside_sots":
    return folders.find_sots_pairs(manual_dir, config)
  return folders.find_paired_folder(manual_dir)


class StaleBuildError(folders.DatasetLayoutError):
  """A built dataset was not made from the files of the source folder given now."""


def _is_current(builder: tfds.core.DatasetBuilder, name: str,
                records: list[folders.PairRecord], manual_dir: PathLike) -> bool:
  """Whether the prepared `builder` was built from these files of `manual_dir`.

  Raises:
    StaleBuildError: it was built from other files of another folder (two folders of
      one name): rebuilding would silently replace that folder's build.
  """
  now = folders.source_fingerprint(manual_dir, records)
  built = (builder.info.metadata or {}).get(_SOURCE_KEY)
  if built is None or built["sha256"] == now["sha256"]:
    # The same files, maybe moved; or a build that did not record its source, which
    # cannot be trusted.
    return built is not None
  if built["root"] != now["root"]:
    if _under(built["root"], records):
      # The same tree given through another of its folders (the RESIDE root, then its
      # SOTS folder): compared as it was recorded, relative to the folder built from.
      resolved = [dataclasses.replace(r, hazy=r.hazy.resolve(), clear=r.clear.resolve())
                  for r in records]
      return (folders.source_fingerprint(built["root"], resolved)["sha256"]
              == built["sha256"])
    hint = ("give this one its own name (paired_folder/<name>) or another data_dir"
            if name.startswith("paired_folder") else "use another data_dir")
    raise StaleBuildError(
        f"{name} in {builder.data_dir} was built from {built['root']} ({built['files']} "
        f"files), not from {now['root']} ({now['files']} files); {hint}, or delete "
        f"{builder.data_dir} to rebuild it from {now['root']}")
  return False


def _under(folder: str, records: list[folders.PairRecord]) -> bool:
  """Whether every file of ``records`` lies below ``folder`` (resolved)."""
  root = pathlib.Path(folder)
  return all(root in p.resolve().parents for r in records for p in (r.hazy, r.clear))


@contextlib.contextmanager
def _tfds_quiet() -> Iterator[None]:
  """Mutes TFDS's own reports while it builds: its stdout lines ("Downloading and preparing
  dataset Unknown size ..."), absl warnings (a new folder "has no dataset_info.json", "Using
  custom data configuration") and nested progress bars, which leave blank lines in a log.
  `build` says instead what it builds, where, and how long it took."""
  absl_logger = std_logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(std_logging.ERROR)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(True)
    absl_logger.setLevel(level)


def _refuse_older_build(name: str, builder: tfds.core.DatasetBuilder) -> None:
  """Raises `DatasetLayoutError` when `name` is built only by an earlier version (another
  version folder beside this one's): without its source folder it cannot be rebuilt, and
  "not built yet" would mislead."""
  folder = pathlib.Path(os.fspath(builder.data_path)).parent
  older = sorted(p.name for p in folder.glob("*")
                 if (p / "dataset_info.json").is_file() and p.name != str(builder.version))
  if older:
    notes = builder.RELEASE_NOTES.get(str(builder.version), "")
    raise folders.DatasetLayoutError(
        f"{name} in {folder} was built by an earlier version ({', '.join(older)}); this one "
        f"is {builder.version} ({notes}): give its source folder (manual_dir, "
        "--config.data.manual_dir) to build it again")


def build(name: str, data_dir: PathLike | None = None, manual_dir: PathLike | None = None, *,
          synthetic_config: synthetic.SyntheticHazeConfig | None = None,
          report: bool = True) -> tfds.core.DatasetBuilder:
  """Builds `name` into `data_dir` unless already built; returns its builder.

  ``data_dir`` defaults to TFDS's (``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``).
  With ``report``, a build says on stderr what it builds and where, then how many pairs
  it wrote and how long it took. A dataset read from `manual_dir` is rebuilt when that
  folder's files changed since it was built (added, removed, replaced or edited:
  `folders.source_fingerprint`), and refused (`StaleBuildError`) when it was built from
  another folder of the same name. Without `manual_dir` an existing build is used as it is.
  """
  with _tfds_quiet():  # TFDS reports while it looks for an existing build, too.
    builder = get_builder(name, data_dir, manual_dir, synthetic_config=synthetic_config)
    dataset = _split_name(name)[0]
    download_config = None
    aside = stale = None  # A stale build's folder while it is rebuilt.
    if dataset in _NEEDS_MANUAL:
      if builder.is_prepared() and manual_dir is None:
        return builder
      if manual_dir is None:
        _refuse_older_build(name, builder)
      config = builder.builder_config.name if dataset == "reside_sots" else None
      records = _records(name, config, manual_dir, data_dir)
      if builder.is_prepared():
        if _is_current(builder, name, records, manual_dir):
          return builder
        std_logging.warning("%s in %s is stale (its source folder %s changed since it was "
                            "built, or it did not record what it was built from): "
                            "rebuilding it", name, builder.data_dir, manual_dir)
        # Set aside, not deleted: a rebuild that fails (a bad new file) puts it back.
        stale = pathlib.Path(os.fspath(builder.data_path))
        aside = stale.with_name(f".{stale.name}.stale-{secrets.token_hex(4)}")
        stale.rename(aside)
        builder = get_builder(name, data_dir, manual_dir, synthetic_config=synthetic_config)
      download_config = tfds.download.DownloadConfig(
          manual_dir=os.fspath(pathlib.Path(manual_dir).expanduser()))
    elif builder.is_prepared():
      return builder
  what = ("rendering the offline synthetic haze set" if dataset == "synthetic_haze"
          else f"reading {manual_dir}")
  if report:
    print(f"building dataset {name} into {builder.data_dir} ({what}; done once, later runs "
          "reuse it; another folder: $TFDS_DATA_DIR, or --config.data.data_dir when "
          "training) ...", file=sys.stderr, flush=True)
  start = time.perf_counter()
  try:
    with _tfds_quiet():
      builder.download_and_prepare(download_config=download_config)
  except BaseException:
    if aside is not None:
      shutil.rmtree(stale, ignore_errors=True)
      aside.rename(stale)
    raise
  if aside is not None:
    shutil.rmtree(aside)
  if report:
    splits = ", ".join(f"{v.num_examples} {k}" for k, v in builder.info.splits.items())
    print(f"built {name} in {time.perf_counter() - start:.0f} s: {splits} pairs",
          file=sys.stderr, flush=True)
  return builder


def _decode_image(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _decode_depth(data: bytes) -> np.ndarray:
  """16-bit PNG of millimetres -> float32 metres."""
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im, dtype=np.uint16).astype(np.float32) / 1000.0


class PairSource:
  """Random access to a built split: ``len(source)``, ``source[i]`` -> dict.

  Each example: ``hazy``, ``clear`` uint8 HxWx3 RGB; ``scene``, ``key`` str;
  ``index`` int32 (-1 if unknown); ``airlight``, ``beta`` float32 (NaN if
  unknown); synthetic_haze adds ``depth`` float32 HxW in metres (stored as
  16-bit millimetres). Usable as a
  grain data source (picklable, thread-safe reads).
  """

  def __init__(self, source: Any, name: str, split: str):
    self._source = source
    self.name = name
    self.split = split

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = dict(self._source[index])
    ex["hazy"] = _decode_image(ex["hazy"])
    ex["clear"] = _decode_image(ex["clear"])
    if "depth" in ex:
      ex["depth"] = _decode_depth(ex["depth"])
    for field in ("scene", "key"):
      if isinstance(ex[field], bytes):
        ex[field] = ex[field].decode("utf-8")
    return ex

  def __repr__(self) -> str:
    return f"PairSource({self.name!r}, split={self.split!r}, {len(self)} examples)"


def load_source(name: str, split: str, data_dir: PathLike | None = None,
                manual_dir: PathLike | None = None, *,
                synthetic_config: synthetic.SyntheticHazeConfig | None = None,
                build_if_missing: bool = True) -> PairSource:
  """A split of a dataset as a `PairSource`, building the dataset first if needed.

  Args:
    name: see `get_builder`.
    split: a split name, optionally sliced (``train``, ``validation``,
      ``test``, ``train[:90%]``...).
    data_dir: where built datasets live (TFDS's default when None).
    manual_dir: the source folder; needed to build RESIDE / paired folders, and when
      given, checked against the build (see `build`).
    synthetic_config: the synthetic set (defaults when None).
    build_if_missing: build when not built yet; if False a missing dataset is an error.
  """
  if build_if_missing:
    builder = build(name, data_dir, manual_dir, synthetic_config=synthetic_config)
  else:
    with _tfds_quiet():
      builder = get_builder(name, data_dir, manual_dir, synthetic_config=synthetic_config)
      prepared = builder.is_prepared()
    if not prepared:
      raise FileNotFoundError(
          f"{name} is not built in {builder.data_dir}; build it with "
          f"`python -m minet_jax.data.builders {name} --data_dir ... --manual_dir ...`")
    dataset = _split_name(name)[0]
    if dataset in _NEEDS_MANUAL and manual_dir is not None:
      config = builder.builder_config.name if dataset == "reside_sots" else None
      if not _is_current(builder, name, _records(name, config, manual_dir), manual_dir):
        raise StaleBuildError(f"{name} in {builder.data_dir} is stale: {manual_dir} changed "
                              "since it was built; build it again (build_if_missing=True)")
  available = set(builder.info.splits.keys())
  if re.split(r"[\[+]", split, maxsplit=1)[0] not in available:
    raise ValueError(f"{name} has no split {split!r}; it has {sorted(available)}")
  if builder.info.splits[split].num_examples == 0:  # TFDS would say "Paths sequence ...".
    raise ValueError(f"split {split!r} of {name} selects no examples")
  # Images are decoded here with Pillow (TFDS would warn about OpenCV and return
  # depth as uint16 millimetres).
  skip = tfds.decode.SkipDecoding()
  decoders = {name: skip for name in ("hazy", "clear", "depth") if name in builder.info.features}
  source = builder.as_data_source(split=split, decoders=decoders)
  return PairSource(source, name, split)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Build a hazy/clear dataset as array_record.")
  parser.add_argument("name", help="synthetic_haze, reside_its, reside_sots/indoor, "
                      "reside_sots/outdoor or paired_folder[/<name>]")
  parser.add_argument("--data_dir", default=None, help="output root (TFDS default if unset)")
  parser.add_argument("--manual_dir", default=None, help="source folder (RESIDE, paired)")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  try:
    builder = build(args.name, args.data_dir, args.manual_dir, report=False)
  except (folders.DatasetLayoutError, ValueError) as e:
    parser.exit(2, f"error: {e}\n")
  except OSError as e:  # A data_dir or source folder the system refuses: one line too.
    parser.exit(1, f"error: {e}\n")
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"{args.name}: {splits} in {builder.data_dir} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  main()
