// PGM/PPM and PNG files, and the image-folder data set (image_folder.h).
#include "dtrain/engine/data/image_folder.h"

#include <fmt/format.h>
#include <png.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "dtrain/common/error.h"

namespace dtrain::data {

namespace fs = std::filesystem;

namespace {

std::string lower_ext(const fs::path& p) {
  std::string e = p.extension().string();
  std::transform(e.begin(), e.end(), e.begin(), [](unsigned char c) { return std::tolower(c); });
  return e;
}

bool is_pnm(const std::string& ext) { return ext == ".pgm" || ext == ".ppm" || ext == ".pnm"; }

// The next header token of a PNM file, skipping whitespace and # comments.
std::string pnm_token(const std::string& bytes, size_t& pos) {
  for (;;) {
    while (pos < bytes.size() && std::isspace(static_cast<unsigned char>(bytes[pos]))) ++pos;
    if (pos < bytes.size() && bytes[pos] == '#') {
      while (pos < bytes.size() && bytes[pos] != '\n') ++pos;
      continue;
    }
    break;
  }
  size_t start = pos;
  while (pos < bytes.size() && !std::isspace(static_cast<unsigned char>(bytes[pos]))) ++pos;
  return bytes.substr(start, pos - start);
}

int64_t pnm_int(const std::string& path, const std::string& bytes, size_t& pos, const char* what) {
  std::string t = pnm_token(bytes, pos);
  DTRAIN_CHECK(!t.empty() && t.size() < 10 && std::all_of(t.begin(), t.end(), ::isdigit),
               DataFormatError, "{}: bad PNM header ({} '{}')", path, what, t);
  return std::stoll(t);
}

Image read_pnm(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  DTRAIN_CHECK(f.good(), IoError, "cannot read image {}", path);
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  size_t pos = 0;
  std::string magic = pnm_token(bytes, pos);
  DTRAIN_CHECK(magic == "P5" || magic == "P6", DataFormatError,
               "{}: not a binary PGM/PPM (magic '{}', expected P5 or P6)", path, magic);
  Image img;
  img.channels = magic == "P5" ? 1 : 3;
  img.width = pnm_int(path, bytes, pos, "width");
  img.height = pnm_int(path, bytes, pos, "height");
  int64_t maxval = pnm_int(path, bytes, pos, "maxval");
  DTRAIN_CHECK(maxval == 255, DataFormatError, "{}: maxval {} (only 8-bit, 255, is read)", path,
               maxval);
  DTRAIN_CHECK(img.width > 0 && img.height > 0, DataFormatError, "{}: empty image", path);
  ++pos;  // the single whitespace byte after maxval
  const int64_t n = img.channels * img.height * img.width;
  DTRAIN_CHECK(static_cast<int64_t>(bytes.size()) - static_cast<int64_t>(pos) == n, DataFormatError,
               "{}: {} pixel bytes for {}x{}x{}, expected {}", path,
               static_cast<int64_t>(bytes.size()) - static_cast<int64_t>(pos), img.channels,
               img.height, img.width, n);
  img.pixels.resize(static_cast<size_t>(n));
  const auto* src = reinterpret_cast<const uint8_t*>(bytes.data() + pos);
  const int64_t hw = img.height * img.width;
  for (int64_t i = 0; i < hw; ++i) {  // interleaved HWC -> planar CHW
    for (int64_t c = 0; c < img.channels; ++c) img.pixels[c * hw + i] = src[i * img.channels + c];
  }
  return img;
}

Image read_png(const std::string& path) {
  png_image png;
  std::memset(&png, 0, sizeof(png));
  png.version = PNG_IMAGE_VERSION;
  DTRAIN_CHECK(png_image_begin_read_from_file(&png, path.c_str()) != 0, DataFormatError,
               "{}: cannot read as PNG: {}", path, png.message);
  const bool colour = (png.format & PNG_FORMAT_FLAG_COLOR) != 0;
  png.format = colour ? PNG_FORMAT_RGB : PNG_FORMAT_GRAY;
  Image img;
  img.channels = colour ? 3 : 1;
  img.height = png.height;
  img.width = png.width;
  std::vector<uint8_t> hwc(PNG_IMAGE_SIZE(png));
  bool ok = png_image_finish_read(&png, nullptr, hwc.data(), 0, nullptr) != 0;
  std::string message = png.message;
  png_image_free(&png);
  DTRAIN_CHECK(ok, DataFormatError, "{}: cannot decode PNG: {}", path, message);
  const int64_t hw = img.height * img.width;
  img.pixels.resize(hwc.size());
  for (int64_t i = 0; i < hw; ++i) {
    for (int64_t c = 0; c < img.channels; ++c) img.pixels[c * hw + i] = hwc[i * img.channels + c];
  }
  return img;
}

bool is_image(const fs::path& p) {
  std::string e = lower_ext(p);
  return is_pnm(e) || e == ".png";
}

}  // namespace

std::string Image::size_str() const {
  return fmt::format("{}x{}x{} (CxHxW)", channels, height, width);
}

Image read_image(const std::string& path) {
  std::string e = lower_ext(path);
  if (is_pnm(e)) return read_pnm(path);
  if (e == ".png") return read_png(path);
  DTRAIN_THROW(DataFormatError, "{}: unknown image type '{}' (expected .pgm, .ppm, .pnm or .png)",
               path, e);
}

void write_pnm(const std::string& path, const Image& image) {
  DTRAIN_CHECK(image.channels == 1 || image.channels == 3, InvalidArgument,
               "write_pnm {}: 1 or 3 channels, got {}", path, image.channels);
  const int64_t hw = image.height * image.width;
  std::string body(static_cast<size_t>(hw * image.channels), '\0');
  for (int64_t i = 0; i < hw; ++i) {
    for (int64_t c = 0; c < image.channels; ++c)
      body[i * image.channels + c] = static_cast<char>(image.pixels[c * hw + i]);
  }
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    f << (image.channels == 1 ? "P5" : "P6") << "\n"
      << image.width << " " << image.height << "\n255\n";
    f.write(body.data(), static_cast<std::streamsize>(body.size()));
    DTRAIN_CHECK(f.good(), IoError, "cannot write {}", tmp);
  }
  fs::rename(tmp, path);
}

ImageFolderDataset::ImageFolderDataset(const std::string& root,
                                       const std::function<void(int64_t, int64_t)>& progress)
    : data_(load(root, classes_, progress)) {}

TensorDataset ImageFolderDataset::load(const std::string& root, std::vector<std::string>& classes,
                                       const std::function<void(int64_t, int64_t)>& progress) {
  DTRAIN_CHECK(fs::is_directory(root), IoError, "imagefolder {}: not a folder", root);
  std::vector<fs::path> dirs;
  for (const auto& e : fs::directory_iterator(root))
    if (e.is_directory()) dirs.push_back(e.path());
  std::sort(dirs.begin(), dirs.end());
  std::vector<std::pair<fs::path, int64_t>> files;
  for (const fs::path& d : dirs) {
    std::vector<fs::path> mine;
    for (const auto& e : fs::directory_iterator(d))
      if (e.is_regular_file() && is_image(e.path())) mine.push_back(e.path());
    if (mine.empty()) continue;
    std::sort(mine.begin(), mine.end());
    for (const fs::path& p : mine) files.emplace_back(p, static_cast<int64_t>(classes.size()));
    classes.push_back(d.filename().string());
  }
  DTRAIN_CHECK(!files.empty(), IoError,
               "imagefolder {}: no images (expected {}/<class>/<name>.pgm|.ppm|.png)", root, root);
  Image first = read_image(files[0].first.string());
  const int64_t n = static_cast<int64_t>(files.size()),
                chw = static_cast<int64_t>(first.pixels.size());
  Tensor images = empty({n, first.channels, first.height, first.width});
  Tensor labels = empty({n}, TensorOptions{}.with_dtype(DType::i64));
  if (progress) progress(0, n);
  for (int64_t i = 0; i < n; ++i) {
    Image img = i == 0 ? first : read_image(files[i].first.string());
    DTRAIN_CHECK(
        img.channels == first.channels && img.height == first.height && img.width == first.width,
        DataFormatError, "imagefolder: {} is {}, but {} is {}; all images must agree",
        files[i].first.string(), img.size_str(), files[0].first.string(), first.size_str());
    float* dst = images.data<float>() + i * chw;
    for (int64_t k = 0; k < chw; ++k) dst[k] = static_cast<float>(img.pixels[k]) / 255.0f;
    labels.data<int64_t>()[i] = files[i].second;
    if (progress) progress(i + 1, n);
  }
  return TensorDataset(images, labels);
}

}  // namespace dtrain::data
