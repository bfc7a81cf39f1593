// `dtrain train --model char-lstm`: a character-level LSTM or GRU language model on
// the fortunes corpus (the GPT demo's text, engine/.../data/text.h), data-parallel.
//
// Model: nn::CharRnnLM (nn/recurrent.h): Embedding -> --layers x --hidden LSTM or GRU
// (--cell lstm|gru, --rnn-dropout between layers) -> Linear; Adam (--lr, default 3e-3)
// with a cosine schedule (--warmup-steps), --max-steps steps (default 300) of --batch
// windows of --seq-len characters. Through the same Trainer and DataParallelPlan as the
// MNIST models: every rank draws the same global batch from a generator seeded by
// (seed, step) and keeps rows rank::world, DDP averages the gradients, so N workers
// train the 1-worker model (up to float summation order). Checkpoints: --ckpt-dir /
// --resume like the MNIST models (the data position is the step); --save FILE writes the
// model with its shape and tokenizer for `dtrain generate`.
//
// Evaluation (after the last step): test loss and perplexity exp(mean cross-entropy)
// over the first --eval-windows held-out windows (val.tok, non-overlapping, split over
// the ranks), next to the add-one unigram baseline's perplexity on the same target
// characters; both printed and written to metrics.jsonl (test_loss, test_ppl,
// unigram_loss, unigram_ppl, eval_tokens).
//
// Not here: CUDA (the GRU op is CPU-only; --device cuda is refused), --checkpoint-signals
// (off for this model), truncated BPTT across batches (every window starts from zeros).
#pragma once

#include <CLI/CLI.hpp>

#include "dtrain/parallel/trace.h"
#include "recovery.h"
#include "train.h"
#include "worker_session.h"

namespace dtrain::cli {

// Flags of the model (--cell, --layers, --hidden, --seq-len, --rnn-dropout, --eval-windows).
void add_char_rnn_options(CLI::App* train, TrainConfig& config);
// Before any session: an unknown --cell, sizes out of range, --device other than cpu.
void validate_char_rnn(const TrainConfig& config);
// One attempt (run_with_recovery repeats it after a lost peer).
TrainResult train_char_rnn_worker(const TrainConfig& config, WorkerSession& session,
                                  const StartFrom& from, parallel::Tracer* tracer);

}  // namespace dtrain::cli
