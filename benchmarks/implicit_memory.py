"""Peak memory of one MI-Net training step: backprop through the IM-blocks vs implicit.

    python benchmarks/implicit_memory.py [--size 64] [--steps 8 16 32] [--features 64]

Compiles one Adam step (forward, MSE loss, gradient, update) of the released
architecture on a batch of one HxH image for every T and backward mode, and prints
XLA's compiled memory analysis: ``temp`` is the scratch memory the step needs on top
of its arguments and outputs (activations kept for the backward pass among them),
the figure that grows with T when the iterations are differentiated step by step.
Nothing is executed, so the numbers are the same on any machine with this XLA
backend. Rows:

* ``unrolled + backprop``: the released solver, gradients through every step;
* ``unrolled + implicit``: the same T forward steps, implicit-function-theorem
  backward with a T-step adjoint;
* ``picard + implicit``: Picard to tolerance (cap T) in a while loop, implicit backward.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import optax

import minet_jax
from minet_jax.core import params as params_lib

MODES = (("unrolled", "backprop"), ("unrolled", "implicit"), ("picard", "implicit"))


def step_memory(cfg: minet_jax.ModelConfig, size: int) -> dict[str, int]:
  """Compiled memory analysis of one Adam step of `cfg` on a 1 x size x size x 3 batch."""
  abstract = jax.eval_shape(lambda: minet_jax.init(cfg))  # No FLOPs, no init compiles.
  optimizer = optax.adam(1e-4)
  opt_state = jax.eval_shape(optimizer.init, abstract.weights)
  batch = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)

  def train_step(weights, opt_state, hazy, clear):
    def loss_fn(w):
      out = params_lib.model_from_params(params_lib.Params(weights=w, config=cfg))(hazy)
      return jnp.mean(jnp.square(out - clear))
    loss, grads = jax.value_and_grad(loss_fn)(weights)
    updates, opt_state = optimizer.update(grads, opt_state, weights)
    return optax.apply_updates(weights, updates), opt_state, loss

  compiled = jax.jit(train_step).lower(abstract.weights, opt_state, batch, batch).compile()
  stats = compiled.memory_analysis()
  return {"temp": stats.temp_size_in_bytes, "arguments": stats.argument_size_in_bytes,
          "outputs": stats.output_size_in_bytes}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=64, help="training crop side (pixels)")
  parser.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32])
  parser.add_argument("--features", type=int, default=64)
  parser.add_argument("--unroll", default="1",
                      help="scan unroll of the iterations ('auto' unrolls fully on CPU: same "
                           "growth, much longer compiles)")
  args = parser.parse_args()
  unroll = args.unroll if args.unroll == "auto" else int(args.unroll)
  base = minet_jax.ModelConfig(features=args.features, unroll=unroll, rtol=1e-4)
  print(f"one Adam step, batch 1 x {args.size} x {args.size}, features {args.features}, "
        f"backend {jax.default_backend()}; MiB of XLA temp memory (arguments+outputs beside)")
  print(f"{'solver + backward':<22}" + "".join(f"{'T = ' + str(t):>12}" for t in args.steps))
  for solver, backward in MODES:
    cells = []
    for t in args.steps:
      cfg = dataclasses.replace(base, solver=solver, backward=backward, iterations=(t,) * 3)
      m = step_memory(cfg, args.size)
      cells.append(f"{m['temp'] / 2**20:9.2f} ({(m['arguments'] + m['outputs']) / 2**20:.1f})")
    print(f"{solver + ' + ' + backward:<22}" + "".join(f"{c:>12}" for c in cells), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
