// Runs one pipeline-parallel step: the schedule's actions for this stage, with
// blocking sends and receives over the pp communicator (see pipeline.h).
#include "dtrain/parallel/pipeline.h"

#include <fmt/format.h>

#include <chrono>
#include <exception>

#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"

namespace dtrain::parallel {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The state of one stage during a step: per micro-batch, the received input leaf,
// the output (the scaled loss on the last stage) and the gradient received for it.
class StageRunner {
 public:
  StageRunner(comm::Communicator& pp, const PipelineOptions& options, const StageForward& forward,
              const StageLoss& loss, const std::vector<Tensor>& inputs)
      : pp_(pp),
        opt_(options),
        forward_(forward),
        loss_(loss),
        inputs_(inputs),
        stage_(pp.rank()),
        first_(stage_ == 0),
        last_(stage_ == pp.size() - 1),
        received_(static_cast<size_t>(options.microbatches)),
        outputs_(received_.size()),
        out_grads_(received_.size()) {}

  void run(const Action& a) {
    const auto t0 = Clock::now();
    const size_t mb = static_cast<size_t>(a.microbatch);
    switch (a.kind) {
      case ActionKind::kRecvForward:
        received_[mb] = recv(stage_ - 1);
        if (is_floating(opt_.activation_dtype)) received_[mb].set_requires_grad(true);
        return;
      case ActionKind::kForward:
        forward(a.microbatch);
        break;
      case ActionKind::kSendForward:
        send(outputs_[mb], stage_ + 1);
        return;
      case ActionKind::kRecvBackward:
        out_grads_[mb] = recv(stage_ + 1);
        return;
      case ActionKind::kBackward:
        backward(mb);
        break;
      case ActionKind::kSendBackward:
        send_input_grad(mb);
        return;
    }
    busy_ += seconds_since(t0);
  }

  double busy() const { return busy_; }
  double loss_sum() const { return loss_sum_; }

 private:
  Tensor recv(int peer) {
    Tensor t = empty(opt_.activation_shape,
                     TensorOptions().with_dtype(opt_.activation_dtype).with_device(opt_.device));
    pp_.recv(t.raw_data(), static_cast<size_t>(t.numel()), t.dtype(), peer);
    return t;
  }

  void send(const Tensor& t, int peer) {
    Tensor c = t.detach().contiguous();
    pp_.send(c.raw_data(), static_cast<size_t>(c.numel()), c.dtype(), peer);
  }

  void forward(int microbatch) {
    const size_t mb = static_cast<size_t>(microbatch);
    Tensor out = forward_(first_ ? inputs_[mb] : received_[mb]);
    if (last_) {
      Tensor l = loss_(out, microbatch);
      DTRAIN_CHECK(l.numel() == 1, ShapeError,
                   "pipeline: the loss of micro-batch {} has {} elements, expected a scalar",
                   microbatch, l.numel());
      loss_sum_ += l.item();
      outputs_[mb] = mul_scalar(l, 1.0 / opt_.microbatches);
      return;
    }
    DTRAIN_CHECK(out.shape() == opt_.activation_shape && out.dtype() == opt_.activation_dtype,
                 ShapeError,
                 "pipeline: stage {} output of micro-batch {} is {} {}, the activation is {} {}",
                 stage_, microbatch, shape_str(out.shape()), dtype_name(out.dtype()),
                 shape_str(opt_.activation_shape), dtype_name(opt_.activation_dtype));
    outputs_[mb] = out;
  }

  // Skipped when nothing on this stage needs a gradient (a first stage without
  // parameters); the previous stage then gets zeros.
  void backward(size_t mb) {
    if (outputs_[mb].requires_grad()) {
      outputs_[mb].backward(last_ ? Tensor() : out_grads_[mb]);
    }
    outputs_[mb] = out_grads_[mb] = Tensor();  // frees the graph
  }

  // The received leaf's gradient (zeros when the stage did not use its input).
  void send_input_grad(size_t mb) {
    Tensor g = received_[mb].grad();
    if (!g.defined()) g = zeros(received_[mb].shape(), received_[mb].options());
    send(g, stage_ - 1);
    received_[mb] = Tensor();
  }

  comm::Communicator& pp_;
  const PipelineOptions& opt_;
  const StageForward& forward_;
  const StageLoss& loss_;
  const std::vector<Tensor>& inputs_;
  const int stage_;
  const bool first_, last_;
  std::vector<Tensor> received_, outputs_, out_grads_;
  double busy_ = 0, loss_sum_ = 0;
};

void check_step(comm::Communicator& pp, const PipelineOptions& options, const StageLoss& loss,
                const std::vector<Tensor>& inputs) {
  const int m = options.microbatches;
  DTRAIN_CHECK(m >= 1, InvalidArgument, "pipeline: {} micro-batches (need >= 1)", m);
  DTRAIN_CHECK(pp.rank() != 0 || static_cast<int>(inputs.size()) == m, InvalidArgument,
               "pipeline: the first stage got {} micro-batch inputs for {} micro-batches",
               inputs.size(), m);
  DTRAIN_CHECK(pp.rank() != pp.size() - 1 || static_cast<bool>(loss), InvalidArgument,
               "pipeline: the last stage (stage {}) needs a loss function", pp.rank());
}

}  // namespace

PipelineStats run_pipeline_step(comm::Communicator& pp, const PipelineOptions& options,
                                const StageForward& forward, const StageLoss& loss,
                                const std::vector<Tensor>& inputs) {
  check_step(pp, options, loss, inputs);
  const auto t0 = Clock::now();
  const int p = pp.size(), m = options.microbatches;
  StageRunner runner(pp, options, forward, loss, inputs);
  const std::vector<Action> schedule = make_schedule(options.schedule, p, pp.rank(), m);
  for (const Action& a : schedule) {
    try {
      runner.run(a);
    } catch (const std::exception& e) {  // idempotent when the communicator already failed
      pp.abort(
          fmt::format("pipeline: stage {} failed at {}: {}", pp.rank(), action_str(a), e.what()));
      throw;
    }
  }
  double mean = runner.loss_sum() / m;
  if (p > 1) pp.broadcast(&mean, 1, DType::f64, p - 1);
  PipelineStats stats;
  stats.loss = mean;
  stats.step_seconds = seconds_since(t0);
  stats.busy_seconds = runner.busy();
  stats.bubble_fraction =
      stats.step_seconds > 0 ? 1.0 - stats.busy_seconds / stats.step_seconds : 0;
  stats.ideal_bubble = static_cast<double>(p - 1) / (m + p - 1);
  return stats;
}

double run_pipeline_forward(comm::Communicator& pp, const PipelineOptions& options,
                            const StageForward& forward,
                            const std::function<double(const Tensor& output)>& loss,
                            const Tensor& input) {
  NoGradGuard no_grad;
  const int s = pp.rank(), p = pp.size();
  Tensor x = input;
  if (s > 0) {
    x = empty(options.activation_shape,
              TensorOptions().with_dtype(options.activation_dtype).with_device(options.device));
    pp.recv(x.raw_data(), static_cast<size_t>(x.numel()), x.dtype(), s - 1);
  }
  Tensor out = forward(x);
  double value = 0;
  if (s == p - 1) {
    value = loss(out);
  } else {
    DTRAIN_CHECK(out.shape() == options.activation_shape, ShapeError,
                 "pipeline: stage {} output is {}, the activation is {}", s,
                 shape_str(out.shape()), shape_str(options.activation_shape));
    Tensor c = out.contiguous();
    pp.send(c.raw_data(), static_cast<size_t>(c.numel()), c.dtype(), s + 1);
  }
  if (p > 1) pp.broadcast(&value, 1, DType::f64, p - 1);
  return value;
}

}  // namespace dtrain::parallel
