// The --data choices of `dtrain train` (image_data.h).
#include "image_data.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <filesystem>

#include "dtrain/common/error.h"
#include "dtrain/engine/data/fashion_mnist.h"
#include "dtrain/engine/data/image_folder.h"
#include "dtrain/engine/data/mnist.h"
#include "dtrain/engine/data/records.h"
#include "progress.h"

namespace dtrain::cli {

namespace {

namespace fs = std::filesystem;

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

// Rank 0 runs prep first (it may write a cache), the other ranks after the barrier.
template <typename F>
auto lead_first(comm::Communicator& comm, F prep) {
  decltype(prep(true)) result{};
  if (comm.rank() == 0) result = prep(true);
  comm.barrier();
  if (comm.rank() != 0) result = prep(false);
  return result;
}

ImageSplits idx_folder(const ImageDataOptions& o, ImageSplits s, float mean, float std) {
  data::MnistOptions test;
  test.mean = mean;
  test.std = std;
  test.normalize = o.normalize;
  data::MnistOptions train = test;
  if (o.raw_train) train.normalize = false;
  s.train = std::make_shared<data::MnistDataset>(s.dir, data::MnistSplit::kTrain, train);
  s.test = std::make_shared<data::MnistDataset>(s.dir, data::MnistSplit::kTest, test);
  s.has_stats = o.normalize;
  s.mean = mean;
  s.std = std;
  return s;
}

// Every 5th row (4, 9, ...) of a data set becomes the test split.
void hold_out(const data::TensorDataset& all, ImageSplits& s) {
  std::vector<int64_t> train, test;
  for (int64_t i = 0; i < all.size(); ++i) (i % 5 == 4 ? test : train).push_back(i);
  DTRAIN_CHECK(!test.empty() && !train.empty(), InvalidArgument,
               "--data {}: {} samples are too few to hold out a test split (need >= 5)", s.dir,
               all.size());
  auto take = [&](const std::vector<int64_t>& rows) {
    return std::make_shared<data::TensorDataset>(data::gather_rows(all.inputs(), rows),
                                                 data::gather_rows(all.targets(), rows));
  };
  s.train = take(train);
  s.test = take(test);
}

// The loading bar of one folder (rank 0 draws; progress.h).
ProgressFn loading_bar(const fs::path& dir, bool lead) {
  return progress_reporter({.label = "loading " + dir.string(), .unit = "images", .enabled = lead});
}

ImageSplits image_folder(const std::string& dir, bool lead) {
  ImageSplits s;
  s.dir = dir;
  if (fs::is_directory(fs::path(dir) / "train")) {
    const fs::path train_dir = fs::path(dir) / "train", test_dir = fs::path(dir) / "test";
    auto train = std::make_shared<data::ImageFolderDataset>(train_dir.string(),
                                                            loading_bar(train_dir, lead));
    auto test =
        std::make_shared<data::ImageFolderDataset>(test_dir.string(), loading_bar(test_dir, lead));
    DTRAIN_CHECK(train->classes() == test->classes(), DataFormatError,
                 "--data imagefolder:{}: train/ and test/ have different class folders", dir);
    s.source = fmt::format("image folder {} ({} classes)", dir, train->classes().size());
    s.train = train;
    s.test = test;
    return s;
  }
  data::ImageFolderDataset all(dir, loading_bar(dir, lead));
  s.source = fmt::format("image folder {} ({} classes, every 5th image held out)", dir,
                         all.classes().size());
  hold_out(data::TensorDataset(all.images(), all.labels()), s);
  return s;
}

ImageSplits records(const std::string& spec) {
  ImageSplits s;
  size_t colon = spec.find(':');
  s.dir = spec.substr(0, colon);
  auto train = std::make_shared<data::RecordDataset>(s.dir);
  if (colon != std::string::npos) {
    s.train = train;
    s.test = std::make_shared<data::RecordDataset>(spec.substr(colon + 1));
    s.source = fmt::format("records {} / {}", s.dir, spec.substr(colon + 1));
    return s;
  }
  s.source = fmt::format("records {} (every 5th record held out)", s.dir);
  hold_out(data::TensorDataset(train->images(), train->labels()), s);
  return s;
}

}  // namespace

ImageSplits load_image_splits(const ImageDataOptions& o, comm::Communicator& comm) {
  const data::MnistOptions mnist;
  if (o.data.empty()) {
    auto prep = lead_first(comm, [&](bool lead) {
      auto log = [lead](std::string_view line) {
        if (lead) spdlog::info("{}", line);
      };
      data::MnistSubsetOptions options;
      options.progress =
          progress_reporter({.label = "data mnist", .unit = "stages", .enabled = lead});
      return data::prepare_mnist_subset(o.data_cache, log, options);
    });
    return idx_folder(o, {.dir = prep.dir, .source = prep.source, .generated = prep.generated},
                      mnist.mean, mnist.std);
  }
  if (o.data == "fashion-mnist") {
    std::string dir = lead_first(comm, [&](bool lead) {
      return data::prepare_fashion_mnist(
          o.data_cache, data::kFashionMnistDebianDir,
          bytes_reporter({.label = "unpacking fashion-mnist", .enabled = lead}));
    });
    return idx_folder(o,
                      {.dir = dir,
                       .source = "Fashion-MNIST (Debian dataset-fashion-mnist, 60000 "
                                 "train / 10000 test)"},
                      data::kFashionMnistMean, data::kFashionMnistStd);
  }
  if (starts_with(o.data, "imagefolder:")) return image_folder(o.data.substr(12), comm.rank() == 0);
  if (starts_with(o.data, "records:")) return records(o.data.substr(8));
  return idx_folder(o, {.dir = o.data, .source = fmt::format("MNIST IDX files from {}", o.data)},
                    mnist.mean, mnist.std);
}

}  // namespace dtrain::cli
