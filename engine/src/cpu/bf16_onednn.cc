// bf16 GEMM and convolution on oneDNN primitives (bf16_onednn.h).
//
// Each shape's primitive (and the reorders between our plain layouts and the
// primitive's blocked ones, format_tag::any) is created on first use and kept in a
// per-thread cache keyed by the shape, so a training step creates nothing. The cache
// is a memo: it holds no state a caller can observe, and it is emptied when it
// reaches kMaxCached entries (a run whose shapes keep changing stays bounded).
// Primitives use oneDNN's own scratchpad: safe because no primitive is shared between
// threads. Temporaries for reordered tensors come from the engine's caching allocator.
#include "bf16_onednn.h"

#include <oneapi/dnnl/dnnl.hpp>

#include <array>
#include <functional>
#include <map>
#include <optional>
#include <unordered_map>

#include "dtrain/common/error.h"
#include "dtrain/engine/allocator.h"
#include "host_buffer.h"

namespace dtrain::cpu {

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using DT = memory::data_type;
using Args = std::unordered_map<int, memory>;
constexpr size_t kMaxCached = 256;

const dnnl::engine& cpu_engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& cpu_stream() {
  thread_local dnnl::stream stream(cpu_engine());
  return stream;
}

// A plain tensor of ours and the layout the primitive wants, with the reorder between
// them when they differ (plain -> want for inputs, want -> plain for the output).
struct Port {
  memory::desc plain, want;
  std::optional<dnnl::reorder> reorder;
};

Port make_port(const memory::desc& plain, const memory::desc& want, bool input) {
  Port p{plain, want, std::nullopt};
  if (plain == want) return p;
  const dnnl::engine& e = cpu_engine();
  p.reorder.emplace(input ? dnnl::reorder::primitive_desc(e, plain, e, want)
                          : dnnl::reorder::primitive_desc(e, want, e, plain));
  return p;
}

// One cached primitive: two inputs, one output, optionally a plain f32 bias (an
// input of the forward pass, an output of the weight gradient).
struct Prim {
  dnnl::primitive prim;
  Port in0, in1, out;
  int arg0 = 0, arg1 = 0, arg_out = 0, arg_bias = 0;
  memory::desc bias;
};

using Key = std::array<int64_t, 11>;

const Prim& cached(const Key& key, const std::function<Prim()>& make) {
  thread_local std::map<Key, Prim> cache;
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (cache.size() >= kMaxCached) cache.clear();
  return cache.emplace(key, make()).first->second;
}

// An input in the primitive's layout: the user's buffer itself, or a reordered copy.
struct Staged {
  std::optional<HostBuffer> storage;
  memory mem;
};

void stage(const Port& p, const void* user, bool input, Staged& s) {
  memory plain(p.plain, cpu_engine(), const_cast<void*>(user));
  if (!p.reorder) {
    s.mem = plain;
    return;
  }
  s.storage.emplace(p.want.get_size());
  s.mem = memory(p.want, cpu_engine(), s.storage->get());
  if (input) p.reorder->execute(cpu_stream(), plain, s.mem);
}

void run(const Prim& p, const void* in0, const void* in1, const float* bias, void* out) {
  Staged a, b, o;
  stage(p.in0, in0, true, a);
  stage(p.in1, in1, true, b);
  stage(p.out, out, false, o);
  Args args{{p.arg0, a.mem}, {p.arg1, b.mem}, {p.arg_out, o.mem}};
  if (bias) args.emplace(p.arg_bias, memory(p.bias, cpu_engine(), const_cast<float*>(bias)));
  dnnl::stream& s = cpu_stream();
  p.prim.execute(s, args);
  if (p.out.reorder) {
    memory user(p.out.plain, cpu_engine(), out);
    p.out.reorder->execute(s, o.mem, user);
  }
  s.wait();
}

// Runs f, turning oneDNN's exceptions into dtrain errors that name the operation.
template <typename F>
void guarded(const char* what, const std::string& shape, F&& f) {
  try {
    f();
  } catch (const dnnl::error& e) {
    DTRAIN_THROW(InternalError, "{} (oneDNN bf16, {}): {}", what, shape, e.what());
  }
}

std::string conv_str(const ConvGeom& g) {
  return fmt::format("input [{},{},{},{}], weight [{},{},{},{}], stride {}, padding {}", g.n, g.c,
                     g.h, g.w, g.o, g.c, g.kh, g.kw, g.stride, g.pad);
}

}  // namespace

bool onednn_has_native_bf16() {
  auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  auto bf16 = static_cast<unsigned>(dnnl::cpu_isa::avx512_core_bf16);
  auto amx = static_cast<unsigned>(dnnl::cpu_isa::avx512_core_amx);
  return (isa & bf16) == bf16 || (isa & amx) == amx;
}

std::string onednn_isa_name() {
  switch (dnnl::get_effective_cpu_isa()) {
    case dnnl::cpu_isa::sse41:
      return "sse41";
    case dnnl::cpu_isa::avx:
      return "avx";
    case dnnl::cpu_isa::avx2:
      return "avx2";
    case dnnl::cpu_isa::avx2_vnni:
      return "avx2_vnni";
    case dnnl::cpu_isa::avx512_core:
      return "avx512_core";
    case dnnl::cpu_isa::avx512_core_vnni:
      return "avx512_core_vnni";
    case dnnl::cpu_isa::avx512_core_bf16:
      return "avx512_core_bf16";
    case dnnl::cpu_isa::avx512_core_amx:
      return "avx512_core_amx";
    default:
      return "isa 0x" + fmt::format("{:x}", static_cast<unsigned>(dnnl::get_effective_cpu_isa()));
  }
}

namespace {

memory::desc strided(int64_t rows, int64_t cols, bool trans, DT dt) {
  // [rows, cols] stored row-major, or (trans) stored as its transpose [cols, rows].
  memory::dims strides = trans ? memory::dims{1, rows} : memory::dims{cols, 1};
  return memory::desc({rows, cols}, dt, strides);
}

Prim make_matmul(const MatmulBf16& g, bool bias) {
  memory::desc a = strided(g.m, g.k, g.trans_a, DT::bf16);
  memory::desc b = strided(g.k, g.n, g.trans_b, DT::bf16);
  memory::desc c = strided(g.m, g.n, false, DT::f32);
  memory::desc bd({1, g.n}, DT::f32, Tag::ab);
  auto desc = bias ? dnnl::matmul::desc(a, b, bd, c) : dnnl::matmul::desc(a, b, c);
  dnnl::matmul::primitive_desc pd(desc, cpu_engine());
  return {dnnl::matmul(pd),       make_port(a, a, true), make_port(b, b, true),
          make_port(c, c, false), DNNL_ARG_SRC,          DNNL_ARG_WEIGHTS,
          DNNL_ARG_DST,           DNNL_ARG_BIAS,         bd};
}

}  // namespace

void matmul_bf16_onednn(const MatmulBf16& g, const BFloat16* a, const BFloat16* b,
                        const float* bias, float* c) {
  if (g.m == 0 || g.n == 0) return;
  const std::string shape = fmt::format("M={} N={} K={}", g.m, g.n, g.k);
  guarded("matmul", shape, [&] {
    Key key{0, g.m, g.n, g.k, g.trans_a, g.trans_b, bias != nullptr};
    const Prim& p = cached(key, [&] { return make_matmul(g, bias != nullptr); });
    run(p, a, b, bias, c);
  });
}

namespace {

struct ConvDescs {
  memory::desc x, w, y, b;
  memory::dims strides, pad;
};

// x_dt / y_dt: the data types of the activations and of the output side.
ConvDescs conv_descs(const ConvGeom& g, DT x_dt, DT w_dt, DT y_dt, Tag act, Tag wt) {
  return {memory::desc({g.n, g.c, g.h, g.w}, x_dt, act),
          memory::desc({g.o, g.c, g.kh, g.kw}, w_dt, wt),
          memory::desc({g.n, g.o, g.oh, g.ow}, y_dt, act),
          memory::desc({g.o}, DT::f32, Tag::x),
          {g.stride, g.stride},
          {g.pad, g.pad}};
}

dnnl::convolution_forward::primitive_desc fwd_pd(const ConvGeom& g, DT y_dt, bool bias) {
  ConvDescs d = conv_descs(g, DT::bf16, DT::bf16, y_dt, Tag::any, Tag::any);
  auto prop = dnnl::prop_kind::forward_training;
  auto algo = dnnl::algorithm::convolution_direct;
  auto desc =
      bias
          ? dnnl::convolution_forward::desc(prop, algo, d.x, d.w, d.b, d.y, d.strides, d.pad, d.pad)
          : dnnl::convolution_forward::desc(prop, algo, d.x, d.w, d.y, d.strides, d.pad, d.pad);
  return {desc, cpu_engine()};
}

Prim make_conv_fwd(const ConvGeom& g, bool bias) {
  auto pd = fwd_pd(g, DT::f32, bias);
  ConvDescs u = conv_descs(g, DT::bf16, DT::bf16, DT::f32, Tag::nchw, Tag::oihw);
  return {dnnl::convolution_forward(pd),
          make_port(u.x, pd.src_desc(), true),
          make_port(u.w, pd.weights_desc(), true),
          make_port(u.y, pd.dst_desc(), false),
          DNNL_ARG_SRC,
          DNNL_ARG_WEIGHTS,
          DNNL_ARG_DST,
          DNNL_ARG_BIAS,
          u.b};
}

Prim make_conv_bwd_data(const ConvGeom& g) {
  ConvDescs d = conv_descs(g, DT::f32, DT::bf16, DT::bf16, Tag::any, Tag::any);
  dnnl::convolution_backward_data::desc desc(dnnl::algorithm::convolution_direct, d.x, d.w, d.y,
                                             d.strides, d.pad, d.pad);
  dnnl::convolution_backward_data::primitive_desc pd(desc, cpu_engine(),
                                                     fwd_pd(g, DT::bf16, false));
  ConvDescs u = conv_descs(g, DT::f32, DT::bf16, DT::bf16, Tag::nchw, Tag::oihw);
  return {dnnl::convolution_backward_data(pd),
          make_port(u.y, pd.diff_dst_desc(), true),
          make_port(u.w, pd.weights_desc(), true),
          make_port(u.x, pd.diff_src_desc(), false),
          DNNL_ARG_DIFF_DST,
          DNNL_ARG_WEIGHTS,
          DNNL_ARG_DIFF_SRC,
          0,
          u.b};
}

Prim make_conv_bwd_weights(const ConvGeom& g, bool bias) {
  ConvDescs d = conv_descs(g, DT::bf16, DT::f32, DT::bf16, Tag::any, Tag::any);
  using Bwd = dnnl::convolution_backward_weights;
  auto algo = dnnl::algorithm::convolution_direct;
  auto desc = bias ? Bwd::desc(algo, d.x, d.w, d.b, d.y, d.strides, d.pad, d.pad)
                   : Bwd::desc(algo, d.x, d.w, d.y, d.strides, d.pad, d.pad);
  Bwd::primitive_desc pd(desc, cpu_engine(), fwd_pd(g, DT::bf16, bias));
  ConvDescs u = conv_descs(g, DT::bf16, DT::f32, DT::bf16, Tag::nchw, Tag::oihw);
  return {Bwd(pd),
          make_port(u.x, pd.src_desc(), true),
          make_port(u.y, pd.diff_dst_desc(), true),
          make_port(u.w, pd.diff_weights_desc(), false),
          DNNL_ARG_SRC,
          DNNL_ARG_DIFF_DST,
          DNNL_ARG_DIFF_WEIGHTS,
          DNNL_ARG_DIFF_BIAS,
          u.b};
}

Key conv_key(int64_t kind, const ConvGeom& g, bool bias) {
  return {kind, g.n, g.c, g.h, g.w, g.o, g.kh, g.kw, g.stride, g.pad, bias};
}

}  // namespace

void conv2d_forward_bf16_onednn(const ConvGeom& g, const BFloat16* x, const BFloat16* w,
                                const float* bias, float* y) {
  guarded("conv2d forward", conv_str(g), [&] {
    bool b = bias != nullptr;
    const Prim& p = cached(conv_key(1, g, b), [&] { return make_conv_fwd(g, b); });
    run(p, x, w, bias, y);
  });
}

void conv2d_backward_data_bf16_onednn(const ConvGeom& g, const BFloat16* dy, const BFloat16* w,
                                      float* dx) {
  guarded("conv2d backward data", conv_str(g), [&] {
    const Prim& p = cached(conv_key(2, g, false), [&] { return make_conv_bwd_data(g); });
    run(p, dy, w, nullptr, dx);
  });
}

void conv2d_backward_weights_bf16_onednn(const ConvGeom& g, const BFloat16* x, const BFloat16* dy,
                                         float* dw, float* db) {
  guarded("conv2d backward weights", conv_str(g), [&] {
    bool b = db != nullptr;
    const Prim& p = cached(conv_key(3, g, b), [&] { return make_conv_bwd_weights(g, b); });
    run(p, x, dy, db, dw);
  });
}

}  // namespace dtrain::cpu
