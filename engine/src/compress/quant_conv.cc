// The s8 x s8 -> s32 convolution of quant.h: oneDNN's int8 convolution primitive
// (NHWC activations, weights reordered into its blocked layout each call) and a
// plain-loop reference, the oracle.
#include <oneapi/dnnl/dnnl.hpp>

#include "dtrain/common/error.h"
#include "dtrain/engine/compress/quant.h"

namespace dtrain::compress {

namespace {

void conv_reference(const Int8ConvShape& s, const int8_t* x, const int8_t* w, int32_t* y) {
  for (int64_t b = 0; b < s.n; ++b) {
    for (int64_t oy = 0; oy < s.oh(); ++oy) {
      for (int64_t ox = 0; ox < s.ow(); ++ox) {
        for (int64_t o = 0; o < s.out; ++o) {
          int32_t acc = 0;
          for (int64_t c = 0; c < s.c; ++c) {
            for (int64_t ky = 0; ky < s.k; ++ky) {
              const int64_t iy = oy * s.stride - s.padding + ky;
              if (iy < 0 || iy >= s.h) continue;
              for (int64_t kx = 0; kx < s.k; ++kx) {
                const int64_t ix = ox * s.stride - s.padding + kx;
                if (ix < 0 || ix >= s.w) continue;
                acc += static_cast<int32_t>(x[((b * s.h + iy) * s.w + ix) * s.c + c]) *
                       static_cast<int32_t>(w[((o * s.c + c) * s.k + ky) * s.k + kx]);
              }
            }
          }
          y[((b * s.oh() + oy) * s.ow() + ox) * s.out + o] = acc;
        }
      }
    }
  }
}

const dnnl::engine& cpu_engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

void conv_onednn(const Int8ConvShape& s, const int8_t* x, const int8_t* w, int32_t* y) {
  using dnnl::memory;
  using dt = memory::data_type;
  using tag = memory::format_tag;
  const auto& eng = cpu_engine();
  memory::desc src_md({s.n, s.c, s.h, s.w}, dt::s8, tag::nhwc);
  memory::desc dst_md({s.n, s.out, s.oh(), s.ow()}, dt::s32, tag::nhwc);
  memory::desc wei_plain({s.out, s.c, s.k, s.k}, dt::s8, tag::oihw);
  memory::desc wei_any({s.out, s.c, s.k, s.k}, dt::s8, tag::any);
  dnnl::convolution_forward::desc d(
      dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, src_md, wei_any,
      dst_md, {s.stride, s.stride}, {s.padding, s.padding}, {s.padding, s.padding});
  dnnl::convolution_forward::primitive_desc pd(d, eng);
  dnnl::stream stream(eng);
  memory src(src_md, eng, const_cast<int8_t*>(x));
  memory dst(dst_md, eng, y);
  memory wei_user(wei_plain, eng, const_cast<int8_t*>(w));
  memory wei = wei_user;
  if (pd.weights_desc() != wei_plain) {
    wei = memory(pd.weights_desc(), eng);
    dnnl::reorder(wei_user, wei).execute(stream, wei_user, wei);
  }
  dnnl::convolution_forward(pd).execute(
      stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
  stream.wait();
}

}  // namespace

void conv_s8s8s32(Int8Kernel kernel, const Int8ConvShape& s, const int8_t* x, const int8_t* w,
                  int32_t* y) {
  DTRAIN_CHECK(s.n >= 0 && s.c > 0 && s.out > 0 && s.k > 0 && s.stride > 0 && s.padding >= 0 &&
                   s.oh() > 0 && s.ow() > 0,
               InvalidArgument, "conv_s8s8s32: bad shape N={} C={} H={} W={} O={} k={} s={} p={}",
               s.n, s.c, s.h, s.w, s.out, s.k, s.stride, s.padding);
  if (s.n == 0) return;
  if (kernel == Int8Kernel::kReference) {
    conv_reference(s, x, w, y);
    return;
  }
  try {
    conv_onednn(s, x, w, y);
  } catch (const dnnl::error& e) {
    DTRAIN_THROW(InternalError, "int8 convolution (oneDNN): {}", e.what());
  }
}

}  // namespace dtrain::compress
