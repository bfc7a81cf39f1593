// Transfer learning for `dtrain train` and the weights of `dtrain infer`.
//
//   --init-from FILE.safetensors  start from these weights (safetensors_import.h);
//   --name-map MAP.json           {"their.name": "our.name", "their.prefix.*": "ours."}
//   --name-prefix FROM=TO,...     prefix rewrite rules (features.=0.)
//   --reset-head                  the last layer with parameters keeps its fresh
//                                 initialisation (file tensors for it are ignored)
//   --freeze PREFIX,...           parameters whose name starts with a prefix get
//                                 requires_grad false ("base": every layer but the head);
//                                 SGD then skips them and DDP does not all-reduce them
//   --classes 0-4 | 5,7,9         train and test on these digits only; the labels are
//                                 KEPT (a digit 7 stays class 7 of the 10 outputs)
//
// Every error names the flag and what is wrong (a prefix that matches no parameter,
// an empty or malformed class list).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dtrain/engine/data/loader.h"
#include "dtrain/engine/nn/module.h"
#include "dtrain/engine/safetensors_import.h"

namespace dtrain::cli {

struct TransferOptions {
  std::string init_from;
  std::string name_map;
  std::string name_prefix;  // comma-separated FROM=TO rules
  std::string freeze;       // comma-separated prefixes, or "base"
  bool reset_head = false;
};

// The name of the last direct child that has parameters ("11" for seed-cnn), + ".".
std::string head_prefix(const nn::Module& model);
// The importer's options from the flags (reads the name map file).
nn::ImportOptions import_options(const TransferOptions& t, const nn::Module& model);
// Loads --init-from (when given) and applies --freeze; returns a line for the log
// ("" when neither flag was given).
std::string apply_transfer(const TransferOptions& t, nn::Module& model);

// "0-4" -> {0,1,2,3,4}; "5,7,9"; "" -> {} (all). InvalidArgument otherwise.
std::vector<int64_t> parse_classes(const std::string& spec);
// The rows of d (images [N,...], labels i64 [N]) whose label is in `classes` (all
// rows when empty); `what` names the split. InvalidArgument when none is left.
// Reads every sample of d (one get_batch) when `classes` is not empty.
std::shared_ptr<const data::Dataset> filter_classes(std::shared_ptr<const data::Dataset> d,
                                                    const std::vector<int64_t>& classes,
                                                    const std::string& what);

}  // namespace dtrain::cli
