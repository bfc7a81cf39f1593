// Importing pretrained weights from a safetensors file (e.g. one written by PyTorch's
// safetensors.torch.save_file, or by `dtrain ckpt export`) into a Module.
//
// The file: an 8-byte little-endian header length H, H bytes of JSON
// {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
// then the raw little-endian data (offsets relative to its start). read_safetensors
// checks everything before returning: a header length past the file, JSON that does
// not parse or is not an object, an entry without dtype/shape/data_offsets, an
// unknown dtype, offsets out of order, past the data or not the shape's byte size are
// a DataFormatError naming the file and the fault; IoError when it cannot be read.
// F32, F64, I32, I64, U8 are kept; BF16 and F16 are converted to f32.
//
// Names: a file tensor's name goes through the user's mapping first: an exact entry
// ({"their.name": "our.name"}, e.g. from a JSON file), else the first prefix rule
// whose prefix matches ("features.=" rewrites features.0.weight to 0.weight), else it
// stays as it is. The result is matched against the model's state_dict keys.
//
// load_safetensors is all or nothing: every mismatch (a model key no tensor maps to,
// a tensor that maps to no key unless allow_unused, two tensors mapping to one key, a
// shape or dtype that differs) is listed in ONE InvalidArgument, and the model is
// untouched unless every tensor fits. Keys under `keep_fresh` prefixes (a reset head)
// are neither required nor loaded, and tensors mapping there are ignored.
// Thread-safety: no shared state.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "dtrain/engine/nn/module.h"
#include "dtrain/engine/tensor.h"

namespace dtrain::nn {

struct NameMap {
  std::map<std::string, std::string> exact;                   // their name -> our name
  std::vector<std::pair<std::string, std::string>> prefixes;  // their prefix -> ours
  // The name in our model for a file tensor's name.
  std::string apply(const std::string& theirs) const;
};

// Parses "from=to" (InvalidArgument when there is no '=' or `from` is empty).
std::pair<std::string, std::string> parse_prefix_rule(const std::string& rule);
// Reads a JSON object {"their.name": "our.name", ...}; a key ending in '*' is a
// prefix rule ("features.*": "" -> prefix "features." to ""). DataFormatError naming
// the file for bad JSON or a non-string value.
NameMap read_name_map(const std::string& path);

// All tensors of a safetensors file, CPU, contiguous (see the file comment).
std::map<std::string, Tensor> read_safetensors(const std::string& path);

struct ImportOptions {
  NameMap names;
  bool allow_unused = false;            // tensors mapping to no model key are skipped
  std::vector<std::string> keep_fresh;  // our-name prefixes left as initialised
};

struct ImportReport {
  std::vector<std::string> loaded;  // our keys
  std::vector<std::string> unused;  // their names (allow_unused, or under keep_fresh)
};

ImportReport load_safetensors(Module& model, const std::string& path,
                              const ImportOptions& options = {});

}  // namespace dtrain::nn
