// A simple binary record file: a fixed header, then fixed-size records of one label
// and one 8-bit image each, so any tool (a few lines of Python's struct) can write it.
//
// Layout, all integers little-endian:
//   offset 0   8 bytes  magic "DTRREC01"
//   offset 8   u32      channels C
//   offset 12  u32      height H
//   offset 16  u32      width W
//   offset 20  u32      classes K (labels are in [0, K))
//   offset 24  u64      record count N
//   offset 32  N records of 4 + C*H*W bytes: u32 label, then the pixels (u8, CHW)
// The file size must be exactly 32 + N * (4 + C*H*W).
//
// RecordDataset reads the whole file into f32 [N,C,H,W] in [0,1] and i64 [N] labels.
// Errors name the file and what is wrong (bad magic, truncated or trailing bytes,
// a label >= K with its record index).
// Thread-safety: the functions share no state; the data set is immutable.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "dtrain/engine/data/loader.h"

namespace dtrain::data {

inline constexpr char kRecordMagic[8] = {'D', 'T', 'R', 'R', 'E', 'C', '0', '1'};
inline constexpr int64_t kRecordHeaderBytes = 32;

// images u8 [N,C,H,W], labels i64/u8 [N] in [0, classes). tmp + rename.
void write_records(const std::string& path, const Tensor& images, const Tensor& labels,
                   int64_t classes);

class RecordDataset : public Dataset {
 public:
  // Throws IoError (unreadable) or DataFormatError naming the file.
  explicit RecordDataset(const std::string& path);
  int64_t size() const override { return data_.size(); }
  Batch get_batch(std::span<const int64_t> indices) const override {
    return data_.get_batch(indices);
  }
  int64_t num_classes() const { return classes_; }
  const Tensor& images() const { return data_.inputs(); }
  const Tensor& labels() const { return data_.targets(); }

 private:
  static TensorDataset load(const std::string& path, int64_t& classes);
  int64_t classes_ = 0;
  TensorDataset data_;
};

}  // namespace dtrain::data
