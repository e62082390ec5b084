// 2-D convolutions for XLA:CPU through oneDNN, as one XLA FFI handler.
//
// minet_jax/onednn.py compiles this file on first use and registers the handler as the
// custom-call target "minet_onednn_conv"; the JAX primitives there supply shapes,
// differentiation and batching, and this file only computes. Layouts are JAX's: images
// NHWC, kernels HWIO, all three of one dtype: float32, or bfloat16 (products accumulate
// in float32 inside oneDNN; the result is rounded to bfloat16). `kind` picks the product:
//   0 forward          a = x  (N, H, W, I),   b = w  (KH, KW, I, O) -> y  (N, OH, OW, O)
//   1 input gradient   a = dy (N, OH, OW, O), b = w                  -> dx (N, H, W, I)
//   2 kernel gradient  a = x,                 b = dy                 -> dw (KH, KW, I, O)
// Geometry follows lax.conv_general_dilated: window strides, explicit (low, high)
// padding per spatial axis, kernel dilation (1 = dense; oneDNN counts from 0) and
// `groups` (feature_group_count: the kernel is then (KH, KW, I / groups, O)).
// `bf16_products` (float32 only) rounds both operands to bfloat16 and multiplies them
// there, accumulating and returning float32: the CPU's counterpart of a GPU's TF32.
//
// Activations stay in JAX's NHWC buffers (oneDNN has direct NHWC kernels); only the
// small kernel is reordered into the blocked layout oneDNN picks (and, with
// bf16_products, the operands are converted). Primitives are built once per geometry
// and cached; working memory belongs to the calling thread, so concurrent calls from
// XLA's threads never share it.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>

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
  dt type;             // of the buffers XLA passes
  bool bf16_products;  // operands converted to bfloat16 (type is float32)
  dims src, wei, dst, strides, dilation, pad_lo, pad_hi;  // oneDNN's logical NCHW / OIHW
};

std::string Key(const Geometry& g) {
  std::ostringstream out;
  out << g.kind << ',' << g.groups << ',' << static_cast<int>(g.type) << ',' << g.bf16_products;
  for (const dims* d : {&g.src, &g.wei, &g.dst, &g.strides, &g.dilation, &g.pad_lo, &g.pad_hi}) {
    out << '|';
    for (auto v : *d) out << v << ',';
  }
  return out.str();
}

// A reorder between two layouts or dtypes, with the scratch memory it needs.
struct Reorder {
  dnnl::reorder prim;
  dnnl::memory::desc from, to, scratch;
};

Reorder MakeReorder(const dnnl::memory::desc& from, const dnnl::memory::desc& to) {
  // User scratchpad: with the library's own, a primitive may not move between threads,
  // and XLA calls the handler from any of its threads.
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto& eng = Engine();
  auto pd = dnnl::reorder::primitive_desc(eng, from, eng, to, attr);
  return {dnnl::reorder(pd), from, to, pd.scratchpad_desc()};
}

// One geometry's primitive and the conversions around it. The primitive's operands
// are `a` and `b` (in the kind's order, see the table at the top) and its result `out`;
// each has JAX's layout and dtype (`*_user`) and the one the primitive takes.
struct Plan {
  dnnl::primitive conv;
  int a_arg, b_arg, out_arg;
  dnnl::memory::desc a, b, out, a_user, b_user, out_user, scratch;
  std::unique_ptr<Reorder> into_a, into_b, from_out;  // null: none needed
  size_t reorder_scratch_bytes = 0;  // the most any of those reorders needs
};

void MaybeReorder(Plan& plan, std::unique_ptr<Reorder>& slot, const dnnl::memory::desc& from,
                  const dnnl::memory::desc& to) {
  if (from == to) return;
  slot = std::make_unique<Reorder>(MakeReorder(from, to));
  plan.reorder_scratch_bytes = std::max(plan.reorder_scratch_bytes, slot->scratch.get_size());
}

std::unique_ptr<Plan> Build(const Geometry& g) {
  auto& eng = Engine();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  // The operands' dtype inside the primitive; results keep the buffers' dtype.
  const dt in = g.bf16_products ? dt::bf16 : g.type;
  const dt src_t = g.kind == 1 ? g.type : in, dst_t = g.kind == 0 ? g.type : in;
  const dt wei_t = g.kind == 2 ? g.type : in;
  dnnl::memory::desc src(g.src, src_t, tag::nhwc), dst(g.dst, dst_t, tag::nhwc);
  // JAX's HWIO kernel as strides over oneDNN's logical (G,) O, I, KH, KW order; output
  // channel o of group k is HWIO's column k * O/G + o.
  const dnnl::memory::dim o = g.wei[g.wei.size() - 4], i = g.wei[g.wei.size() - 3];
  const dnnl::memory::dim kw = g.wei.back(), all_o = o * g.groups;
  dims strides = {1, all_o, kw * i * all_o, i * all_o};
  if (g.groups > 1) strides.insert(strides.begin(), o);
  dnnl::memory::desc wei_any(g.wei, wei_t, tag::any), wei_user(g.wei, g.type, strides);
  // The forward primitive, or the backward ones' hint: a forward of the operand dtype.
  auto fwd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      g.kind == 0 ? src : dnnl::memory::desc(g.src, in, tag::nhwc),
      g.kind == 0 ? wei_any : dnnl::memory::desc(g.wei, in, tag::any),
      g.kind == 0 ? dst : dnnl::memory::desc(g.dst, in, tag::nhwc),
      g.strides, g.dilation, g.pad_lo, g.pad_hi, attr);
  auto plan = std::make_unique<Plan>();
  auto user = [&](const dnnl::memory::desc& d) {
    return dnnl::memory::desc(d.get_dims(), g.type, tag::nhwc);
  };
  if (g.kind == 0) {
    plan->conv = dnnl::convolution_forward(fwd);
    plan->a_arg = DNNL_ARG_SRC, plan->b_arg = DNNL_ARG_WEIGHTS, plan->out_arg = DNNL_ARG_DST;
    plan->a = src, plan->b = fwd.weights_desc(), plan->out = dst;
    plan->a_user = user(src), plan->b_user = wei_user, plan->out_user = dst;
    plan->scratch = fwd.scratchpad_desc();
  } else if (g.kind == 1) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, src, wei_any, dst, g.strides, g.dilation,
        g.pad_lo, g.pad_hi, fwd, attr);
    plan->conv = dnnl::convolution_backward_data(pd);
    plan->a_arg = DNNL_ARG_DIFF_DST, plan->b_arg = DNNL_ARG_WEIGHTS;
    plan->out_arg = DNNL_ARG_DIFF_SRC;
    plan->a = dst, plan->b = pd.weights_desc(), plan->out = src;
    plan->a_user = user(dst), plan->b_user = wei_user, plan->out_user = src;
    plan->scratch = pd.scratchpad_desc();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, src, wei_any, dst, g.strides, g.dilation,
        g.pad_lo, g.pad_hi, fwd, attr);
    plan->conv = dnnl::convolution_backward_weights(pd);
    plan->a_arg = DNNL_ARG_SRC, plan->b_arg = DNNL_ARG_DIFF_DST;
    plan->out_arg = DNNL_ARG_DIFF_WEIGHTS;
    plan->a = src, plan->b = dst, plan->out = pd.diff_weights_desc();
    plan->a_user = user(src), plan->b_user = user(dst), plan->out_user = wei_user;
    plan->scratch = pd.scratchpad_desc();
  }
  MaybeReorder(*plan, plan->into_a, plan->a_user, plan->a);
  MaybeReorder(*plan, plan->into_b, plan->b_user, plan->b);
  MaybeReorder(*plan, plan->from_out, plan->out, plan->out_user);
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

// Working memory of the calling thread, one slot per use, grown as needed and kept for
// the next call while all slots together hold at most kKeepBytes: a fresh allocation
// of the converted operands each call (megabytes, page by page) would cost a good part
// of a bfloat16 convolution. Calls that need more allocate afresh each time, which at
// those sizes is small next to the convolution.
constexpr size_t kKeepBytes = size_t{64} << 20;

enum Slot { kScratch, kA, kB, kOut, kReorderScratch, kSlots };

class Workspace {
 public:
  char* Get(int slot, size_t bytes) {
    auto& buffer = buffers_[slot];
    if (buffer.size < bytes) {
      buffer = {};  // The old buffer goes before the new one comes.
      buffer.data.reset(new char[bytes]);  // Not zeroed: every use writes before reading.
      buffer.size = bytes;
    }
    return buffer.data.get();
  }
  // Frees everything when the slots hold more than kKeepBytes, so one large call does
  // not pin its memory to the thread.
  void Trim() {
    size_t total = 0;
    for (auto& buffer : buffers_) total += buffer.size;
    if (total > kKeepBytes) {
      for (auto& buffer : buffers_) buffer = {};
    }
  }

 private:
  struct Buffer {
    std::unique_ptr<char[]> data;
    size_t size = 0;
  };
  Buffer buffers_[kSlots];
};

dims Spatial(ffi::Span<const int64_t> values) { return dims(values.begin(), values.end()); }

ffi::Error Conv(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out, int64_t kind,
                ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                ffi::Span<const int64_t> pad_hi, ffi::Span<const int64_t> dilation,
                int64_t groups, int64_t bf16_products) {
  if (kind < 0 || kind > 2) return ffi::Error::InvalidArgument("kind must be 0, 1 or 2");
  if (strides.size() != 2 || pad_lo.size() != 2 || pad_hi.size() != 2 ||
      dilation.size() != 2) {
    return ffi::Error::InvalidArgument("strides, padding and dilation need 2 values each");
  }
  const ffi::DataType type = a.element_type();
  if (b.element_type() != type || out->element_type() != type ||
      (type != ffi::DataType::F32 && type != ffi::DataType::BF16)) {
    return ffi::Error::InvalidArgument("operands and result must all be float32 or bfloat16");
  }
  if (bf16_products && type != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("bf16_products applies to float32 operands");
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
  g.type = type == ffi::DataType::F32 ? dt::f32 : dt::bf16;
  g.bf16_products = bf16_products != 0;
  g.src = {x_dims[0], x_dims[3], x_dims[1], x_dims[2]};
  g.wei = {w_dims[3] / groups, w_dims[2], w_dims[0], w_dims[1]};
  if (groups > 1) g.wei.insert(g.wei.begin(), groups);
  g.dst = {y_dims[0], y_dims[3], y_dims[1], y_dims[2]};
  g.strides = Spatial(strides);
  g.pad_lo = Spatial(pad_lo);
  g.pad_hi = Spatial(pad_hi);
  g.dilation = {dilation[0] - 1, dilation[1] - 1};
  thread_local Workspace workspace;
  struct TrimOnExit {  // Also when oneDNN throws.
    Workspace& w;
    ~TrimOnExit() { w.Trim(); }
  } trim{workspace};
  try {
    const Plan& plan = Cached(g);
    auto& eng = Engine();
    dnnl::stream stream(eng);
    char* reorder_scratch = workspace.Get(kReorderScratch, plan.reorder_scratch_bytes);
    auto run_reorder = [&](const Reorder& r, dnnl::memory& from, dnnl::memory& to) {
      dnnl::memory scratch(r.scratch, eng, reorder_scratch);
      r.prim.execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                              {DNNL_ARG_SCRATCHPAD, scratch}});
    };
    // An operand in the primitive's layout: the user's buffer, or its converted copy.
    auto operand = [&](const std::unique_ptr<Reorder>& into,
                       const dnnl::memory::desc& user_desc, const dnnl::memory::desc& desc,
                       void* data, int slot) {
      dnnl::memory user(user_desc, eng, data);
      if (!into) return user;
      dnnl::memory mem(desc, eng, workspace.Get(slot, desc.get_size()));
      run_reorder(*into, user, mem);
      return mem;
    };
    dnnl::memory am = operand(plan.into_a, plan.a_user, plan.a, a.untyped_data(), kA);
    dnnl::memory bm = operand(plan.into_b, plan.b_user, plan.b, b.untyped_data(), kB);
    dnnl::memory out_user(plan.out_user, eng, out->untyped_data());
    dnnl::memory om = !plan.from_out
        ? out_user : dnnl::memory(plan.out, eng, workspace.Get(kOut, plan.out.get_size()));
    dnnl::memory scratch(plan.scratch, eng, workspace.Get(kScratch, plan.scratch.get_size()));
    plan.conv.execute(stream, {{plan.a_arg, am}, {plan.b_arg, bm}, {plan.out_arg, om},
                               {DNNL_ARG_SCRATCHPAD, scratch}});
    if (plan.from_out) run_reorder(*plan.from_out, om, out_user);
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
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("kind")
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("pad_lo")
                                  .Attr<ffi::Span<const int64_t>>("pad_hi")
                                  .Attr<ffi::Span<const int64_t>>("dilation")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("bf16_products"));

// Whether this CPU computes bfloat16 products natively (AVX512-BF16, or AMX, which
// implies it): elsewhere oneDNN emulates them, slower than float32.
extern "C" int MinetOnednnNativeBf16() {
  const auto want = static_cast<unsigned>(dnnl::cpu_isa::avx512_core_bf16);
  return (static_cast<unsigned>(dnnl::get_effective_cpu_isa()) & want) == want;
}
