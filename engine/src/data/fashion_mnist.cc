// Fashion-MNIST from the Debian package (fashion_mnist.h).
#include "dtrain/engine/data/fashion_mnist.h"

#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <vector>

#include "dtrain/common/error.h"
#include "dtrain/engine/data/mnist.h"

namespace dtrain::data {

namespace fs = std::filesystem;

void gunzip_file(const std::string& from, const std::string& to) {
  gzFile in = gzopen(from.c_str(), "rb");
  DTRAIN_CHECK(in != nullptr, IoError, "cannot open {}", from);
  std::string tmp = to + ".tmp";
  std::ofstream out(tmp, std::ios::binary);
  std::vector<char> buf(1 << 16);
  int n = 0;
  while ((n = gzread(in, buf.data(), static_cast<unsigned>(buf.size()))) > 0)
    out.write(buf.data(), n);
  int err = Z_OK;
  std::string message = gzerror(in, &err);  // a truncated stream ends with n == 0 and an error
  gzclose(in);
  DTRAIN_CHECK(n == 0 && (err == Z_OK || err == Z_STREAM_END), DataFormatError,
               "{}: corrupt gzip stream: {}", from, message);
  out.close();
  DTRAIN_CHECK(out.good(), IoError, "cannot write {}", tmp);
  fs::rename(tmp, to);
}

std::string prepare_fashion_mnist(const std::string& data_dir, const std::string& source_dir,
                                  const std::function<void(uint64_t, uint64_t)>& progress) {
  const std::string dir = (fs::path(data_dir) / "fashion-mnist").string();
  if (check_mnist_folder(dir, 60000, 10000).empty()) return dir;
  fs::create_directories(dir);
  const char* names[] = {"train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"};
  uint64_t total = 0, done = 0;
  for (const char* name : names) {
    fs::path gz = fs::path(source_dir) / (std::string(name) + ".gz");
    DTRAIN_CHECK(fs::exists(gz), IoError,
                 "--data fashion-mnist: {} not found; install the Debian package "
                 "dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
                 gz.string());
    total += fs::file_size(gz);
  }
  if (progress) progress(0, total);
  for (const char* name : names) {
    fs::path gz = fs::path(source_dir) / (std::string(name) + ".gz");
    gunzip_file(gz.string(), (fs::path(dir) / name).string());
    done += fs::file_size(gz);
    if (progress) progress(done, total);
  }
  std::string why = check_mnist_folder(dir, 60000, 10000);
  DTRAIN_CHECK(why.empty(), DataFormatError, "--data fashion-mnist: unpacked files in {}: {}", dir,
               why);
  return dir;
}

}  // namespace dtrain::data
