// 2-D convolutions for XLA:CPU through oneDNN, as one XLA FFI handler.
//
// minet_jax/onednn.py compiles this file on first use and registers the handler as the
// custom-call target "minet_onednn_conv"; the JAX primitives there supply shapes,
// differentiation and batching, and this file only computes. Layouts are JAX's: images
// NHWC, kernels HWIO, float32. `kind` picks the product:
//   0 forward          a = x  (N, H, W, I),   b = w  (KH, KW, I, O) -> y  (N, OH, OW, O)
//   1 input gradient   a = dy (N, OH, OW, O), b = w                  -> dx (N, H, W, I)
//   2 kernel gradient  a = x,                 b = dy                 -> dw (KH, KW, I, O)
// Geometry follows lax.conv_general_dilated: window strides, explicit (low, high)
// padding per spatial axis, kernel dilation (1 = dense; oneDNN counts from 0) and
// `groups` (feature_group_count: the kernel is then (KH, KW, I / groups, O)).
//
// Activations stay in JAX's NHWC buffers (oneDNN has direct NHWC kernels); only the
// small kernel is reordered into the blocked layout oneDNN picks. Primitives are built
// once per geometry and cached; scratch memory is allocated per call so concurrent
// calls from XLA's threads never share it.

#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dims = dnnl::memory::dims;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

struct Geometry {
  int64_t kind, groups;
  dims src, wei, dst, strides, dilation, pad_lo, pad_hi;  // oneDNN's logical NCHW / OIHW
};

std::string Key(const Geometry& g) {
  std::ostringstream out;
  out << g.kind << ',' << g.groups;
  for (const dims* d : {&g.src, &g.wei, &g.dst, &g.strides, &g.dilation, &g.pad_lo, &g.pad_hi}) {
    out << '|';
    for (auto v : *d) out << v << ',';
  }
  return out.str();
}

// One geometry's primitive, the kernel layout it wants, and the reorder into or out of
// JAX's HWIO kernel.
struct Plan {
  dnnl::primitive conv;
  dnnl::memory::desc src, wei, dst, wei_user, scratch, reorder_scratch;
  bool reorder = false;
  dnnl::reorder wei_reorder;
};

std::unique_ptr<Plan> Build(const Geometry& g) {
  auto& eng = Engine();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::memory::desc src(g.src, dt::f32, tag::nhwc), dst(g.dst, dt::f32, tag::nhwc);
  // JAX's HWIO kernel as strides over oneDNN's logical (G,) O, I, KH, KW order; output
  // channel o of group k is HWIO's column k * O/G + o.
  const dnnl::memory::dim o = g.wei[g.wei.size() - 4], i = g.wei[g.wei.size() - 3];
  const dnnl::memory::dim kw = g.wei.back(), all_o = o * g.groups;
  dims strides = {1, all_o, kw * i * all_o, i * all_o};
  if (g.groups > 1) strides.insert(strides.begin(), o);
  dnnl::memory::desc wei_any(g.wei, dt::f32, tag::any), wei_user(g.wei, dt::f32, strides);
  auto fwd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src,
      wei_any, dst, g.strides, g.dilation, g.pad_lo, g.pad_hi, attr);
  auto plan = std::make_unique<Plan>();
  plan->src = src;
  plan->dst = dst;
  plan->wei_user = wei_user;
  if (g.kind == 0) {
    plan->conv = dnnl::convolution_forward(fwd);
    plan->wei = fwd.weights_desc();
    plan->scratch = fwd.scratchpad_desc();
  } else if (g.kind == 1) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, src, wei_any, dst, g.strides, g.dilation,
        g.pad_lo, g.pad_hi, fwd, attr);
    plan->conv = dnnl::convolution_backward_data(pd);
    plan->wei = pd.weights_desc();
    plan->scratch = pd.scratchpad_desc();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, src, wei_any, dst, g.strides, g.dilation,
        g.pad_lo, g.pad_hi, fwd, attr);
    plan->conv = dnnl::convolution_backward_weights(pd);
    plan->wei = pd.diff_weights_desc();
    plan->scratch = pd.scratchpad_desc();
  }
  plan->reorder = plan->wei != wei_user;
  if (plan->reorder) {
    // User scratchpad here too: with the library's own, a primitive may not move
    // between threads, and XLA calls the handler from any of its threads.
    auto pd = g.kind == 2 ? dnnl::reorder::primitive_desc(eng, plan->wei, eng, wei_user, attr)
                          : dnnl::reorder::primitive_desc(eng, wei_user, eng, plan->wei, attr);
    plan->wei_reorder = dnnl::reorder(pd);
    plan->reorder_scratch = pd.scratchpad_desc();
  }
  return plan;
}

const Plan& Cached(const Geometry& g) {
  static std::mutex mutex;
  static auto* plans = new std::unordered_map<std::string, std::unique_ptr<Plan>>();
  std::string key = Key(g);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans->find(key);
  if (it == plans->end()) it = plans->emplace(key, Build(g)).first;
  return *it->second;
}

dims Spatial(ffi::Span<const int64_t> values) { return dims(values.begin(), values.end()); }

ffi::Error Conv(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                ffi::ResultBuffer<ffi::F32> out, int64_t kind,
                ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                ffi::Span<const int64_t> pad_hi, ffi::Span<const int64_t> dilation,
                int64_t groups) {
  if (kind < 0 || kind > 2) return ffi::Error::InvalidArgument("kind must be 0, 1 or 2");
  if (strides.size() != 2 || pad_lo.size() != 2 || pad_hi.size() != 2 ||
      dilation.size() != 2) {
    return ffi::Error::InvalidArgument("strides, padding and dilation need 2 values each");
  }
  // Which operand holds which tensor, by kind (see the table at the top).
  auto x_dims = kind == 1 ? out->dimensions() : a.dimensions();
  auto w_dims = kind == 2 ? out->dimensions() : b.dimensions();
  auto y_dims = kind == 0 ? out->dimensions() : (kind == 1 ? a.dimensions() : b.dimensions());
  if (x_dims.size() != 4 || w_dims.size() != 4 || y_dims.size() != 4) {
    return ffi::Error::InvalidArgument("operands must be rank 4 (NHWC, HWIO)");
  }
  if (groups < 1 || x_dims[3] != w_dims[2] * groups || w_dims[3] % groups != 0) {
    return ffi::Error::InvalidArgument("channels do not divide into the groups");
  }
  Geometry g;
  g.kind = kind;
  g.groups = groups;
  g.src = {x_dims[0], x_dims[3], x_dims[1], x_dims[2]};
  g.wei = {w_dims[3] / groups, w_dims[2], w_dims[0], w_dims[1]};
  if (groups > 1) g.wei.insert(g.wei.begin(), groups);
  g.dst = {y_dims[0], y_dims[3], y_dims[1], y_dims[2]};
  g.strides = Spatial(strides);
  g.pad_lo = Spatial(pad_lo);
  g.pad_hi = Spatial(pad_hi);
  g.dilation = {dilation[0] - 1, dilation[1] - 1};
  try {
    const Plan& plan = Cached(g);
    auto& eng = Engine();
    dnnl::stream stream(eng);
    std::vector<char> scratch_bytes(plan.scratch.get_size());
    dnnl::memory scratch(plan.scratch, eng, scratch_bytes.data());
    float* x = kind == 1 ? out->typed_data() : a.typed_data();
    float* w = kind == 2 ? out->typed_data() : b.typed_data();
    float* y = kind == 0 ? out->typed_data() : (kind == 1 ? a.typed_data() : b.typed_data());
    dnnl::memory src(plan.src, eng, x), dst(plan.dst, eng, y);
    dnnl::memory wei_user(plan.wei_user, eng, w);
    std::vector<char> wei_bytes(plan.reorder ? plan.wei.get_size() : 0);
    dnnl::memory wei = plan.reorder ? dnnl::memory(plan.wei, eng, wei_bytes.data()) : wei_user;
    std::vector<char> reorder_bytes(plan.reorder ? plan.reorder_scratch.get_size() : 0);
    auto reorder = [&](dnnl::memory& from, dnnl::memory& to) {
      dnnl::memory scratch(plan.reorder_scratch, eng, reorder_bytes.data());
      plan.wei_reorder.execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                                        {DNNL_ARG_SCRATCHPAD, scratch}});
    };
    if (kind == 0) {
      if (plan.reorder) reorder(wei_user, wei);
      plan.conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei},
                                 {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (kind == 1) {
      if (plan.reorder) reorder(wei_user, wei);
      plan.conv.execute(stream, {{DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_WEIGHTS, wei},
                                 {DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      plan.conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, dst},
                                 {DNNL_ARG_DIFF_WEIGHTS, wei}, {DNNL_ARG_SCRATCHPAD, scratch}});
      if (plan.reorder) reorder(wei, wei_user);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    // Nothing may unwind through the C boundary into XLA (e.g. std::bad_alloc).
    return ffi::Error::Internal(std::string("minet_onednn_conv: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MinetOnednnConv, Conv,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kind")
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("pad_lo")
                                  .Attr<ffi::Span<const int64_t>>("pad_hi")
                                  .Attr<ffi::Span<const int64_t>>("dilation")
                                  .Attr<int64_t>("groups"));
