// Gradient compression for DDP's buckets: the 16-bit casts and PowerSGD (see
// grad_compression.h for the design).
#include "dtrain/parallel/grad_compression.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/random.h"

namespace dtrain::parallel {

namespace {

constexpr GradCompression kAllKinds[] = {GradCompression::kNone, GradCompression::kBf16,
                                         GradCompression::kFp16, GradCompression::kPowerSgd};

// ---- bf16 / fp16 ----

// Waits for the 16-bit sum, then writes sum / world into the f32 bucket.
class HalfWork final : public comm::Work {
 public:
  HalfWork(std::shared_ptr<comm::Work> inner, Tensor flat, Tensor half, int world)
      : inner_(std::move(inner)), flat_(std::move(flat)), half_(std::move(half)), world_(world) {}

  void wait() override {
    if (done_) return;
    inner_->wait();
    NoGradGuard no_grad;
    flat_.copy_(half_);  // widened to f32, then averaged in f32
    flat_.copy_(mul_scalar(flat_, 1.0 / world_));
    done_ = true;
  }
  bool is_completed() const override { return done_ || inner_->is_completed(); }

 private:
  std::shared_ptr<comm::Work> inner_;
  Tensor flat_, half_;
  int world_;
  bool done_ = false;
};

class HalfCompressor final : public BucketCompressor {
 public:
  HalfCompressor(DType wire, int64_t numel, Device device)
      : half_(empty({numel}, TensorOptions{wire, device})) {}

  std::shared_ptr<comm::Work> launch(comm::Communicator& comm, const Tensor& flat) override {
    DTRAIN_CHECK(flat.numel() == half_.numel(), ShapeError,
                 "grad compression: bucket of {} elements, compressor built for {}", flat.numel(),
                 half_.numel());
    {
      NoGradGuard no_grad;
      half_.copy_(flat);  // rounds to nearest even
    }
    auto work = comm.allreduce_async(half_.raw_data(), static_cast<size_t>(half_.numel()),
                                     half_.dtype(), comm::ReduceOp::kSum);
    return std::make_shared<HalfWork>(std::move(work), flat, half_, comm.size());
  }

 private:
  Tensor half_;  // the wire buffer, allocated once
};

// ---- PowerSGD ----

// A parameter compressed as [rows, cols] ~ P [rows, r] Q^T; P, Q row-major.
struct LowRank {
  int64_t offset = 0, rows = 0, cols = 0, r = 0;
  int64_t p_offset = 0, q_offset = 0;
};
// A parameter all-reduced as it is.
struct Plain {
  int64_t offset = 0, numel = 0;
};

// transposed false: out[rows, r] = m[rows, cols] * x[cols, r] (P = M Q);
// transposed true:  out[cols, r] = m[rows, cols]^T * x[rows, r] (Q = M^T P).
void multiply(const float* m, const float* x, float* out, const LowRank& l, bool transposed) {
  std::fill(out, out + (transposed ? l.cols : l.rows) * l.r, 0.0f);
  for (int64_t i = 0; i < l.rows; ++i) {
    for (int64_t k = 0; k < l.cols; ++k) {
      const float v = m[i * l.cols + k];
      float* o = out + (transposed ? k : i) * l.r;
      const float* in = x + (transposed ? i : k) * l.r;
      for (int64_t j = 0; j < l.r; ++j) o[j] += v * in[j];
    }
  }
}

// Gram-Schmidt on the r columns of p [rows, r] (PyTorch's epsilon for zero columns).
void orthonormalise(float* p, int64_t rows, int64_t r) {
  for (int64_t c = 0; c < r; ++c) {
    for (int64_t prev = 0; prev < c; ++prev) {
      double dot = 0;
      for (int64_t i = 0; i < rows; ++i) dot += double(p[i * r + c]) * p[i * r + prev];
      for (int64_t i = 0; i < rows; ++i) p[i * r + c] -= float(dot) * p[i * r + prev];
    }
    double norm = 0;
    for (int64_t i = 0; i < rows; ++i) norm += double(p[i * r + c]) * p[i * r + c];
    const float inv = float(1.0 / (std::sqrt(norm) + 1e-8));
    for (int64_t i = 0; i < rows; ++i) p[i * r + c] *= inv;
  }
}

class PowerSgdCompressor final : public BucketCompressor {
 public:
  PowerSgdCompressor(const GradCompressionOptions& o, const std::vector<Shape>& shapes);
  std::shared_ptr<comm::Work> launch(comm::Communicator& comm, const Tensor& flat) override;
  // The second half of the step, run by the Work's wait().
  void finish(comm::Communicator& comm, float* g);

 private:
  std::vector<LowRank> low_;
  std::vector<Plain> plain_;
  int64_t plain_numel_ = 0;
  std::vector<float> error_;  // per element of the bucket; 0 on the plain parameters
  std::vector<float> first_;  // [plain values..., P of every matrix...]
  std::vector<float> q_;      // Q of every matrix, kept across steps (warm start)
};

class PowerSgdWork final : public comm::Work {
 public:
  PowerSgdWork(std::shared_ptr<comm::Work> inner, PowerSgdCompressor* owner,
               comm::Communicator& comm, Tensor flat)
      : inner_(std::move(inner)), owner_(owner), comm_(comm), flat_(std::move(flat)) {}

  void wait() override {
    if (done_) return;
    inner_->wait();
    owner_->finish(comm_, flat_.data<float>());
    done_ = true;
  }
  bool is_completed() const override { return done_; }

 private:
  std::shared_ptr<comm::Work> inner_;
  PowerSgdCompressor* owner_;
  comm::Communicator& comm_;
  Tensor flat_;
  bool done_ = false;
};

PowerSgdCompressor::PowerSgdCompressor(const GradCompressionOptions& o,
                                       const std::vector<Shape>& shapes) {
  int64_t offset = 0, p_numel = 0, q_numel = 0;
  for (const Shape& s : shapes) {
    const int64_t numel = shape_numel(s);
    const int64_t rows = s.size() >= 2 ? s[0] : 0;
    const int64_t cols = rows > 0 ? numel / rows : 0;
    const int64_t r = std::min<int64_t>({o.powersgd_rank, rows, cols});
    if (rows > 0 && (rows + cols) * r < numel) {
      low_.push_back({offset, rows, cols, r, p_numel, q_numel});
      p_numel += rows * r;
      q_numel += cols * r;
    } else {
      plain_.push_back({offset, numel});
      plain_numel_ += numel;
    }
    offset += numel;
  }
  error_.assign(static_cast<size_t>(offset), 0.0f);
  first_.assign(static_cast<size_t>(plain_numel_ + p_numel), 0.0f);
  q_.resize(static_cast<size_t>(q_numel));
  Generator gen(o.powersgd_seed);
  for (float& v : q_) v = static_cast<float>(gen.normal());
}

std::shared_ptr<comm::Work> PowerSgdCompressor::launch(comm::Communicator& comm,
                                                       const Tensor& flat) {
  DTRAIN_CHECK(flat.numel() == static_cast<int64_t>(error_.size()), ShapeError,
               "powersgd: bucket of {} elements, compressor built for {}", flat.numel(),
               error_.size());
  float* g = flat.data<float>();
  for (size_t i = 0; i < error_.size(); ++i) g[i] += error_[i];  // error feedback
  int64_t at = 0;
  for (const Plain& p : plain_) {
    std::copy(g + p.offset, g + p.offset + p.numel, first_.data() + at);
    at += p.numel;
  }
  for (const LowRank& l : low_) {
    multiply(g + l.offset, q_.data() + l.q_offset, first_.data() + plain_numel_ + l.p_offset, l,
             /*transposed=*/false);
  }
  auto work = comm.allreduce_async(first_.data(), first_.size(), DType::f32, comm::ReduceOp::kSum);
  return std::make_shared<PowerSgdWork>(std::move(work), this, comm, flat);
}

void PowerSgdCompressor::finish(comm::Communicator& comm, float* g) {
  const float inv_world = 1.0f / static_cast<float>(comm.size());
  float* p_all = first_.data() + plain_numel_;
  for (const LowRank& l : low_) {
    orthonormalise(p_all + l.p_offset, l.rows, l.r);
    multiply(g + l.offset, p_all + l.p_offset, q_.data() + l.q_offset, l, /*transposed=*/true);
  }
  if (!q_.empty()) comm.allreduce(q_.data(), q_.size(), DType::f32, comm::ReduceOp::kSum);
  for (float& v : q_) v *= inv_world;
  for (const LowRank& l : low_) {  // g = P Q^T; error = input - g
    const float* p = p_all + l.p_offset;
    const float* q = q_.data() + l.q_offset;
    for (int64_t i = 0; i < l.rows; ++i) {
      for (int64_t k = 0; k < l.cols; ++k) {
        float v = 0;
        for (int64_t j = 0; j < l.r; ++j) v += p[i * l.r + j] * q[k * l.r + j];
        const int64_t e = l.offset + i * l.cols + k;
        error_[static_cast<size_t>(e)] = g[e] - v;
        g[e] = v;
      }
    }
  }
  int64_t at = 0;
  for (const Plain& p : plain_) {
    for (int64_t i = 0; i < p.numel; ++i) g[p.offset + i] = first_[at + i] * inv_world;
    at += p.numel;
  }
}

}  // namespace

const char* grad_compression_name(GradCompression kind) {
  switch (kind) {
    case GradCompression::kNone:
      return "none";
    case GradCompression::kBf16:
      return "bf16";
    case GradCompression::kFp16:
      return "fp16";
    case GradCompression::kPowerSgd:
      return "powersgd";
  }
  return "?";
}

GradCompression parse_grad_compression(std::string_view name) {
  for (GradCompression k : kAllKinds) {
    if (name == grad_compression_name(k)) return k;
  }
  DTRAIN_THROW(InvalidArgument, "grad compression '{}': expected none, bf16, fp16 or powersgd",
               std::string(name));
}

std::unique_ptr<BucketCompressor> make_bucket_compressor(const GradCompressionOptions& options,
                                                         const std::vector<Shape>& shapes,
                                                         DType dtype, Device device) {
  if (options.kind == GradCompression::kNone) return nullptr;
  const char* name = grad_compression_name(options.kind);
  DTRAIN_CHECK(dtype == DType::f32, InvalidArgument,
               "grad compression {}: compresses f32 gradients, got a {} bucket", name,
               dtype_name(dtype));
  int64_t numel = 0;
  for (const Shape& s : shapes) numel += shape_numel(s);
  if (options.kind == GradCompression::kBf16) {
    return std::make_unique<HalfCompressor>(DType::bf16, numel, device);
  }
  if (options.kind == GradCompression::kFp16) {
    return std::make_unique<HalfCompressor>(DType::f16, numel, device);
  }
  DTRAIN_CHECK(options.powersgd_rank >= 1, InvalidArgument,
               "grad compression powersgd: rank must be >= 1, got {}", options.powersgd_rank);
  DTRAIN_CHECK(device.is_cpu(), UnsupportedError,
               "grad compression powersgd: runs on host memory, the gradients are on {}; use "
               "bf16 or fp16 on a GPU",
               device.str());
  return std::make_unique<PowerSgdCompressor>(options, shapes);
}

}  // namespace dtrain::parallel
