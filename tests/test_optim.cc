// Optimizers, LR schedules and a small training run.
//
// Oracles: optimizers against the torch.optim update formulas re-implemented here in
// double; schedules against their closed forms; checkpoint resume against the
// uninterrupted run (bit-identical).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/nn/layers.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/nn/module.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/adam.h"
#include "dtrain/engine/optim/lr_scheduler.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/engine/serialize.h"
#include "gradcheck.h"
#include "nn_test_util.h"

namespace dtrain {
namespace {

using testing::randn;
using namespace nntest;

// ---------------------------------------------------------------- optimizers

// Gradient for parameter element j at step t: fixed, varied in sign and size.
double grad_at(int t, int j) { return std::sin(1.7 * t + 0.9 * j + 0.3) * (1.0 + 0.5 * j); }

const std::vector<double> kInit = {0.5, -1.25, 2.0, 0.0, -0.3};

// Runs `steps` optimizer steps on a [5] f32 parameter with grad_at() gradients.
template <typename MakeOpt>
std::vector<double> run_optimizer(MakeOpt make, int steps) {
  std::vector<float> init(kInit.begin(), kInit.end());
  Tensor p = from_vector<float>(init, {5});
  p.set_requires_grad(true);
  auto opt = make(std::vector<Tensor>{p});
  for (int t = 0; t < steps; ++t) {
    std::vector<float> g(5);
    for (int j = 0; j < 5; ++j) g[static_cast<size_t>(j)] = static_cast<float>(grad_at(t, j));
    p.set_grad(from_vector<float>(g, {5}));
    opt->step();
  }
  return p.to_vector<double>();
}

// torch.optim.SGD, as documented, in double.
std::vector<double> sgd_reference(double lr, double mu, double damp, double wd, bool nesterov,
                                  int steps) {
  std::vector<double> p = kInit, buf(5, 0.0);
  for (int t = 0; t < steps; ++t) {
    for (int j = 0; j < 5; ++j) {
      double g = grad_at(t, j) + wd * p[j];
      if (mu != 0.0) {
        buf[j] = t == 0 ? g : mu * buf[j] + (1.0 - damp) * g;
        g = nesterov ? g + mu * buf[j] : buf[j];
      }
      p[j] -= lr * g;
    }
  }
  return p;
}

// torch.optim.Adam / AdamW, as documented, in double.
std::vector<double> adam_reference(double lr, double b1, double b2, double eps, double wd,
                                   bool decoupled, int steps) {
  std::vector<double> p = kInit, m(5, 0.0), v(5, 0.0);
  for (int t = 1; t <= steps; ++t) {
    for (int j = 0; j < 5; ++j) {
      double g = grad_at(t - 1, j);
      if (decoupled) {
        p[j] *= 1.0 - lr * wd;
      } else {
        g += wd * p[j];
      }
      m[j] = b1 * m[j] + (1.0 - b1) * g;
      v[j] = b2 * v[j] + (1.0 - b2) * g * g;
      double m_hat = m[j] / (1.0 - std::pow(b1, t));
      double v_hat = v[j] / (1.0 - std::pow(b2, t));
      p[j] -= lr * m_hat / (std::sqrt(v_hat) + eps);
    }
  }
  return p;
}

void expect_close(const std::vector<double>& got, const std::vector<double>& want,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t j = 0; j < got.size(); ++j) {
    EXPECT_NEAR(got[j], want[j], 2e-5 * std::max(1.0, std::abs(want[j])))
        << what << " [" << j << "]";
  }
  // The update must have moved the parameter (the comparison is not vacuous).
  double moved = 0;
  for (size_t j = 0; j < got.size(); ++j) moved += std::abs(got[j] - kInit[j]);
  EXPECT_GT(moved, 1e-2) << what;
}

TEST(Optim, SgdMatchesTorchFormulas) {
  struct Case {
    const char* name;
    double lr, mu, damp, wd;
    bool nesterov;
  };
  for (const Case& c :
       {Case{"plain", 0.1, 0.0, 0.0, 0.0, false}, Case{"momentum", 0.1, 0.9, 0.0, 0.0, false},
        Case{"dampening", 0.05, 0.8, 0.3, 0.0, false}, Case{"nesterov", 0.1, 0.9, 0.0, 0.0, true},
        Case{"weight_decay", 0.1, 0.9, 0.0, 0.05, false},
        Case{"nesterov+wd", 0.07, 0.5, 0.0, 0.1, true}}) {
    auto got = run_optimizer(
        [&](std::vector<Tensor> ps) {
          return std::make_unique<optim::SGD>(
              ps,
              optim::SGDOptions(c.lr).momentum(c.mu).dampening(c.damp).weight_decay(c.wd).nesterov(
                  c.nesterov));
        },
        6);
    expect_close(got, sgd_reference(c.lr, c.mu, c.damp, c.wd, c.nesterov, 6), c.name);
  }
  Tensor p = zeros({2});
  EXPECT_THROW(optim::SGD({p}, optim::SGDOptions(0.1).nesterov(true)), InvalidArgument);
  EXPECT_THROW(optim::SGD({p}, optim::SGDOptions(-0.1)), InvalidArgument);
  EXPECT_THROW(optim::SGD({p, p}, optim::SGDOptions(0.1)), InvalidArgument);
}

TEST(Optim, AdamAndAdamWMatchTorchFormulas) {
  auto adam = [](double lr, double b1, double b2, double eps, double wd) {
    return [=](std::vector<Tensor> ps) {
      return std::make_unique<optim::Adam>(
          ps, optim::AdamOptions(lr).betas(b1, b2).eps(eps).weight_decay(wd));
    };
  };
  auto adamw = [](double lr, double b1, double b2, double eps, double wd) {
    return [=](std::vector<Tensor> ps) {
      return std::make_unique<optim::AdamW>(
          ps, optim::AdamWOptions(lr).betas(b1, b2).eps(eps).weight_decay(wd));
    };
  };
  expect_close(run_optimizer(adam(0.1, 0.9, 0.999, 1e-8, 0.0), 7),
               adam_reference(0.1, 0.9, 0.999, 1e-8, 0.0, false, 7), "adam");
  expect_close(run_optimizer(adam(0.05, 0.8, 0.99, 1e-3, 0.2), 7),
               adam_reference(0.05, 0.8, 0.99, 1e-3, 0.2, false, 7), "adam+l2");
  expect_close(run_optimizer(adamw(0.1, 0.9, 0.999, 1e-8, 0.1), 7),
               adam_reference(0.1, 0.9, 0.999, 1e-8, 0.1, true, 7), "adamw");
  // AdamW's default weight decay is PyTorch's 0.01; Adam's is 0.
  EXPECT_EQ(optim::AdamWOptions().weight_decay(), 1e-2);
  EXPECT_EQ(optim::AdamOptions().weight_decay(), 0.0);
  // Decoupled and coupled decay really differ.
  EXPECT_GT(std::abs(adam_reference(0.1, 0.9, 0.999, 1e-8, 0.1, true, 7)[0] -
                     adam_reference(0.1, 0.9, 0.999, 1e-8, 0.1, false, 7)[0]),
            1e-4);
  Tensor p = zeros({2});
  EXPECT_THROW(optim::Adam({p}, optim::AdamOptions().betas(1.0, 0.9)), InvalidArgument);
}

TEST(Optim, FrozenParametersStayBitIdentical) {
  for (int which = 0; which < 2; ++which) {
    Generator gen(15);
    auto model = nn::make_model("mlp", gen);
    auto frozen = model->at<nn::Linear>(1);
    frozen->set_requires_grad(false);
    std::vector<Tensor> before;
    for (const Tensor& p : model->parameters()) before.push_back(p.clone());
    std::unique_ptr<optim::Optimizer> opt;
    if (which == 0) {
      opt = std::make_unique<optim::SGD>(model->parameters(),
                                         optim::SGDOptions(0.05).momentum(0.9).weight_decay(0.1));
    } else {
      opt = std::make_unique<optim::AdamW>(model->parameters(), optim::AdamWOptions(1e-3));
    }
    for (int step = 0; step < 4; ++step) {
      nn::Batch b = nn::make_random_batch("mlp", 8, gen);
      opt->zero_grad();
      cross_entropy(model->forward(b.input), b.target).backward();
      opt->step();
    }
    auto params = model->named_parameters();
    for (size_t i = 0; i < params.size(); ++i) {
      bool is_frozen = params[i].first.rfind("1.", 0) == 0;
      EXPECT_EQ(bit_equal(params[i].second, before[i]), is_frozen)
          << opt->name() << " " << params[i].first;
    }
    // The frozen parameters have no optimizer state either.
    optim::StateDict st = opt->state_dict();
    EXPECT_EQ(st.count("state.0.step"), 0u) << opt->name();
    EXPECT_EQ(st.at("state.2.step").item(), 4.0) << opt->name();
  }
}

// Trains `model` for `steps` full-batch steps on (x, y).
void train_steps(nn::Module& model, optim::Optimizer& opt, const Tensor& x, const Tensor& y,
                 int steps) {
  for (int s = 0; s < steps; ++s) {
    opt.zero_grad();
    cross_entropy(model.forward(x), y).backward();
    opt.step();
  }
}

std::shared_ptr<nn::Sequential> small_net(Generator& gen) {
  return std::make_shared<nn::Sequential>(std::initializer_list<std::shared_ptr<nn::Module>>{
      std::make_shared<nn::Linear>(6, 16, gen), std::make_shared<nn::Tanh>(),
      std::make_shared<nn::Linear>(16, 3, gen)});
}

TEST(Optim, CheckpointResumeIsBitIdentical) {
  using MakeOpt = std::function<std::unique_ptr<optim::Optimizer>(std::vector<Tensor>)>;
  std::vector<std::pair<std::string, MakeOpt>> cases = {
      {"sgd-nesterov",
       [](std::vector<Tensor> p) {
         return std::make_unique<optim::SGD>(
             p, optim::SGDOptions(0.1).momentum(0.9).nesterov(true).weight_decay(1e-3));
       }},
      {"adam",
       [](std::vector<Tensor> p) {
         return std::make_unique<optim::Adam>(p, optim::AdamOptions(0.01).weight_decay(1e-3));
       }},
      {"adamw",
       [](std::vector<Tensor> p) {
         return std::make_unique<optim::AdamW>(p, optim::AdamWOptions(0.01));
       }},
  };
  Generator data_gen(16);
  Tensor x = randn({12, 6}, data_gen);
  Tensor y = from_vector<int64_t>({0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 1, 0}, {12});
  for (const auto& [label, make] : cases) {
    std::string path = temp_path(label + ".ckpt");
    Generator g1(17);
    auto a = small_net(g1);
    auto opt_a = make(a->parameters());
    train_steps(*a, *opt_a, x, y, 3);
    save_checkpoint(path, *a, opt_a.get(), {{"step", 3}});
    train_steps(*a, *opt_a, x, y, 3);

    Generator g2(99);  // different init: everything must come from the checkpoint
    auto b = small_net(g2);
    auto opt_b = make(b->parameters());
    nlohmann::json extra = load_checkpoint(path, *b, opt_b.get());
    EXPECT_EQ(extra, (nlohmann::json{{"step", 3}})) << label;
    train_steps(*b, *opt_b, x, y, 3);
    auto pa = a->parameters(), pb = b->parameters();
    for (size_t i = 0; i < pa.size(); ++i) {
      EXPECT_TRUE(bit_equal(pa[i], pb[i])) << label << " parameter " << i;
    }
    // And without the optimizer state the continuation differs (the test can fail).
    Generator g3(99);
    auto c = small_net(g3);
    auto opt_c = make(c->parameters());
    load_checkpoint(path, *c, nullptr);
    train_steps(*c, *opt_c, x, y, 3);
    EXPECT_FALSE(bit_equal(pa[0], c->parameters()[0])) << label;
    std::filesystem::remove(path);
  }
}

TEST(Optim, StateDictValidation) {
  Generator gen(18);
  auto net = small_net(gen);
  Tensor x = randn({4, 6}, gen);
  Tensor y = from_vector<int64_t>({0, 1, 2, 1}, {4});
  optim::Adam adam(net->parameters(), optim::AdamOptions(0.01));
  train_steps(*net, adam, x, y, 2);
  optim::StateDict st = adam.state_dict();
  EXPECT_EQ(st.at("state.3.step").item(), 2.0);
  EXPECT_EQ(st.at("state.0.exp_avg").shape(), (Shape{16, 6}));
  EXPECT_EQ(st.at("num_params").item(), 4.0);

  optim::SGD sgd(net->parameters(), optim::SGDOptions(0.1).momentum(0.9));
  EXPECT_CONTAINS(error_of<DataFormatError>([&] { sgd.load_state_dict(st); }),
                  "SGD keeps no 'exp_avg' state");
  optim::Adam other(net->at<nn::Linear>(0)->parameters(), optim::AdamOptions(0.01));
  EXPECT_CONTAINS(error_of<DataFormatError>([&] { other.load_state_dict(st); }),
                  "the state is for 4 parameters, this optimizer has 2");
  optim::StateDict bad = st;
  bad["state.1.exp_avg"] = zeros({3});
  EXPECT_CONTAINS(error_of<DataFormatError>([&] { adam.load_state_dict(bad); }),
                  "'state.1.exp_avg' is f32 [3] but parameter 1 is f32 [16]");
  bad = st;
  bad.erase("state.1.step");
  EXPECT_CONTAINS(error_of<DataFormatError>([&] { adam.load_state_dict(bad); }),
                  "'state.1.step' is not");
  bad = st;
  bad["state.9.step"] = from_vector<int64_t>({1}, {});
  EXPECT_CONTAINS(error_of<DataFormatError>([&] { adam.load_state_dict(bad); }),
                  "unexpected key 'state.9.step'");
  // A failed load changed nothing.
  optim::StateDict after = adam.state_dict();
  ASSERT_EQ(after.size(), st.size());
  for (const auto& [k, v] : st) EXPECT_TRUE(bit_equal(after.at(k), v)) << k;

  // Checkpoint with the wrong optimizer type, or a different model.
  std::string path = temp_path("adam.ckpt");
  save_checkpoint(path, *net, &adam);
  EXPECT_CONTAINS(error_of<InvalidArgument>([&] { load_checkpoint(path, *net, &sgd); }),
                  "holds Adam state, but the optimizer is SGD");
  auto mlp = nn::make_model("mlp", gen);
  std::string m = error_of<InvalidArgument>([&] { load_checkpoint(path, *mlp, nullptr); });
  EXPECT_CONTAINS(m, path);
  EXPECT_CONTAINS(m, "missing key(s)");
  save_checkpoint(path, *net, nullptr);
  EXPECT_CONTAINS(error_of<InvalidArgument>([&] { load_checkpoint(path, *net, &adam); }),
                  "holds no optimizer state");
  std::filesystem::remove(path);
}

// ---------------------------------------------------------------- schedulers

TEST(Scheduler, StepLRFollowsClosedForm) {
  Tensor p = zeros({1});
  optim::SGD opt({p}, optim::SGDOptions(0.05));
  optim::StepLR sched(opt, optim::StepLROptions(30).gamma(0.1));
  // torch docs: lr = 0.05 for epoch < 30, 0.005 for 30 <= epoch < 60, 0.0005 ...
  for (int t = 0; t < 95; ++t) {
    double want = 0.05 * std::pow(0.1, t / 30);
    EXPECT_NEAR(opt.lr(), want, 1e-15) << t;
    EXPECT_EQ(sched.get_lr(), opt.lr());
    sched.step();
  }
  sched.set_last_epoch(61);
  EXPECT_NEAR(opt.lr(), 0.0005, 1e-15);
}

TEST(Scheduler, CosineAnnealingFollowsClosedForm) {
  Tensor p = zeros({1});
  optim::SGD opt({p}, optim::SGDOptions(1.0));
  optim::CosineAnnealingLR sched(opt, optim::CosineAnnealingOptions(10).eta_min(0.1));
  const double pi = std::acos(-1.0);
  for (int t = 0; t <= 20; ++t) {
    double want = 0.1 + 0.9 * (1 + std::cos(pi * t / 10)) / 2;
    EXPECT_NEAR(opt.lr(), want, 1e-12) << t;
    sched.step();
  }
  EXPECT_NEAR(sched.lr_at(0), 1.0, 1e-15);
  EXPECT_NEAR(sched.lr_at(5), 0.55, 1e-12);
  EXPECT_NEAR(sched.lr_at(10), 0.1, 1e-12);

  Tensor q = zeros({1});
  optim::Adam adam({q}, optim::AdamOptions(0.3));
  optim::CosineAnnealingLR warm(adam, optim::CosineAnnealingOptions(13).warmup_steps(3));
  EXPECT_NEAR(adam.lr(), 0.1, 1e-15);  // (0 + 1) / 3 of the base
  std::vector<double> want = {0.1, 0.2, 0.3};
  for (int t = 3; t <= 13; ++t) want.push_back(0.3 * (1 + std::cos(pi * (t - 3) / 10)) / 2);
  for (size_t t = 0; t < want.size(); ++t) {
    EXPECT_NEAR(adam.lr(), want[t], 1e-12) << t;
    warm.step();
  }
  EXPECT_THROW(optim::CosineAnnealingLR(adam, optim::CosineAnnealingOptions(5).warmup_steps(5)),
               InvalidArgument);
}

// ---------------------------------------------------------------- training

TEST(Training, MlpLossFallsOnSeparableData) {
  // 10 classes, each a Gaussian blob around its own random centre in 784-d.
  Generator gen(19);
  const int64_t n = 200, d = 784, classes = 10;
  Tensor centres = randn({classes, d}, gen);
  Tensor x = empty({n, d});
  Tensor y = empty({n}, TensorOptions{}.with_dtype(DType::i64));
  const float* c = centres.data<float>();
  float* px = x.data<float>();
  int64_t* py = y.data<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    int64_t k = static_cast<int64_t>(gen.below(classes));
    py[i] = k;
    for (int64_t j = 0; j < d; ++j) {
      px[i * d + j] = c[k * d + j] + static_cast<float>(gen.normal());
    }
  }
  auto model = nn::make_model("mlp", gen);
  optim::SGD opt(model->parameters(), optim::SGDOptions(0.01).momentum(0.9));
  optim::CosineAnnealingLR sched(opt, optim::CosineAnnealingOptions(50).warmup_steps(5));
  double first = 0, last = 0;
  for (int step = 0; step < 50; ++step) {
    Tensor xb = x.narrow(0, (step % 4) * 50, 50), yb = y.narrow(0, (step % 4) * 50, 50);
    opt.zero_grad();
    Tensor loss = cross_entropy(model->forward(xb), yb);
    if (step == 0) first = loss.item();
    loss.backward();
    opt.step();
    sched.step();
  }
  {
    NoGradGuard ng;
    last = cross_entropy(model->forward(x), y).item();
  }
  EXPECT_GT(first, 1.5);  // about ln(10) at the start
  EXPECT_LT(last, 0.5 * first) << "first " << first << " last " << last;
}

}  // namespace
}  // namespace dtrain
