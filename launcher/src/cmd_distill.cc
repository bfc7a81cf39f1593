// `dtrain distill`: knowledge distillation of an MNIST teacher into a student (see
// cmd_compress.cc for the command line). The student trains through the Trainer
// with kd_loss as its loss function; the teacher runs in eval mode without grad.
// Then a second student, initialised from the same seed and fed the same batches in
// the same order, trains on the labels alone, and both test accuracies are printed.
#include <fmt/format.h>

#include <memory>
#include <string>

#include "commands.h"
#include "compress_local.h"
#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/compress/distill.h"
#include "dtrain/engine/serialize.h"
#include "mnist_source.h"

namespace dtrain::cli {

namespace {

struct DistillArgs {
  std::string teacher, teacher_model = "seed-cnn", student_model = "mlp", out;
  double temperature = 4, alpha = 0.5, lr = 0.05;
  int64_t max_steps = 200;
  bool baseline = true;
  LocalDataOptions data;
};

double train_student(const DistillArgs& a, const LossFn& loss, const std::string& save) {
  Generator gen(a.data.seed);
  auto student = nn::make_model(a.student_model, gen);
  LocalMnistSource data(a.data);
  TrainStats stats = train_local(student, loss, data, a.max_steps, a.lr);
  if (!save.empty()) {
    save_checkpoint(save, *student, nullptr, {{"model", a.student_model}, {"seed", a.data.seed}});
  }
  return stats.eval.at("test_accuracy");
}

int run_distill(const DistillArgs& a) {
  DTRAIN_CHECK(a.temperature > 0, InvalidArgument, "--temperature must be > 0, got {}",
               a.temperature);
  DTRAIN_CHECK(a.alpha >= 0 && a.alpha <= 1, InvalidArgument, "--alpha must be in [0, 1], got {}",
               a.alpha);
  DTRAIN_CHECK(a.max_steps >= 1, InvalidArgument, "--max-steps must be >= 1, got {}", a.max_steps);
  nn::model_info(a.student_model);  // an unknown name lists the known ones
  auto teacher = load_model(a.teacher, a.teacher_model, "--teacher");
  teacher->eval();
  LocalMnistSource eval_data(a.data);
  const double teacher_acc = eval_data.evaluate(*teacher).at("test_accuracy");
  teacher->eval();
  LossFn kd = [&](nn::Module& student, const TrainBatch& b) {
    Tensor t;
    {
      NoGradGuard ng;
      t = teacher->forward(b.tensors[0]);
    }
    return compress::kd_loss(student.forward(b.tensors[0]), t, b.tensors[1], a.temperature,
                             a.alpha);
  };
  const double distilled = train_student(a, kd, a.out);
  fmt::print(
      "dtrain distill: teacher {} (test accuracy {:.4f}) -> student {}, T={} alpha={}, {} steps, "
      "seed {}: distilled student test accuracy {:.4f}",
      a.teacher_model, teacher_acc, a.student_model, a.temperature, a.alpha, a.max_steps,
      a.data.seed, distilled);
  if (a.baseline) {
    const double alone = train_student(a, mnist_loss, "");
    fmt::print(", same student trained alone {:.4f} ({:+.4f})", alone, distilled - alone);
  }
  fmt::print("\n");
  return 0;
}

}  // namespace

Command add_distill_command(CLI::App& app) {
  auto a = std::make_shared<DistillArgs>();
  CLI::App* c = app.add_subcommand("distill", "Knowledge distillation of a teacher into a student");
  c->add_option("--teacher", a->teacher, "Teacher checkpoint (dtrain train --save)")->required();
  c->add_option("--teacher-model", a->teacher_model, "The teacher's model")->capture_default_str();
  c->add_option("--student-model", a->student_model, "The student's model")->capture_default_str();
  c->add_option("--temperature", a->temperature, "Softmax temperature T")->capture_default_str();
  c->add_option("--alpha", a->alpha, "Weight of the soft (KL) term")->capture_default_str();
  c->add_option("--max-steps", a->max_steps, "Training steps of each student")
      ->capture_default_str();
  c->add_option("--lr", a->lr, "SGD learning rate (momentum 0.9, constant)")->capture_default_str();
  c->add_option("--out", a->out, "Write the distilled student's checkpoint here");
  c->add_flag("!--no-baseline", a->baseline, "Skip the student trained alone");
  add_local_data_options(c, a->data);
  return {c, [a] { return run_distill(*a); }};
}

}  // namespace dtrain::cli
