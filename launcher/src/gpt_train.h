// `dtrain train --model gpt`: a character-level GPT on a real corpus, on any mesh.
//
// The corpus is Debian's fortunes (engine/.../data/text.h), prepared once into
// <data-cache>/fortunes (vocab.json, train.tok, val.tok); the vocabulary is padded
// to a multiple of 64, the same model on every mesh (tp = 2, 4, ... divide it). The run goes
// through the same Trainer as MNIST (trainer.h) with the GPT's pieces:
//   - TextSource: step k's global batch is drawn from a generator seeded by (seed, k),
//     the same for every mesh (dp rank r keeps its rows), so a resumed run sees the
//     uninterrupted run's batches; a validation sweep reports val_loss, val_ppl and
//     the corpus' unigram baseline;
//   - MeshPlan: the Trainer's view of a parallel::GptOnMesh on the ProcessMesh of
//     --parallel (dp x pp x tp; --microbatches, --pp-schedule, --stage-split), with
//     DDP / ZeRO-1/2/3 over dp (--zero) and global-norm clipping (--clip);
//   - GptCheckpoints (gpt_checkpoints.h): --ckpt-dir/--resume, sharded checkpoints
//     that load at any mesh.
// The Trainer's optimizer is only the schedule's clock (the LR it sets is copied
// into the mesh's optimizers before each update). --save writes the whole model in
// one file (for `dtrain generate`) from any mesh; --print-schedule prints the stages
// and the pipeline timeline and exits.
//
// --bf16: autocast of the linears (amp.h). Not yet: --device cuda for the GPT,
// sequence parallelism.
#pragma once

#include "dtrain/parallel/trace.h"
#include "train.h"
#include "worker_session.h"

namespace dtrain::cli {

// tracer: the Trainer's spans (null: off); not owned.
TrainResult train_gpt_worker(const TrainConfig& config, WorkerSession& session,
                             parallel::Tracer* tracer);

}  // namespace dtrain::cli
