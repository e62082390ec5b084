"""What one step of each fixed-point solver costs on a real IM-block, against the unrolled loop.

    python benchmarks/solver_overhead.py [--shared ../shared] [--image 1400_1] [--block 2]
        [--steps 8] [--repeats 5] [--model-repeats 3] [--baseline OLD_fixed_point.py]
        [--out FILE]

One IM-block of the released weights (``--block``, 1-based, or 0 for all three in turn)
is solved from its real input: g0 is the encoder output of a SOTS indoor image
(``--image``; 620x460 gives features of 1x230x310x64), as in the released forward pass
(for blocks 2 and 3, the previous blocks' unrolled outputs). Each variant is one jitted
call, compiled and run once before timing, then timed ``--repeats`` times, the variants
alternating (in an order that rotates every round) so that all of them see the same
machine load; the figure is the median:

* f: one evaluation of the block's map T(g) = g0 + eta * f(g), a call of its own (so
  with a call's fixed cost, which the solvers spread over their steps);
* f chain: ``--steps`` evaluations chained in one program, no residuals: the floor of a step;
* unrolled: `fixed_point.Unrolled`, ``--steps`` steps (the released solver);
* picard: `fixed_point.Picard` with rtol = atol = 0, i.e. forced to take all steps;
* picard best: the same with ``best_so_far=True``;
* anderson: `fixed_point.Anderson` (m = 5) with rtol = atol = 0.

It prints seconds per step (one map evaluation) and each variant's ratio to unrolled.
Then the whole released model's forward pass (`MINet.forward_rgb_with_diagnostics`,
jitted) is timed the same way with its unrolled solver and with Picard at rtol 0 and
the released step counts, i.e. the same number of map evaluations.

``--baseline`` names another copy of ``minet_jax/core/fixed_point.py`` (e.g. the one of
an earlier commit, ``git show REV:minet_jax/core/fixed_point.py > old.py``); its solvers
are timed alongside those of the ``minet_jax`` that Python imports, block and model, in
the same alternation, and their answers (values, statuses, steps, residuals,
histories) are checked to be bit-identical to those. docs/PERFORMANCE.md quotes the
figures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minet_jax import convert
from minet_jax.core import fixed_point as fp
from minet_jax.core import model as model_module
from minet_jax.core.params import Params, model_from_params
from minet_jax.data import folders

DEFAULT_SHARED = pathlib.Path(
    os.environ.get("MINET_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared"))


def load_solver_module(path: pathlib.Path):
  """A copy of fixed_point.py imported as its own module (it depends on jax and chex only)."""
  name = f"baseline_fixed_point_{path.stem}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # its dataclasses look their module up while being built
  spec.loader.exec_module(module)
  return module


def solver_variants(module, steps: int) -> dict:
  """name -> solver object of ``module`` (a fixed_point module); all take ``steps`` steps."""
  return {"unrolled": module.Unrolled(),
          "picard": module.Picard(rtol=0.0),
          "picard best": module.Picard(rtol=0.0, best_so_far=True),
          "anderson": module.Anderson(rtol=0.0)}


def block_inputs(params: Params, hazy: np.ndarray, block: int):
  """(T, args, g0) of IM-block ``block`` (0-based) on the image, in the released forward pass."""
  model = model_from_params(params)
  x = jnp.asarray(hazy[None], jnp.float32) / 255.0
  g0 = jax.jit(lambda x: model.encode(model.model_input(x)))(x)
  for earlier in model.im_blocks[:block]:
    g0 = jax.jit(lambda g: earlier(g))(g0)
  implicit_euler_map, state = model.im_blocks[block].map_fn()
  return implicit_euler_map, (g0, state), jax.block_until_ready(g0)


def _timed(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def alternate(calls: dict, repeats: int) -> dict[str, float]:
  """Median seconds of each zero-argument call, after one warm-up call each, alternating."""
  for call in calls.values():
    jax.block_until_ready(call())
  times: dict[str, list[float]] = {name: [] for name in calls}
  names = list(calls)
  for r in range(repeats):
    # Each round starts one variant later, so that none always runs after the same one
    # (a variant that leaves the caches or the allocator in a bad state slows the next).
    for name in names[r % len(names):] + names[:r % len(names)]:
      times[name].append(_timed(calls[name]))
  return {name: statistics.median(t) for name, t in times.items()}


def _same(a, b) -> bool:
  """Bit-identical pytrees (NaN equal to NaN)."""
  return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def block_figures(fn, args, g0, modules: dict, steps: int, repeats: int) -> dict:
  """Seconds per step of every solver of every module, and of one map evaluation."""
  calls, answers = {}, {}
  evaluate = jax.jit(fn)
  calls["f"] = lambda: evaluate(g0, args)

  def chain(g, args):
    for _ in range(steps):
      g = fn(g, args)
    return g
  chained = jax.jit(chain)
  calls["f chain"] = lambda: chained(g0, args)
  for name in solver_variants(fp, steps):
    for tag, module in modules.items():
      solver = solver_variants(module, steps)[name]
      solve = jax.jit(lambda g0, args, module=module, solver=solver: module.fixed_point(
          fn, solver, g0, args, max_steps=steps, per_sample=True))
      key = f"{name} [{tag}]" if len(modules) > 1 else name
      calls[key] = lambda solve=solve: solve(g0, args)
      answers[key] = calls[key]()
  seconds = alternate(calls, repeats)
  per_step = {k: (v if k == "f" else v / steps) for k, v in seconds.items()}
  identical = {}
  if len(modules) > 1:
    first, *others = modules
    for name in solver_variants(fp, steps):
      ref = answers[f"{name} [{first}]"]
      for tag in others:
        other = answers[f"{name} [{tag}]"]
        identical[f"{name} [{tag}]"] = _same(
            (ref.value, ref.status, ref.num_steps, ref.residual, ref.residual_history),
            (other.value, other.status, other.num_steps, other.residual,
             other.residual_history))
  return {"seconds_per_step": per_step, "identical_to_first": identical}


@contextlib.contextmanager
def model_solvers(module):
  """Builds and traces models with another fixed_point module's solvers."""
  saved = model_module.fp
  model_module.fp = module
  try:
    yield
  finally:
    model_module.fp = saved


def model_forward(params: Params, module, x):
  """A compiled forward pass (output and per-block diagnostics) with ``module``'s solvers."""
  with model_solvers(module):
    model = model_from_params(params)
    for block in model.im_blocks:  # The model's objects may come from a cached structure.
      block.solver, block.adjoint = module.from_config(params.config)
    graphdef, state = nnx.split(model)

    def run(state, x):
      y, results = nnx.merge(graphdef, state).forward_rgb_with_diagnostics(x)
      return y, [(r.status, r.num_steps, r.residual, r.residual_history) for r in results]

    compiled = jax.jit(run).lower(state, x).compile()
  return lambda: compiled(state, x)


def model_figures(params: Params, hazy: np.ndarray, modules: dict, repeats: int) -> dict:
  """Seconds per image: released unrolled model, and Picard (rtol 0) with its step counts."""
  x = jnp.asarray(hazy[None], jnp.float32) / 255.0
  picard = Params(weights=params.weights, config=dataclasses.replace(
      params.config, solver="picard", rtol=0.0, atol=0.0))
  calls = {"unrolled": model_forward(params, fp, x)}
  for tag, module in modules.items():
    calls[f"picard [{tag}]" if len(modules) > 1 else "picard"] = model_forward(
        picard, module, x)
  seconds = alternate(calls, repeats)
  identical = {}
  if len(modules) > 1:
    first, *others = modules
    for tag in others:
      identical[f"picard [{tag}]"] = _same(calls[f"picard [{first}]"](),
                                           calls[f"picard [{tag}]"]())
  return {"seconds_per_image": seconds, "identical_to_first": identical}


def _print_table(title: str, seconds: dict[str, float], unit: str) -> None:
  reference = next(v for k, v in seconds.items() if k.startswith("unrolled"))
  print(f"\n{title}\n| variant | {unit} | / unrolled |\n|---|---:|---:|")
  for name, value in seconds.items():
    print(f"| {name} | {value:.4f} | {value / reference:.3f} |")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
  parser.add_argument("--image", default="1400_1", help="SOTS indoor image key")
  parser.add_argument("--block", type=int, default=2, choices=(0, 1, 2, 3),
                      help="IM-block (1-3), or 0 for all three")
  parser.add_argument("--steps", type=int, default=8, help="steps per solve")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--model-repeats", type=int, default=3,
                      help="repeats of the whole-model comparison (0 skips it)")
  parser.add_argument("--baseline", type=pathlib.Path, default=None,
                      help="another fixed_point.py whose solvers are timed alongside")
  parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON file to write")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.repeats < 1:
    parser.error("--steps and --repeats must be >= 1")

  records = [r for r in folders.find_sots_pairs(args.shared / "data/RESIDE/SOTS/indoor")
             if r.key == args.image]
  if not records:
    parser.error(f"no SOTS indoor image {args.image!r} under {args.shared}")
  hazy, _ = folders.load_pair(records[0])
  params = convert.weights_from_checkpoint(args.shared / "weights" / "minet_its_official.pth")
  modules = {"current": fp}
  if args.baseline is not None:
    modules["baseline"] = load_solver_module(args.baseline)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); host: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; conv backend "
        f"{params.config.conv_backend}; image {args.image} {hazy.shape[1]}x{hazy.shape[0]}; "
        f"{args.steps} steps; median of {args.repeats}", flush=True)

  report: dict = {"image": args.image, "steps": args.steps, "repeats": args.repeats,
                  "conv_backend": params.config.conv_backend, "host": platform.machine(),
                  "cpus": os.cpu_count(), "blocks": {}}
  for block in ([1, 2, 3] if args.block == 0 else [args.block]):
    fn, fargs, g0 = block_inputs(params, hazy, block - 1)
    figures = block_figures(fn, fargs, g0, modules, args.steps, args.repeats)
    report["blocks"][block] = figures
    _print_table(f"IM-block {block}, features {'x'.join(map(str, g0.shape))}: seconds per step "
                 "(f: one map evaluation)", figures["seconds_per_step"], "s/step")
    if figures["identical_to_first"]:
      print(f"bit-identical to [current]: {figures['identical_to_first']}", flush=True)
  if args.model_repeats > 0:
    figures = model_figures(params, hazy, modules, args.model_repeats)
    report["model"] = figures
    _print_table(f"Whole model, iterations {params.config.iterations}: seconds per image",
                 figures["seconds_per_image"], "s/image")
    if figures["identical_to_first"]:
      print(f"bit-identical to [current]: {figures['identical_to_first']}", flush=True)
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
  main()
