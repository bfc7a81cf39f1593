// The TensorBoard event writer (launcher/src/tensorboard.h): CRC-32C against the
// published check values (RFC 3720 B.4 and the "123456789" check), one TFRecord
// framed byte for byte, an Event encoded byte for byte as protobuf would, the
// writer's file and its error on a path it cannot create. The end-to-end check
// against an independent reader is tests/tensorboard/test_events.py (ctest
// TensorboardEvents).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "dtrain/common/error.h"
#include "dtrain/engine/nn/layers.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/random.h"
#include "subprocess.h"
#include "tensorboard.h"

namespace {

using dtrain::cli::crc32c;
namespace fs = std::filesystem;

std::string bytes(std::initializer_list<int> v) {
  std::string s;
  for (int b : v) s.push_back(static_cast<char>(b));
  return s;
}

TEST(Crc32c, KnownVectors) {
  EXPECT_EQ(crc32c("123456789"), 0xE3069283u);
  EXPECT_EQ(crc32c(""), 0u);
  EXPECT_EQ(crc32c(std::string(32, '\0')), 0x8A9136AAu);
  EXPECT_EQ(crc32c(std::string(32, '\xff')), 0x62A8AB43u);
  std::string ascending;
  for (int i = 0; i < 32; ++i) ascending.push_back(static_cast<char>(i));
  EXPECT_EQ(crc32c(ascending), 0x46DD794Eu);
}

TEST(Crc32c, MaskIsTfRecords) {
  const uint32_t c = crc32c("abc");
  EXPECT_EQ(dtrain::cli::masked_crc32c("abc"), ((c >> 15) | (c << 17)) + 0xa282ead8u);
}

TEST(TfRecord, FramedByteForByte) {
  // length 3 (LE u64), masked crc of those 8 bytes, "abc", masked crc of "abc"
  // (values from an independent bitwise CRC-32C).
  const std::string expected = bytes({0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xb0, 0x99,
                                      0x49, 0x0e, 0x61, 0x62, 0x63, 0x6e, 0x57, 0xf1, 0x21});
  const std::string got = dtrain::cli::frame_record("abc");
  EXPECT_EQ(got, expected);
}

TEST(EventEncoding, ScalarEventByteForByte) {
  // Event{wall_time: 1.5, step: 7, summary {value {tag: "a", simple_value: 2}}}
  const std::string expected =
      bytes({0x09, 0,    0,    0,    0,   0, 0, 0xf8, 0x3f,  // 1: double 1.5
             0x10, 0x07,                                     // 2: varint 7
             0x2a, 0x0a,                                     // 5: Summary, 10 bytes
             0x0a, 0x08,                                     //   1: Value, 8 bytes
             0x0a, 0x01, 'a',                                //     1: "a"
             0x15, 0x00, 0x00, 0x00, 0x40});                 //     2: float 2.0
  EXPECT_EQ(dtrain::cli::scalars_event(1.5, 7, {{"a", 2.0f}}), expected);
}

TEST(EventEncoding, FileVersionEvent) {
  const std::string e = dtrain::cli::file_version_event(0.0);
  EXPECT_EQ(e, bytes({0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0x1a, 13}) + "brain.Event:2");
}

TEST(EventEncoding, SessionStartEvent) {
  // Event{wall_time: 0, step: 20, session_log {status: START}}
  EXPECT_EQ(dtrain::cli::session_start_event(0.0, 20),
            bytes({0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 20, 0x3a, 0x02, 0x08, 0x01}));
}

TEST(EventWriter, FileHoldsFramedRecords) {
  const fs::path dir = dtrain::testing::scratch_dir("dtrain_test_tensorboard", "writer");
  const std::string path = (dir / "events.out.tfevents.test").string();
  {
    dtrain::cli::EventWriter w(path);
    w.add_scalars(3, {{"train/loss", 0.25f}}, 10.0);
    w.flush();
  }
  std::ifstream in(path, std::ios::binary);
  const std::string file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string first = dtrain::cli::frame_record(dtrain::cli::file_version_event(0));
  ASSERT_GE(file.size(), first.size());
  const std::string second =
      dtrain::cli::frame_record(dtrain::cli::scalars_event(10.0, 3, {{"train/loss", 0.25f}}));
  EXPECT_EQ(file.size(), first.size() + second.size());
  EXPECT_EQ(file.substr(file.size() - second.size()), second);
}

TEST(EventWriter, UncreatableFileNamesThePath) {
  try {
    dtrain::cli::EventWriter w("/nonexistent-dir/sub/events.out.tfevents.x");
    FAIL() << "no error";
  } catch (const dtrain::Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent-dir/sub/events.out.tfevents.x"),
              std::string::npos)
        << e.what();
  }
}

TEST(TensorboardDir, FlagOrBesideTheMetrics) {
  EXPECT_EQ(dtrain::cli::tensorboard_dir("none", "runs/a/metrics.jsonl"), "");
  EXPECT_EQ(dtrain::cli::tensorboard_dir("", "runs/a/metrics.jsonl"), "runs/a");
  EXPECT_EQ(dtrain::cli::tensorboard_dir("", "metrics.jsonl"), ".");
  EXPECT_EQ(dtrain::cli::tensorboard_dir("tb", "runs/a/metrics.jsonl"), "tb");
}

// loss = sum over parameters of sum(p * p): every gradient is 2p, so the norm is 2 |p|.
TEST(GradientNorm, IsTheL2NormOfEveryGradient) {
  dtrain::Generator gen(3);
  dtrain::nn::Linear lin(3, 2, gen);
  dtrain::Tensor loss;
  double squares = 0;
  for (const dtrain::Tensor& p : lin.parameters()) {
    dtrain::Tensor term = dtrain::sum(dtrain::mul(p, p));
    loss = loss.defined() ? dtrain::add(loss, term) : term;
    const float* d = p.data<float>();
    for (int64_t i = 0; i < p.numel(); ++i) squares += double(d[i]) * double(d[i]);
  }
  loss.backward();
  EXPECT_NEAR(dtrain::cli::gradient_norm(lin), 2 * std::sqrt(squares), 1e-5);
  lin.zero_grad();
  EXPECT_EQ(dtrain::cli::gradient_norm(lin), 0.0);
}

}  // namespace
