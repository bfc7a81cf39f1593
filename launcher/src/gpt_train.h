// `dtrain train --model gpt`: a character-level GPT on a real corpus, on any mesh.
//
// The corpus is Debian's fortunes (engine/.../data/text.h), prepared once into
// <data-cache>/fortunes (vocab.json, train.tok, val.tok); the vocabulary is padded
// to a multiple of 64, the same model on every mesh (tp = 2, 4, ... divide it). The run goes
// through the same Trainer as MNIST (trainer.h) with two GPT pieces:
//   - TextSource: every step the same global batch of random windows for every
//     mesh (dp rank r keeps rows r, r + dp, ...), and a validation sweep that
//     reports val_loss, val_ppl and the corpus' unigram baseline;
//   - MeshPlan: the ProcessMesh of --parallel (dp x pp x tp, pp = 1 for now), the
//     GPT with its tensor-parallel seams over mesh.tp(), and the data-parallel side
//     over mesh.dp(): DDP + AdamW (nanoGPT's decay groups), or ZeRO-1/2
//     (--zero 1|2), with gradient clipping by the global norm (--clip).
// The Trainer's optimizer is only the schedule's clock (the LR it sets is copied
// into the plan's real optimizer before each update).
//
// Not yet: pipeline stages (pp > 1 is refused with a clear line), ZeRO-3 for the GPT,
// sharded GPT checkpoints (--ckpt-dir/--resume are refused; --save writes the
// gathered model for `dtrain generate`).
#pragma once

#include "train.h"
#include "worker_session.h"

namespace dtrain::cli {

TrainResult train_gpt_worker(const TrainConfig& config, WorkerSession& session);

}  // namespace dtrain::cli
