// Trainer: the one training loop every model and every parallel layout runs through.
//
// The loop (fit()) knows steps, epochs, the learning-rate schedule, throughput and
// when a checkpoint is due -- nothing else. What varies lives behind four seams:
//   - LossFn: the model's loss on one batch (MNIST: cross entropy of the logits);
//   - BatchSource: the training batches of this rank, its data position for
//     checkpoints, and the held-out evaluation (metrics by name);
//   - ParallelPlan: how the model is spread over the ranks -- wrap it, run one step's
//     forward + backward, synchronise the gradients, apply the optimizer, combine
//     the logged loss, say which checkpoint shard this rank holds;
//   - Callbacks: progress line, metrics.jsonl, checkpoints, test seams.
//
// One step:  next batch -> on_step_begin -> zero_grad -> plan.forward_backward ->
//   plan.sync_gradients -> plan.optimizer_step -> scheduler.step -> on_step_end;
//   every log_every steps (and the last) plan.reduce_loss -> on_log; when a
//   checkpoint is due on_checkpoint; then stop_requested. After the last step
//   on_train_end, then data.evaluate -> on_eval. Callbacks run in registration order.
//   A stop (a callback's stop_requested said true) ends the loop after that step:
//   a checkpoint of the step (unless one was just written), on_train_end with
//   stats.stopped, and no evaluation.
//
// Plugging in a new model and plan (the next user: a GPT with a tensor-parallel
// plan). Nothing here assumes MNIST's (image, label) batches or accuracy:
//
//   class TokenSource final : public BatchSource {      // yields {tokens, targets}
//     bool next(TrainBatch& b) override {                // [B,T] i64 each
//       b.tensors = {tokens, targets};  b.samples = B * dp_size;  return true; }
//     Metrics evaluate(nn::Module& m) override { return {{"val_loss", ...}}; }
//     ...
//   };
//   class TensorParallelPlan final : public ParallelPlan {
//     void prepare(std::shared_ptr<nn::Module> m) override;   // shard the Linear layers
//     void sync_gradients() override;        // all-reduce over the data-parallel group only
//     double reduce_loss(double l) override; // average over the data-parallel group
//     void checkpoint_state(CheckpointState& s) const override;  // shard = tp rank, ...
//     ...
//   };
//   Tensor gpt_loss(nn::Module& m, const TrainBatch& b) {   // logits [B,T,V]
//     Tensor logits = m.forward(b.tensors[0]).reshape({-1, vocab});
//     return cross_entropy(logits, b.tensors[1].reshape({-1}));
//   }
//   TokenSource data(...); TensorParallelPlan plan(mesh); optim::SGD opt(...);
//   ProgressCallback progress(...);
//   Trainer trainer({.model = gpt, .loss = gpt_loss, .optimizer = &opt, .data = &data,
//                    .plan = &plan, .callbacks = {&progress}},
//                   {.epochs = 1, .max_steps = 1000, .log_every = 10});
//   TrainStats stats = trainer.fit();
//
// Not here: anything about MNIST (mnist_source.h), DDP (ddp_plan.h), checkpoint
// files and recovery (checkpointing.h, recovery.h), flags (train.cc). A pipeline plan
// will also need a forward-only hook for evaluation; evaluate() gets the model today.
//
// Tracing (TrainerParts::tracer): per step a "step" span holding forward (each
// call of the StepFn), backward (the last forward's end to forward_backward's
// return: under a pipeline schedule, only the tail after the last forward), sync
// gradients and optimizer; the tracer's step is the step's 1-based number.
//
// Where: trainer.h/.cc include only the engine and the comm-free parallel/trace.h
// (no coordinator, no WorkerSession, no comm), so they can move into a library
// (parallel/) unchanged once a second binary needs them; they sit beside their only
// user for now. A source's data
// position is an engine DistributedSampler, what ckpt::TrainingState stores.
//
// Errors: a non-finite loss throws NumericalError naming the step, before backward;
// whatever a plan, source or callback throws propagates out of fit() (a CommError
// is what recovery.h catches). Thread-safety: one thread (the training thread).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dtrain/engine/checkpoint.h"
#include "dtrain/engine/data/sampler.h"
#include "dtrain/engine/nn/module.h"
#include "dtrain/engine/optim/lr_scheduler.h"
#include "dtrain/engine/optim/optimizer.h"
#include "dtrain/engine/tensor.h"
#include "dtrain/parallel/trace.h"

namespace dtrain::cli {

// One step's inputs on this rank. The loss function gives the tensors their
// meaning (MNIST: {images [B,1,28,28] f32, labels [B] i64}).
struct TrainBatch {
  std::vector<Tensor> tensors;
  int64_t samples = 0;  // samples the step consumes over all data-parallel ranks (samples/s)
};

// Evaluation results by name ("test_accuracy", "val_loss", ...).
using Metrics = std::map<std::string, double>;

// The model's loss on one (micro-)batch: a scalar tensor backward() can start from.
using LossFn = std::function<Tensor(nn::Module& model, const TrainBatch& batch)>;

// What a plan runs per (micro-)batch: LossFn plus the trainer's finite-loss check.
struct StepLoss {
  Tensor loss;   // the scalar to call backward() on
  double value;  // loss.item(), already checked to be finite
};
using StepFn = std::function<StepLoss(nn::Module& model, const TrainBatch& batch)>;

// The training data of this rank and its held-out evaluation.
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  // Steps in one whole epoch on this rank.
  virtual int64_t steps_per_epoch() const = 0;
  // Starts an epoch; continues from a loaded position when it is that position's epoch.
  virtual void begin_epoch(int64_t epoch) = 0;
  // The next batch of the epoch; false when the epoch is over.
  virtual bool next(TrainBatch& batch) = 0;
  // The current epoch has been consumed whole (an end-of-epoch checkpoint is due).
  virtual bool epoch_done() const = 0;
  // What the trainer has consumed, as a sampler a checkpoint stores (a copy).
  virtual data::DistributedSampler position() const = 0;
  // Continues from a position loaded from a checkpoint (next begin_epoch resumes it).
  virtual void load_position(const data::SamplerState& state) = 0;
  // Collective over the source's ranks: every rank returns the global metrics.
  virtual Metrics evaluate(nn::Module& model) = 0;

  // Optional: evaluate() reports (batches done, batches total) of this rank's pass
  // to it (the logging rank's evaluation bar, progress.h); empty: nothing.
  void set_eval_progress(std::function<void(int64_t, int64_t)> fn) {
    eval_progress_ = std::move(fn);
  }

 protected:
  void eval_progress(int64_t done, int64_t total) const {
    if (eval_progress_) eval_progress_(done, total);
  }

 private:
  std::function<void(int64_t, int64_t)> eval_progress_;
};

// A checkpoint's content and which shard of it this rank writes and reads.
struct CheckpointState {
  ckpt::TrainingState training;  // model, optimizer, scheduler, sampler, step, epoch
  int shard = 0;
  int num_shards = 1;
};

// How the model is spread over the ranks. The trainer calls the hooks in the order
// of the file comment; every hook marked collective runs on every rank.
class ParallelPlan {
 public:
  virtual ~ParallelPlan() = default;
  // Wraps the model, once per fit(), after a checkpoint was loaded into it and
  // before the first step. Collective.
  virtual void prepare(std::shared_ptr<nn::Module> model) = 0;
  // Forward and backward of one step (a pipeline schedule runs its micro-batches
  // here); returns this rank's loss of the step.
  virtual double forward_backward(const TrainBatch& batch, const StepFn& step) = 0;
  // After backward, before the optimizer (DDP: average the gradients). Collective.
  virtual void sync_gradients() = 0;
  // Applies the gradients (a ZeRO plan: this rank's shard, then gather). Collective
  // for plans that shard the optimizer.
  virtual void optimizer_step(optim::Optimizer& optimizer) = 0;
  // The loss to log, combined over the ranks (DDP: the average). Collective.
  virtual double reduce_loss(double local_loss) = 0;
  // Fills in the parts of a checkpoint the parallelism owns: the shard this rank
  // holds, and the model/optimizer state when the plan shards them.
  virtual void checkpoint_state(CheckpointState& state) const = 0;
  // This rank draws progress and writes metrics.
  virtual bool is_logging_rank() const = 0;
  // This process's rank in the job, for messages.
  virtual int rank() const = 0;
};

struct StepEnd {
  int64_t step = 0;  // steps done, counting those before a resume
  int64_t epoch = 0;
  double loss = 0;           // this rank's loss of the step
  double lr = 0;             // the optimizer's rate after the step (the schedule has moved on)
  double samples_per_s = 0;  // over the steps since the last log
};

struct TrainBegin {
  int64_t start_step = 0;  // 0, or the step a checkpoint resumed
  int64_t total_steps = 0;
};

struct TrainStats {
  int64_t start_step = 0;
  int64_t steps = 0;      // the last step done (== total steps unless a callback stopped)
  double final_loss = 0;  // the last step's, combined over the ranks (reduce_loss)
  double seconds = 0;     // the training loop, without evaluation
  double samples_per_s = 0;
  bool stopped = false;  // a callback stopped training early (no evaluation ran)
  Metrics eval;          // what evaluate() returned
};

class Callback {
 public:
  virtual ~Callback() = default;
  // After a checkpoint was loaded and the plan prepared, before the first step.
  virtual void on_train_begin(const TrainBegin& /*begin*/) {}
  // A batch was fetched for step `step` + 1; it throws to abandon the step.
  virtual void on_step_begin(int64_t /*step*/, int64_t /*epoch*/) {}
  virtual void on_step_end(const StepEnd& /*end*/) {}
  // Every log_every steps and after the last: loss = reduce_loss() of the step.
  virtual void on_log(const StepEnd& /*log*/) {}
  // A checkpoint is due: the state to write, as of after `state.training.step`.
  virtual void on_checkpoint(const CheckpointState& /*state*/) {}
  // Last at every step end: true stops training after this step (see the file
  // comment). Every callback is asked at every step; a callback whose answer may
  // differ between ranks must make it agree (a collective) so all ranks stop together.
  virtual bool stop_requested(const StepEnd& /*end*/) { return false; }
  // After the last step, before evaluation (stats.eval is still empty).
  virtual void on_train_end(const TrainStats& /*stats*/) {}
  virtual void on_eval(const TrainStats& /*stats*/) {}
};

// Loads a checkpoint to resume from before the first step.
class CheckpointLoader {
 public:
  virtual ~CheckpointLoader() = default;
  // Loads one into state and returns true, or returns false and leaves state as it
  // is (nothing to resume). Collective.
  virtual bool load(CheckpointState& state) = 0;
};

struct TrainerOptions {
  int64_t epochs = 1;
  int64_t max_steps = 0;  // 0: no limit beyond epochs
  int64_t log_every = 10;
  // nullopt: no checkpoints; 0: at the end of every epoch; n: every n steps.
  std::optional<int64_t> checkpoint_every;
};

// The pieces fit() runs. Not owned: each must outlive the Trainer.
struct TrainerParts {
  std::shared_ptr<nn::Module> model;        // required
  LossFn loss;                              // required
  optim::Optimizer* optimizer = nullptr;    // required
  optim::LRScheduler* scheduler = nullptr;  // optional: stepped after every step
  BatchSource* data = nullptr;              // required
  ParallelPlan* plan = nullptr;             // required
  CheckpointLoader* resume = nullptr;       // optional
  std::vector<Callback*> callbacks;
  parallel::Tracer* tracer = nullptr;  // optional: the step's spans (trace.h)
};

// epochs x steps per epoch, capped by max_steps (to size a schedule before fit()).
int64_t total_steps(const TrainerOptions& options, const BatchSource& data);

class Trainer {
 public:
  // Throws InvalidArgument for a missing required part or options out of range.
  Trainer(TrainerParts parts, TrainerOptions options);
  // Resume (if any), prepare, train to total_steps, evaluate. Collective.
  TrainStats fit();

 private:
  struct Loop;  // the running counters of one fit()
  void resume(Loop& loop);
  void run_epoch(Loop& loop, int64_t epoch);
  void train_step(Loop& loop, const TrainBatch& batch, int64_t epoch);
  double forward_backward(const TrainBatch& batch, int64_t step, int64_t epoch);
  void after_step(Loop& loop, const StepEnd& end);
  StepLoss checked_loss(nn::Module& model, const TrainBatch& batch, int64_t step,
                        int64_t epoch) const;
  void checkpoint(Loop& loop, int64_t step, int64_t epoch);
  // model, optimizer, scheduler and `position`, then the plan's part.
  CheckpointState state_of(data::DistributedSampler& position, int64_t step, int64_t epoch) const;

  TrainerParts parts_;
  TrainerOptions options_;
};

}  // namespace dtrain::cli
