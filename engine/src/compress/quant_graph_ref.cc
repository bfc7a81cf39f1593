// The reference kernel of the int8 graph (quant_graph.h): every op as plain integer loops
// on NHWC activations held as int32, with the graph's scales, rounding (requantize())
// and saturation. The oracle the oneDNN path is tested against; not fast.
#include <algorithm>
#include <limits>

#include "dtrain/common/error.h"
#include "dtrain/engine/compress/quant_graph.h"

namespace dtrain::compress {

namespace {

// An activation: NHWC [n, h, w, c], or [n, c] with h = w = 1 and flat (after a Linear).
struct Act {
  int64_t n = 0, h = 1, w = 1, c = 0;
  bool flat = false;
  std::vector<int32_t> v;
};

int32_t output_value(const Int8GraphOp& op, int32_t acc, int64_t o, float* logit) {
  if (op.last) {
    float y = (static_cast<float>(acc) + op.bias[static_cast<size_t>(o)]) *
              op.oscale[static_cast<size_t>(o)];
    *logit = op.relu && y < 0.f ? 0.f : y;
    return 0;
  }
  return requantize(acc, op.bias[static_cast<size_t>(o)], op.oscale[static_cast<size_t>(o)],
                    op.relu);
}

Act conv_ref(const Int8GraphOp& op, const Act& x, std::vector<float>* logits) {
  DTRAIN_CHECK(!x.flat && x.c == op.channels, ShapeError,
               "int8 graph conv: expected [N,{},H,W] input, got C={}", op.channels, x.c);
  Act y;
  y.n = x.n;
  y.c = op.out;
  y.h = (x.h + 2 * op.padding - op.kernel) / op.stride + 1;
  y.w = (x.w + 2 * op.padding - op.kernel) / op.stride + 1;
  y.v.resize(static_cast<size_t>(y.n * y.h * y.w * y.c));
  if (op.last) logits->resize(y.v.size());
  for (int64_t b = 0; b < y.n; ++b) {
    for (int64_t oy = 0; oy < y.h; ++oy) {
      for (int64_t ox = 0; ox < y.w; ++ox) {
        const int64_t at = ((b * y.h + oy) * y.w + ox) * y.c;
        for (int64_t o = 0; o < op.out; ++o) {
          int32_t acc = 0;
          for (int64_t ky = 0; ky < op.kernel; ++ky) {
            const int64_t iy = oy * op.stride - op.padding + ky;
            if (iy < 0 || iy >= x.h) continue;
            for (int64_t kx = 0; kx < op.kernel; ++kx) {
              const int64_t ix = ox * op.stride - op.padding + kx;
              if (ix < 0 || ix >= x.w) continue;
              const int32_t* src = x.v.data() + ((b * x.h + iy) * x.w + ix) * x.c;
              for (int64_t c = 0; c < x.c; ++c) {
                acc += src[c] * op.weight[static_cast<size_t>(
                                    ((o * x.c + c) * op.kernel + ky) * op.kernel + kx)];
              }
            }
          }
          float* logit = op.last ? logits->data() + at + o : nullptr;
          y.v[static_cast<size_t>(at + o)] = output_value(op, acc, o, logit);
        }
      }
    }
  }
  return y;
}

// After a Flatten the weight's K index is NCHW-ordered (c, y, x); x is NHWC.
Act linear_ref(const Int8GraphOp& op, const Act& x, std::vector<float>* logits) {
  const int64_t k = x.h * x.w * x.c;
  DTRAIN_CHECK(k == op.in, ShapeError, "int8 graph linear: expected {} input features, got {}",
               op.in, k);
  Act y;
  y.n = x.n;
  y.c = op.out;
  y.flat = true;
  y.v.resize(static_cast<size_t>(y.n * y.c));
  if (op.last) logits->resize(y.v.size());
  for (int64_t b = 0; b < x.n; ++b) {
    for (int64_t o = 0; o < op.out; ++o) {
      int32_t acc = 0;
      for (int64_t c = 0; c < x.c; ++c) {
        for (int64_t i = 0; i < x.h * x.w; ++i) {
          acc += x.v[static_cast<size_t>((b * x.h * x.w + i) * x.c + c)] *
                 op.weight[static_cast<size_t>(o * op.in + c * x.h * x.w + i)];
        }
      }
      float* logit = op.last ? logits->data() + b * op.out + o : nullptr;
      y.v[static_cast<size_t>(b * op.out + o)] = output_value(op, acc, o, logit);
    }
  }
  return y;
}

Act maxpool_ref(const Int8GraphOp& op, const Act& x) {
  DTRAIN_CHECK(!x.flat, ShapeError, "int8 graph max-pool: expected a [N,C,H,W] input");
  Act y = x;
  y.h = (x.h + 2 * op.padding - op.kernel) / op.stride + 1;
  y.w = (x.w + 2 * op.padding - op.kernel) / op.stride + 1;
  y.v.assign(static_cast<size_t>(y.n * y.h * y.w * y.c), std::numeric_limits<int32_t>::min());
  for (int64_t b = 0; b < y.n; ++b) {
    for (int64_t oy = 0; oy < y.h; ++oy) {
      for (int64_t ox = 0; ox < y.w; ++ox) {
        int32_t* dst = y.v.data() + ((b * y.h + oy) * y.w + ox) * y.c;
        for (int64_t ky = 0; ky < op.kernel; ++ky) {
          const int64_t iy = oy * op.stride - op.padding + ky;
          for (int64_t kx = 0; kx < op.kernel; ++kx) {
            const int64_t ix = ox * op.stride - op.padding + kx;
            if (iy < 0 || iy >= x.h || ix < 0 || ix >= x.w) continue;
            const int32_t* src = x.v.data() + ((b * x.h + iy) * x.w + ix) * x.c;
            for (int64_t c = 0; c < x.c; ++c) dst[c] = std::max(dst[c], src[c]);
          }
        }
      }
    }
  }
  return y;
}

}  // namespace

Tensor Int8Graph::run_reference(const Tensor& x, std::vector<std::vector<int32_t>>* trace) const {
  const Shape& s = x.shape();
  std::vector<uint8_t> q = quantize_input_nhwc(x, input_scale_, input_u8_);
  Act a;
  a.n = s[0];
  a.flat = s.size() == 2;
  a.c = s[1];
  if (!a.flat) {
    a.h = s[2];
    a.w = s[3];
  }
  a.v.resize(q.size());
  for (size_t i = 0; i < q.size(); ++i) {
    a.v[i] =
        input_u8_ ? static_cast<int32_t>(q[i]) : static_cast<int32_t>(static_cast<int8_t>(q[i]));
  }
  std::vector<float> logits;
  for (const Int8GraphOp& op : ops_) {
    if (op.kind == Int8GraphOp::Kind::kConv) {
      a = conv_ref(op, a, &logits);
    } else if (op.kind == Int8GraphOp::Kind::kLinear) {
      a = linear_ref(op, a, &logits);
    } else {
      a = maxpool_ref(op, a);
    }
    if (trace != nullptr && !op.last) trace->push_back(a.v);
  }
  Shape out = a.flat ? Shape{a.n, a.c} : Shape{a.n, a.h, a.w, a.c};
  return from_vector<float>(logits, out);
}

}  // namespace dtrain::compress
