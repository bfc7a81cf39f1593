// conv2d and max_pool2d, forward and backward, on cuDNN 9 (its legacy convolution and
// pooling API: one call per direction, algorithms chosen by cuDNN's heuristics, the
// workspace from the device's caching allocator), NCHW as the CPU backend; and the
// one-layer LSTM on cuDNN's RNN API (weights copied gate by gate into cuDNN's weight
// space, the reserve space kept for backward).
#include <cudnn.h>

#include <memory>
#include <vector>

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
                                                  i32(g.o), i32(g.c / g.groups), i32(g.kh),
                                                  i32(g.kw)));
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
    // Grouped / depthwise convolution: the filter holds c / groups input channels.
    DTRAIN_CUDNN_CHECK(cudnnSetConvolutionGroupCount(d, i32(g.groups)));
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
  Tensor dw = gw ? zeros({g.o, g.c / g.groups, g.kh, g.kw}, opts) : Tensor();
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

// ---- LSTM ----

namespace dtrain::cuda {

namespace {

struct RnnDesc {
  cudnnRNNDescriptor_t d = nullptr;
  cudnnDropoutDescriptor_t drop = nullptr;
  RnnDesc(cudnnHandle_t h, DType dt, int64_t input, int64_t hidden) {
    DTRAIN_CUDNN_CHECK(cudnnCreateDropoutDescriptor(&drop));
    DTRAIN_CUDNN_CHECK(cudnnSetDropoutDescriptor(drop, h, 0.f, nullptr, 0, 0));  // one layer
    DTRAIN_CUDNN_CHECK(cudnnCreateRNNDescriptor(&d));
    bool half = dt == DType::f16 || dt == DType::bf16;
    cudnnDataType_t math = dt == DType::f64 ? CUDNN_DATA_DOUBLE : CUDNN_DATA_FLOAT;
    DTRAIN_CUDNN_CHECK(
        cudnnSetRNNDescriptor_v8(d, CUDNN_RNN_ALGO_STANDARD, CUDNN_LSTM, CUDNN_RNN_DOUBLE_BIAS,
                                 CUDNN_UNIDIRECTIONAL, CUDNN_LINEAR_INPUT, cudnn_type(dt, "lstm"),
                                 math, half ? CUDNN_TENSOR_OP_MATH : CUDNN_FMA_MATH, i32(input),
                                 i32(hidden), i32(hidden), 1, drop, CUDNN_RNN_PADDED_IO_DISABLED));
  }
  ~RnnDesc() {
    cudnnDestroyRNNDescriptor(d);
    cudnnDestroyDropoutDescriptor(drop);
  }
  RnnDesc(const RnnDesc&) = delete;
  RnnDesc& operator=(const RnnDesc&) = delete;
};

struct RnnDataDesc {
  cudnnRNNDataDescriptor_t d = nullptr;
  RnnDataDesc(DType dt, int64_t t, int64_t b, int64_t v) {
    std::vector<int> lengths(static_cast<size_t>(b), i32(t));
    DTRAIN_CUDNN_CHECK(cudnnCreateRNNDataDescriptor(&d));
    DTRAIN_CUDNN_CHECK(cudnnSetRNNDataDescriptor(d, cudnn_type(dt, "lstm"),
                                                 CUDNN_RNN_DATA_LAYOUT_BATCH_MAJOR_UNPACKED, i32(t),
                                                 i32(b), i32(v), lengths.data(), nullptr));
  }
  ~RnnDataDesc() { cudnnDestroyRNNDataDescriptor(d); }
  RnnDataDesc(const RnnDataDesc&) = delete;
  RnnDataDesc& operator=(const RnnDataDesc&) = delete;
};

struct StateDesc {  // h and c: [layers = 1, B, H]
  cudnnTensorDescriptor_t d = nullptr;
  StateDesc(DType dt, int64_t b, int64_t h) {
    int dims[3] = {1, i32(b), i32(h)}, strides[3] = {i32(b * h), i32(h), 1};
    DTRAIN_CUDNN_CHECK(cudnnCreateTensorDescriptor(&d));
    DTRAIN_CUDNN_CHECK(cudnnSetTensorNdDescriptor(d, cudnn_type(dt, "lstm"), 3, dims, strides));
  }
  ~StateDesc() { cudnnDestroyTensorDescriptor(d); }
  StateDesc(const StateDesc&) = delete;
  StateDesc& operator=(const StateDesc&) = delete;
};

// Copies between dtrain's [4H, K] gate-stacked matrices / [4H] biases and cuDNN's weight
// space (linear layer k = input gate k, 4 + k = recurrent gate k; same gate order).
void weight_params(cudnnHandle_t h, const RnnDesc& r, size_t bytes, const void* space, int id,
                   void** m, void** b) {
  cudnnTensorDescriptor_t md = nullptr, bd = nullptr;
  DTRAIN_CUDNN_CHECK(cudnnCreateTensorDescriptor(&md));
  DTRAIN_CUDNN_CHECK(cudnnCreateTensorDescriptor(&bd));
  cudnnStatus_t st = cudnnGetRNNWeightParams(h, r.d, 0, bytes, space, id, md, m, bd, b);
  cudnnDestroyTensorDescriptor(md);
  cudnnDestroyTensorDescriptor(bd);
  DTRAIN_CUDNN_CHECK(st);
}

}  // namespace

struct LstmState {
  int64_t B, T, I, H;
  DType dt;
  Device dev;
  std::unique_ptr<RnnDesc> rnn;
  std::unique_ptr<RnnDataDesc> xd, yd;
  std::unique_ptr<StateDesc> hd;
  Tensor x, y, hx, cx, weights, reserve, seq_lengths;
  size_t weight_bytes = 0, work_bytes = 0, reserve_bytes = 0;
};

LstmForward lstm_forward(const Tensor& x, const Tensor& w_ih, const Tensor& w_hh,
                         const Tensor& b_ih, const Tensor& b_hh, const Tensor& h0,
                         const Tensor& c0) {
  check_same_device("lstm", {x, w_ih, w_hh, b_ih, b_hh, h0, c0});
  auto s = std::make_shared<LstmState>();
  s->B = x.shape()[0], s->T = x.shape()[1], s->I = x.shape()[2], s->H = w_hh.shape()[1];
  s->dt = x.dtype();
  s->dev = x.device();
  const int64_t B = s->B, T = s->T, H = s->H;
  DeviceContext& ctx = context(s->dev.index);
  cudnnHandle_t h = ctx.cudnn;
  s->rnn = std::make_unique<RnnDesc>(h, s->dt, s->I, H);
  s->xd = std::make_unique<RnnDataDesc>(s->dt, T, B, s->I);
  s->yd = std::make_unique<RnnDataDesc>(s->dt, T, B, H);
  s->hd = std::make_unique<StateDesc>(s->dt, B, H);
  s->x = contig(x);
  s->hx = h0.defined() ? contig(h0) : zeros({B, H}, x.options());
  s->cx = c0.defined() ? contig(c0) : zeros({B, H}, x.options());
  s->seq_lengths = full({B}, static_cast<double>(T), TensorOptions{DType::i32, s->dev});
  DTRAIN_CUDNN_CHECK(cudnnGetRNNWeightSpaceSize(h, s->rnn->d, &s->weight_bytes));
  s->weights = zeros({static_cast<int64_t>(s->weight_bytes)}, TensorOptions{DType::u8, s->dev});
  const size_t esize = dtype_size(s->dt);
  const Tensor mats[2] = {contig(w_ih), contig(w_hh)};
  const Tensor biases[2] = {b_ih.defined() ? contig(b_ih) : Tensor(),
                            b_hh.defined() ? contig(b_hh) : Tensor()};
  const int64_t cols[2] = {s->I, H};
  for (int part = 0; part < 2; ++part) {
    for (int gate = 0; gate < 4; ++gate) {
      void *m = nullptr, *b = nullptr;
      weight_params(h, *s->rnn, s->weight_bytes, s->weights.raw_data(), part * 4 + gate, &m, &b);
      const char* src = static_cast<const char*>(mats[part].raw_data());
      DTRAIN_CUDA_CHECK(cudaMemcpyAsync(m, src + gate * H * cols[part] * esize,
                                        static_cast<size_t>(H * cols[part]) * esize,
                                        cudaMemcpyDeviceToDevice, ctx.stream));
      if (biases[part].defined()) {
        const char* bsrc = static_cast<const char*>(biases[part].raw_data());
        DTRAIN_CUDA_CHECK(cudaMemcpyAsync(b, bsrc + gate * H * esize,
                                          static_cast<size_t>(H) * esize, cudaMemcpyDeviceToDevice,
                                          ctx.stream));
      }
    }
  }
  DTRAIN_CUDNN_CHECK(cudnnGetRNNTempSpaceSizes(h, s->rnn->d, CUDNN_FWD_MODE_TRAINING, s->xd->d,
                                               &s->work_bytes, &s->reserve_bytes));
  Tensor work = workspace(s->dev, s->work_bytes);
  s->reserve = workspace(s->dev, s->reserve_bytes);
  LstmForward r;
  r.output = empty({B, T, H}, x.options());
  r.h_n = empty({B, H}, x.options());
  r.c_n = empty({B, H}, x.options());
  DTRAIN_CUDNN_CHECK(cudnnRNNForward(
      h, s->rnn->d, CUDNN_FWD_MODE_TRAINING, s->seq_lengths.data<int32_t>(), s->xd->d,
      s->x.raw_data(), s->yd->d, r.output.raw_data(), s->hd->d, s->hx.raw_data(), r.h_n.raw_data(),
      s->hd->d, s->cx.raw_data(), r.c_n.raw_data(), s->weight_bytes, s->weights.raw_data(),
      s->work_bytes, ptr(work), s->reserve_bytes, ptr(s->reserve)));
  s->y = r.output.detach();
  r.state = s;
  return r;
}

std::vector<Tensor> lstm_backward(LstmState& s, const Tensor& d_out, const Tensor& d_hn,
                                  const Tensor& d_cn) {
  const int64_t B = s.B, T = s.T, H = s.H;
  const TensorOptions opts{s.dt, s.dev};
  DeviceContext& ctx = context(s.dev.index);
  cudnnHandle_t h = ctx.cudnn;
  Tensor dy = d_out.defined() ? contig(d_out) : zeros({B, T, H}, opts);
  Tensor dhy = d_hn.defined() ? contig(d_hn) : zeros({B, H}, opts);
  Tensor dcy = d_cn.defined() ? contig(d_cn) : zeros({B, H}, opts);
  Tensor dx = empty({B, T, s.I}, opts), dhx = empty({B, H}, opts), dcx = empty({B, H}, opts);
  Tensor work = workspace(s.dev, s.work_bytes);
  DTRAIN_CUDNN_CHECK(cudnnRNNBackwardData_v8(
      h, s.rnn->d, s.seq_lengths.data<int32_t>(), s.yd->d, s.y.raw_data(), dy.raw_data(), s.xd->d,
      dx.raw_data(), s.hd->d, s.hx.raw_data(), dhy.raw_data(), dhx.raw_data(), s.hd->d,
      s.cx.raw_data(), dcy.raw_data(), dcx.raw_data(), s.weight_bytes, s.weights.raw_data(),
      s.work_bytes, ptr(work), s.reserve_bytes, ptr(s.reserve)));
  Tensor dweights = zeros({static_cast<int64_t>(s.weight_bytes)}, TensorOptions{DType::u8, s.dev});
  DTRAIN_CUDNN_CHECK(cudnnRNNBackwardWeights_v8(
      h, s.rnn->d, CUDNN_WGRAD_MODE_ADD, s.seq_lengths.data<int32_t>(), s.xd->d, s.x.raw_data(),
      s.hd->d, s.hx.raw_data(), s.yd->d, s.y.raw_data(), s.weight_bytes, dweights.raw_data(),
      s.work_bytes, ptr(work), s.reserve_bytes, ptr(s.reserve)));
  const size_t esize = dtype_size(s.dt);
  const int64_t cols[2] = {s.I, H};
  Tensor dmats[2] = {empty({4 * H, s.I}, opts), empty({4 * H, H}, opts)};
  Tensor dbias[2] = {empty({4 * H}, opts), empty({4 * H}, opts)};
  for (int part = 0; part < 2; ++part) {
    for (int gate = 0; gate < 4; ++gate) {
      void *m = nullptr, *b = nullptr;
      weight_params(h, *s.rnn, s.weight_bytes, dweights.raw_data(), part * 4 + gate, &m, &b);
      char* dst = static_cast<char*>(dmats[part].raw_data());
      DTRAIN_CUDA_CHECK(cudaMemcpyAsync(dst + gate * H * cols[part] * esize, m,
                                        static_cast<size_t>(H * cols[part]) * esize,
                                        cudaMemcpyDeviceToDevice, ctx.stream));
      char* bdst = static_cast<char*>(dbias[part].raw_data());
      DTRAIN_CUDA_CHECK(cudaMemcpyAsync(bdst + gate * H * esize, b, static_cast<size_t>(H) * esize,
                                        cudaMemcpyDeviceToDevice, ctx.stream));
    }
  }
  return {dx, dmats[0], dmats[1], dbias[0], dbias[1], dhx, dcx};
}

}  // namespace dtrain::cuda
