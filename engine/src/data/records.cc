// The binary record file (records.h).
#include "dtrain/engine/data/records.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string_view>

#include "dtrain/common/error.h"

namespace dtrain::data {

namespace {

template <typename T>
T get_le(const uint8_t* p) {
  T v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v |= static_cast<T>(p[i]) << (8 * i);
  return v;
}

template <typename T>
void put_le(std::string& out, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

int64_t label_at(const Tensor& labels, int64_t i) {
  if (labels.dtype() == DType::u8) return labels.data<uint8_t>()[i];
  return labels.data<int64_t>()[i];
}

}  // namespace

void write_records(const std::string& path, const Tensor& images, const Tensor& labels,
                   int64_t classes) {
  DTRAIN_CHECK(images.dtype() == DType::u8 && images.dim() == 4, InvalidArgument,
               "write_records {}: images must be u8 [N,C,H,W], got {} {}", path,
               dtype_name(images.dtype()), shape_str(images.shape()));
  DTRAIN_CHECK(labels.dim() == 1 && labels.size(0) == images.size(0) &&
                   (labels.dtype() == DType::i64 || labels.dtype() == DType::u8),
               InvalidArgument, "write_records {}: labels must be i64 or u8 [{}]", path,
               images.size(0));
  Tensor img = images.contiguous(), lab = labels.contiguous();
  const int64_t n = img.size(0), chw = img.numel() / std::max<int64_t>(n, 1);
  std::string out(kRecordMagic, 8);
  for (int64_t d = 1; d < 4; ++d) put_le<uint32_t>(out, static_cast<uint32_t>(img.size(d)));
  put_le<uint32_t>(out, static_cast<uint32_t>(classes));
  put_le<uint64_t>(out, static_cast<uint64_t>(n));
  const auto* px = img.data<uint8_t>();
  for (int64_t i = 0; i < n; ++i) {
    int64_t y = label_at(lab, i);
    DTRAIN_CHECK(y >= 0 && y < classes, InvalidArgument,
                 "write_records {}: label {} of record {} "
                 "is outside [0, {})",
                 path, y, i, classes);
    put_le<uint32_t>(out, static_cast<uint32_t>(y));
    out.append(reinterpret_cast<const char*>(px + i * chw), static_cast<size_t>(chw));
  }
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    f.write(out.data(), static_cast<std::streamsize>(out.size()));
    DTRAIN_CHECK(f.good(), IoError, "cannot write {}", tmp);
  }
  std::filesystem::rename(tmp, path);
}

RecordDataset::RecordDataset(const std::string& path) : data_(load(path, classes_)) {}

TensorDataset RecordDataset::load(const std::string& path, int64_t& classes) {
  std::ifstream f(path, std::ios::binary);
  DTRAIN_CHECK(f.good(), IoError, "records {}: cannot read the file", path);
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  DTRAIN_CHECK(bytes.size() >= static_cast<size_t>(kRecordHeaderBytes) &&
                   std::memcmp(bytes.data(), kRecordMagic, 8) == 0,
               DataFormatError,
               "records {}: not a record file (expected the magic DTRREC01 and a "
               "32-byte header, see dtrain/engine/data/records.h)",
               path);
  const auto* h = reinterpret_cast<const uint8_t*>(bytes.data());
  const int64_t c = get_le<uint32_t>(h + 8), hh = get_le<uint32_t>(h + 12),
                w = get_le<uint32_t>(h + 16);
  classes = get_le<uint32_t>(h + 20);
  const auto n = static_cast<int64_t>(get_le<uint64_t>(h + 24));
  DTRAIN_CHECK(c > 0 && hh > 0 && w > 0 && classes > 0 && n >= 0 && n < (int64_t{1} << 40),
               DataFormatError, "records {}: bad header (C {}, H {}, W {}, classes {}, N {})", path,
               c, hh, w, classes, n);
  const int64_t chw = c * hh * w, record = 4 + chw;
  const int64_t expected = kRecordHeaderBytes + n * record;
  DTRAIN_CHECK(static_cast<int64_t>(bytes.size()) == expected, DataFormatError,
               "records {}: {} bytes, but the header ({} records of {}x{}x{}) needs {}", path,
               bytes.size(), n, c, hh, w, expected);
  Tensor images = empty({n, c, hh, w});
  Tensor labels = empty({n}, TensorOptions{}.with_dtype(DType::i64));
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* r = h + kRecordHeaderBytes + i * record;
    int64_t y = get_le<uint32_t>(r);
    DTRAIN_CHECK(y < classes, DataFormatError, "records {}: record {} has label {}, classes = {}",
                 path, i, y, classes);
    labels.data<int64_t>()[i] = y;
    float* dst = images.data<float>() + i * chw;
    for (int64_t k = 0; k < chw; ++k) dst[k] = static_cast<float>(r[4 + k]) / 255.0f;
  }
  return TensorDataset(images, labels);
}

}  // namespace dtrain::data
