// IDX files: the container format of MNIST (http://yann.lecun.com/exdb/mnist/).
//
// An IDX file is a big-endian header -- two zero bytes, a type byte (0x08 =
// unsigned byte), a dimension count, then one 32-bit size per dimension -- followed
// by the raw elements in row-major order. MNIST images are 0x00000803 ([N,28,28])
// and labels 0x00000801 ([N]). This reader and writer are generic over the number
// of dimensions but handle only the unsigned-byte type, the only one MNIST uses;
// gzip'd files are not read (unpack them first).
//
// Errors: a missing or unreadable file is an IoError naming the path; a bad magic
// number, an unsupported type, a truncated body or trailing bytes are a
// DataFormatError naming the file and what is wrong.
//
// Thread-safety: the functions are independent; they share no state.
#pragma once

#include <cstdint>
#include <string>

#include "dtrain/engine/tensor.h"

namespace dtrain::data {

inline constexpr uint32_t kIdxMagicU8Labels = 0x00000801;  // u8, 1 dimension
inline constexpr uint32_t kIdxMagicU8Images = 0x00000803;  // u8, 3 dimensions

// The contents of one IDX file.
struct IdxArray {
  Tensor data;  // u8, contiguous, on the CPU, shape == shape
  Shape shape;  // the dimensions from the header, e.g. [60000,28,28]
};

// Reads any unsigned-byte IDX file.
IdxArray read_idx(const std::string& path);
// Reads an image file: magic 0x00000803, shape [N,H,W].
IdxArray read_idx_images(const std::string& path);
// Reads a label file: magic 0x00000801, shape [N].
IdxArray read_idx_labels(const std::string& path);
// Reads an image file and its label file and checks that the counts agree.
struct IdxImagesLabels {
  IdxArray images;  // [N,H,W]
  IdxArray labels;  // [N]
};
IdxImagesLabels read_idx_pair(const std::string& images_path, const std::string& labels_path);

// Writes a u8 tensor (1 to 255 dimensions, each < 2^31) as an IDX file. The data
// goes to a temporary file in the same folder, is flushed to disk, then renamed
// over `path`, so a reader never sees a half-written file.
void write_idx(const std::string& path, const Tensor& data);

}  // namespace dtrain::data
