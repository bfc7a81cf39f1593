// Convolution and max pooling on oneDNN primitives (f32).
//
// Each call builds its operation descriptor and primitive descriptor and then the
// primitive; oneDNN's primitive cache makes the repeated creation of the same
// primitive (every training step) cheap. Only two process-wide objects exist: the
// CPU engine (an immutable function-local static) and a per-thread stream; there is
// no other state. Scratchpads are passed in by us (scratchpad_mode::user) from the
// engine's caching allocator, which also keeps primitives safe to run from several
// threads at once.
//
// Layouts: with OneDnnLayout::kPlain our NCHW activations and OIHW weights go to
// oneDNN as they are (it then tends to pick its gemm-based kernels). With kBlocked
// the primitive chooses its own layouts (format_tag::any, usually nChw16c) and the
// call reorders inputs in and outputs back, within the call: tensors outside these
// functions are always plain NCHW. Which one wins depends on the layer and the pass;
// bench/conv_kernels measures both.
//
// Pooling always runs on plain NCHW (oneDNN's jit pooling handles it directly). Its
// forward pass fills an opaque workspace (which element won) that the backward
// pass reads; the caller owns that buffer.
// Deliberately not done: f64 (oneDNN has none), dilation, groups.
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <optional>
#include <unordered_map>

#include "conv.h"
#include "dtrain/common/error.h"
#include "dtrain/engine/allocator.h"
#include "host_buffer.h"

namespace dtrain::cpu {

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using Args = std::unordered_map<int, memory>;

const dnnl::engine& cpu_engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

const dnnl::stream& cpu_stream() {
  thread_local const dnnl::stream stream(cpu_engine());
  return stream;
}

// Waits for this thread's stream (a copy of the handle: wait() is not const).
void wait() {
  dnnl::stream s = cpu_stream();
  s.wait();
}

// Runs f, turning oneDNN's exceptions into dtrain errors that name the operation.
template <typename F>
void guarded(const char* what, F&& f) {
  try {
    f();
  } catch (const dnnl::error& e) {
    DTRAIN_THROW(InternalError, "{} (oneDNN): {}", what, e.what());
  }
}

memory::desc f32_desc(const memory::dims& dims, Tag tag) {
  return memory::desc(dims, memory::data_type::f32, tag);
}

// A memory object over one of our buffers (oneDNN wants non-const pointers).
memory wrap(const memory::desc& desc, const float* ptr) {
  return memory(desc, cpu_engine(), const_cast<float*>(ptr));
}

dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

void reorder(const memory& from, const memory& to) {
  dnnl::reorder(from, to).execute(cpu_stream(), {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}});
}

// `user` in the layout `want`: itself when the layouts agree, else a reordered copy
// in `storage` (copied only when `copy_in`; outputs are written back by the caller).
memory in_layout(const memory& user, const memory::desc& want, std::optional<HostBuffer>& storage,
                 bool copy_in) {
  if (user.get_desc() == want) return user;
  storage.emplace(want.get_size());
  memory m(want, cpu_engine(), storage->get());
  if (copy_in) reorder(user, m);
  return m;
}

// Descriptors of one convolution: NCHW / OIHW for kPlain, format_tag::any (the
// primitive's choice) for kBlocked; the bias is always a plain vector.
struct ConvDescs {
  memory::desc x, w, b, y;
  memory::dims strides, pad;
};

ConvDescs conv_descs(const ConvGeom& g, OneDnnLayout layout) {
  bool plain = layout == OneDnnLayout::kPlain;
  Tag act = plain ? Tag::nchw : Tag::any;
  return {f32_desc({g.n, g.c, g.h, g.w}, act),
          f32_desc({g.o, g.c, g.kh, g.kw}, plain ? Tag::oihw : Tag::any),
          f32_desc({g.o}, Tag::x),
          f32_desc({g.n, g.o, g.oh, g.ow}, act),
          memory::dims{g.stride, g.stride},
          memory::dims{g.pad, g.pad}};
}

// The user's buffers as oneDNN memories (always plain).
struct UserConv {
  memory x, w, b, y;
};

UserConv user_conv(const ConvGeom& g, const float* x, const float* w, const float* b,
                   const float* y) {
  ConvDescs d = conv_descs(g, OneDnnLayout::kPlain);
  return {wrap(d.x, x), wrap(d.w, w), b ? wrap(d.b, b) : memory(), wrap(d.y, y)};
}

dnnl::convolution_forward::primitive_desc forward_pd(const ConvGeom& g, bool bias,
                                                     OneDnnLayout layout) {
  ConvDescs d = conv_descs(g, layout);
  auto prop = dnnl::prop_kind::forward_training;
  auto algo = dnnl::algorithm::convolution_direct;
  auto desc =
      bias
          ? dnnl::convolution_forward::desc(prop, algo, d.x, d.w, d.b, d.y, d.strides, d.pad, d.pad)
          : dnnl::convolution_forward::desc(prop, algo, d.x, d.w, d.y, d.strides, d.pad, d.pad);
  return {desc, user_scratchpad(), cpu_engine()};
}

// Executes `prim` with `args` plus a scratchpad of the size `pd` asks for, and waits
// (the scratchpad is released on return).
template <typename Pd>
void execute(const dnnl::primitive& prim, const Pd& pd, Args args) {
  HostBuffer scratch(pd.scratchpad_desc().get_size());
  args.emplace(DNNL_ARG_SCRATCHPAD, memory(pd.scratchpad_desc(), cpu_engine(), scratch.get()));
  prim.execute(cpu_stream(), args);
  wait();
}

}  // namespace

void conv2d_forward_onednn(const ConvGeom& g, const float* x, const float* weight,
                           const float* bias, float* y, OneDnnLayout layout) {
  guarded("conv2d forward", [&] {
    auto pd = forward_pd(g, bias != nullptr, layout);
    UserConv u = user_conv(g, x, weight, bias, y);
    std::optional<HostBuffer> bx, bw, by;
    memory mx = in_layout(u.x, pd.src_desc(), bx, true);
    memory mw = in_layout(u.w, pd.weights_desc(), bw, true);
    memory my = in_layout(u.y, pd.dst_desc(), by, false);
    Args args{{DNNL_ARG_SRC, mx}, {DNNL_ARG_WEIGHTS, mw}, {DNNL_ARG_DST, my}};
    if (bias) args.emplace(DNNL_ARG_BIAS, u.b);
    execute(dnnl::convolution_forward(pd), pd, args);
    if (my != u.y) reorder(my, u.y);
    wait();
  });
}

void conv2d_backward_data_onednn(const ConvGeom& g, const float* dy, const float* weight, float* dx,
                                 OneDnnLayout layout) {
  guarded("conv2d backward data", [&] {
    ConvDescs d = conv_descs(g, layout);
    dnnl::convolution_backward_data::desc desc(dnnl::algorithm::convolution_direct, d.x, d.w, d.y,
                                               d.strides, d.pad, d.pad);
    dnnl::convolution_backward_data::primitive_desc pd(desc, user_scratchpad(), cpu_engine(),
                                                       forward_pd(g, false, layout));
    UserConv u = user_conv(g, dx, weight, nullptr, dy);
    std::optional<HostBuffer> bdy, bw, bdx;
    memory mdy = in_layout(u.y, pd.diff_dst_desc(), bdy, true);
    memory mw = in_layout(u.w, pd.weights_desc(), bw, true);
    memory mdx = in_layout(u.x, pd.diff_src_desc(), bdx, false);
    execute(dnnl::convolution_backward_data(pd), pd,
            {{DNNL_ARG_DIFF_DST, mdy}, {DNNL_ARG_WEIGHTS, mw}, {DNNL_ARG_DIFF_SRC, mdx}});
    if (mdx != u.x) reorder(mdx, u.x);
    wait();
  });
}

void conv2d_backward_weights_onednn(const ConvGeom& g, const float* x, const float* dy,
                                    float* dweight, float* dbias, OneDnnLayout layout) {
  guarded("conv2d backward weights", [&] {
    ConvDescs d = conv_descs(g, layout);
    auto algo = dnnl::algorithm::convolution_direct;
    using Bwd = dnnl::convolution_backward_weights;
    auto desc = dbias ? Bwd::desc(algo, d.x, d.w, d.b, d.y, d.strides, d.pad, d.pad)
                      : Bwd::desc(algo, d.x, d.w, d.y, d.strides, d.pad, d.pad);
    Bwd::primitive_desc pd(desc, user_scratchpad(), cpu_engine(),
                           forward_pd(g, dbias != nullptr, layout));
    UserConv u = user_conv(g, x, dweight, dbias, dy);
    std::optional<HostBuffer> bx, bdy, bdw;
    memory mx = in_layout(u.x, pd.src_desc(), bx, true);
    memory mdy = in_layout(u.y, pd.diff_dst_desc(), bdy, true);
    memory mdw = in_layout(u.w, pd.diff_weights_desc(), bdw, false);
    Args args{{DNNL_ARG_SRC, mx}, {DNNL_ARG_DIFF_DST, mdy}, {DNNL_ARG_DIFF_WEIGHTS, mdw}};
    if (dbias) args.emplace(DNNL_ARG_DIFF_BIAS, u.b);
    execute(Bwd(pd), pd, args);
    if (mdw != u.w) reorder(mdw, u.w);
    wait();
  });
}

namespace {

struct PoolDescs {
  memory::desc x, y;
  memory::dims strides, kernel, pad;
};

PoolDescs pool_descs(const PoolGeom& g) {
  return {f32_desc({g.n, g.c, g.h, g.w}, Tag::nchw), f32_desc({g.n, g.c, g.oh, g.ow}, Tag::nchw),
          memory::dims{g.stride, g.stride}, memory::dims{g.kernel, g.kernel},
          memory::dims{g.pad, g.pad}};
}

dnnl::pooling_forward::primitive_desc pool_forward_pd(const PoolGeom& g) {
  PoolDescs d = pool_descs(g);
  dnnl::pooling_forward::desc desc(dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_max,
                                   d.x, d.y, d.strides, d.kernel, d.pad, d.pad);
  return {desc, user_scratchpad(), cpu_engine()};
}

}  // namespace

size_t max_pool2d_workspace_bytes_onednn(const PoolGeom& g) {
  size_t bytes = 0;
  guarded("max_pool2d", [&] { bytes = pool_forward_pd(g).workspace_desc().get_size(); });
  return bytes;
}

void max_pool2d_forward_onednn(const PoolGeom& g, const float* x, float* y, void* workspace) {
  guarded("max_pool2d forward", [&] {
    auto pd = pool_forward_pd(g);
    PoolDescs d = pool_descs(g);
    memory ws(pd.workspace_desc(), cpu_engine(), workspace);
    execute(dnnl::pooling_forward(pd), pd,
            {{DNNL_ARG_SRC, wrap(d.x, x)}, {DNNL_ARG_DST, wrap(d.y, y)}, {DNNL_ARG_WORKSPACE, ws}});
    wait();
  });
}

void max_pool2d_backward_onednn(const PoolGeom& g, const float* dy, const void* workspace,
                                float* dx) {
  guarded("max_pool2d backward", [&] {
    auto hint = pool_forward_pd(g);
    PoolDescs d = pool_descs(g);
    dnnl::pooling_backward::desc desc(dnnl::algorithm::pooling_max, d.x, d.y, d.strides, d.kernel,
                                      d.pad, d.pad);
    dnnl::pooling_backward::primitive_desc pd(desc, user_scratchpad(), cpu_engine(), hint);
    memory ws(hint.workspace_desc(), cpu_engine(), const_cast<void*>(workspace));
    execute(dnnl::pooling_backward(pd), pd,
            {{DNNL_ARG_DIFF_DST, wrap(d.y, dy)},
             {DNNL_ARG_DIFF_SRC, wrap(d.x, dx)},
             {DNNL_ARG_WORKSPACE, ws}});
    wait();
  });
}

}  // namespace dtrain::cpu
