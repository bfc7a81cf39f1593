// The oneDNN path of the int8 graph (quant_graph.h): primitives per input shape, cached;
// weights reordered into the layout the primitives ask for, once per layout.
#include <oneapi/dnnl/dnnl.hpp>

#include <map>
#include <unordered_map>

#include "dtrain/common/error.h"
#include "dtrain/engine/compress/quant.h"
#include "dtrain/engine/compress/quant_graph.h"

namespace dtrain::compress {

using dnnl::memory;
using dt = memory::data_type;
using tag = memory::format_tag;

// One op's primitive and the memory it reads that is not an activation.
struct Int8Graph::Plan {
  struct Step {
    dnnl::primitive prim;
    memory::desc src, dst, scratch;
    memory wei, bias;  // conv / linear only
  };
  memory::desc input;
  std::vector<Step> steps;
};

struct Int8Graph::Impl {
  dnnl::engine eng{dnnl::engine::kind::cpu, 0};
  struct Weights {
    // reordered copies, one per layout asked for (and per [H, W] of a Linear after a
    // Flatten, whose K order those set)
    std::vector<std::pair<int64_t, memory>> layouts;
    memory bias;  // f32 [out]
  };
  std::vector<Weights> weights;  // per op (unused for max-pool)
  std::map<Shape, std::unique_ptr<Plan>> plans;
};

namespace {

// The NHWC/NC descriptor of an activation [n, c, (h, w)].
memory::desc act_md(const memory::dims& d, dt type) {
  return memory::desc(d, type, d.size() == 4 ? tag::nhwc : tag::nc);
}

dnnl::primitive_attr layer_attr(const Int8GraphOp& op) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  attr.set_output_scales(1 << 1, op.oscale);  // per output channel (dim 1)
  if (op.relu) {
    dnnl::post_ops po;
    po.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    attr.set_post_ops(po);
  }
  return attr;
}

dt dst_type(const Int8GraphOp& op) { return op.last ? dt::f32 : (op.relu ? dt::u8 : dt::s8); }

int64_t out_size(int64_t in, const Int8GraphOp& op) {
  return (in + 2 * op.padding - op.kernel) / op.stride + 1;
}

}  // namespace

Int8Graph::Int8Graph(std::vector<Int8GraphOp> ops, float input_scale, bool input_u8,
                     const Shape& example)
    : ops_(std::move(ops)),
      input_scale_(input_scale),
      input_u8_(input_u8),
      impl_(std::make_unique<Impl>()) {
  impl_->weights.resize(ops_.size());
  plan_for(example);  // reorders the weights now, for the calibration shape
}

Int8Graph::~Int8Graph() = default;

size_t Int8Graph::cached_shapes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return impl_->plans.size();
}

namespace {

// The weights of op i in layout `want`: a copy made before, or a reorder now of the
// plain `user` weights at `data` (op.weight, or its NHWC-ordered copy: key = H * 2^20 + W).
memory weights_in(Int8Graph::Impl& impl, const Int8GraphOp& op, size_t i, const memory::desc& want,
                  const memory::desc& user, const int8_t* data, int64_t key = 0) {
  auto& w = impl.weights[i];
  if (!w.bias) {  // first use: the bias
    w.bias = memory(memory::desc({op.out}, dt::f32, tag::x), impl.eng);
    std::copy(op.bias.begin(), op.bias.end(), static_cast<float*>(w.bias.get_data_handle()));
  }
  for (const auto& [k, m] : w.layouts) {
    if (k == key && m.get_desc() == want) return m;
  }
  memory plain(user, impl.eng, const_cast<int8_t*>(data));
  memory m(want, impl.eng);
  dnnl::stream stream(impl.eng);
  dnnl::reorder(plain, m).execute(stream, plain, m);
  stream.wait();
  w.layouts.emplace_back(key, m);
  return m;
}

// A Linear's weight [out, C*H*W] (NCHW order) permuted to [out, H*W*C] (NHWC order).
std::vector<int8_t> weight_nhwc(const Int8GraphOp& op, int64_t c, int64_t hw) {
  std::vector<int8_t> out(op.weight.size());
  for (int64_t o = 0; o < op.out; ++o) {
    for (int64_t ch = 0; ch < c; ++ch) {
      for (int64_t i = 0; i < hw; ++i) {
        out[static_cast<size_t>(o * op.in + i * c + ch)] =
            op.weight[static_cast<size_t>(o * op.in + ch * hw + i)];
      }
    }
  }
  return out;
}

Int8Graph::Plan::Step conv_step(Int8Graph::Impl& impl, const Int8GraphOp& op, size_t i,
                                const memory::desc& src) {
  const memory::dims s = src.dims();
  DTRAIN_CHECK(s.size() == 4 && s[1] == op.channels, ShapeError,
               "int8 graph conv {}: expected input [N,{},H,W], got C={}", i, op.channels,
               s.size() == 4 ? s[1] : -1);
  const memory::dims wd{op.out, op.channels, op.kernel, op.kernel};
  memory::desc wei_any(wd, dt::s8, tag::any), bias_md({op.out}, dt::f32, tag::x);
  memory::desc dst = act_md({s[0], op.out, out_size(s[2], op), out_size(s[3], op)}, dst_type(op));
  dnnl::convolution_forward::desc d(
      dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, src, wei_any,
      bias_md, dst, {op.stride, op.stride}, {op.padding, op.padding}, {op.padding, op.padding});
  dnnl::convolution_forward::primitive_desc pd(d, layer_attr(op), impl.eng);
  memory wei = weights_in(impl, op, i, pd.weights_desc(), memory::desc(wd, dt::s8, tag::oihw),
                          op.weight.data());
  return {dnnl::convolution_forward(pd), src, pd.dst_desc(),
          pd.scratchpad_desc(),          wei, impl.weights[i].bias};
}

// After a Flatten the src is 4D NHWC: read as the 2D [N, H*W*C] it is in memory (oneDNN's
// 4D int8 inner product is a slow GEMM), with the weights permuted to that K order.
Int8Graph::Plan::Step linear_step(Int8Graph::Impl& impl, const Int8GraphOp& op, size_t i,
                                  const memory::desc& src4) {
  memory::dims s = src4.dims();
  int64_t k = 1;
  for (size_t j = 1; j < s.size(); ++j) k *= s[j];
  DTRAIN_CHECK(k == op.in, ShapeError, "int8 graph linear {}: expected {} input features, got {}",
               i, op.in, k);
  const memory::desc src = act_md({s[0], k}, src4.data_type());
  std::vector<int8_t> permuted;
  int64_t key = 0;
  if (s.size() == 4) {
    permuted = weight_nhwc(op, s[1], s[2] * s[3]);
    key = (s[2] << 20) + s[3];
  }
  memory::desc wei_any({op.out, op.in}, dt::s8, tag::any), bias_md({op.out}, dt::f32, tag::x);
  memory::desc dst = act_md({s[0], op.out}, dst_type(op));
  dnnl::inner_product_forward::desc d(dnnl::prop_kind::forward_inference, src, wei_any, bias_md,
                                      dst);
  dnnl::inner_product_forward::primitive_desc pd(d, layer_attr(op), impl.eng);
  memory wei =
      weights_in(impl, op, i, pd.weights_desc(), memory::desc({op.out, op.in}, dt::s8, tag::oi),
                 permuted.empty() ? op.weight.data() : permuted.data(), key);
  return {dnnl::inner_product_forward(pd),
          src,
          pd.dst_desc(),
          pd.scratchpad_desc(),
          wei,
          impl.weights[i].bias};
}

Int8Graph::Plan::Step pool_step(Int8Graph::Impl& impl, const Int8GraphOp& op, size_t i,
                                const memory::desc& src) {
  const memory::dims s = src.dims();
  DTRAIN_CHECK(s.size() == 4, ShapeError, "int8 graph max-pool {}: expected a [N,C,H,W] input", i);
  const int64_t oh = out_size(s[2], op), ow = out_size(s[3], op);
  const int64_t pr_h = (oh - 1) * op.stride + op.kernel - s[2] - op.padding;
  const int64_t pr_w = (ow - 1) * op.stride + op.kernel - s[3] - op.padding;
  memory::desc dst = act_md({s[0], s[1], oh, ow}, src.data_type());
  dnnl::pooling_forward::desc d(dnnl::prop_kind::forward_inference, dnnl::algorithm::pooling_max,
                                src, dst, {op.stride, op.stride}, {op.kernel, op.kernel},
                                {op.padding, op.padding},
                                {std::max<int64_t>(pr_h, 0), std::max<int64_t>(pr_w, 0)});
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::pooling_forward::primitive_desc pd(d, attr, impl.eng);
  return {dnnl::pooling_forward(pd), src, pd.dst_desc(), pd.scratchpad_desc(), {}, {}};
}

}  // namespace

const Int8Graph::Plan& Int8Graph::plan_for(const Shape& s) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = impl_->plans.find(s);
  if (it != impl_->plans.end()) return *it->second;
  DTRAIN_CHECK(s.size() == 2 || s.size() == 4, ShapeError,
               "int8 graph: expected an input [N,C,H,W] or [N,K], got {}", shape_str(s));
  auto plan = std::make_unique<Plan>();
  plan->input = act_md(memory::dims(s.begin(), s.end()), input_u8_ ? dt::u8 : dt::s8);
  memory::desc cur = plan->input;
  try {
    for (size_t i = 0; i < ops_.size(); ++i) {
      const Int8GraphOp& op = ops_[i];
      if (op.kind == Int8GraphOp::Kind::kConv) {
        plan->steps.push_back(conv_step(*impl_, op, i, cur));
      } else if (op.kind == Int8GraphOp::Kind::kLinear) {
        plan->steps.push_back(linear_step(*impl_, op, i, cur));
      } else {
        plan->steps.push_back(pool_step(*impl_, op, i, cur));
      }
      cur = plan->steps.back().dst;
    }
  } catch (const dnnl::error& e) {
    DTRAIN_THROW(InternalError, "int8 graph (oneDNN) for input {}: {}", shape_str(s), e.what());
  }
  return *impl_->plans.emplace(s, std::move(plan)).first->second;
}

namespace {

std::vector<int32_t> widen(const memory& m) {
  const memory::desc d = m.get_desc();
  size_t n = 1;
  for (auto v : d.dims()) n *= static_cast<size_t>(v);
  std::vector<int32_t> out(n);
  if (d.data_type() == dt::u8) {
    const auto* p = static_cast<const uint8_t*>(m.get_data_handle());
    std::copy(p, p + n, out.begin());
  } else {
    const auto* p = static_cast<const int8_t*>(m.get_data_handle());
    std::copy(p, p + n, out.begin());
  }
  return out;
}

}  // namespace

Tensor Int8Graph::run_onednn(const Tensor& x, std::vector<std::vector<int32_t>>* trace) const {
  const Plan& plan = plan_for(x.shape());
  std::vector<uint8_t> q = quantize_input_nhwc(x, input_scale_, input_u8_);
  const auto& eng = impl_->eng;
  const memory::dims out_dims = plan.steps.back().dst.dims();
  Tensor y = empty(Shape(out_dims.begin(), out_dims.end()));
  dnnl::stream stream(eng);
  void* prev = q.data();
  // Uninitialised buffers (every byte is written): the activations, then the scratchpad.
  std::vector<std::unique_ptr<uint8_t[]>> buffers;
  try {
    for (size_t i = 0; i < plan.steps.size(); ++i) {
      const auto& st = plan.steps[i];
      const bool last = i + 1 == plan.steps.size();
      if (!last) buffers.emplace_back(new uint8_t[st.dst.get_size()]);
      memory dst(st.dst, eng, last ? static_cast<void*>(y.data<float>()) : buffers.back().get());
      std::unordered_map<int, memory> args{{DNNL_ARG_SRC, memory(st.src, eng, prev)},
                                           {DNNL_ARG_DST, dst}};
      if (st.scratch.get_size() > 0) {
        buffers.emplace_back(new uint8_t[st.scratch.get_size()]);
        args.emplace(DNNL_ARG_SCRATCHPAD, memory(st.scratch, eng, buffers.back().get()));
      }
      if (st.wei) {
        args.emplace(DNNL_ARG_WEIGHTS, st.wei);
        args.emplace(DNNL_ARG_BIAS, st.bias);
      }
      st.prim.execute(stream, args);
      if (trace != nullptr && !last) {
        stream.wait();
        trace->push_back(widen(dst));
      }
      prev = dst.get_data_handle();
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    DTRAIN_THROW(InternalError, "int8 graph (oneDNN) on input {}: {}", shape_str(x.shape()),
                 e.what());
  }
  return y;
}

Tensor Int8Graph::run(const Tensor& x, bool reference,
                      std::vector<std::vector<int32_t>>* trace) const {
  DTRAIN_CHECK(x.dtype() == DType::f32 && x.device().is_cpu(), DTypeError,
               "int8 graph: expected a CPU f32 input, got {}", dtype_name(x.dtype()));
  return reference ? run_reference(x, trace) : run_onednn(x, trace);
}

std::vector<uint8_t> quantize_input_nhwc(const Tensor& x, float scale, bool u8) {
  Tensor c = x.contiguous();
  const Shape& s = c.shape();
  DTRAIN_CHECK(s.size() == 2 || s.size() == 4, ShapeError,
               "int8 graph: expected an input [N,C,H,W] or [N,K], got {}", shape_str(s));
  const float* p = c.data<float>();
  const int64_t n = s[0], ch = s[1], hw = s.size() == 4 ? s[2] * s[3] : 1;
  std::vector<uint8_t> q(static_cast<size_t>(c.numel()));
  if (ch == 1 || hw == 1) {  // NCHW is NHWC already; one loop per type, so each vectorizes
    // Locals: stores through uint8_t* may alias q's pointer and the scale otherwise.
    uint8_t* out = q.data();
    const size_t count = q.size();
    const float sc = scale;
    if (u8) {
      for (size_t i = 0; i < count; ++i) out[i] = quantize_u8(p[i], sc);
    } else {
      for (size_t i = 0; i < count; ++i) out[i] = static_cast<uint8_t>(quantize_s8(p[i], sc));
    }
    return q;
  }
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t k = 0; k < ch; ++k) {
      const float* src = p + (b * ch + k) * hw;
      uint8_t* dst = q.data() + b * hw * ch + k;
      for (int64_t i = 0; i < hw; ++i) {
        dst[i * ch] =
            u8 ? quantize_u8(src[i], scale) : static_cast<uint8_t>(quantize_s8(src[i], scale));
      }
    }
  }
  return q;
}

}  // namespace dtrain::compress
