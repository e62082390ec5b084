"""2-D convolutions through oneDNN on XLA:CPU, as differentiable JAX primitives.

XLA:CPU's own convolution kernels trail oneDNN's (the library PyTorch's CPU convs use)
on this model's shapes, most of all in the gradients and the shared smoothing
(``benchmarks/layer_speed.py --conv-backends xla onednn`` measures them; figures in
docs/PERFORMANCE.md). This module puts oneDNN behind three primitives:

  conv        y  = conv(x, w)          NHWC image, HWIO kernel
  conv_input  dx = conv_input(dy, w)   the transpose of x -> conv(x, w)
  conv_kernel dw = conv_kernel(x, dy)  the transpose of w -> conv(x, w)

Each is bilinear, and the transpose of each with respect to either operand is another
of the three, so JVPs, VJPs and their transposes (linearize, jvp-of-grad, the fixed
point's custom JVP) all stay on oneDNN. Batching folds a vmapped image axis into N.
On other platforms the primitives lower to `lax.conv_general_dilated` and its
transposes, so a program built with them runs anywhere.

The kernels live in ``csrc/onednn_conv.cc``, an XLA FFI handler compiled on first use
with the system C++ compiler against the oneDNN headers and library of the
``onednn-cpu-gomp`` / ``onednn-devel-cpu-gomp`` wheels (the ``onednn`` extra, x86-64 Linux;
``$MINET_ONEDNN_ROOT`` points at another install), and cached under
``$MINET_JAX_CACHE`` (default ``~/.cache/minet_jax``) beside a record of its size and
SHA-256: a library that no longer matches it (truncated, replaced) is rebuilt before
anything loads it. Operands are float32, or, on
CPUs with AVX512-BF16 or AMX, bfloat16 (sums in float32, results rounded to bfloat16);
``bf16_products`` multiplies float32 operands in bfloat16 with float32 sums and
results. Those are the fast, inexact settings ``ModelConfig.dtype="bfloat16"`` and
``precision="default"`` (measured in docs/PRETRAINED.md). Programs that use
them cannot be serialised with `jax.export` (the custom call has no compatibility
guarantee); ``conv_backend="xla"`` builds exportable ones.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from minet_jax.core import files
from minet_jax.core.config import CONV_BACKENDS

_SOURCE = pathlib.Path(__file__).parent / "csrc" / "onednn_conv.cc"
_TARGET = "minet_onednn_conv"
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# Values of the handler's `kind` attribute.
_FORWARD, _INPUT, _KERNEL = 0, 1, 2


class OneDNNUnavailable(RuntimeError):
  """The oneDNN kernels cannot be built or loaded here; the message says why."""


# The pinned wheels (pyproject.toml): the library, and the headers to compile against.
_WHEELS = {"lib": ("onednn-cpu-gomp", "libdnnl.so"),
           "include": ("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp")}


def _installed_dirs() -> tuple[pathlib.Path, pathlib.Path] | None:
  """(include dir, lib dir) of oneDNN, or None when either is missing.

  ``$MINET_ONEDNN_ROOT`` (a prefix holding include/oneapi/dnnl and lib/libdnnl.so)
  wins; else the wheels' own file lists say where pip put them (the environment's
  prefix, or the user site for ``pip install --user``).
  """
  if "MINET_ONEDNN_ROOT" in os.environ:
    root = pathlib.Path(os.environ["MINET_ONEDNN_ROOT"])
    dirs = {"include": root / "include", "lib": root / "lib"}
  else:
    dirs = {}
    for key, (wheel, suffix) in _WHEELS.items():
      try:
        files = importlib.metadata.distribution(wheel).files or []
      except importlib.metadata.PackageNotFoundError:
        return None
      for f in files:
        if str(f).endswith(suffix):
          found = pathlib.Path(os.path.normpath(f.locate()))
          # include/oneapi/dnnl/dnnl.hpp -> include; lib/libdnnl.so -> lib.
          dirs[key] = found.parents[suffix.count("/")]
          break
  if not ((dirs.get("include", pathlib.Path("/nonexistent")) / _WHEELS["include"][1]).is_file()
          and any(dirs.get("lib", pathlib.Path("/nonexistent")).glob("libdnnl.so*"))):
    return None
  return dirs["include"], dirs["lib"]


def _compile(include: pathlib.Path, lib: pathlib.Path, output: pathlib.Path) -> None:
  cxx = os.environ.get("CXX")
  # CXX may carry a launcher or flags ("ccache g++"), split as a shell would.
  compiler = shlex.split(cxx) if cxx else [shutil.which("g++") or shutil.which("c++")]
  if not compiler or compiler[0] is None:
    raise OneDNNUnavailable("no C++ compiler found (set CXX, or install g++)")
  command = [*compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", str(_SOURCE),
             "-I", jax.ffi.include_dir(), "-I", str(include),
             "-L", str(lib), "-ldnnl", f"-Wl,-rpath,{lib}", "-o", str(output)]
  done = subprocess.run(command, capture_output=True, text=True)
  if done.returncode != 0:
    # The first errors say what is wrong; what follows them is mostly consequences.
    raise OneDNNUnavailable(f"compiling {_SOURCE.name} failed:\n{done.stderr[:4000]}")


def _library(include: pathlib.Path, lib: pathlib.Path) -> pathlib.Path:
  """Where the kernel library for this source, jax version and oneDNN install is cached."""
  key = hashlib.sha256("\0".join(
      [_SOURCE.read_text(), jax.__version__, jax.ffi.include_dir(), str(include), str(lib),
       str(sorted(p.name for p in lib.glob("libdnnl.so*")))]).encode()).hexdigest()
  return files.cache_dir() / f"minet_onednn_{key[:16]}.so"


def _record_file(library: pathlib.Path) -> pathlib.Path:
  return library.with_name(library.name + ".json")


def _fingerprint(path: pathlib.Path) -> dict:
  with open(path, "rb") as f:
    return {"size": os.fstat(f.fileno()).st_size,
            "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _intact(library: pathlib.Path) -> bool:
  """Whether `library` is the file its build recorded (size and SHA-256).

  A truncated library passes a mere existence check and then kills the process inside
  dlopen (SIGBUS); a file planted under the cached name would run its constructors.
  """
  try:
    record = json.loads(_record_file(library).read_text())
    return (isinstance(record, dict) and library.stat().st_size == record.get("size")
            and _fingerprint(library) == record)
  except (OSError, ValueError, RecursionError):
    return False


def _build(include: pathlib.Path, lib: pathlib.Path, library: pathlib.Path) -> None:
  """Compiles into a temporary file beside `library`, then renames it and its record into
  place, so a concurrent or interrupted build never leaves a half-written library."""
  library.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
    partial = pathlib.Path(tmp) / library.name
    _compile(include, lib, partial)
    record = pathlib.Path(tmp) / "record.json"
    record.write_text(json.dumps(_fingerprint(partial)))
    os.replace(partial, library)
    os.replace(record, _record_file(library))


def _build_and_register() -> None:
  dirs = _installed_dirs()
  if dirs is None:
    raise OneDNNUnavailable(
        "oneDNN headers or library not found: pip install onednn-cpu-gomp==2023.2.0 "
        "onednn-devel-cpu-gomp==2023.2.0 (x86-64 Linux), or point MINET_ONEDNN_ROOT at "
        "a oneDNN 3 install")
  include, lib = dirs
  # One library per source, jax version and oneDNN install; the compiler is only
  # needed when that library is not built yet, or no longer what was built.
  library = _library(include, lib)
  if not _intact(library):
    damaged = library.exists()
    try:
      _build(include, lib, library)
    except (OneDNNUnavailable, OSError, subprocess.SubprocessError) as e:
      if not damaged:
        raise
      raise OneDNNUnavailable(
          f"the cached kernel library {library} is not the file its build recorded "
          f"(truncated or replaced) and rebuilding it failed: {e}") from e
    if not _intact(library):
      raise OneDNNUnavailable(f"the kernel library {library} changed right after its build")
  handle = ctypes.cdll.LoadLibrary(str(library))
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(handle.MinetOnednnConv),
                              platform="cpu")
  _NATIVE_BF16.append(bool(handle.MinetOnednnNativeBf16()))


# The outcome of the first attempt (None: loaded), so a failed build is not retried on
# every convolution traced.
_LOADED: list[OneDNNUnavailable | None] = []
# Whether the CPU computes bfloat16 products natively, asked of oneDNN once loaded.
_NATIVE_BF16: list[bool] = []


# Threads tracing convolutions at once would each build and register the library.
_LOAD_LOCK = threading.Lock()


def _load() -> None:
  """Compiles (once per source, jax and oneDNN) and registers the FFI handler."""
  if not _LOADED:
    with _LOAD_LOCK:
      _load_once()
  if _LOADED[0] is not None:
    raise _LOADED[0]


def _load_once() -> None:
  if not _LOADED:
    try:
      _build_and_register()
      _LOADED.append(None)
    except OneDNNUnavailable as e:
      _LOADED.append(e)
    except (OSError, subprocess.SubprocessError, AttributeError, ValueError) as e:
      # An unwritable cache folder, a CXX that is not there or does not parse (an
      # unclosed quote), a library that will not load: all mean no oneDNN here, said
      # with the cause.
      _LOADED.append(OneDNNUnavailable(f"building or loading the oneDNN kernels failed: "
                                       f"{type(e).__name__}: {e}"))


def available() -> bool:
  """Whether the oneDNN kernels build and load here (the first call may compile them)."""
  try:
    _load()
  except OneDNNUnavailable:
    return False
  return True


def ensure_available() -> None:
  """Builds and loads the kernels, or raises `OneDNNUnavailable` saying why not."""
  _load()


@functools.cache
def _warn_auto_fallback(reason: str) -> None:
  warnings.warn(f"conv_backend='auto' runs XLA's convolutions: {reason}", stacklevel=3)


def use_onednn(backend: str, dtype: jnp.dtype | str = jnp.float32) -> bool:
  """Whether `dtype` convolutions under ``ModelConfig.conv_backend=backend`` go to oneDNN.

  float32 ones do wherever oneDNN is used; bfloat16 ones only where the CPU computes
  bfloat16 natively (AVX512-BF16 or AMX; elsewhere oneDNN would emulate it, slower
  than float32); other dtypes never.

  Off CPUs, XLA's. On a CPU, "onednn" raises `OneDNNUnavailable` when the kernels
  cannot be built here (for float32 and bfloat16, the dtypes it could take). "auto"
  takes them when the default backend is a single CPU device and they build. With
  several devices it keeps XLA's: XLA's SPMD partitioner cannot split a custom call,
  so a batch-sharded oneDNN conv would run whole on every device (correct, not
  parallel). Where the oneDNN wheels are installed but the build fails it says so
  once (a warning); where they are not (other than x86-64 Linux) it quietly keeps XLA's.
  """
  if backend not in CONV_BACKENDS:
    raise ValueError(f"conv_backend must be one of {CONV_BACKENDS}, got {backend!r}")
  dtype = jnp.dtype(dtype)
  if (backend == "xla" or jax.default_backend() != "cpu"
      or dtype not in (jnp.float32, jnp.bfloat16)):
    return False
  if backend == "onednn":
    _load()
  elif jax.device_count() > 1:
    return False
  else:
    try:
      _load()
    except OneDNNUnavailable as e:
      if _installed_dirs() is not None:
        _warn_auto_fallback(str(e))
      return False
  return dtype == jnp.float32 or _NATIVE_BF16 == [True]


# Geometry parameters shared by the three primitives: strides and dilation as (h, w),
# padding as ((lo, hi), (lo, hi)).
def _geometry(strides, padding, dilation, groups, bf16_products) -> dict:
  return dict(strides=tuple(int(s) for s in strides),
              padding=tuple((int(lo), int(hi)) for lo, hi in padding),
              dilation=tuple(int(d) for d in dilation), groups=int(groups),
              bf16_products=bool(bf16_products))


def _out_size(size: int, k: int, stride: int, lo: int, hi: int, dilation: int) -> int:
  return (size + lo + hi - (dilation * (k - 1) + 1)) // stride + 1


def _rounded(bf16_products: bool, *arrays):
  """The operands as the kernels multiply them: rounded to bfloat16 with bf16_products."""
  if not bf16_products:
    return arrays
  return tuple(a.astype(jnp.bfloat16).astype(jnp.float32) for a in arrays)


def _reference(x, w, *, strides, padding, dilation, groups, bf16_products=False,
               precision=jax.lax.Precision.HIGHEST):
  x, w = _rounded(bf16_products, x, w)
  return jax.lax.conv_general_dilated(
      x, w, window_strides=strides, padding=padding, rhs_dilation=dilation,
      dimension_numbers=_DIMENSION_NUMBERS, feature_group_count=groups,
      precision=precision)


conv_p = Primitive("onednn_conv")
conv_input_p = Primitive("onednn_conv_input")
conv_kernel_p = Primitive("onednn_conv_kernel")


def _check_dtypes(a, b, bf16_products: bool) -> jnp.dtype:
  """The operands' common dtype, float32 or bfloat16 (the result's too)."""
  if a.dtype != b.dtype or a.dtype not in (jnp.float32, jnp.bfloat16):
    raise TypeError(f"oneDNN convolutions take two float32 or two bfloat16 operands, got "
                    f"{a.dtype} and {b.dtype}")
  if bf16_products and a.dtype != jnp.float32:
    raise TypeError(f"bf16_products applies to float32 operands, got {a.dtype}")
  return a.dtype


def _check_padding(padding) -> None:
  if any(p < 0 for pair in padding for p in pair):
    # lax crops for negative padding; oneDNN has no such mode.
    raise ValueError(f"padding must be >= 0, got {padding}")


def _conv_abstract(x, w, *, strides, padding, dilation, groups, bf16_products):
  dtype = _check_dtypes(x, w, bf16_products)
  n, h, wd, c = x.shape
  kh, kw, ci, co = w.shape
  _check_padding(padding)
  if ci * groups != c or co % groups:
    raise ValueError(f"a {w.shape} kernel in {groups} group(s) does not fit {c} input "
                     "channels")
  oh = _out_size(h, kh, strides[0], *padding[0], dilation[0])
  ow = _out_size(wd, kw, strides[1], *padding[1], dilation[1])
  return jax.core.ShapedArray((n, oh, ow, co), dtype)


def _conv_input_abstract(dy, w, *, in_hw, strides, padding, dilation, groups, bf16_products):
  dtype = _check_dtypes(dy, w, bf16_products)
  _check_padding(padding)
  if dy.shape[3] != w.shape[3] or w.shape[3] % groups:
    raise ValueError(f"a {w.shape} kernel in {groups} group(s) does not fit {dy.shape[3]} "
                     "output channels")
  sizes = tuple(_out_size(in_hw[i], w.shape[i], strides[i], *padding[i], dilation[i])
                for i in range(2))
  if min(in_hw) < 1 or sizes != tuple(dy.shape[1:3]):
    raise ValueError(f"a {tuple(in_hw)} input does not give the {tuple(dy.shape[1:3])} "
                     f"output under strides {strides}, padding {padding}")
  return jax.core.ShapedArray((dy.shape[0], *in_hw, w.shape[2] * groups), dtype)


def _conv_kernel_abstract(x, dy, *, kernel_hw, strides, padding, dilation, groups,
                          bf16_products):
  dtype = _check_dtypes(x, dy, bf16_products)
  return jax.core.ShapedArray((*kernel_hw, x.shape[3] // groups, dy.shape[3]), dtype)


conv_p.def_abstract_eval(_conv_abstract)
conv_input_p.def_abstract_eval(_conv_input_abstract)
conv_kernel_p.def_abstract_eval(_conv_kernel_abstract)


def _ffi_attrs(kind: int, strides, padding, dilation, groups, bf16_products) -> dict:
  return dict(kind=np.int64(kind), bf16_products=np.int64(bf16_products),
              strides=np.asarray(strides, np.int64),
              pad_lo=np.asarray([p[0] for p in padding], np.int64),
              pad_hi=np.asarray([p[1] for p in padding], np.int64),
              dilation=np.asarray(dilation, np.int64), groups=np.int64(groups))


def _cpu_lowering(kind: int):
  lower = jax.ffi.ffi_lowering(_TARGET)

  def rule(ctx, a, b, *, in_hw=None, kernel_hw=None, **params):
    del in_hw, kernel_hw  # the result's shape carries them
    return lower(ctx, a, b, **_ffi_attrs(kind, **params))
  return rule


# Reference implementations: the lowering off CPU, and the truth the tests compare with.
# Each rounds its own two operands (with bf16_products), as the kernels do.
def _reference_input(dy, w, *, in_hw, bf16_products, **geometry):
  dy, w = _rounded(bf16_products, dy, w)
  x = jnp.zeros((dy.shape[0], *in_hw, w.shape[2] * geometry["groups"]), dy.dtype)
  return jax.vjp(lambda x: _reference(x, w, **geometry), x)[1](dy)[0]


def _reference_kernel(x, dy, *, kernel_hw, bf16_products, **geometry):
  x, dy = _rounded(bf16_products, x, dy)
  w = jnp.zeros((*kernel_hw, x.shape[3] // geometry["groups"], dy.shape[3]), x.dtype)
  return jax.vjp(lambda w: _reference(x, w, **geometry), w)[1](dy)[0]


def _off_cpu(reference):
  """The lowering of a primitive elsewhere (GPU, TPU): XLA's convolutions. Fast inexact
  products (``bf16_products``, what precision "default" chose on the CPU that traced
  the program) are that platform's own there, its DEFAULT precision (TF32 on NVIDIA
  GPUs since Ampere), not the CPU kernels' bfloat16 rounding; else exact float32."""

  def lower(*args, bf16_products, **params):
    precision = jax.lax.Precision.DEFAULT if bf16_products else jax.lax.Precision.HIGHEST
    return reference(*args, bf16_products=False, precision=precision, **params)

  return lower


@functools.lru_cache(maxsize=None)
def _jitted(prim: Primitive, params: tuple) -> callable:
  return jax.jit(functools.partial(prim.bind, **dict(params)))


def _eager(prim: Primitive, *args, **params):
  """Outside jit, a primitive runs as its own one-op program."""
  return _jitted(prim, tuple(sorted(params.items())))(*args)


for _p, _kind, _ref in ((conv_p, _FORWARD, _reference), (conv_input_p, _INPUT, _reference_input),
                        (conv_kernel_p, _KERNEL, _reference_kernel)):
  mlir.register_lowering(_p, _cpu_lowering(_kind), platform="cpu")
  # Elsewhere (GPU, TPU) the same program runs XLA's convolutions.
  mlir.register_lowering(_p, mlir.lower_fun(_off_cpu(_ref), multiple_results=False))
  _p.def_impl(functools.partial(_eager, _p))


# Transposes. With <., .> the elementwise inner product:
#   <conv(x, w), dy> = <x, conv_input(dy, w)> = <w, conv_kernel(x, dy)>,
# so each primitive's transpose in either operand is one of the other two.
def _geom(params: dict) -> dict:
  return {k: params[k] for k in ("strides", "padding", "dilation", "groups", "bf16_products")}


def _conv_t_x(ct, x, w, **params):
  return conv_input_p.bind(ct, w, in_hw=tuple(x.aval.shape[1:3]), **_geom(params))


def _conv_t_w(ct, x, w, **params):
  return conv_kernel_p.bind(x, ct, kernel_hw=tuple(w.aval.shape[:2]), **_geom(params))


def _input_t_dy(ct, dy, w, **params):
  return conv_p.bind(ct, w, **_geom(params))


def _input_t_w(ct, dy, w, **params):
  return conv_kernel_p.bind(ct, dy, kernel_hw=tuple(w.aval.shape[:2]), **_geom(params))


def _kernel_t_x(ct, x, dy, **params):
  return conv_input_p.bind(dy, ct, in_hw=tuple(x.aval.shape[1:3]), **_geom(params))


def _kernel_t_dy(ct, x, dy, **params):
  return conv_p.bind(x, ct, **_geom(params))


ad.defbilinear(conv_p, _conv_t_x, _conv_t_w)
ad.defbilinear(conv_input_p, _input_t_dy, _input_t_w)
ad.defbilinear(conv_kernel_p, _kernel_t_x, _kernel_t_dy)


def _batch_rule(prim, image_operands):
  """vmap: a batched image operand folds into N; anything else maps over the batch."""

  def rule(args, dims, **params):
    (a, b), (da, db) = args, dims
    foldable = all(d is None or i in image_operands
                   for i, d in enumerate((da, db)))
    if foldable:
      size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
      merged, n = [], None
      for x, d in zip(args, dims):
        if d is None:
          merged.append(x)
          continue
        x = jnp.moveaxis(x, d, 0)
        n = x.shape[1]
        merged.append(x.reshape(size * n, *x.shape[2:]))
      out = prim.bind(*merged, **params)
      return out.reshape(size, n, *out.shape[1:]), 0
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
    a, b = (jnp.moveaxis(x, d, 0) if d is not None
            else jnp.broadcast_to(x, (size, *x.shape)) for x, d in zip(args, dims))
    return jax.lax.map(lambda ab: prim.bind(*ab, **params), (a, b)), 0
  return rule


# Which operands carry N: the kernel gradient sums over N, so a vmapped batch there
# cannot fold into it.
batching.primitive_batchers[conv_p] = _batch_rule(conv_p, (0,))
batching.primitive_batchers[conv_input_p] = _batch_rule(conv_input_p, (0,))
batching.primitive_batchers[conv_kernel_p] = _batch_rule(conv_kernel_p, ())


def conv_input(dy: jax.Array, w: jax.Array, input_hw: Sequence[int], *,
               strides: Sequence[int] = (1, 1),
               padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
               dilation: Sequence[int] = (1, 1), groups: int = 1,
               bf16_products: bool = False) -> jax.Array:
  """The transpose of ``x -> conv(x, w, ...)`` for an `input_hw`-sized x, applied to `dy`.

  That is a transposed convolution (PyTorch's ``conv_transpose2d`` of `dy` with the
  kernel ``w`` read as OIHW = ``w.transpose(3, 2, 0, 1)``), computed without inserted
  zeros. Operands and `bf16_products` as for `conv`.
  """
  _check_supported(dy, w, bf16_products)
  return conv_input_p.bind(dy, w, in_hw=tuple(int(v) for v in input_hw),
                           **_geometry(strides, padding, dilation, groups, bf16_products))


def conv(x: jax.Array, w: jax.Array, *, strides: Sequence[int] = (1, 1),
         padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
         dilation: Sequence[int] = (1, 1), groups: int = 1,
         bf16_products: bool = False) -> jax.Array:
  """``lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
  feature_group_count=groups)`` in NHWC/HWIO.

  Two float32 or two bfloat16 operands, and a result of their dtype; differentiable
  to any order (every derivative keeps `bf16_products`). With `bf16_products` (float32
  only) both operands are rounded to bfloat16 and multiplied there, with float32 sums
  and result: what `bf16_products_for` turns on for ``ModelConfig.precision="default"``.
  Raises `OneDNNUnavailable` when the kernels cannot be built here, and for bfloat16
  (operands or products) on a CPU without native bfloat16 (oneDNN has no such kernels
  on some, and emulates them slower than float32 on others).
  """
  _check_supported(x, w, bf16_products)
  return conv_p.bind(x, w, **_geometry(strides, padding, dilation, groups, bf16_products))


def _check_supported(a: jax.Array, b: jax.Array, bf16_products: bool) -> None:
  _load()
  dtype = _check_dtypes(a, b, bf16_products)
  if ((bf16_products or dtype == jnp.bfloat16)
      and jax.default_backend() == "cpu" and _NATIVE_BF16 != [True]):
    raise OneDNNUnavailable("bfloat16 convolutions need a CPU with AVX512-BF16 or AMX; "
                            "this one has neither (use float32)")


def bf16_products_for(precision: jax.lax.Precision | None) -> bool:
  """Whether oneDNN convolutions at `precision` round float32 operands to bfloat16.

  Precision.DEFAULT asks for the fastest products the hardware has (XLA: TF32 on
  GPUs); on a CPU with native bfloat16 (AVX512-BF16 or AMX) those are bfloat16
  products with float32 sums, elsewhere float32 ones. Anything else is exact.
  """
  return precision == jax.lax.Precision.DEFAULT and use_onednn("onednn", jnp.bfloat16)
