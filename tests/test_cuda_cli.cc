// The CLI side of the CUDA backend, end to end through the dtrain binary: `dtrain
// doctor` prints the versions, one table of every op against the CPU reference and,
// without a GPU, says so; `dtrain train --device cuda` without a GPU fails with one
// line naming the driver's reason, and a malformed --device is refused.
#include <gtest/gtest.h>

#include <string>

#include "dtrain/engine/cuda/runtime.h"
#include "subprocess.h"

namespace dtrain {
namespace {

using testing::CommandResult;
using testing::run_command;

const std::string kBin = DTRAIN_BIN;

int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

TEST(DoctorCli, PrintsVersionsAndOneTable) {
  CommandResult r = run_command(kBin + " doctor --only cpu", 300);
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("cuDNN:"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("NCCL:"), std::string::npos) << r.out;
  for (const char* op : {"add [7,1,13]+[5,1]", "softmax(dim=0)", "cross_entropy", "matmul",
                         "conv2d", "lstm", "adamw"}) {
    EXPECT_NE(r.out.find(op), std::string::npos) << op << "\n" << r.out;
  }
  EXPECT_EQ(r.out.find("FAIL"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(" 0 failed"), std::string::npos) << r.out;
}

TEST(DoctorCli, SaysWhenNoGpuIsFound) {
  if (cuda::device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  CommandResult r = run_command(kBin + " doctor", 300);
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("no GPU found (no CUDA device: " + cuda::device_error() + ")"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("no GPU found: checked the CPU backend only"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("cuda:0"), std::string::npos) << r.out;
}

TEST(TrainCli, DeviceCudaWithoutGpuIsOneLine) {
  if (cuda::device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  CommandResult r = run_command(kBin + " train --device cuda --epochs 1", 120);
  EXPECT_NE(r.code, 0);
  EXPECT_EQ(count_lines(r.out), 1) << r.out;
  EXPECT_NE(r.out.find("no CUDA device: " + cuda::device_error()), std::string::npos) << r.out;
}

// On a GPU the augmentation runs on the device batch (mnist_source.h); the bytes are
// the CPU's (Augment.CudaMatchesCpuBitForBit), so the run trains like the CPU one.
TEST(TrainCli, DeviceCudaAugmentsOnTheGpuAndLearns) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device: " << cuda::device_error();
  CommandResult r =
      run_command(kBin + " train --device cuda --epochs 1 --augment crop:2,flip,rotate:10", 300);
  ASSERT_EQ(r.code, 0) << r.out;
  const size_t at = r.out.find("test accuracy ");
  ASSERT_NE(at, std::string::npos) << r.out;
  EXPECT_GT(std::stod(r.out.substr(at + 14)), 0.8) << r.out;
}

TEST(TrainCli, MalformedDeviceIsRefused) {
  CommandResult r = run_command(kBin + " train --device gpu0 --epochs 1", 120);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("device 'gpu0': expected cpu, cuda or cuda:N"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace dtrain
