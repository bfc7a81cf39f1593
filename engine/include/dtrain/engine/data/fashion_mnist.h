// Fashion-MNIST (Zalando; 60,000 train / 10,000 test 28x28 grey images of 10 kinds
// of clothing) from the Debian package dataset-fashion-mnist, which ships the four
// gzip'd IDX files in /usr/share/datasets/fashion-mnist. prepare_fashion_mnist()
// unpacks them (zlib) into <data_dir>/fashion-mnist/ in MNIST's file layout, so
// MnistDataset reads them as they are; valid unpacked files are reused, files are
// written tmp + rename (concurrent ranks write identical bytes).
//
// Thread-safety: the functions share no state.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace dtrain::data {

inline constexpr const char* kFashionMnistDebianDir = "/usr/share/datasets/fashion-mnist";
inline constexpr float kFashionMnistMean = 0.2860f;  // of the train images in [0,1]
inline constexpr float kFashionMnistStd = 0.3530f;
inline constexpr const char* kFashionMnistClasses[10] = {
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};

// The folder of unpacked IDX files. Throws IoError naming the missing file and the
// package to install, or DataFormatError for a corrupt gzip stream. `progress` (when
// set) hears (gzip bytes unpacked, gzip bytes in all): 0 first, then after each file;
// not called when the unpacked files are already there.
std::string prepare_fashion_mnist(
    const std::string& data_dir, const std::string& source_dir = kFashionMnistDebianDir,
    const std::function<void(uint64_t done, uint64_t total)>& progress = {});

// Unpacks one gzip file to `to` (tmp + rename).
void gunzip_file(const std::string& from, const std::string& to);

}  // namespace dtrain::data
