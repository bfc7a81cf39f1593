// conv2d and max_pool2d, forward and backward, on cuDNN 9 (its legacy convolution and
// pooling API: one call per direction, algorithms chosen by cuDNN's heuristics, the
// workspace from the device's caching allocator). NCHW as the CPU backend.
#include <cudnn.h>

#include "cuda/context.h"
#include "cuda/ops_cuda.h"
#include "dtrain/engine/cuda/runtime.h"

namespace dtrain::cuda {

namespace {

#define DTRAIN_CUDNN_CHECK(expr)                                                  \
  do {                                                                            \
    cudnnStatus_t dtrain_cudnn_st_ = (expr);                                      \
    DTRAIN_CHECK(dtrain_cudnn_st_ == CUDNN_STATUS_SUCCESS, UnsupportedError,      \
                 "cuDNN error {} ({}) in {}", static_cast<int>(dtrain_cudnn_st_), \
                 cudnnGetErrorString(dtrain_cudnn_st_), #expr);                   \
  } while (0)

cudnnDataType_t cudnn_type(DType dt, const char* op) {
  switch (dt) {
    case DType::f32:
      return CUDNN_DATA_FLOAT;
    case DType::f64:
      return CUDNN_DATA_DOUBLE;
    case DType::f16:
      return CUDNN_DATA_HALF;
    case DType::bf16:
      return CUDNN_DATA_BFLOAT16;
    default:
      DTRAIN_THROW(UnsupportedError, "{} on CUDA: dtype {} is not supported", op, dtype_name(dt));
  }
}

int i32(int64_t v) {
  DTRAIN_CHECK(v <= 2147483647, UnsupportedError, "cuDNN: dimension {} exceeds 2^31-1", v);
  return static_cast<int>(v);
}

// alpha = 1 and beta (0 or 1) as cuDNN wants them: double for f64, float otherwise.
struct Scale {
  float f1 = 1.f, f0 = 0.f;
  double d1 = 1.0, d0 = 0.0;
  bool dbl;
  explicit Scale(DType dt) : dbl(dt == DType::f64) {}
  const void* one() const { return dbl ? static_cast<const void*>(&d1) : &f1; }
  const void* zero() const { return dbl ? static_cast<const void*>(&d0) : &f0; }
};

struct TensorDesc {
  cudnnTensorDescriptor_t d = nullptr;
  TensorDesc(DType dt, int64_t n, int64_t c, int64_t h, int64_t w) {
    DTRAIN_CUDNN_CHECK(cudnnCreateTensorDescriptor(&d));
    DTRAIN_CUDNN_CHECK(cudnnSetTensor4dDescriptor(d, CUDNN_TENSOR_NCHW, cudnn_type(dt, "cuDNN"),
                                                  i32(n), i32(c), i32(h), i32(w)));
  }
  ~TensorDesc() { cudnnDestroyTensorDescriptor(d); }
  TensorDesc(const TensorDesc&) = delete;
  TensorDesc& operator=(const TensorDesc&) = delete;
};

struct FilterDesc {
  cudnnFilterDescriptor_t d = nullptr;
  FilterDesc(DType dt, const cpu::ConvGeom& g) {
    DTRAIN_CUDNN_CHECK(cudnnCreateFilterDescriptor(&d));
    DTRAIN_CUDNN_CHECK(cudnnSetFilter4dDescriptor(d, cudnn_type(dt, "conv2d"), CUDNN_TENSOR_NCHW,
                                                  i32(g.o), i32(g.c), i32(g.kh), i32(g.kw)));
  }
  ~FilterDesc() { cudnnDestroyFilterDescriptor(d); }
  FilterDesc(const FilterDesc&) = delete;
  FilterDesc& operator=(const FilterDesc&) = delete;
};

struct ConvDesc {
  cudnnConvolutionDescriptor_t d = nullptr;
  ConvDesc(DType dt, const cpu::ConvGeom& g) {
    DTRAIN_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&d));
    cudnnDataType_t compute = dt == DType::f64 ? CUDNN_DATA_DOUBLE : CUDNN_DATA_FLOAT;
    DTRAIN_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(d, i32(g.pad), i32(g.pad), i32(g.stride),
                                                       i32(g.stride), 1, 1, CUDNN_CROSS_CORRELATION,
                                                       compute));
    // f32 stays f32 (FMA math) unless an AllowTf32Guard is alive (default math lets
    // cuDNN use TF32); half types use the tensor cores.
    bool half = dt == DType::f16 || dt == DType::bf16;
    cudnnMathType_t math = half                        ? CUDNN_TENSOR_OP_MATH
                           : AllowTf32Guard::enabled() ? CUDNN_DEFAULT_MATH
                                                       : CUDNN_FMA_MATH;
    DTRAIN_CUDNN_CHECK(cudnnSetConvolutionMathType(d, math));
  }
  ~ConvDesc() { cudnnDestroyConvolutionDescriptor(d); }
  ConvDesc(const ConvDesc&) = delete;
  ConvDesc& operator=(const ConvDesc&) = delete;
};

// Everything one convolution call needs.
struct ConvSetup {
  DeviceContext& ctx;
  TensorDesc xd, yd;
  FilterDesc wd;
  ConvDesc cd;
  Scale s;
  ConvSetup(const Device& dev, DType dt, const cpu::ConvGeom& g)
      : ctx(context(dev.index)),
        xd(dt, g.n, g.c, g.h, g.w),
        yd(dt, g.n, g.o, g.oh, g.ow),
        wd(dt, g),
        cd(dt, g),
        s(dt) {}
};

// A scratch buffer from the caching allocator (u8 tensor), null for zero bytes.
Tensor workspace(const Device& dev, size_t bytes) {
  return bytes == 0 ? Tensor()
                    : empty({static_cast<int64_t>(bytes)}, TensorOptions{DType::u8, dev});
}
void* ptr(const Tensor& t) { return t.defined() ? t.raw_data() : nullptr; }

Tensor contig(const Tensor& t) { return t.detach().contiguous(); }

}  // namespace

Tensor conv2d_forward(const Tensor& x, const Tensor& w, const Tensor& b, const cpu::ConvGeom& g) {
  check_same_device("conv2d", {x, w, b});
  Tensor xc = contig(x), wc = contig(w);
  Tensor y = empty({g.n, g.o, g.oh, g.ow}, x.options());
  if (g.n == 0) return y;
  ConvSetup c(x.device(), x.dtype(), g);
  cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
  int found = 0;
  DTRAIN_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithm_v7(
      c.ctx.cudnn, c.xd.d, c.wd.d, c.cd.d, c.yd.d, CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &found, perf));
  DTRAIN_CHECK(found > 0, UnsupportedError, "conv2d on CUDA: cuDNN has no forward algorithm");
  size_t bytes = 0;
  DTRAIN_CUDNN_CHECK(cudnnGetConvolutionForwardWorkspaceSize(c.ctx.cudnn, c.xd.d, c.wd.d, c.cd.d,
                                                             c.yd.d, perf[0].algo, &bytes));
  Tensor ws = workspace(x.device(), bytes);
  DTRAIN_CUDNN_CHECK(cudnnConvolutionForward(c.ctx.cudnn, c.s.one(), c.xd.d, xc.raw_data(), c.wd.d,
                                             wc.raw_data(), c.cd.d, perf[0].algo, ptr(ws), bytes,
                                             c.s.zero(), c.yd.d, y.raw_data()));
  if (b.defined()) {
    Tensor bc = contig(b);
    TensorDesc bd(x.dtype(), 1, g.o, 1, 1);
    DTRAIN_CUDNN_CHECK(cudnnAddTensor(c.ctx.cudnn, c.s.one(), bd.d, bc.raw_data(), c.s.one(),
                                      c.yd.d, y.raw_data()));
  }
  return y;
}

std::vector<Tensor> conv2d_backward(const Tensor& dy, const Tensor& x, const Tensor& w,
                                    const cpu::ConvGeom& g, bool gx, bool gw, bool gb) {
  const TensorOptions opts = w.options();
  Tensor dyc = contig(dy);
  Tensor dx = gx ? zeros({g.n, g.c, g.h, g.w}, opts) : Tensor();
  Tensor dw = gw ? zeros({g.o, g.c, g.kh, g.kw}, opts) : Tensor();
  Tensor db = gb ? zeros({g.o}, opts) : Tensor();
  if (g.n == 0) return {dx, dw, db};
  ConvSetup c(w.device(), w.dtype(), g);
  if (gx) {
    cudnnConvolutionBwdDataAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT];
    int found = 0;
    DTRAIN_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithm_v7(
        c.ctx.cudnn, c.wd.d, c.yd.d, c.cd.d, c.xd.d, CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, &found,
        perf));
    DTRAIN_CHECK(found > 0, UnsupportedError, "conv2d backward: cuDNN has no data algorithm");
    size_t bytes = 0;
    DTRAIN_CUDNN_CHECK(cudnnGetConvolutionBackwardDataWorkspaceSize(
        c.ctx.cudnn, c.wd.d, c.yd.d, c.cd.d, c.xd.d, perf[0].algo, &bytes));
    Tensor ws = workspace(w.device(), bytes);
    Tensor wc = contig(w);
    DTRAIN_CUDNN_CHECK(cudnnConvolutionBackwardData(
        c.ctx.cudnn, c.s.one(), c.wd.d, wc.raw_data(), c.yd.d, dyc.raw_data(), c.cd.d, perf[0].algo,
        ptr(ws), bytes, c.s.zero(), c.xd.d, dx.raw_data()));
  }
  if (gw) {
    cudnnConvolutionBwdFilterAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT];
    int found = 0;
    DTRAIN_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterAlgorithm_v7(
        c.ctx.cudnn, c.xd.d, c.yd.d, c.cd.d, c.wd.d, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT,
        &found, perf));
    DTRAIN_CHECK(found > 0, UnsupportedError, "conv2d backward: cuDNN has no filter algorithm");
    size_t bytes = 0;
    DTRAIN_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterWorkspaceSize(
        c.ctx.cudnn, c.xd.d, c.yd.d, c.cd.d, c.wd.d, perf[0].algo, &bytes));
    Tensor ws = workspace(w.device(), bytes);
    Tensor xc = contig(x);
    DTRAIN_CUDNN_CHECK(cudnnConvolutionBackwardFilter(
        c.ctx.cudnn, c.s.one(), c.xd.d, xc.raw_data(), c.yd.d, dyc.raw_data(), c.cd.d, perf[0].algo,
        ptr(ws), bytes, c.s.zero(), c.wd.d, dw.raw_data()));
  }
  if (gb) {
    TensorDesc bd(w.dtype(), 1, g.o, 1, 1);
    DTRAIN_CUDNN_CHECK(cudnnConvolutionBackwardBias(c.ctx.cudnn, c.s.one(), c.yd.d, dyc.raw_data(),
                                                    c.s.zero(), bd.d, db.raw_data()));
  }
  return {dx, dw, db};
}

namespace {

struct PoolDesc {
  cudnnPoolingDescriptor_t d = nullptr;
  explicit PoolDesc(const cpu::PoolGeom& g) {
    DTRAIN_CUDNN_CHECK(cudnnCreatePoolingDescriptor(&d));
    // Deterministic max pooling: backward routes each gradient to one winner.
    DTRAIN_CUDNN_CHECK(cudnnSetPooling2dDescriptor(
        d, CUDNN_POOLING_MAX_DETERMINISTIC, CUDNN_PROPAGATE_NAN, i32(g.kernel), i32(g.kernel),
        i32(g.pad), i32(g.pad), i32(g.stride), i32(g.stride)));
  }
  ~PoolDesc() { cudnnDestroyPoolingDescriptor(d); }
  PoolDesc(const PoolDesc&) = delete;
  PoolDesc& operator=(const PoolDesc&) = delete;
};

}  // namespace

Tensor max_pool2d_forward(const Tensor& x, const cpu::PoolGeom& g) {
  Tensor xc = contig(x);
  Tensor y = empty({g.n, g.c, g.oh, g.ow}, x.options());
  if (g.planes() == 0) return y;
  DeviceContext& ctx = context(x.device().index);
  PoolDesc pd(g);
  TensorDesc xd(x.dtype(), g.n, g.c, g.h, g.w), yd(x.dtype(), g.n, g.c, g.oh, g.ow);
  int n = 0, c = 0, oh = 0, ow = 0;
  DTRAIN_CUDNN_CHECK(cudnnGetPooling2dForwardOutputDim(pd.d, xd.d, &n, &c, &oh, &ow));
  DTRAIN_CHECK(oh == g.oh && ow == g.ow, InternalError,
               "max_pool2d on CUDA: cuDNN's output {}x{} differs from dtrain's {}x{}", oh, ow, g.oh,
               g.ow);
  Scale s(x.dtype());
  DTRAIN_CUDNN_CHECK(cudnnPoolingForward(ctx.cudnn, pd.d, s.one(), xd.d, xc.raw_data(), s.zero(),
                                         yd.d, y.raw_data()));
  return y;
}

Tensor max_pool2d_backward(const Tensor& dy, const Tensor& x, const Tensor& y,
                           const cpu::PoolGeom& g) {
  Tensor dx = zeros({g.n, g.c, g.h, g.w}, x.options());
  if (g.planes() == 0) return dx;
  Tensor dyc = contig(dy), xc = contig(x), yc = contig(y);
  DeviceContext& ctx = context(x.device().index);
  PoolDesc pd(g);
  TensorDesc xd(x.dtype(), g.n, g.c, g.h, g.w), yd(x.dtype(), g.n, g.c, g.oh, g.ow);
  Scale s(x.dtype());
  DTRAIN_CUDNN_CHECK(cudnnPoolingBackward(ctx.cudnn, pd.d, s.one(), yd.d, yc.raw_data(), yd.d,
                                          dyc.raw_data(), xd.d, xc.raw_data(), s.zero(), xd.d,
                                          dx.raw_data()));
  return dx;
}

}  // namespace dtrain::cuda
