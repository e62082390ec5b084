"""Which recipe makes the released MI-Net stable? Short self-distillation runs, compared.

    python benchmarks/stable_search.py [--shared ../shared] [--steps 150]
        [--variants NAME ...] [--out docs/stability/stable_search.json]

Every variant starts from the authors' released weights, shrinks each IM-block's f by
scaling its last instance norm's (scale, bias) (`minet_jax.stable.shrink_blocks`; f
ends in a ReLU, so this scales f, and eta * df/dg with it), then trains the student
with its blocks solved to rtol 1e-3 (Picard or Anderson) to reproduce the frozen
released model's output (T = 8 unrolled) on hazy images: the offline synthetic
train split and fixed crops of the RESIDE ITS sample pairs (never SOTS). Variants
differ in the shrink, the penalty (spectral norm or Hutchinson Frobenius), its
weight, the adjoint and the learning rate.

Each trained student is scored on the synthetic validation split (images no variant
trains on): PSNR to the teacher's output and to the ground truth, solves converged
and mean steps per block (Picard, rtol 1e-3, at most 50 steps), and rho(eta J) at
the solution on the first four images (power iteration, growth-rate estimate).
The table it prints is the comparison docs/STABILITY.md keeps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

import minet_jax
from minet_jax import convert, metrics
from minet_jax.stability import spectral
from minet_jax.data import folders, synthetic
from minet_jax.core.params import Params, model_from_params
from minet_jax.train import defaults
from minet_jax.train import state as state_lib
from minet_jax.train import step as step_lib

import stable_minet  # benchmarks/stable_minet.py: the SOTS scoring, shared


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One way to make the released model stable (module docstring)."""
  shrink: tuple[float, ...] = (0.3, 0.3, 0.3)
  solver: str = "picard"
  rtol: float = 1e-3
  max_steps: int = 30
  backward: str = "phantom"
  phantom_steps: int = 1
  phantom_damping: float = 1.0
  penalty: str = "spectral"
  penalty_weight: float = 1.0
  penalty_target: float = 0.8
  penalty_point: str = "solution"
  penalty_iters: int = 4
  match_weight: float = 1.0
  output_weight: float = 0.0
  learning_rate: float = 1e-4
  batch_size: int = 2


def student_config(released: Params, recipe: Recipe):
  return dataclasses.replace(
      released.config, solver=recipe.solver, rtol=recipe.rtol,
      iterations=(recipe.max_steps,) * released.config.num_blocks, backward=recipe.backward,
      phantom_steps=recipe.phantom_steps, phantom_damping=recipe.phantom_damping,
      contractive_weight=recipe.penalty_weight if recipe.penalty != "none" else 0.0,
      contractive_kind=recipe.penalty if recipe.penalty != "none" else "spectral",
      contractive_target=recipe.penalty_target, contractive_point=recipe.penalty_point,
      contractive_iters=recipe.penalty_iters, best_so_far=True)


def distillation_images(its_root: pathlib.Path | None) -> dict[str, np.ndarray]:
  """Synthetic train split (144x192) and a fixed grid of 144x192 crops of each ITS pair."""
  pairs = [(ex["hazy"], ex["clear"]) for ex in synthetic.generate("train")]
  if its_root is not None:
    for record in folders.find_its_pairs(its_root):
      hazy, clear = folders.load_pair(record)
      for top in (0, 150, 300):
        for left in (0, 200, 400):
          pairs.append((hazy[top:top + 144, left:left + 192],
                        clear[top:top + 144, left:left + 192]))
  return {"hazy": np.stack([h for h, _ in pairs]).astype(np.float32) / 255.0,
          "clear": np.stack([c for _, c in pairs]).astype(np.float32) / 255.0}


def validation_images() -> dict[str, np.ndarray]:
  examples = list(synthetic.generate("validation"))
  return {k: np.stack([ex[k] for ex in examples]).astype(np.float32) / 255.0
          for k in ("hazy", "clear")}


def batched_forward(params: Params, images: np.ndarray, batch: int = 8):
  graphdef, state = nnx.split(model_from_params(params))

  @jax.jit
  def run(state, x):
    return nnx.merge(graphdef, state).forward_rgb_with_diagnostics(x)

  outs, diags = [], []
  for i in range(0, len(images), batch):
    y, results = run(state, jnp.asarray(images[i:i + batch]))
    outs.append(np.asarray(y))
    diags.append([(np.asarray(r.num_steps), np.asarray(r.status)) for r in results])
  steps = np.concatenate([np.stack([d[0] for d in ds], 1) for ds in diags])
  status = np.concatenate([np.stack([d[1] for d in ds], 1) for ds in diags])
  return np.concatenate(outs), steps, status


def teacher_outputs(released: Params, images: np.ndarray) -> np.ndarray:
  return batched_forward(released, images)[0]


def psnr_mean(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.mean(metrics.psnr(np.clip(a, 0, 1) * 255.0, np.clip(b, 0, 1) * 255.0)))


def rho_at_solution(params: Params, image: np.ndarray, key) -> list[float]:
  model = model_from_params(params)
  graphdef, state = nnx.split(model)
  runs = jax.jit(lambda s, x: nnx.merge(graphdef, s).solve_blocks(
      nnx.merge(graphdef, s).model_input(x)))(state, jnp.asarray(image[None]))
  out = []
  for block, run in zip(model.im_blocks, runs):
    t_map, f_state = block.map_fn()
    matvec, _ = spectral.linearise(lambda z: t_map(z, (run.g0, f_state)), run.result.value)
    key, sub = jax.random.split(key)
    est = jax.jit(lambda v: spectral.spectral_radius(matvec, v, num_iters=40, window=15))(
        jax.random.normal(sub, run.result.value.shape))
    out.append(float(est["radius"]))
  return out


def score(params: Params, val: dict, teacher_val: np.ndarray, *, max_steps: int = 50) -> dict:
  cfg = dataclasses.replace(params.config, solver="picard", rtol=1e-3,
                            iterations=(max_steps,) * params.config.num_blocks)
  solved = Params(weights=params.weights, config=cfg)
  y, steps, status = batched_forward(solved, val["hazy"])
  rho = np.array([rho_at_solution(solved, img, jax.random.key(i))
                  for i, img in enumerate(val["hazy"][:4])])
  return {"psnr_teacher": psnr_mean(y, teacher_val), "psnr_gt": psnr_mean(y, val["clear"]),
          "converged": int((status == 0).sum()), "solves": int(status.size),
          "mean_steps": steps.mean(axis=0).tolist(), "rho_max": rho.max(axis=0).tolist()}


def distil(student: Params, teacher: Params, images: dict, *, recipe: Recipe,
           steps: int, seed: int, log_every: int):
  """`steps` updates of the project's own train step, the teacher's outputs as targets."""
  config = defaults.get_config()
  config.model = defaults.section(student.config)
  config.seed = seed
  config.optimizer.learning_rate = recipe.learning_rate
  config.optimizer.schedule = "cosine"
  config.optimizer.decay_steps = steps
  config.optimizer.cosine_final_fraction = 0.1
  state = state_lib.create_train_state(config, params=student)
  step_fn = step_lib.make_train_step(
      "mse", state_lib.learning_rate_schedule(config.optimizer), teacher=teacher,
      match_weight=recipe.match_weight, output_weight=recipe.output_weight)
  rng = np.random.default_rng(seed)
  log = []
  for i in range(steps):
    idx = rng.choice(len(images["hazy"]), recipe.batch_size, replace=False)
    state, m = step_fn(state, {"hazy": jnp.asarray(images["hazy"][idx]),
                               "clear": jnp.asarray(images["clear"][idx])})
    if (i + 1) % log_every == 0 or i == 0:
      row = {k: float(v) for k, v in m.items()}
      log.append({"step": i + 1, **row})
      print(f"  step {i + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
  return state.params(), log


# name -> Recipe overrides.
VARIANTS = {
    # Blocks alone: the teacher's block outputs as fixed points (no solve in training).
    "match_none": dict(penalty="none"),
    "match_radius": dict(penalty="radius", penalty_weight=1.0, penalty_target=0.9),
    "match_radius_lr3e-4": dict(penalty="radius", penalty_weight=1.0, penalty_target=0.9,
                                learning_rate=3e-4),
    "match_radius_noshrink": dict(shrink=(1.0, 1.0, 1.0), penalty="radius",
                                  penalty_weight=1.0, penalty_target=0.9),
    "match_frobenius": dict(penalty="frobenius", penalty_weight=0.1),
    # The whole student on the teacher's output, blocks solved (phantom gradient).
    "output_none": dict(penalty="none", match_weight=0.0, output_weight=1.0,
                        learning_rate=3e-4),
    "output_radius": dict(penalty="radius", penalty_weight=1.0, penalty_target=0.9,
                          match_weight=0.0, output_weight=1.0, learning_rate=3e-4),
}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shared", type=pathlib.Path, default=stable_minet.DEFAULT_SHARED)
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--untrained", action="store_true",
                      help="also score each variant's shrink before any training")
  parser.add_argument("--score", nargs="*", default=[], metavar="WORKDIR",
                      help="also score these trained models (e.g. a configs/stable.py run) "
                           "in the same table")
  parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON of the results")
  args = parser.parse_args()

  released = convert.weights_from_checkpoint(args.shared / "weights" / "minet_its_official.pth")
  its = args.shared / "data" / "RESIDE" / "ITS"
  train = distillation_images(its_root=its if its.is_dir() else None)
  val = validation_images()
  print(f"{len(train['hazy'])} training images, {len(val['hazy'])} validation images", flush=True)
  teacher_val = teacher_outputs(released, val["hazy"])
  rows = [{"variant": "released (T = 8)", "steps": 0,
           **score(released, val, teacher_val)}]
  print(json.dumps(rows[-1]), flush=True)
  for path in args.score:
    try:
      trained = stable_minet.one_stage_only(minet_jax.load(path), path)
    except ValueError as e:
      raise SystemExit(f"stable_search: --score: {e}") from None
    rows.append({"variant": f"trained: {path}", "steps": 0, **score(trained, val, teacher_val)})
    print(json.dumps(rows[-1]), flush=True)
  for name in args.variants:
    recipe = dataclasses.replace(Recipe(), **VARIANTS[name])
    student = state_lib.shrink_blocks(
        Params(weights=released.weights, config=student_config(released, recipe)), recipe.shrink)
    if args.untrained:
      scores = score(student, val, teacher_val)
      rows.append({"variant": name, "steps": 0, "recipe": dataclasses.asdict(recipe), **scores})
      print(json.dumps(rows[-1]), flush=True)
    start = time.time()
    trained, log = distil(student, released, train, recipe=recipe,
                          steps=args.steps, seed=0, log_every=max(args.steps // 5, 1))
    seconds = time.time() - start
    scores = score(trained, val, teacher_val)
    rows.append({"variant": name, "steps": args.steps, "train_seconds": seconds,
                 "recipe": dataclasses.asdict(recipe), "log": log, **scores})
    print(json.dumps(rows[-1]), flush=True)
    if args.out:
      args.out.parent.mkdir(parents=True, exist_ok=True)
      args.out.write_text(json.dumps(rows, indent=1) + "\n")

  print("\n| variant | steps | s/step | PSNR to teacher | PSNR to GT (teacher "
        f"{psnr_mean(teacher_val, val['clear']):.2f}) | Picard converged | "
        "mean steps per block | rho(eta J) max per block |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    per_step = r.get("train_seconds", float("nan")) / max(r["steps"], 1)
    print(f"| {r['variant']} | {r['steps']} | {per_step:.2f} | {r['psnr_teacher']:.2f} | "
          f"{r['psnr_gt']:.2f} | {r['converged']}/{r['solves']} | "
          f"{' / '.join(f'{s:.1f}' for s in r['mean_steps'])} | "
          f"{' / '.join(f'{x:.3f}' for x in r['rho_max'])} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
