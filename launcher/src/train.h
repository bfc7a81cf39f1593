// `dtrain train`: the training job, on one worker or data-parallel on many.
//
// Loads the data (the MNIST subset by default, or a user's IDX folder), builds the
// model, trains with SGD + momentum, logs metrics as JSON lines, evaluates on the
// held-out split and prints a one-line summary. Started by `dtrain launch`, mpirun,
// srun or a torchrun-style environment, each process becomes one rank: the global
// batch is split over the ranks, DistributedDataParallel averages the gradients,
// rank 0 alone draws progress and writes metrics, and evaluation combines every
// rank's share of the test set. Errors are thrown as dtrain::Error;
// the CLI turns them into a message and a non-zero exit.
//
// Checkpoints (--ckpt-dir): every --ckpt-every steps each rank writes its shard
// (dtrain/engine/checkpoint.h) and the checkpoint is committed in two phases
// through the coordinator (BeginCheckpoint, write, CommitShard; the coordinator
// commits when every shard is in), or locally by a single process. --resume auto
// continues from the newest committed checkpoint that verifies.
//
// Recovery: when a collective fails (a lost peer, CommError/TimeoutError) or the
// coordinator announces a newer generation, a worker re-joins the job (a new
// communicator), reloads the last committed checkpoint (from step 0 when none was
// committed) and continues; restarting from a checkpointed step takes the same
// path as a run passing through it, so the loss curve is bit-exact on the CPU
// backend. A process restarted by its launcher joins the later generation and
// resumes the same way.
//
// Timeline (--trace FILE): every rank records the Trainer's and DDP's spans and
// writes FILE with ".rank<r>" inserted (trace.json -> trace.rank0.json; a folder gets
// trace.rank<r>.json), also when the run fails; rank 0 prints how much of its
// all-reduce time backward hid. An unwritable path fails before training.
//
// TensorBoard (--tensorboard, tensorboard.h): event files beside the metrics file by
// default (rank 0's, or one per rank with --tensorboard-all-ranks); the default
// metrics path runs/train-<time>/ is chosen once per run (rank 0's time on every rank
// when every rank writes events), so a recovered attempt writes into the same folder.
//
// Layout: the loop is the Trainer (trainer.h); run_train composes one attempt from
// MnistBatchSource (mnist_source.h), DataParallelPlan (ddp_plan.h), ShardedCheckpoints
// (checkpointing.h) and the callbacks of train_callbacks.h, and run_with_recovery
// (recovery.h) repeats it after a lost peer.
#pragma once

#include <cstdint>
#include <string>

#include "logging.h"
#include "transfer.h"

namespace dtrain::cli {

struct TrainConfig {
  std::string model = "seed-cnn";
  std::string data;  // IDX folder; empty: the demo's MNIST subset
  std::string data_cache = "data";
  std::string device = "cpu";
  std::string backend = "auto";    // auto | tcp | mpi | nccl
  std::string allreduce_algo;      // empty: DTRAIN_ALLREDUCE_ALGO or auto
  double timeout_s = 60;           // every collective; a lost peer fails within this
  double stall_timeout_s = 0;      // the inspector's stall report (0: off)
  bool check_collectives = false;  // the inspector's fingerprint check
  int64_t epochs = 5;
  int64_t batch = 64;  // global: split evenly over the ranks
  double lr = 0.05;
  double momentum = 0.9;
  double weight_decay = 0.0;
  bool nesterov = false;
  std::string schedule = "cosine";  // cosine | step | constant
  int64_t warmup_steps = 0;
  uint64_t seed = 1;
  int threads = 1;
  bool normalize = true;
  int64_t log_every = 10;
  int64_t max_steps = 0;                  // 0: no limit (for quick runs and tests)
  std::string grad_compression = "none";  // DDP: none | bf16 | fp16 | powersgd
  int powersgd_rank = 2;                  // --grad-compression powersgd: the rank
  std::string metrics;  // path of the JSON-lines file; empty: runs/<time>/metrics.jsonl
  std::string save;     // checkpoint written at the end; empty: none
  // TensorBoard event files (tensorboard.h): a folder; empty: the metrics file's
  // folder; "none": off. Rank 0 only unless tensorboard_all_ranks.
  std::string tensorboard;
  bool tensorboard_all_ranks = false;
  bool report = false;  // render `dtrain report` into <run folder>/report at the end
  // --log-level / --log-dir / --log-format (logging.h); the default folder for the
  // files is the metrics file's folder/logs.
  LogOptions log;
  bool progress = true;
  std::string ckpt_dir;         // sharded checkpoints; empty: none
  int64_t ckpt_every = 0;       // steps between checkpoints; 0: at the end of every epoch
  int keep = 3;                 // committed checkpoints kept (0: all)
  std::string resume = "none";  // none | auto | a checkpoint name (step-00000120)
  std::string trace;            // Chrome trace per rank (parallel/trace.h); empty: off
  // With --ckpt-dir: on these signals every rank stops at the same step, commits a
  // final checkpoint and exits kExitStoppedBySignal (signal_checkpoint.h); "none": off.
  std::string checkpoint_signals = "USR1,TERM";
  // --model gpt (gpt_train.h): the mesh, ZeRO stage, clipping and the model's shape.
  std::string parallel;  // "dp=2,tp=2,pp=1"; empty: dp = world
  int zero = 0;          // 0 (DDP), 1, 2 or 3
  double clip = 1.0;     // global gradient-norm clip; 0: off
  int64_t context = 64;
  int64_t gpt_layers = 4, gpt_heads = 4, gpt_dim = 128;
  int microbatches = 4;              // pp > 1: micro-batches per step
  std::string pp_schedule = "1f1b";  // 1f1b | gpipe
  std::string stage_split;           // "0,3": first layer of each stage; empty: balanced
  bool print_schedule = false;       // print the stages and the schedule, do not train
  bool bf16 = false;                 // GPT: bf16 autocast of the linears (amp.h)
  std::string amp = "none";          // --amp: none | bf16 (train_amp.h; --bf16 is bf16)
  bool lr_given = false, weight_decay_given = false;  // else the GPT's own defaults
  // --model char-lstm (char_rnn_train.h): cell, shape, window and evaluation size.
  std::string rnn_cell = "lstm";  // lstm | gru
  int64_t rnn_layers = 2, rnn_hidden = 128, rnn_seq_len = 64;
  double rnn_dropout = 0.0;        // between layers
  int64_t rnn_eval_windows = 512;  // held-out windows evaluated (0: all)
  // Test seams, from the environment (run_train reads them; see train.cc):
  // DTRAIN_TEST_KILL_AT=rank:step[:always] -- that rank kills itself (SIGKILL) after
  // the step; only in its first incarnation (not after a launch restart) unless :always;
  // DTRAIN_TEST_COMMIT_DELAY_MS=n -- every rank waits n ms between writing its
  // shard and CommitShard (a window to kill a worker mid-checkpoint), and as long
  // when the coordinator cannot be reached and the checkpoint is skipped.
  // DTRAIN_TEST_STALL_AT=rank:seq -- that rank holds before its collective #seq (the
  // inspector's fault-injection hook, comm/inspector.h) until aborted or --timeout.
  int test_kill_rank = -1;
  int64_t test_kill_step = -1;
  int test_stall_rank = -1;
  uint64_t test_stall_at = 0;
  int64_t test_commit_delay_ms = 0;
  // DTRAIN_TEST_SIGNAL_AT=rank:step -- that rank sends itself SIGUSR1 after the step.
  int test_signal_rank = -1;
  int64_t test_signal_step = -1;
  std::string augment;      // --augment crop:2,flip,rotate:10 (data/augment.h); empty: none
  int augment_threads = 1;  // --augment-threads
  // Transfer learning (transfer.h): --init-from, --name-map, --freeze, --reset-head;
  // --classes restricts the data to some digits (labels kept).
  TransferOptions transfer;
  std::string classes;
};

struct TrainResult {
  int64_t steps = 0;
  double final_loss = 0;
  double test_accuracy = 0;
  double samples_per_s = 0;
  double seconds = 0;
  bool generated_data = false;
  int world_size = 1;
  std::string metrics_path;
  std::string stopped_by;  // "SIGUSR1" when a signal stopped it after the final checkpoint
};

TrainResult run_train(const TrainConfig& config);

}  // namespace dtrain::cli
