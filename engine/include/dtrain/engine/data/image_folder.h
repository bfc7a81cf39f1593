// Image files and the image-folder data set (torchvision's ImageFolder layout).
//
// read_image() reads one 8-bit image: binary PGM/PPM (P5 grey, P6 RGB, maxval 255)
// or PNG (libpng; grey stays 1 channel, anything with colour becomes RGB, alpha is
// dropped). ImageFolderDataset loads root/<class>/<file> for every class folder,
// classes numbered in sorted name order (as torchvision), files sorted by name;
// files with other extensions are skipped. Every image must have the size and channel
// count of the first one: a different one is one DataFormatError naming the file and
// both sizes ("root/cat/b.pgm is 1x32x32 (CxHxW), but root/ant/a.pgm is 1x28x28").
// Images become f32 [N,C,H,W] in [0,1], labels i64 [N], held in memory.
//
// Deliberately not here: JPEG, resizing (sizes must agree), lazy loading.
// Thread-safety: the functions share no state; the data set is immutable.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "dtrain/engine/data/loader.h"

namespace dtrain::data {

struct Image {
  int64_t channels = 0, height = 0, width = 0;
  std::vector<uint8_t> pixels;   // C planes of H x W (CHW)
  std::string size_str() const;  // "1x28x28 (CxHxW)"
};

// By extension: .pgm/.ppm/.pnm or .png. Throws IoError (unreadable) or
// DataFormatError (malformed, 16-bit, unknown extension) naming the file.
Image read_image(const std::string& path);
// Writes a binary PGM (1 channel) or PPM (3 channels), tmp + rename.
void write_pnm(const std::string& path, const Image& image);

class ImageFolderDataset : public Dataset {
 public:
  // Throws IoError when root has no class folder with images, DataFormatError as above.
  // `progress` (when set) hears (images read, images in all) as they load: 0 first.
  explicit ImageFolderDataset(const std::string& root,
                              const std::function<void(int64_t, int64_t)>& progress = {});
  int64_t size() const override { return data_.size(); }
  Batch get_batch(std::span<const int64_t> indices) const override {
    return data_.get_batch(indices);
  }
  const std::vector<std::string>& classes() const { return classes_; }
  const Tensor& images() const { return data_.inputs(); }   // f32 [N,C,H,W]
  const Tensor& labels() const { return data_.targets(); }  // i64 [N]

 private:
  static TensorDataset load(const std::string& root, std::vector<std::string>& classes,
                            const std::function<void(int64_t, int64_t)>& progress);
  std::vector<std::string> classes_;
  TensorDataset data_;
};

}  // namespace dtrain::data
