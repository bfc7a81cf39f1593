// Pipeline parallelism: one training step of a model split into stages over a pp
// communicator (rank = stage), its batch cut into m micro-batches.
//
// Each stage is a callable from its input to its output. The first stage gets the
// micro-batch inputs (any dtype, e.g. i64 token ids); every later stage gets a
// received activation, a fresh leaf that requires grad, so its backward leaves the
// gradient for the previous stage in that leaf's grad(). The last stage also gets a
// loss callable; each micro-batch loss is scaled by 1/m before its backward, so the
// parameters' grad() sum to the gradient of the mean over micro-batches (the
// full-batch mean when micro-batches are equal). Gradients accumulate (+=): zero them
// before the step, step the optimizer after it, as with one backward.
//
// The schedule (schedule.h) orders the blocking sends and receives so that no two
// neighbours both wait to send. Every boundary carries one activation shape and dtype
// (options.activation_shape/dtype); the tensors live where the communicator reads.
//
// Failure: a lost peer fails the step with the communicator's CommError/TimeoutError.
// When a stage callable throws, the step aborts the pp communicator (so the other
// stages fail at once with CommError naming the reason, instead of waiting for the
// timeout) and rethrows; the communicator then stays failed.
//
// Deliberately not here: partitioning a module (the caller builds its stage;
// partition_layers helps), interleaved stages, overlap of compute and communication,
// tied embeddings across stages (mesh.h's embedding group).
// Thread-safety: one step at a time per communicator, from one thread.
#pragma once

#include <functional>
#include <vector>

#include "dtrain/comm/communicator.h"
#include "dtrain/engine/tensor.h"
#include "dtrain/parallel/schedule.h"

namespace dtrain::parallel {

using StageForward = std::function<Tensor(const Tensor& input)>;
// The scalar loss of micro-batch `microbatch` given the last stage's output.
using StageLoss = std::function<Tensor(const Tensor& output, int microbatch)>;

struct PipelineOptions {
  ScheduleKind schedule = ScheduleKind::k1F1B;
  int microbatches = 1;
  Shape activation_shape;  // of one micro-batch, at every stage boundary
  DType activation_dtype = DType::f32;
  Device device = Device::cpu();
};

struct PipelineStats {
  double loss = 0;             // mean over micro-batches, the same on every stage
  double step_seconds = 0;     // wall time of the step on this stage
  double busy_seconds = 0;     // of which forward and backward
  double bubble_fraction = 0;  // 1 - busy / step
  double ideal_bubble = 0;     // (p - 1) / (m + p - 1)
};

// Collective over `pp`. `inputs`: the m micro-batch inputs on the first stage
// (ignored elsewhere). `loss`: needed on the last stage only. InvalidArgument on a
// wrong count of inputs or a missing loss, ShapeError when a stage output is not
// options.activation_shape/dtype.
PipelineStats run_pipeline_step(comm::Communicator& pp, const PipelineOptions& options,
                                const StageForward& forward, const StageLoss& loss,
                                const std::vector<Tensor>& inputs);

// Forward only (evaluation): `input` (first stage) through every stage as one batch,
// without a graph; the last stage's loss(output) is returned on every stage.
// options.activation_shape is that batch's activation; schedule/microbatches unused.
double run_pipeline_forward(comm::Communicator& pp, const PipelineOptions& options,
                            const StageForward& forward,
                            const std::function<double(const Tensor& output)>& loss,
                            const Tensor& input);

}  // namespace dtrain::parallel
