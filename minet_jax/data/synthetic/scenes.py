"""Clean images with exact depth that need no download.

Two sources, both returning ``(rgb, depth)`` with ``rgb`` float32 HxWx3 in
[0, 1] and ``depth`` float32 HxW in metres, measured along the optical axis
(z-depth, the convention of Kinect / NYU Depth v2, whose maps RESIDE ITS
hazes):

* `render_room`: a procedurally generated indoor scene, ray cast in numpy. A
  pinhole camera stands in a box-shaped room (3-6 m wide, 4-8 m deep, 2.4-3.2 m
  high) furnished with boxes (possibly rotated about the vertical) and with
  photographs hung on the walls. Surfaces are textured with images bundled in
  scikit-image (no download), lit by a ceiling point light with hard shadows
  plus ambient light. Depth is exact: it is the ray parameter of the first hit.
  Rendering is supersampled and box-filtered, colour and depth alike.
* `motorcycle`: the left image of Middlebury 2014 "Motorcycle" as bundled with
  scikit-image (``skimage.data.stereo_motorcycle``, downsampled 4x), with depth
  from its ground-truth disparity ``d`` (pixels) by the Middlebury relation
  ``Z = f * B / (d + doffs)``: f = 994.978 px, baseline B = 0.193001 m,
  doffs = 31.086 px (the calibration scikit-image documents for this size),
  giving 2.1-5.0 m. Pixels without ground truth (7 %, non-finite in the file,
  mostly occlusions beside foreground edges) take the farther (smaller
  disparity) of the nearest valid neighbours on their scanline, since an
  occluded pixel belongs to the background; any still left take the nearest
  valid pixel in 2-D.

The bundled images are split between purposes: `MATERIALS` tile walls, floors
and furniture in both splits, `TRAIN_POSTERS` and `VALIDATION_POSTERS` hang on
the walls of one split each, so the validation split shows no photograph that
the train split contains.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage
from skimage import data as skdata
from skimage import transform

# Middlebury 2014 "Motorcycle" calibration at the 4x-downsampled size scikit-image bundles.
MOTORCYCLE_FOCAL_PX = 994.978
MOTORCYCLE_BASELINE_M = 0.193001
MOTORCYCLE_DOFFS_PX = 31.086

# Bundled scikit-image images (shipped inside the wheel, no download).
# The three groups are disjoint: no photograph is both a material and a poster, and
# validation posters never appear in the train split.
MATERIALS = ("brick", "grass", "gravel", "moon", "coins", "cell", "hubble_deep_field",
             "immunohistochemistry")
TRAIN_POSTERS = ("astronaut", "chelsea", "rocket", "camera")
VALIDATION_POSTERS = ("coffee", "retina", "colorwheel")


@functools.lru_cache(maxsize=None)
def bundled_image(name: str, max_side: int = 256) -> np.ndarray:
  """A scikit-image bundled image as float32 HxWx3 in [0, 1], at most `max_side` px."""
  image = getattr(skdata, name)()
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  image = image[..., :3].astype(np.float32) / 255.0
  scale = max_side / max(image.shape[:2])
  if scale < 1:
    image = transform.rescale(image, scale, channel_axis=-1, anti_aliasing=True,
                              preserve_range=True).astype(np.float32)
  image.setflags(write=False)
  return image


def disparity_to_depth(disparity: np.ndarray, focal_px: float = MOTORCYCLE_FOCAL_PX,
                       baseline_m: float = MOTORCYCLE_BASELINE_M,
                       doffs_px: float = MOTORCYCLE_DOFFS_PX) -> np.ndarray:
  """Middlebury disparity (px) -> z-depth (m); invalid disparities give NaN."""
  disparity = np.asarray(disparity, np.float64)
  valid = np.isfinite(disparity) & (disparity + doffs_px > 0)
  depth = np.full(disparity.shape, np.nan)
  depth[valid] = focal_px * baseline_m / (disparity[valid] + doffs_px)
  return depth


def fill_invalid_disparity(disparity: np.ndarray) -> np.ndarray:
  """Fills non-finite disparities with the background (smaller) scanline neighbour."""
  disparity = np.asarray(disparity, np.float64)
  valid = np.isfinite(disparity)
  h, w = disparity.shape
  cols = np.broadcast_to(np.arange(w), (h, w))
  # Index of the nearest valid pixel at or left of / right of each pixel (-1 / w: none).
  left = np.maximum.accumulate(np.where(valid, cols, -1), axis=1)
  right = np.minimum.accumulate(np.where(valid, cols, w)[:, ::-1], axis=1)[:, ::-1]
  rows = np.arange(h)[:, None]
  from_left = np.where(left >= 0, disparity[rows, np.clip(left, 0, w - 1)], np.inf)
  from_right = np.where(right < w, disparity[rows, np.clip(right, 0, w - 1)], np.inf)
  filled = np.where(valid, disparity, np.minimum(from_left, from_right))
  still = ~np.isfinite(filled)
  if still.any():
    _, (iy, ix) = ndimage.distance_transform_edt(still, return_indices=True)
    filled = filled[iy, ix]
  return filled


@functools.lru_cache(maxsize=1)
def _motorcycle_full() -> tuple[np.ndarray, np.ndarray]:
  left, _, disparity = skdata.stereo_motorcycle()
  depth = disparity_to_depth(fill_invalid_disparity(disparity)).astype(np.float32)
  rgb = left.astype(np.float32) / 255.0
  rgb.setflags(write=False)
  depth.setflags(write=False)
  return rgb, depth


def motorcycle(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """A random crop of the Middlebury motorcycle (aspect of `size`), resized to `size`.

  The crop covers 55-100 % of the largest window of that aspect in the 500x741
  image, so crops differ in framing and scale.
  """
  rgb, depth = _motorcycle_full()
  h, w = size
  full_h, full_w = depth.shape
  base = min(full_h / h, full_w / w)
  scale = base * rng.uniform(0.55, 1.0)
  ch, cw = int(round(h * scale)), int(round(w * scale))
  top = int(rng.integers(0, full_h - ch + 1))
  left = int(rng.integers(0, full_w - cw + 1))
  crop = (slice(top, top + ch), slice(left, left + cw))
  out_rgb = transform.resize(rgb[crop], (h, w), anti_aliasing=True, preserve_range=True)
  out_depth = transform.resize(depth[crop], (h, w), anti_aliasing=True, preserve_range=True)
  return np.clip(out_rgb, 0, 1).astype(np.float32), out_depth.astype(np.float32)


def _rotation(yaw: float, pitch: float) -> np.ndarray:
  """Camera-to-world rotation: pitch about x (positive looks up), then yaw about y."""
  cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
  r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  r_pitch = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])
  return r_yaw @ r_pitch


@functools.lru_cache(maxsize=None)
def _mean_colour(name: str) -> np.ndarray:
  return bundled_image(name).mean(axis=(0, 1), dtype=np.float64).astype(np.float32)


def _material(rng: np.random.Generator) -> dict:
  name = MATERIALS[rng.integers(len(MATERIALS))]
  tint = rng.uniform(0.35, 1.0, 3) if rng.random() < 0.7 else np.ones(3)
  # Rescale to a random albedo: some photos (the Hubble field) are nearly black, and
  # indoor surfaces mostly reflect 25-85 % of the light.
  gain = rng.uniform(0.25, 0.85) / max(float(_mean_colour(name).mean()), 1e-3)
  return {"texture": bundled_image(name), "mean": _mean_colour(name),
          "tint": (gain * tint / tint.max()).astype(np.float32),
          "metres_per_tile": float(rng.uniform(0.6, 2.5)),
          "offset": [float(x) for x in rng.uniform(0, 1, 2)],
          "contrast": float(rng.uniform(0.4, 1.0))}


def _sample(material: dict, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Tiles a material's texture over surface coordinates (u, v) in metres."""
  tex = material["texture"]
  th, tw = tex.shape[:2]
  span = material["metres_per_tile"]
  x = ((u / span + material["offset"][0]) % 1.0) * (tw - 1)
  y = ((v / span + material["offset"][1]) % 1.0) * (th - 1)
  colour = tex[y.astype(np.int32), x.astype(np.int32)]
  mean = material["mean"]
  colour = mean + material["contrast"] * (colour - mean)
  return colour * material["tint"]


def _yaw_matrix(yaw: float) -> np.ndarray:
  """World-to-box rotation about the vertical axis."""
  c, s = np.cos(yaw), np.sin(yaw)
  return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])


def _box_corners(half: np.ndarray, yaw: float) -> np.ndarray:
  signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)])
  return (signs * half) @ _yaw_matrix(yaw)


def _box_hits(origin: np.ndarray, rays: np.ndarray, centre: np.ndarray, half: np.ndarray,
              yaw: float, want_normal: bool = True):
  """Slab test of rays against a yawed box: (hit, entry t, entry axis, world normal)."""
  to_local = _yaw_matrix(yaw).astype(rays.dtype)
  o = (origin - centre.astype(rays.dtype)) @ to_local.T
  d = rays @ to_local.T
  o = np.broadcast_to(o, d.shape)
  t_in = np.full(d.shape[0], -np.inf, d.dtype)
  t_out = np.full(d.shape[0], np.inf, d.dtype)
  axis = np.zeros(d.shape[0], np.int64)
  for k in range(3):
    dk = d[:, k]
    inv = 1.0 / np.where(np.abs(dk) < 1e-9, 1e-9, dk)
    ta = (-float(half[k]) - o[:, k]) * inv
    tb = (float(half[k]) - o[:, k]) * inv
    near = np.minimum(ta, tb)
    if want_normal:
      axis = np.where(near > t_in, k, axis)
    t_in = np.maximum(t_in, near)
    t_out = np.minimum(t_out, np.maximum(ta, tb))
  hit = (t_in <= t_out) & (t_in > 1e-6)
  if not want_normal:
    return hit, t_in, None, None
  local_n = np.zeros_like(d)
  rows = np.arange(d.shape[0])
  local_n[rows, axis] = -np.sign(d[rows, axis])
  return hit, t_in, axis, local_n @ to_local


def render_room(rng: np.random.Generator, size: tuple[int, int], posters: tuple[str, ...],
                supersample: int = 2, return_info: bool = False):
  """Renders a random furnished room.

  Args:
    rng: source of every random choice (the scene is a function of its state).
    size: (height, width) of the output.
    posters: names of bundled images that may hang on the walls.
    supersample: rays per pixel along each axis; colour and depth are box-filtered.
    return_info: also return the camera and per-ray surface labels (for checks).

  Returns:
    ``(rgb, depth)``: float32 HxWx3 in [0, 1] and float32 HxW z-depth in metres;
    with `return_info`, a third item: a dict with ``eye`` (camera centre, world
    metres; the floor is y = 0 and the back wall z = ``room[1]``), ``rotation``
    (camera-to-world), ``focal`` (px at the supersampled size), ``room`` (width,
    depth, height) and ``label`` (supersampled HxW: 0/1 side walls, 2 floor,
    3 ceiling, 4 front, 5 back wall, 6 + i box i).
  """
  h, w = size
  hs, ws = h * supersample, w * supersample
  room_w, room_d, room_h = rng.uniform(3, 6), rng.uniform(4, 8), rng.uniform(2.4, 3.2)
  f32 = np.float32  # float32 throughout: twice as fast, and millimetre-exact at room scale
  lo = np.array([-room_w / 2, 0.0, 0.0], f32)
  hi = np.array([room_w / 2, room_h, room_d], f32)
  eye = np.array([rng.uniform(-0.3, 0.3) * room_w, rng.uniform(1.0, 1.7), rng.uniform(0.2, 0.8)],
                 f32)
  rot = _rotation(np.deg2rad(rng.uniform(-25, 25)), np.deg2rad(rng.uniform(-15, 5))).astype(f32)
  focal = float(0.5 * ws / np.tan(np.deg2rad(rng.uniform(55, 70)) / 2))

  # One ray per subpixel; camera-frame direction (x, y, 1) makes the ray parameter the z-depth.
  cam_x = (np.arange(ws, dtype=f32) + 0.5 - ws / 2) / focal
  cam_y = -(np.arange(hs, dtype=f32) + 0.5 - hs / 2) / focal
  dirs = (cam_y[:, None, None] * rot[:, 1] + cam_x[None, :, None] * rot[:, 0]
          + rot[:, 2]).reshape(-1, 3)
  n_rays = dirs.shape[0]
  rays = np.arange(n_rays)

  # Room interior: exit distance through the walls, per axis, and which wall.
  safe = np.where(np.abs(dirs) < 1e-9, 1e-9, dirs)
  wall_t = np.where(safe > 0, (hi - eye) / safe, (lo - eye) / safe)
  axis = np.argmin(wall_t, axis=1)
  depth = wall_t[rays, axis]
  positive = safe[rays, axis] > 0
  # Labels 0..5: x- wall, x+ wall, floor, ceiling, front, back; 6 + i: box i.
  label = axis * 2 + positive
  normal = np.zeros((n_rays, 3), f32)
  normal[rays, axis] = np.where(positive, -1.0, 1.0)

  # Furniture: boxes standing on the floor in front of the camera, yawed about their centre.
  boxes = []
  for _ in range(int(rng.integers(3, 9))):
    half = np.array([rng.uniform(0.15, 0.8), rng.uniform(0.15, 0.9), rng.uniform(0.2, 0.6)])
    half[1] = min(half[1], room_h * 0.45)
    centre = np.array([rng.uniform(lo[0] + half[0], hi[0] - half[0]), half[1],
                       rng.uniform(eye[2] + 1.5 + half[2], room_d - half[2])])
    boxes.append((centre, half, rng.uniform(-np.pi / 4, np.pi / 4), _material(rng)))

  box_axis = np.zeros(n_rays, np.int64)
  pixel_index = rays.reshape(hs, ws)
  for i, (centre, half, yaw, _) in enumerate(boxes):
    # Only rays through the box's screen-space bounding rectangle can hit it.
    cam_pts = (centre + _box_corners(half, yaw) - eye) @ rot
    if np.all(cam_pts[:, 2] > 0.05):
      cols = cam_pts[:, 0] / cam_pts[:, 2] * focal + ws / 2
      rows = -cam_pts[:, 1] / cam_pts[:, 2] * focal + hs / 2
      r0, r1 = np.clip([np.floor(rows.min()), np.ceil(rows.max()) + 1], 0, hs).astype(int)
      c0, c1 = np.clip([np.floor(cols.min()), np.ceil(cols.max()) + 1], 0, ws).astype(int)
      idx = pixel_index[r0:r1, c0:c1].ravel()
    else:
      idx = rays
    if idx.size == 0:
      continue
    hit, t_in, near_axis, local_n = _box_hits(eye, dirs[idx], centre, half, yaw)
    closer = hit & (t_in < depth[idx])
    sel = idx[closer]
    depth[sel] = t_in[closer]
    label[sel] = 6 + i
    box_axis[sel] = near_axis[closer]
    normal[sel] = local_n[closer]

  points = eye + depth[:, None] * dirs
  colour = np.zeros((n_rays, 3), f32)
  order = np.argsort(label, kind="stable")
  bounds = np.searchsorted(label[order], np.arange(7 + len(boxes)))
  groups = {g: order[bounds[g]:bounds[g + 1]] for g in range(6 + len(boxes))}

  # Walls, floor and ceiling: each gets a material; (u, v) are in-plane metres.
  uv_axes = {0: (2, 1), 1: (2, 1), 2: (0, 2), 3: (0, 2), 4: (0, 1), 5: (0, 1)}
  for g in range(6):
    material = _material(rng)
    idx = groups[g]
    if idx.size:
      a, b = uv_axes[g]
      colour[idx] = _sample(material, points[idx, a], points[idx, b])
  for i, (centre, half, yaw, material) in enumerate(boxes):
    idx = groups[6 + i]
    if idx.size:
      local = (points[idx] - centre.astype(f32)) @ _yaw_matrix(yaw).T.astype(f32)
      ax = box_axis[idx]
      u = np.where(ax == 0, local[:, 2], local[:, 0])
      v = np.where(ax == 1, local[:, 2], local[:, 1])
      colour[idx] = _sample(material, u, v)

  # Photographs on the side and back walls (decals, so depth is unchanged).
  for _ in range(int(rng.integers(1, 4))):
    wall = int(rng.choice([0, 1, 5]))
    photo = bundled_image(posters[rng.integers(len(posters))])
    ph, pw = photo.shape[:2]
    height_m = rng.uniform(0.5, 1.2)
    width_m = height_m * pw / ph
    a, b = uv_axes[wall]
    extent = hi[a] - lo[a]
    if width_m > 0.9 * extent:
      continue
    u0 = lo[a] + rng.uniform(0.05 * extent, 0.95 * extent - width_m)
    v0 = rng.uniform(0.7, max(0.75, room_h - height_m - 0.2))
    idx = groups[wall]
    pu = (points[idx, a] - u0) / width_m
    pv = 1.0 - (points[idx, b] - v0) / height_m
    inside = (pu >= 0) & (pu < 1) & (pv >= 0) & (pv < 1)
    colour[idx[inside]] = photo[(pv[inside] * (ph - 1)).astype(np.int32),
                                (pu[inside] * (pw - 1)).astype(np.int32)]

  # Lambertian shading from a ceiling light, with hard shadows cast by the boxes.
  light = np.array([rng.uniform(lo[0] + 0.5, hi[0] - 0.5), room_h - 0.1,
                    rng.uniform(0.3, 0.7) * room_d], f32)
  to_light = light - points
  dist = np.sqrt(np.einsum("ij,ij->i", to_light, to_light))
  lambert = np.clip(np.einsum("ij,ij->i", normal, to_light) / np.maximum(dist, 1e-6), 0, 1)
  # Shadow rays start from one subpixel per pixel, shared by the others (a quarter of
  # the work at supersample=2; shadow edges are pixel-sharp). Surfaces facing away from
  # the light are unlit anyway.
  first = pixel_index[::supersample, ::supersample].ravel()
  candidates = first[lambert[first] > 0]
  origins = np.zeros_like(points)
  origins[candidates] = points[candidates] + 1e-4 * normal[candidates]
  seg_lo = np.minimum(origins[candidates], light)
  seg_hi = np.maximum(origins[candidates], light)
  lit = np.zeros(n_rays, bool)
  lit[candidates] = True
  for centre, half, yaw, _ in boxes:
    corners = centre + _box_corners(half, yaw)
    # Only segments whose bounding box meets the box's can be blocked by it.
    near = np.all((seg_lo <= corners.max(0)) & (seg_hi >= corners.min(0)), axis=1)
    idx = candidates[near & lit[candidates]]
    if idx.size:
      hit, t_in, _, _ = _box_hits(origins[idx], light - origins[idx], centre, half, yaw,
                                  want_normal=False)
      lit[idx[hit & (t_in < 1.0)]] = False
  lit = np.repeat(np.repeat(lit.reshape(hs, ws)[::supersample, ::supersample], supersample, 0),
                  supersample, 1).ravel()
  power = rng.uniform(0.7, 1.1)
  ambient = rng.uniform(0.25, 0.45)
  shade = ambient + (1 - ambient) * 1.6 * power * lambert * lit / (1 + (dist / f32(4)) ** 2)
  colour = np.clip(colour * shade[:, None], 0, 1)

  def pool(x):
    x = x.reshape(h, supersample, w, supersample, *x.shape[2:])
    return x.mean(axis=(1, 3))

  rgb = pool(colour.reshape(hs, ws, 3)).astype(np.float32)
  depth_out = pool(depth.reshape(hs, ws)).astype(np.float32)
  if not return_info:
    return rgb, depth_out
  info = {"eye": eye, "rotation": rot, "focal": focal, "room": (room_w, room_d, room_h),
          "label": label.reshape(hs, ws)}
  return rgb, depth_out, info
