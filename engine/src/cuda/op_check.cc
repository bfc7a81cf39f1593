// The backend check (op_check.h): every op on a backend against the CPU reference.
#include "dtrain/engine/cuda/op_check.h"

#include <cmath>
#include <functional>
#include <limits>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/functors.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/adam.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/engine/random.h"
#ifdef DTRAIN_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace dtrain::check {

namespace {

struct Input {
  Shape shape;
  double lo = -1.0, hi = 1.0;
  int64_t index_range = 0;  // > 0: an i64 index input with values in [0, index_range)
  bool grad = true;         // floating inputs: check their gradient
};

// One evaluation: the backend under test, or the reference for it.
struct Side {
  Device target;  // the device being checked (also known to the reference side)
  bool reference = false;
  Precision precision = Precision::kNative;
};

using OpFn = std::function<Tensor(const std::vector<Tensor>&, const Side&)>;

struct OpSpec {
  std::string name;
  std::vector<Input> inputs;
  OpFn fn;
  bool backward = true;
  bool gemm = false;  // also checked in TF32
};

Tensor gemm2(const Tensor& a, const Tensor& b, const Side& s) {
#ifdef DTRAIN_WITH_CUDA
  if (!s.reference && s.precision == Precision::kTf32) {
    return cuda::matmul(a, b, cuda::MathMode::kTf32);
  }
#endif
  return matmul(a, b);
}

// The mask a dropout on `s.target` draws from Generator(seed), computed on the host.
Tensor reference_dropout_mask(const Shape& shape, double p, uint64_t seed, const Side& s) {
  Generator gen(seed);
  std::vector<double> m(static_cast<size_t>(shape_numel(shape)));
  const double scale = 1.0 / (1.0 - p);
  if (s.target.is_cuda()) {
    fn::DropoutMask dm{gen.next_u64(), static_cast<float>(p), static_cast<float>(scale)};
    for (size_t i = 0; i < m.size(); ++i) m[i] = dm(i) != 0.f ? scale : 0.0;
  } else {
    for (double& v : m) v = gen.uniform_float() >= static_cast<float>(p) ? scale : 0.0;
  }
  return from_vector(m, shape);
}

std::vector<OpSpec> op_list() {
  using V = std::vector<Tensor>;
  std::vector<OpSpec> ops;
  auto add_op = [&](std::string name, std::vector<Input> in, OpFn f) {
    ops.push_back(OpSpec{std::move(name), std::move(in), std::move(f)});
    return &ops.back();
  };
  add_op("add [7,1,13]+[5,1]", {{{7, 1, 13}}, {{5, 1}}},
         [](const V& x, const Side&) { return add(x[0], x[1]); });
  add_op("sub [3,5]-[5]", {{{3, 5}}, {{5}}},
         [](const V& x, const Side&) { return sub(x[0], x[1]); });
  add_op("mul [4,6,3]*[4,1,3]", {{{4, 6, 3}}, {{4, 1, 3}}},
         [](const V& x, const Side&) { return mul(x[0], x[1]); });
  add_op("div [5,7]/[7]", {{{5, 7}}, {{7}, 0.5, 1.5}},
         [](const V& x, const Side&) { return div(x[0], x[1]); });
  add_op("mul_scalar [33]", {{{33}}}, [](const V& x, const Side&) { return x[0] * 1.7; });
  add_op("add_scalar [33]", {{{33}}}, [](const V& x, const Side&) { return x[0] + 0.3; });
  add_op("exp [9,11]", {{{9, 11}}}, [](const V& x, const Side&) { return exp(x[0]); });
  add_op("log [9,11]", {{{9, 11}, 0.5, 2.0}}, [](const V& x, const Side&) { return log(x[0]); });
  add_op("relu [17,19]", {{{17, 19}}}, [](const V& x, const Side&) { return relu(x[0]); });
  add_op("tanh [17,19]", {{{17, 19}}}, [](const V& x, const Side&) { return tanh(x[0]); });
  add_op("sigmoid [17,19]", {{{17, 19}, -4, 4}},
         [](const V& x, const Side&) { return sigmoid(x[0]); });
  add_op("sum(dims=0,2) [6,5,7]", {{{6, 5, 7}}}, [](const V& x, const Side&) {
    return sum(x[0], {0, 2});
  });
  add_op("sum [1001]", {{{1001}}}, [](const V& x, const Side&) { return sum(x[0]); });
  add_op("sum(dim=1) of [9,4]^T", {{{9, 4}}},
         [](const V& x, const Side&) { return sum(x[0].t(), {1}); });
  add_op("mean(dim=1) [3,130]", {{{3, 130}}},
         [](const V& x, const Side&) { return mean(x[0], {1}); });
  add_op("softmax(dim=1) [5,37]", {{{5, 37}, -3, 3}},
         [](const V& x, const Side&) { return softmax(x[0], 1); });
  add_op("softmax(dim=0) [6,3,4]", {{{6, 3, 4}, -3, 3}},
         [](const V& x, const Side&) { return softmax(x[0], 0); });
  add_op("log_softmax(dim=-1) [7,300]", {{{7, 300}, -3, 3}},
         [](const V& x, const Side&) { return log_softmax(x[0], -1); });
  add_op("cross_entropy [9,13]", {{{9, 13}, -3, 3}, {{9}, 0, 0, 13, false}},
         [](const V& x, const Side&) { return cross_entropy(x[0], x[1]); });
  add_op("embedding [11,6][3,5]", {{{11, 6}}, {{3, 5}, 0, 0, 11, false}},
         [](const V& x, const Side&) { return embedding(x[0], x[1]); });
  add_op("dropout(p=0.3) [10,23]", {{{10, 23}}}, [](const V& x, const Side& s) {
    if (!s.reference) {
      Generator gen(77);
      return dropout(x[0], 0.3, true, gen);
    }
    return mul(x[0], reference_dropout_mask(x[0].shape(), 0.3, 77, s).to(x[0].dtype()));
  });
  add_op("matmul [17,23]x[23,9]", {{{17, 23}}, {{23, 9}}}, [](const V& x, const Side& s) {
    return gemm2(x[0], x[1], s);
  })->gemm = true;
  add_op("matmul [8,5]x[7,5]^T", {{{8, 5}}, {{7, 5}}}, [](const V& x, const Side& s) {
    return gemm2(x[0], x[1].t(), s);
  })->gemm = true;
  add_op("matmul [3,4,6]x[3,6,5]", {{{3, 4, 6}}, {{3, 6, 5}}},
         [](const V& x, const Side&) { return matmul(x[0], x[1]); });
  add_op("linear [4,3,10]x[6,10]+[6]", {{{4, 3, 10}}, {{6, 10}}, {{6}}},
         [](const V& x, const Side&) { return linear(x[0], x[1], x[2]); });
  add_op("conv2d(s=2,p=1) [2,3,9,9]x[4,3,3,3]", {{{2, 3, 9, 9}}, {{4, 3, 3, 3}}, {{4}}},
         [](const V& x, const Side&) {
           return conv2d(x[0], x[1], x[2], {2, 1});
         });
  add_op("conv2d(p=2) [3,2,7,6]x[5,2,5,3]", {{{3, 2, 7, 6}}, {{5, 2, 5, 3}}, {{5}}},
         [](const V& x, const Side&) {
           return conv2d(x[0], x[1], x[2], {1, 2});
         });
  add_op("max_pool2d(k=2) [2,3,8,8]", {{{2, 3, 8, 8}}}, [](const V& x, const Side&) {
    return max_pool2d(x[0], {2, 0, 0});
  });
  add_op("max_pool2d(k=3,s=2,p=1) [2,3,9,7]", {{{2, 3, 9, 7}}}, [](const V& x, const Side&) {
    return max_pool2d(x[0], {3, 2, 1});
  });
  add_op("lstm [2,5,4] H=3", {{{2, 5, 4}}, {{12, 4}}, {{12, 3}}, {{12}}, {{12}}},
         [](const V& x, const Side&) {
           return lstm(x[0], {x[1], x[2], x[3], x[4]}).output;
         });
  add_op("lstm h_n+c_n [3,4,5] H=6 with h0,c0",
         {{{3, 4, 5}}, {{24, 5}}, {{24, 6}}, {{24}}, {{24}}, {{3, 6}}, {{3, 6}}},
         [](const V& x, const Side&) {
           LstmResult r = lstm(x[0], {x[1], x[2], x[3], x[4]}, x[5], x[6]);
           return add(r.h_n, mul_scalar(r.c_n, 0.5));
         });
  add_op("layer_norm [7,33] w,b", {{{7, 33}, -2, 2}, {{33}, 0.5, 1.5}, {{33}}},
         [](const V& x, const Side&) { return layer_norm(x[0], x[1], x[2], 1e-5); });
  add_op("layer_norm [3,4,300] no affine", {{{3, 4, 300}, -2, 2}},
         [](const V& x, const Side&) { return layer_norm(x[0], Tensor(), Tensor(), 1e-5); });
  add_op("gelu [17,19]", {{{17, 19}, -4, 4}}, [](const V& x, const Side&) { return gelu(x[0]); });
  add_op(
      "sdpa causal [2,3,37,8]", {{{2, 3, 37, 8}}, {{2, 3, 37, 8}}, {{2, 3, 37, 8}}},
      [](const V& x, const Side&) { return scaled_dot_product_attention(x[0], x[1], x[2], true); });
  add_op("sdpa [1,2,70,64] of [1,70,2,64]^T(1,2)",
         {{{1, 70, 2, 64}}, {{1, 70, 2, 64}}, {{1, 70, 2, 64}}}, [](const V& x, const Side&) {
           return scaled_dot_product_attention(x[0].transpose(1, 2), x[1].transpose(1, 2),
                                               x[2].transpose(1, 2), false);
         });
  add_op("cat(dim=1) [3,2,4]+[3,5,4]", {{{3, 2, 4}}, {{3, 5, 4}}}, [](const V& x, const Side&) {
    return cat({x[0], x[1]}, 1);
  });
  add_op("split(3, dim=-1) [4,8] recombined", {{{4, 8}}}, [](const V& x, const Side&) {
    std::vector<Tensor> c = split(x[0], 3, -1);
    return cat({mul_scalar(c[2], 2.0), c[0], c[1]}, 1);
  });
  auto optimizer_op = [&](std::string name, std::function<void(Tensor&)> run) {
    add_op(std::move(name), {{{13, 7}, -1, 1, 0, false}, {{13, 7}, -1, 1, 0, false}},
           [run](const V& x, const Side&) {
             Tensor p = x[0].detach().clone();
             p.set_requires_grad(true);
             p.set_grad(x[1].detach().clone());
             run(p);
             return p.detach();
           })
        ->backward = false;
  };
  optimizer_op("sgd(momentum,nesterov,wd) x2 [13,7]", [](Tensor& p) {
    optim::SGD opt({p}, optim::SGDOptions(0.1).momentum(0.9).nesterov(true).weight_decay(0.01));
    opt.step();
    opt.step();
  });
  optimizer_op("adam(wd) x2 [13,7]", [](Tensor& p) {
    optim::Adam opt({p}, optim::AdamOptions(0.01).weight_decay(0.1));
    opt.step();
    opt.step();
  });
  optimizer_op("adamw x2 [13,7]", [](Tensor& p) {
    optim::AdamW opt({p}, optim::AdamWOptions(0.01));
    opt.step();
    opt.step();
  });
  return ops;
}

Tensor random_input(const Input& in, Generator& gen) {
  const size_t n = static_cast<size_t>(shape_numel(in.shape));
  if (in.index_range > 0) {
    std::vector<int64_t> v(n);
    for (auto& x : v) x = static_cast<int64_t>(gen.below(static_cast<uint64_t>(in.index_range)));
    return from_vector(v, in.shape);
  }
  std::vector<double> v(n);
  for (auto& x : v) x = gen.uniform(in.lo, in.hi);
  return from_vector(v, in.shape);
}

// The inputs of one side from the f64 host originals.
Tensor prepare(const Tensor& base, bool index, const Device& device, DType dtype, bool reference) {
  if (index) return reference ? base : base.to(device);
  if (device.is_cpu()) return base.to(reference ? DType::f64 : DType::f32);
  Tensor rounded = base.to(dtype);  // the checked dtype's rounding, on the host
  return reference ? rounded.to(DType::f32) : rounded.to(device);
}

struct Outcome {
  Tensor out;
  std::vector<Tensor> grads;
};

Outcome evaluate(const OpSpec& op, const std::vector<Tensor>& bases, const Tensor& weight,
                 const Side& side, DType dtype) {
  std::vector<Tensor> inputs;
  for (size_t i = 0; i < bases.size(); ++i) {
    const Input& in = op.inputs[i];
    Tensor t = prepare(bases[i], in.index_range > 0, side.target, dtype, side.reference);
    if (op.backward && in.index_range == 0 && in.grad) t.set_requires_grad(true);
    inputs.push_back(t);
  }
  Outcome o;
  o.out = op.fn(inputs, side);
  if (op.backward) {
    Tensor w = prepare(weight, false, side.target, dtype, side.reference);
    sum(mul(o.out, w)).backward();
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (inputs[i].requires_grad()) o.grads.push_back(inputs[i].grad());
    }
  }
  return o;
}

}  // namespace

double tolerance(const Device& device, DType dtype, Precision precision) {
  if (device.is_cpu()) return 1e-5;  // f32 against f64
  if (precision == Precision::kTf32) return 1e-3;
  switch (dtype) {
    case DType::f32:
      return 1e-5;
    case DType::f16:
      return 5e-3;
    case DType::bf16:
      return 1e-2;
    default:
      return 1e-12;
  }
}

double max_relative_error(const Tensor& got, const Tensor& want) {
  const double inf = std::numeric_limits<double>::infinity();
  if (!got.defined() || !want.defined() || got.shape() != want.shape()) return inf;
  std::vector<double> g = got.to(Device::cpu()).to_vector<double>();
  std::vector<double> w = want.to(Device::cpu()).to_vector<double>();
  double diff = 0, scale = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    if (!fn::is_finite(g[i]) && fn::is_finite(w[i])) return inf;
    diff = std::max(diff, std::fabs(g[i] - w[i]));
    scale = std::max(scale, std::fabs(w[i]));
  }
  return diff / std::max(scale, 1e-30);
}

void poison_allocator_cache(const Device& device) {
  if (!device.is_cuda()) return;
  std::vector<Tensor> blocks;
  for (int64_t bytes = 64; bytes <= (int64_t{8} << 20); bytes += bytes / 2) {
    for (int k = 0; k < 2; ++k) {
      blocks.push_back(full({bytes}, 255.0, TensorOptions{DType::u8, device}));  // NaN bits
    }
  }
  // Released here: the cache hands these NaN blocks to the next allocations.
}

std::vector<Result> run_all(const Device& device, DType dtype, Precision precision, uint64_t seed) {
  std::vector<Result> results;
  const std::string dname = precision == Precision::kTf32 ? "tf32" : dtype_name(dtype);
  uint64_t op_seed = seed;
  for (const OpSpec& spec : op_list()) {
    ++op_seed;
    if (precision == Precision::kTf32 && !spec.gemm) continue;
    Result r;
    r.op = spec.name;
    r.backend = device.str();
    r.dtype = dname;
    r.tolerance = tolerance(device, dtype, precision);
    try {
      Generator gen(op_seed);
      std::vector<Tensor> bases;
      for (const Input& in : spec.inputs) bases.push_back(random_input(in, gen));
      OpSpec run = spec;
      if (precision == Precision::kTf32) run.backward = false;
      Side ref{device, true, precision}, test{device, false, precision};
      OpSpec forward_only = run;
      forward_only.backward = false;
      Outcome want = evaluate(forward_only, bases, Tensor(), ref, dtype);
      Tensor weight;  // backward runs sum(out * weight).backward()
      if (run.backward) {
        weight = random_input(Input{want.out.shape()}, gen);
        want = evaluate(run, bases, weight, ref, dtype);
      }
      poison_allocator_cache(device);
      Outcome got = evaluate(run, bases, weight, test, dtype);
      r.forward_error = max_relative_error(got.out, want.out);
      for (size_t i = 0; i < want.grads.size(); ++i) {
        double e = i < got.grads.size() ? max_relative_error(got.grads[i], want.grads[i])
                                        : std::numeric_limits<double>::infinity();
        r.backward_error = std::max(r.backward_error, e);
      }
      r.checked_backward = run.backward;
      r.passed = r.forward_error <= r.tolerance && r.backward_error <= r.tolerance;
    } catch (const UnsupportedError& e) {
      r.skipped = true;
      r.note = e.message();
    } catch (const Error& e) {
      r.passed = false;
      r.note = e.message();
    }
    results.push_back(r);
  }
  return results;
}

}  // namespace dtrain::check
