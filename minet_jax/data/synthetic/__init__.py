"""``synthetic_haze``: the embedded default dataset, generated offline.

Physics. Haze follows the atmospheric scattering model used to synthesise
RESIDE (Koschmieder's law, as in He et al.'s dark channel prior):

    I(x) = J(x) * t(x) + A * (1 - t(x)),     t(x) = exp(-beta * d(x))

with J the clear image in [0, 1] (linear in the stored 8-bit values, as RESIDE
does it), A a grey atmospheric light, beta the scattering coefficient and d the
depth. As in RESIDE ITS, each clear image is hazed several times with
beta ~ U[0.6, 1.8] and A ~ U[0.7, 1.0], independently per rendering. An optional
camera exposure (`SyntheticHazeConfig.exposure_range`) scales and clips each clear
image first, so bright surfaces saturate as they do in photographs.

Depth units. Scene depth is z-depth in metres, rounded to whole millimetres
(see `minet_jax.data.synthetic.scenes`):
2.1-5.0 m for the Middlebury motorcycle, about 1-9 m for the rendered rooms,
the range of NYU Depth v2 (0-10 m), whose depth RESIDE ITS hazes. The haze
model sees ``d = depth / max(depth)`` of the image (so d is in (0, 1]) unless
``depth_scale_m`` fixes a scale in metres. This normalisation is what RESIDE
ITS's images imply: fitting the model to the ITS sample pairs gives optical
depths ``beta * d = -log t`` between about 0.45 and 1.2 across an image, which
in metres (2-8 m indoors) would give beta * d of 1.2-14, i.e. mostly white images.
The far wall therefore keeps t = exp(-beta) in [0.17, 0.55].

Scenes. The train split holds `SyntheticHazeConfig.train_rooms` rendered rooms
plus `motorcycle_views` crops of the Middlebury motorcycle (one scene); the
validation split holds `validation_rooms` other rooms. Rooms are drawn from
disjoint random streams, and the photographs hung on validation walls are not
used in training, so no scene is shared between splits. Everything is a
deterministic function of the config (seed included).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np

from minet_jax.core.api import INTEGER_SCALE
from minet_jax.data.synthetic import scenes
from minet_jax.image_io import to_uint8

SPLITS = ("train", "validation")
_STREAM = {"train": 0, "validation": 1, "motorcycle": 2}


@dataclasses.dataclass(frozen=True)
class SyntheticHazeConfig:
  """What `generate` builds; every field changes the data, so all are part of its identity."""
  image_size: tuple[int, int] = (144, 192)  # (height, width) of every image, 3:4 like RESIDE
  train_rooms: int = 48  # rendered rooms in the train split
  validation_rooms: int = 8  # rendered rooms in the validation split
  motorcycle_views: int = 4  # crops of the Middlebury motorcycle, train split only
  hazes_per_scene: int = 3  # hazy renderings of each clear image (ITS uses 10)
  beta_range: tuple[float, float] = (0.6, 1.8)  # scattering coefficient, RESIDE ITS range
  airlight_range: tuple[float, float] = (0.7, 1.0)  # grey atmospheric light, RESIDE ITS range
  depth_scale_m: float | None = None  # None: d = depth / max(depth); else d = depth / this
  # Camera exposure: each clear image is multiplied by a gain from this range and clipped
  # to [0, 1], so bright surfaces saturate into flat white areas as in photographs
  # (RESIDE's white table tops and windows); (1, 1) leaves the renderings as they are.
  exposure_range: tuple[float, float] = (1.0, 1.0)
  supersample: int = 2  # rays per pixel along each axis when rendering rooms
  seed: int = 0

  def __post_init__(self):
    # Config files and JSON give lists; the record must hash and compare as tuples.
    object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
    for name in ("beta_range", "airlight_range", "exposure_range"):
      object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
    h, w = self.image_size
    if h < 16 or w < 16:
      raise ValueError(f"image_size must be at least 16x16, got {self.image_size}")
    for name in ("train_rooms", "validation_rooms", "motorcycle_views"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if self.hazes_per_scene < 1 or self.supersample < 1:
      raise ValueError("hazes_per_scene and supersample must be >= 1")
    for name, floor in (("beta_range", 0.0), ("airlight_range", 0.0), ("exposure_range", 1.0)):
      values = getattr(self, name)
      if len(values) != 2 or not floor <= values[0] <= values[1] < math.inf:
        raise ValueError(f"{name} must be (low, high) with {floor:g} <= low <= high, both "
                         f"finite, got {values}")
    if self.depth_scale_m is not None and self.depth_scale_m <= 0:
      raise ValueError(f"depth_scale_m must be positive or None, got {self.depth_scale_m}")

  def num_examples(self, split: str) -> int:
    if split == "train":
      return (self.train_rooms + self.motorcycle_views) * self.hazes_per_scene
    if split == "validation":
      return self.validation_rooms * self.hazes_per_scene
    raise ValueError(f"unknown split {split!r}; synthetic_haze has {SPLITS}")


def transmission(depth: np.ndarray, beta: float) -> np.ndarray:
  """t = exp(-beta * d)."""
  return np.exp(-beta * np.asarray(depth, np.float64))


def add_haze(clear: np.ndarray, depth: np.ndarray, beta: float, airlight: float,
             depth_scale_m: float | None = None) -> np.ndarray:
  """Hazes a clear image: I = J * t + A * (1 - t).

  Args:
    clear: HxWx3 clear image J, uint8, uint16 or float in [0, 1].
    depth: HxW depth in metres.
    beta: scattering coefficient (per unit of normalised depth).
    airlight: grey atmospheric light A in [0, 1].
    depth_scale_m: None to normalise depth by its maximum, else metres per unit.

  Returns:
    float64 HxWx3 hazy image (in [0, 1] when J and A are).
  """
  clear = np.asarray(clear)
  integer_scale = INTEGER_SCALE.get(clear.dtype)
  j = clear / integer_scale if integer_scale else clear.astype(np.float64)
  depth = np.asarray(depth, np.float64)
  if depth.shape != j.shape[:2]:
    raise ValueError(f"depth shape {depth.shape} does not match image shape {j.shape[:2]}")
  scale = depth.max() if depth_scale_m is None else depth_scale_m
  if not scale > 0:  # 0 / 0 would make every pixel NaN.
    raise ValueError(f"cannot normalise depth by {scale!r}: "
                     + ("its maximum must be > 0 (0 everywhere, negative or NaN?)"
                        if depth_scale_m is None else "depth_scale_m must be > 0"))
  t = transmission(depth / scale, beta)[..., None]
  return j * t + airlight * (1.0 - t)


def _scene_list(split: str, config: SyntheticHazeConfig) -> list[tuple[str, str, int]]:
  """(scene id, stream, index) of every clear image of a split."""
  if split == "train":
    rooms = [(f"train_room_{i:04d}", "train", i) for i in range(config.train_rooms)]
    return rooms + [("motorcycle", "motorcycle", i) for i in range(config.motorcycle_views)]
  if split == "validation":
    return [(f"validation_room_{i:04d}", "validation", i)
            for i in range(config.validation_rooms)]
  raise ValueError(f"unknown split {split!r}; synthetic_haze has {SPLITS}")


def render_scene(stream: str, index: int,
                 config: SyntheticHazeConfig) -> tuple[np.ndarray, np.ndarray]:
  """The clear image (uint8 HxWx3) and depth (float32 HxW, metres) of one scene."""
  rng = np.random.default_rng([config.seed, _STREAM[stream], index])
  if stream == "motorcycle":
    rgb, depth = scenes.motorcycle(rng, config.image_size)
  else:
    posters = scenes.TRAIN_POSTERS if stream == "train" else scenes.VALIDATION_POSTERS
    rgb, depth = scenes.render_room(rng, config.image_size, posters, config.supersample)
  if config.exposure_range != (1.0, 1.0):
    # Its own stream: the scene's draws, and so its geometry and materials, stay the same.
    gain = np.random.default_rng([config.seed, _STREAM[stream], index, 2]).uniform(
        *config.exposure_range)
    rgb = np.clip(rgb * np.float32(gain), 0.0, 1.0)
  # Millimetre steps, as Kinect / NYU depth PNGs store it; the haze is made from this.
  return to_uint8(rgb), (np.round(depth * 1000.0) / 1000.0).astype(np.float32)


def generate(split: str, config: SyntheticHazeConfig | None = None) -> Iterator[dict]:
  """Yields the examples of a split, in a fixed order.

  Each example: ``hazy`` and ``clear`` uint8 HxWx3, ``depth`` float32 HxW in
  metres, ``scene`` and ``key`` str, ``index`` (which rendering of the scene)
  int, ``beta`` and ``airlight`` float32.
  """
  config = config or SyntheticHazeConfig()
  for scene in _scene_list(split, config):
    yield from _hazed(*scene, config)


def num_scenes(split: str, config: SyntheticHazeConfig | None = None) -> int:
  """How many clear images a split holds (each hazed ``hazes_per_scene`` times)."""
  return len(_scene_list(split, config or SyntheticHazeConfig()))


def scene_examples(split: str, position: int,
                   config: SyntheticHazeConfig | None = None) -> Iterator[dict]:
  """The examples of the ``position``-th clear image of a split (`generate`'s, in its
  order), rendering that scene alone."""
  config = config or SyntheticHazeConfig()
  scenes_ = _scene_list(split, config)
  if not 0 <= position < len(scenes_):
    raise ValueError(f"position {position} is outside the {len(scenes_)} scenes of {split!r}")
  return _hazed(*scenes_[position], config)


def _hazed(scene: str, stream: str, index: int, config: SyntheticHazeConfig) -> Iterator[dict]:
  """The ``hazes_per_scene`` examples of one clear image."""
  clear, depth = render_scene(stream, index, config)
  # A separate stream for haze parameters: changing hazes_per_scene keeps the scenes.
  rng = np.random.default_rng([config.seed, _STREAM[stream], index, 1])
  for k in range(config.hazes_per_scene):
    beta = float(rng.uniform(*config.beta_range))
    airlight = float(rng.uniform(*config.airlight_range))
    hazy = to_uint8(add_haze(clear, depth, beta, airlight, config.depth_scale_m))
    suffix = f"{index:02d}_{k}" if stream == "motorcycle" else str(k)
    yield {"hazy": hazy, "clear": clear, "depth": depth, "scene": scene,
           "key": f"{scene}_{suffix}", "index": k, "beta": np.float32(beta),
           "airlight": np.float32(airlight)}
