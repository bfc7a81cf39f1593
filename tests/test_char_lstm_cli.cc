// `dtrain train --model char-lstm` and `dtrain generate` end to end: a short run on the
// fortunes corpus beats the unigram baseline computed on the same held-out characters;
// two workers through `dtrain launch` train the 1-worker model (every logged loss and
// the test perplexity within 1e-5, the bound the GPT's DDP tests use); a resumed
// --ckpt-dir run repeats the uninterrupted run's losses; generate prints the prompt and
// N characters of the corpus alphabet, the same for the same seed; bad input (another
// model's checkpoint, an unknown --cell, a checkpoint of another cell) is one line and
// a non-zero exit.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <string>

#include "dtrain/engine/nn/layers.h"
#include "dtrain/engine/serialize.h"
#include "subprocess.h"

#ifndef DTRAIN_BIN
#error "DTRAIN_BIN must point at the dtrain binary"
#endif

namespace fs = std::filesystem;

namespace {

using Result = dtrain::testing::CommandResult;

std::string bin() { return DTRAIN_BIN; }

fs::path scratch(const std::string& name) {
  return dtrain::testing::scratch_dir("dtrain_test_char_lstm_cli", name);
}

// 250 steps of a 2x64 LSTM on 16 windows of 32 characters: about 1.5 s here.
std::string lm_args(const fs::path& dir, const std::string& metrics, int steps = 250) {
  return " train --model char-lstm --no-progress --layers 2 --hidden 64 --seq-len 32 "
         "--batch 16 --lr 0.01 --log-every 10 --eval-windows 128 --max-steps " +
         std::to_string(steps) + " --data-cache " + (dir / "data").string() + " --metrics " +
         (dir / metrics).string();
}

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

std::map<int, double> logged_losses(const fs::path& path) {
  std::map<int, double> out;
  std::ifstream in(path);
  const std::regex row("\"loss\":([-0-9.e+]+).*\"step\":([0-9]+)");
  std::smatch m;
  for (std::string line; std::getline(in, line);) {
    if (std::regex_search(line, m, row)) out[std::stoi(m[2])] = std::stod(m[1]);
  }
  return out;
}

// A number of the evaluation line ("test_ppl", "unigram_ppl") of a metrics.jsonl.
double eval_metric(const fs::path& path, const std::string& name) {
  std::ifstream in(path);
  const std::regex field("\"" + name + "\":([-0-9.e+]+)");
  std::smatch m;
  for (std::string line; std::getline(in, line);) {
    if (std::regex_search(line, m, field)) return std::stod(m[1]);
  }
  ADD_FAILURE() << "no " << name << " in " << path;
  return 0;
}

void expect_same_losses(const std::map<int, double>& a, const std::map<int, double>& b,
                        const std::string& what) {
  ASSERT_FALSE(b.empty()) << what;
  for (const auto& [step, loss] : b) {
    ASSERT_TRUE(a.count(step)) << what << " step " << step;
    EXPECT_NEAR(a.at(step), loss, 1e-5 * loss) << what << " step " << step;
  }
}

TEST(CharLstmDemo, BeatsUnigramTwoWorkersMatchOneAndGenerates) {
  const fs::path dir = scratch("demo");
  const std::string ckpt = (dir / "lm.dtrn").string();
  Result one = dtrain::testing::run_command(bin() + lm_args(dir, "one.jsonl") + " --save " + ckpt);
  ASSERT_EQ(one.code, 0) << one.out;
  EXPECT_TRUE(contains(one.out, "perplexity")) << one.out;
  const double ppl = eval_metric(dir / "one.jsonl", "test_ppl");
  const double unigram = eval_metric(dir / "one.jsonl", "unigram_ppl");
  EXPECT_LT(ppl, 0.6 * unigram) << one.out;  // here: about 12 against 31

  Result two = dtrain::testing::run_command(bin() + " launch --nproc 2 -- " + bin() +
                                            lm_args(dir, "two.jsonl"));
  ASSERT_EQ(two.code, 0) << two.out;
  expect_same_losses(logged_losses(dir / "one.jsonl"), logged_losses(dir / "two.jsonl"),
                     "2 workers");
  EXPECT_NEAR(eval_metric(dir / "two.jsonl", "test_ppl"), ppl, 1e-5 * ppl);
  EXPECT_EQ(eval_metric(dir / "two.jsonl", "unigram_ppl"), unigram);

  std::set<char> alphabet;
  {
    std::ifstream corpus(dir / "data" / "fortunes" / "corpus.txt", std::ios::binary);
    for (char c; corpus.get(c);) alphabet.insert(c);
  }
  const std::string gen = bin() + " generate --ckpt " + ckpt + " --prompt 'The ' --length 60 ";
  Result a = dtrain::testing::run_command(gen + "--temperature 0.8 --seed 5 2>/dev/null");
  Result b = dtrain::testing::run_command(gen + "--temperature 0.8 --seed 5 2>/dev/null");
  ASSERT_EQ(a.code, 0) << a.out;
  EXPECT_EQ(a.out, b.out);
  ASSERT_EQ(a.out.size(), 4u + 60u + 1u) << a.out;  // prompt, 60 characters, newline
  EXPECT_EQ(a.out.rfind("The ", 0), 0u) << a.out;
  for (size_t i = 4; i < 64; ++i) EXPECT_TRUE(alphabet.count(a.out[i])) << int(a.out[i]);
}

// A --ckpt-dir run resumed from its middle checkpoint logs the uninterrupted losses.
TEST(CharLstmCheckpoint, ResumeRepeatsTheUninterruptedRun) {
  const fs::path dir = scratch("resume");
  const std::string args = lm_args(dir, "a.jsonl", 60) +
                           " --cell gru --ckpt-every 30 "
                           "--keep 0 --ckpt-dir " +
                           (dir / "ckpt").string();
  Result a = dtrain::testing::run_command(bin() + args);
  ASSERT_EQ(a.code, 0) << a.out;
  ASSERT_TRUE(fs::exists(dir / "ckpt" / "step-00000030")) << a.out;
  fs::copy_file(dir / "a.jsonl", dir / "full.jsonl");
  Result b = dtrain::testing::run_command(bin() + args + " --resume step-00000030");
  ASSERT_EQ(b.code, 0) << b.out;
  std::map<int, double> full = logged_losses(dir / "full.jsonl"),
                        resumed = logged_losses(dir / "a.jsonl");
  for (int step = 40; step <= 60; step += 10) {
    EXPECT_EQ(resumed.at(step), full.at(step)) << "step " << step;
  }
  Result other = dtrain::testing::run_command(bin() + lm_args(dir, "c.jsonl", 60) +
                                              " --cell lstm --resume auto "
                                              "--ckpt-dir " +
                                              (dir / "ckpt").string());
  EXPECT_NE(other.code, 0) << other.out;
  EXPECT_TRUE(contains(other.out, "weight_ih_l0")) << other.out;
}

TEST(CharLstmCli, BadInputIsOneLine) {
  const fs::path dir = scratch("bad");
  Result cell = dtrain::testing::run_command(bin() + lm_args(dir, "m.jsonl") + " --cell rnn");
  EXPECT_NE(cell.code, 0);
  EXPECT_TRUE(contains(cell.out, "unknown recurrent cell 'rnn': expected lstm or gru")) << cell.out;
  // Another model's checkpoint, as `dtrain train --model mlp --save` writes it.
  const std::string mlp = (dir / "mlp.dtrn").string();
  dtrain::Generator gen(1);
  dtrain::nn::Linear linear(784, 10, gen);
  dtrain::save_checkpoint(mlp, linear, nullptr, {{"model", "mlp"}, {"step", 1}});
  Result g = dtrain::testing::run_command(bin() + " generate --length 5 --ckpt " + mlp);
  EXPECT_NE(g.code, 0);
  EXPECT_TRUE(contains(g.out, "not a GPT or char-lstm checkpoint (model 'mlp')")) << g.out;
}

}  // namespace
