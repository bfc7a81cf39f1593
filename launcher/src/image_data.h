// The image data sets `dtrain train --data` selects, as a train and a test split:
//   (empty)            the demo's MNIST subset (rank 0 fetches it, the others wait)
//   DIR                an MNIST-layout IDX folder
//   fashion-mnist      Fashion-MNIST from the Debian package (data/fashion_mnist.h)
//   imagefolder:DIR    DIR/train/<class>/* and DIR/test/<class>/* (data/image_folder.h);
//                      without DIR/train, DIR/<class>/* with every 5th image held out
//   records:TRAIN[:TEST]  binary record files (data/records.h); without TEST, every
//                      5th record held out
// MNIST and Fashion-MNIST are normalised with their mean/std (options.normalize);
// image folders and records are scaled to [0,1] only. With raw_train the train split
// stays unnormalised and `mean`/`std` say what the augmentation pipeline should
// apply last.
// Thread-safety: the training thread.
#pragma once

#include <memory>
#include <string>

#include "dtrain/comm/communicator.h"
#include "dtrain/engine/data/loader.h"

namespace dtrain::cli {

struct ImageSplits {
  std::shared_ptr<const data::Dataset> train, test;
  std::string dir;         // where the files are
  std::string source;      // one line for the banner and the summary
  bool generated = false;  // the demo's synthetic digits
  bool has_stats = false;  // mean/std apply (MNIST, Fashion-MNIST)
  float mean = 0, std = 1;
};

struct ImageDataOptions {
  std::string data;        // the --data value
  std::string data_cache;  // where downloads and unpacked files are cached
  bool normalize = true;
  bool raw_train = false;  // leave the train split unnormalised (augmentation does it)
};

// Collective for the demo subset and Fashion-MNIST (rank 0 prepares, then a barrier).
// Throws IoError/DataFormatError naming a missing or malformed file, InvalidArgument
// for a --data value that selects nothing.
ImageSplits load_image_splits(const ImageDataOptions& options, comm::Communicator& comm);

}  // namespace dtrain::cli
