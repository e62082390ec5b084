"""One IM-block distilled on whole full-resolution renders: the radius hinge where it fails.

    python benchmarks/stable_fullres.py --init checkpoints/minet_its --block 2 \
        --fraction 0.5 --target 0.85 --out BLOCK_FOLDER [--teacher its] [--steps 300] \
        [--rooms 24] [--size 460 620] [--exposure 1.5 3.0] [--hinge-weight 4] \
        [--inputs MODEL]
    python benchmarks/stable_compose.py --block WORKDIR:0.3 --block BLOCK_FOLDER:0.5 \
        --block WORKDIR:0.7 --save COMPOSED

`configs/stable.py` takes its radius hinge on 128 px crops, and the radius of a stage
map grows with the image it runs on: block 2 expands on SOTS samples with large
saturated areas only at full resolution (docs/STABILITY.md, "Where block 2 expands").
This script trains block ``--block`` of ``--init`` (at stage fraction ``--fraction``,
everything else as stored) on whole renders of the size of the SOTS photographs: the
offline synthetic rooms at ``--size`` with a camera exposure (``--exposure``), one hazy
image per room. The frozen teacher (``--teacher``, the released model) runs once on
each render and its block input g0 and output y are kept (with ``--inputs``, g0 is
that model's block input instead, its blocks solved as it stores them); each step then
takes one render and minimises the block-wise matching term of `configs/stable.py`
(`contractive.fixed_point_mismatch`) plus ``--hinge-weight`` times
max(0, rho - ``--target``)^2, rho the stage map's radius at the stage that answers y
over the whole image (`contractive.block_radius`, ``--iters`` power steps). Adam,
cosine-decayed to 10 %. Only that block's f trains; ``--out`` is a checkpoint folder
holding ``--init`` with that block replaced, its fraction and target set, and
``--out`` + ``.json`` the per-step log. Put it together with other blocks with
`stable_compose.py` and score it with `stable_minet.py`.

A measurement of what a whole-image hinge does, not a training recipe: one block, a
fixed set of renders, no checkpoints while it runs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from minet_jax import hub
from minet_jax.core import checkpoint
from minet_jax.core.config import ModelConfig
from minet_jax.core.params import Params, model_from_params, params_from_model
from minet_jax.data import synthetic
from minet_jax.stability import contractive

import synthetic_saturation  # benchmarks/synthetic_saturation.py: what counts as saturated


def _positive(kind: type) -> Callable[[str], float]:
  def parse(text: str) -> float:
    value = kind(text)
    if not value > 0:
      raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value
  return parse


def _fraction(text: str) -> float:
  value = float(text)
  try:  # The config's own check of a fraction.
    ModelConfig(stage_fraction=value)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from e
  return value


def render_config(rooms: int, size: tuple[int, int], exposure: tuple[float, float],
                  seed: int) -> synthetic.SyntheticHazeConfig:
  """The renders' set: ``rooms`` rooms at ``size``, one haze each, no motorcycle views."""
  return synthetic.SyntheticHazeConfig(image_size=size, train_rooms=rooms,
                                       motorcycle_views=0, hazes_per_scene=1,
                                       exposure_range=exposure, seed=seed)


def renders(config: synthetic.SyntheticHazeConfig) -> np.ndarray:
  """The hazy images of the set's train split, uint8 (N, H, W, 3)."""
  return np.stack([ex["hazy"] for ex in synthetic.generate("train", config)])


def render_set_or_exit(parser: argparse.ArgumentParser, rooms: int, size: tuple[int, int],
                       exposure: tuple[float, float], seed: int, flags: str
                       ) -> synthetic.SyntheticHazeConfig:
  """`render_config`, its errors (and odd sizes) refused through ``parser`` naming ``flags``."""
  if size[0] % 2 or size[1] % 2:
    parser.error(f"--size must be even, got {size[0]} x {size[1]}")
  try:
    return render_config(rooms, tuple(size), tuple(exposure), seed)
  except ValueError as e:  # The set's own checks: size, exposure.
    parser.error(f"{flags}: {e}")


def new_result_or_exit(parser: argparse.ArgumentParser, out: pathlib.Path) -> pathlib.Path:
  """The log path ``out`` + ``.json``; refuses through ``parser`` when ``out`` or it exists
  (nothing is overwritten) or ``out``'s folder does not."""
  log_path = out.with_name(out.name + ".json")
  for path in (out, log_path):
    if path.exists():
      parser.error(f"{path} exists; give --out a new name")
  if not out.parent.is_dir():
    parser.error(f"--out: no folder {out.parent}")
  return log_path


def same_architecture_or_exit(parser: argparse.ArgumentParser, base: Params, base_flag: str,
                              others: dict[str, Params | None]) -> None:
  """Refuses through ``parser`` each of ``others`` (flag -> model; None: not given) whose
  architecture, stage fractions and counts aside (`ModelConfig.same_weights`), is not
  ``base``'s."""
  for name, other in others.items():
    if other is not None and not base.config.same_weights(other.config):
      parser.error(f"{name} has another architecture than {base_flag}")


def train_block(init: Params, teacher: Params, hazy: np.ndarray, *, block: int,
                fraction: float, target: float, steps: int, learning_rate: float,
                hinge_weight: float, iters: int, inputs: Params | None = None,
                seed: int = 0, log: Callable[[str], None] = print
                ) -> tuple[Params, list[dict]]:
  """``init`` with block ``block`` (0-based) trained as described above on ``hazy``
  (float32 [0, 1], (N, H, W, 3)); returns the model and the per-step records (matching
  term and radius, before each update). With ``inputs``, the block's input g0 on each
  render is that model's (its blocks solved as it stores), the output y still the
  teacher's: the block learns to bring the states it is given back to the teacher's."""
  fractions = list(init.config.stage_fraction)
  targets = list(init.config.contractive_target)  # One per block (ModelConfig).
  stages = list(init.config.stages)
  # The block trained here takes one stage, whatever it had in ``init``.
  fractions[block], targets[block], stages[block] = fraction, target, 1
  student = model_from_params(init.replace_config(stage_fraction=tuple(fractions),
                                                  contractive_target=tuple(targets),
                                                  stages=tuple(stages)))
  im_block = student.im_blocks[block]
  teacher_model = model_from_params(teacher)

  input_model = teacher_model if inputs is None else model_from_params(inputs)

  @jax.jit
  def block_states(image):
    # The blocks' states only: `solve_blocks`, not the whole forward pass.
    runs = teacher_model.solve_blocks(teacher_model.model_input(image))
    g0 = runs[block].g0
    if inputs is not None:
      g0 = input_model.solve_blocks(input_model.model_input(image))[block].g0
    return g0, runs[block].output

  # The teacher (and the input model) are frozen: the states are computed once per render.
  states = [block_states(jnp.asarray(image[None])) for image in hazy]
  schedule = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.1)
  optimizer = nnx.Optimizer(im_block, optax.adam(schedule), wrt=nnx.Param)

  @nnx.jit
  def step(im_block, optimizer, g0, y, key):
    def loss_fn(im_block):
      mismatch = jnp.mean(contractive.fixed_point_mismatch(im_block, g0, y))
      hinge, rho = contractive.block_term(im_block, g0, im_block.stage_of(g0, y), key,
                                          kind="radius", num_iters=iters, target=target)
      return mismatch + hinge_weight * hinge, (mismatch, rho)
    (_, (mismatch, rho)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(im_block)
    optimizer.update(im_block, grads)
    return mismatch, rho

  order = np.random.default_rng(seed)
  key = jax.random.key(seed)
  records = []
  for i in range(steps):
    j = int(order.integers(len(states)))
    mismatch, rho = step(im_block, optimizer, *states[j], jax.random.fold_in(key, i))
    records.append({"step": i, "render": int(j), "mismatch": float(mismatch),
                    "rho": float(rho)})
    if i % 10 == 0 or i == steps - 1:
      recent = records[-10:]
      log(f"step {i}: mismatch {np.mean([r['mismatch'] for r in recent]):.4f}, rho mean "
          f"{np.mean([r['rho'] for r in recent]):.3f} max {max(r['rho'] for r in recent):.3f}")
  return params_from_model(student), records


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--init", required=True,
                      help="the model whose block trains: a workdir, checkpoint or .pth")
  parser.add_argument("--teacher", default="its", help="the frozen teacher (default: the "
                      "released model, fetched once; a checkpoint folder or .pth works offline)")
  parser.add_argument("--inputs", default=None, help="the model whose solved blocks give "
                      "the block's input on each render (default: the teacher's), e.g. the "
                      "model the block will sit in")
  parser.add_argument("--block", type=_positive(int), required=True, help="IM-block, from 1")
  parser.add_argument("--fraction", type=_fraction, required=True,
                      help="the block's stage fraction (ModelConfig.stage_fraction)")
  parser.add_argument("--target", type=_positive(float), required=True)
  parser.add_argument("--steps", type=_positive(int), default=300)
  parser.add_argument("--learning-rate", type=_positive(float), default=3e-3)
  parser.add_argument("--hinge-weight", type=_positive(float), default=4.0)
  parser.add_argument("--iters", type=_positive(int), default=8)
  parser.add_argument("--rooms", type=_positive(int), default=24)
  parser.add_argument("--size", type=_positive(int), nargs=2, default=(460, 620),
                      metavar=("H", "W"))
  parser.add_argument("--exposure", type=_positive(float), nargs=2, default=(1.5, 3.0),
                      metavar=("LOW", "HIGH"))
  parser.add_argument("--seed", type=int, default=7, help="the renders' seed")
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args()
  data = render_set_or_exit(parser, args.rooms, args.size, args.exposure, args.seed,
                            "--size / --exposure / --rooms")
  log_path = new_result_or_exit(parser, args.out)
  try:
    init, teacher = hub.resolve(args.init), hub.resolve(args.teacher)
    inputs = None if args.inputs is None else hub.resolve(args.inputs)
  except (OSError, ValueError) as e:
    parser.error(str(e))
  if args.block > init.config.num_blocks:
    parser.error(f"--block {args.block}: the model has {init.config.num_blocks} IM-blocks")
  same_architecture_or_exit(parser, init, "--init", {"--teacher": teacher, "--inputs": inputs})

  start = time.perf_counter()
  hazy = renders(data)
  saturated = synthetic_saturation.saturated_share(hazy)
  print(f"{len(hazy)} renders at {args.size[0]} x {args.size[1]}, {saturated:.1%} of "
        f"their pixels saturated", flush=True)
  params, records = train_block(
      init, teacher, hazy.astype(np.float32) / 255.0, block=args.block - 1,
      fraction=args.fraction, target=args.target,
      steps=args.steps, learning_rate=args.learning_rate, hinge_weight=args.hinge_weight,
      iters=args.iters, inputs=inputs, log=lambda line: print(line, flush=True))
  checkpoint.save(params, args.out)
  seconds = time.perf_counter() - start
  log_path.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, pathlib.Path) else v)
                                           for k, v in vars(args).items()},
                                  "saturated_share": saturated, "seconds": seconds,
                                  "steps": records}, indent=1) + "\n")
  print(f"saved {args.out} and {log_path} ({seconds:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
