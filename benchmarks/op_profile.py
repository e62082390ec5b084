"""Where a compiled XLA program spends its time, by kind of operation.

Used by ``forward_speed.py --profile`` and ``train_step_speed.py --profile``. One call
of the compiled program runs under `jax.profiler.trace`; the trace's per-operation
events (named like the program's HLO instructions) are summed by the kind of work the
instruction does, read from the optimised HLO (`Compiled.as_text`): a convolution
(a weight gradient when its window is larger than 7x7: XLA writes the kernel gradient
as a convolution whose window is the whole image; `minet_jax.core.onednn`'s custom calls
are convolutions too), a matrix product, a reduction,
a transpose or copy, a slice, pad or concatenation (the shared smoothing's shifted
sums are fusions of slices), else elementwise.

The sums add up operations that may overlap in time (XLA:CPU runs independent
operations concurrently), so they are shares of work, not of wall time; and
operations XLA hands to a thread pool asynchronously (Eigen convolutions, with
``xla_cpu_ynn_fusions=dot``) are under-counted.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

import jax

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_WINDOW = re.compile(r"window=\{size=(\d+)x(\d+)")
# The oneDNN convolutions of minet_jax.core.onednn: one custom-call target, `kind` 2 is the
# kernel gradient.
_ONEDNN = re.compile(r'custom_call_target="minet_onednn_conv".*kind\s*=\s*(\d)')


def _computations(hlo: str) -> dict[str, list[str]]:
  computations, current = {}, None
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      computations[current] = []
    elif current is not None:
      computations[current].append(line)
  return computations


def _kind(lines: list[str], computations: dict[str, list[str]], depth: int = 0) -> str:
  """The kind of one instruction's work, looking inside the computations it calls."""
  ops, called = set(), []
  for line in lines:
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    ops.add(match.group(2))
    if match.group(2) == "convolution":
      window = _WINDOW.search(line)
      if window and int(window.group(1)) * int(window.group(2)) > 49:
        return "convolution, weight gradient"
      return "convolution"
    onednn = _ONEDNN.search(line)
    if onednn:
      return ("convolution, weight gradient (oneDNN)" if onednn.group(1) == "2"
              else "convolution (oneDNN)")
    called += _CALLS.findall(line)
  if "dot" in ops:
    return "matrix product"
  if depth < 3:
    for name in called:
      kind = _kind(computations.get(name, []), computations, depth + 1)
      if kind != "elementwise":
        return kind
  for op, kind in (("reduce", "reduction"), ("reduce-window", "reduction"),
                   ("transpose", "transpose / copy"), ("copy", "transpose / copy"),
                   ("slice", "slice / pad / concat (shifted sums)"),
                   ("pad", "slice / pad / concat (shifted sums)"),
                   ("concatenate", "slice / pad / concat (shifted sums)")):
    if op in ops:
      return kind
  return "elementwise"


def op_times(compiled: jax.stages.Compiled, *args) -> dict[str, tuple[int, float]]:
  """{kind: (operations, milliseconds)} for one call of `compiled` (a `jax.stages.Compiled`)."""
  hlo = compiled.as_text()
  computations = _computations(hlo)
  kinds = {}
  for lines in computations.values():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if match:
        kinds[match.group(1)] = _kind([line], computations)
  jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      jax.block_until_ready(compiled(*args))
    traces = glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)
    events = json.load(gzip.open(traces[0]))["traceEvents"] if traces else []
  totals = collections.defaultdict(lambda: [0, 0.0])
  for event in events:
    if event.get("ph") == "X" and event.get("name") in kinds:
      total = totals[kinds[event["name"]]]
      total[0] += 1
      total[1] += event["dur"] / 1000.0  # Microseconds in the trace.
  return {kind: (n, ms) for kind, (n, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1])}


def print_op_times(times: dict[str, tuple[int, float]]) -> None:
  """The table `op_times` returns, with each kind's share of the summed time."""
  total = sum(ms for _, ms in times.values()) or 1.0
  print(f"  per-operation time by kind (summed over {sum(n for n, _ in times.values())} "
        f"operations, {total:.0f} ms; concurrent operations overlap):")
  for kind, (n, ms) in times.items():
    print(f"    {kind:36s} {ms:8.1f} ms {ms / total:6.1%}  ({n} operations)")
