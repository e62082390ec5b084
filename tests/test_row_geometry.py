"""Each spatial layer's `RowGeometry` against what the layer does: perturb one input row
and see which output rows change; run it on a window of rows and compare with the
whole map's rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minet_jax.core import layers

HEIGHT = 12  # a multiple of every stride below


def _smoothing(k):
  layer = layers.ShareSepConv(k)
  layer.kernel[...] = jax.random.normal(jax.random.key(3), (k, k))  # not the identity
  return layer


LAYERS = {
    "conv 3x3": lambda: layers.Conv2d(2, 2, 3, padding=1, rngs=nnx.Rngs(0)),
    "conv 3x3 stride 2": lambda: layers.Conv2d(2, 2, 3, stride=2, padding=1, rngs=nnx.Rngs(0)),
    "conv 3x3 stride 2 unpadded": lambda: layers.Conv2d(2, 2, 3, stride=2, rngs=nnx.Rngs(0)),
    "conv 5x5 dilation 2": lambda: layers.Conv2d(2, 2, 5, padding=4, dilation=2,
                                                  rngs=nnx.Rngs(0)),
    "conv 3x3 dilation 3 stride 3 padding 2": lambda: layers.Conv2d(
        2, 2, 3, stride=3, padding=2, dilation=3, rngs=nnx.Rngs(0)),
    "conv 1x1": lambda: layers.Conv2d(2, 2, 1, rngs=nnx.Rngs(0)),
    "transposed 4x4 stride 2 padding 1": lambda: layers.ConvTranspose2d(
        2, 2, 4, stride=2, padding=1, rngs=nnx.Rngs(0)),
    "transposed 3x3 stride 2 padding 1": lambda: layers.ConvTranspose2d(
        2, 2, 3, stride=2, padding=1, rngs=nnx.Rngs(0)),
    "transposed 5x5 stride 3 padding 1": lambda: layers.ConvTranspose2d(
        2, 2, 5, stride=3, padding=1, rngs=nnx.Rngs(0)),
    "smoothing 5x5": lambda: _smoothing(5),
}


@pytest.mark.parametrize("name", LAYERS)
def test_rows_read_are_the_rows_that_change_the_output(name):
  layer = LAYERS[name]()
  geometry = layer.row_geometry
  x = jax.random.normal(jax.random.key(0), (1, HEIGHT, 5, 2))
  y = np.asarray(layer(x))
  assert y.shape[1] == geometry.size(HEIGHT)
  # The resolution change: `scale` more output rows per input row.
  assert geometry.size(2 * HEIGHT) - geometry.size(HEIGHT) == geometry.scale * HEIGHT

  reads = [set() for _ in range(y.shape[1])]
  for row in range(HEIGHT):
    changed = np.any(np.asarray(layer(x.at[:, row].add(1.0))) != y, axis=(0, 2, 3))
    for out in np.flatnonzero(changed):
      reads[out].add(row)
  for out, rows in enumerate(reads):
    first, last = geometry.reads(out)
    assert rows <= set(range(first, last + 1)), (out, rows, (first, last))
    # The ends are read, where they are rows of the map and not its padding.
    assert (first < 0 or first in rows) and (last >= HEIGHT or last in rows), (out, rows)


@pytest.mark.parametrize("name", LAYERS)
def test_a_window_of_rows_gives_the_whole_outputs_rows(name):
  # What the strips rely on: run on input rows [a, b), a a multiple of `phase`, the
  # layer's output row j is the whole output's row first_output(a) + j wherever all
  # the rows it reads lie in [a, b) or outside the map.
  layer = LAYERS[name]()
  geometry = layer.row_geometry
  x = jax.random.normal(jax.random.key(1), (1, HEIGHT, 5, 2))
  whole = np.asarray(layer(x))
  checked = 0
  for a in range(0, 3 * geometry.phase, geometry.phase):
    for b in (a + 3, a + 7, HEIGHT):
      part = np.asarray(layer(x[:, a:b]))
      assert part.shape[1] == geometry.size(b - a)
      for j in range(part.shape[1]):
        out = geometry.first_output(a) + j
        first, last = geometry.reads(out)
        inside = (first >= a or (a == 0 and first < 0)) and (
            last < b or (b == HEIGHT and last >= HEIGHT))
        if inside and 0 <= out < whole.shape[1]:
          np.testing.assert_allclose(part[:, j], whole[:, out], rtol=1e-5, atol=1e-5)
          checked += 1
  assert checked >= 6
  if geometry.phase > 1:
    with pytest.raises(ValueError, match="stride"):
      geometry.first_output(1)


def test_instance_norm_with_given_statistics_is_its_call():
  norm = layers.InstanceNorm(3)
  norm.scale[...] = jnp.asarray([0.5, 1.0, 2.0])
  norm.bias[...] = jnp.asarray([0.1, -0.2, 0.3])
  x = jax.random.normal(jax.random.key(2), (2, 6, 7, 3)) * 3.0 + 1.0
  mean, var = norm.statistics(x)
  np.testing.assert_allclose(mean[:, 0, 0], np.mean(np.asarray(x), axis=(1, 2)), rtol=1e-5)
  np.testing.assert_allclose(var[:, 0, 0], np.var(np.asarray(x), axis=(1, 2)), rtol=1e-5)
  # The top rows, normalised with the whole map's statistics, are the call's top rows.
  np.testing.assert_array_equal(np.asarray(norm.normalize(x[:, :2], mean, var)),
                                np.asarray(norm(x))[:, :2])
