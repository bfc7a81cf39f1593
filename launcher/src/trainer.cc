#include "trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "dtrain/common/error.h"

namespace dtrain::cli {

using Clock = std::chrono::steady_clock;

// The running counters of one fit().
struct Trainer::Loop {
  int64_t step = 0;
  int64_t start_epoch = 0;
  int64_t first_step = 0;
  int64_t total_steps = 0;
  double loss = 0;         // this rank's, of the last step
  double logged_loss = 0;  // combined over the ranks (reduce_loss), of the last logged step
  int64_t samples = 0;
  int64_t window_samples = 0;
  int64_t checkpointed_step = -1;  // the step of the last checkpoint written
  bool stopped = false;            // a callback's stop_requested
  Clock::time_point window_start;
};

int64_t total_steps(const TrainerOptions& options, const BatchSource& data) {
  int64_t total = data.steps_per_epoch() * options.epochs;
  if (options.max_steps > 0) total = std::min(total, options.max_steps);
  return total;
}

Trainer::Trainer(TrainerParts parts, TrainerOptions options)
    : parts_(std::move(parts)), options_(options) {
  DTRAIN_CHECK(parts_.model && parts_.loss && parts_.optimizer && parts_.data && parts_.plan,
               InvalidArgument, "Trainer: model, loss, optimizer, data and plan are required");
  DTRAIN_CHECK(options_.epochs >= 1, InvalidArgument, "Trainer: epochs must be >= 1, got {}",
               options_.epochs);
  DTRAIN_CHECK(options_.log_every >= 1, InvalidArgument, "Trainer: log_every must be >= 1, got {}",
               options_.log_every);
  DTRAIN_CHECK(!options_.checkpoint_every || *options_.checkpoint_every >= 0, InvalidArgument,
               "Trainer: checkpoint_every must be >= 0 steps, got {}", *options_.checkpoint_every);
}

TrainStats Trainer::fit() {
  Loop loop;
  loop.total_steps = total_steps(options_, *parts_.data);
  resume(loop);
  // After the checkpoint: a DDP plan's broadcast then hands out the loaded weights.
  parts_.plan->prepare(parts_.model);
  loop.first_step = loop.step;
  for (Callback* c : parts_.callbacks) c->on_train_begin({loop.step, loop.total_steps});

  const auto t0 = Clock::now();
  loop.window_start = t0;
  for (int64_t epoch = loop.start_epoch;
       epoch < options_.epochs && loop.step < loop.total_steps && !loop.stopped; ++epoch) {
    run_epoch(loop, epoch);
  }
  TrainStats stats;
  stats.start_step = loop.first_step;
  stats.steps = loop.step;
  stats.final_loss = loop.logged_loss;
  stats.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  stats.samples_per_s = stats.seconds > 0 ? static_cast<double>(loop.samples) / stats.seconds : 0;
  stats.stopped = loop.stopped;
  for (Callback* c : parts_.callbacks) c->on_train_end(stats);
  if (stats.stopped) return stats;

  stats.eval = parts_.data->evaluate(*parts_.model);  // every rank its share
  for (Callback* c : parts_.callbacks) c->on_eval(stats);
  return stats;
}

void Trainer::resume(Loop& loop) {
  if (parts_.resume == nullptr) return;
  data::DistributedSampler position = parts_.data->position();
  CheckpointState state = state_of(position, 0, 0);
  if (!parts_.resume->load(state)) return;
  parts_.data->load_position(position.state());
  loop.step = state.training.step;
  loop.start_epoch = state.training.epoch;
}

void Trainer::run_epoch(Loop& loop, int64_t epoch) {
  BatchSource& data = *parts_.data;
  data.begin_epoch(epoch);
  TrainBatch batch;
  bool epoch_done = true;
  while (loop.step < loop.total_steps && !loop.stopped) {
    if (!data.next(batch)) break;
    for (Callback* c : parts_.callbacks) c->on_step_begin(loop.step, epoch);
    train_step(loop, batch, epoch);
    epoch_done = data.epoch_done();
  }
  if (options_.checkpoint_every == 0 && epoch_done && loop.step > loop.first_step &&
      loop.checkpointed_step != loop.step) {
    checkpoint(loop, loop.step, epoch);
  }
}

void Trainer::train_step(Loop& loop, const TrainBatch& batch, int64_t epoch) {
  optim::Optimizer& opt = *parts_.optimizer;
  ParallelPlan& plan = *parts_.plan;
  parallel::Tracer* tracer = parts_.tracer;
  const int64_t step = loop.step;
  if (tracer) tracer->set_step(step + 1);
  {
    parallel::ScopedSpan step_span(tracer, parallel::SpanKind::kStep);
    opt.zero_grad();
    loop.loss = forward_backward(batch, step, epoch);
    {
      parallel::ScopedSpan span(tracer, parallel::SpanKind::kSyncGradients);
      plan.sync_gradients();
    }
    parallel::ScopedSpan span(tracer, parallel::SpanKind::kOptimizer);
    plan.optimizer_step(opt);
    if (parts_.scheduler) parts_.scheduler->step();
  }
  ++loop.step;
  loop.samples += batch.samples;
  loop.window_samples += batch.samples;
  double window_s = std::chrono::duration<double>(Clock::now() - loop.window_start).count();
  double sps = window_s > 0 ? static_cast<double>(loop.window_samples) / window_s : 0.0;
  after_step(loop, {loop.step, epoch, loop.loss, opt.lr(), sps});
}

// The plan's forward_backward; traced: a forward span per StepFn call, then backward
// from the last forward's end to the plan's return.
double Trainer::forward_backward(const TrainBatch& batch, int64_t step, int64_t epoch) {
  using parallel::SpanKind;
  using parallel::TraceClock;
  parallel::Tracer* tracer = parts_.tracer;
  TraceClock::time_point forward_end = TraceClock::now();
  const double loss =
      parts_.plan->forward_backward(batch, [&](nn::Module& model, const TrainBatch& b) {
        const TraceClock::time_point start = tracer ? TraceClock::now() : forward_end;
        StepLoss l = checked_loss(model, b, step, epoch);
        if (tracer) tracer->record(SpanKind::kForward, start, forward_end = TraceClock::now());
        return l;
      });
  if (tracer) tracer->record(SpanKind::kBackward, forward_end, TraceClock::now());
  return loss;
}

void Trainer::after_step(Loop& loop, const StepEnd& end) {
  for (Callback* c : parts_.callbacks) c->on_step_end(end);
  if (end.step % options_.log_every == 0 || end.step == loop.total_steps) {
    StepEnd log = end;
    log.loss = loop.logged_loss = parts_.plan->reduce_loss(end.loss);
    for (Callback* c : parts_.callbacks) c->on_log(log);
    loop.window_start = Clock::now();
    loop.window_samples = 0;
  }
  const int64_t every = options_.checkpoint_every.value_or(0);
  if (every > 0 && end.step % every == 0) checkpoint(loop, end.step, end.epoch);
  bool stop = false;
  for (Callback* c : parts_.callbacks) stop = c->stop_requested(end) || stop;  // ask them all
  if (!stop) return;
  loop.stopped = true;
  if (options_.checkpoint_every && loop.checkpointed_step != end.step) {
    checkpoint(loop, end.step, end.epoch);
  }
}

StepLoss Trainer::checked_loss(nn::Module& model, const TrainBatch& batch, int64_t step,
                               int64_t epoch) const {
  Tensor loss = parts_.loss(model, batch);
  const double value = loss.item();
  DTRAIN_CHECK(std::isfinite(value), NumericalError,
               "loss is {} at step {} (epoch {}) on rank {}; stopping. Try a smaller --lr "
               "(now {})",
               value, step + 1, epoch, parts_.plan->rank(), parts_.optimizer->lr());
  return {loss, value};
}

// The sampler copy holds the consumed position; it lives until on_checkpoint returns.
void Trainer::checkpoint(Loop& loop, int64_t step, int64_t epoch) {
  loop.checkpointed_step = step;
  data::DistributedSampler position = parts_.data->position();
  const CheckpointState state = state_of(position, step, epoch);
  for (Callback* c : parts_.callbacks) c->on_checkpoint(state);
}

CheckpointState Trainer::state_of(data::DistributedSampler& position, int64_t step,
                                  int64_t epoch) const {
  CheckpointState state;
  state.training.model = parts_.model.get();
  state.training.optimizer = parts_.optimizer;
  state.training.scheduler = parts_.scheduler;
  state.training.sampler = &position;
  state.training.step = step;
  state.training.epoch = epoch;
  parts_.plan->checkpoint_state(state);
  return state;
}

}  // namespace dtrain::cli
