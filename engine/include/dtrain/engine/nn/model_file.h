// A model description file: a JSON layer list that builds an nn::Sequential without
// recompiling (`dtrain train --model FILE.json`).
//
//   {"input": [1, 28, 28], "classes": 10,
//    "layers": [{"type": "conv2d", "in": 1, "out": 32, "kernel": 3},
//               {"type": "relu"}, {"type": "maxpool2d", "kernel": 2},
//               {"type": "flatten"}, {"type": "linear", "in": 5408, "out": 10}]}
//
// Layer types and their fields (optional ones in brackets, PyTorch's defaults):
//   conv2d     in, out, kernel, [stride 1], [padding 0], [bias true]
//   linear     in, out, [bias true]
//   maxpool2d  kernel, [stride = kernel], [padding 0]
//   flatten    (all but the batch dimension)
//   relu, tanh, sigmoid, gelu
//   dropout    [p 0.5]
//   layernorm  dim (the last dimension)
// The file is checked when it is read, before any weight is drawn: the per-sample
// shape runs through the layers (shape inference), so an unknown type, a missing or
// unknown field, or a shape that does not fit names the file, the line the layer
// starts on, the layer index and the field:
// "m.json:12: layer 4 (linear): in = 500, but the previous layer gives 576".
// The last layer must give [classes]. Layers are initialised in file order from the
// Generator, so a file equal to seed-cnn's layers gives seed-cnn's exact weights.
//
// Deliberately not here: YAML (no YAML library is installed), branches/residuals.
// Thread-safety: the functions share no state.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/engine/nn/layers.h"
#include "dtrain/engine/random.h"

namespace dtrain::nn {

struct ModelFileInfo {
  Shape input_shape;  // per sample, e.g. {1,28,28}
  int64_t num_classes = 0;
  std::vector<std::string> layer_shapes;  // the output shape after each layer, "[32,26,26]"
};

// True for a --model value that names a description file (ends in .json).
bool is_model_file(const std::string& model);

// Parses and shape-checks `text` (the file's contents; `name` is used in messages)
// without building. Throws InvalidArgument / ShapeError as described above.
ModelFileInfo check_model_json(const std::string& text, const std::string& name);
// check_model_json, then builds the model drawing weights from gen.
std::shared_ptr<Sequential> model_from_json(const std::string& text, const std::string& name,
                                            Generator& gen, ModelFileInfo* info = nullptr);
// Reads `path` (IoError when it cannot) and calls model_from_json.
std::shared_ptr<Sequential> load_model_file(const std::string& path, Generator& gen,
                                            ModelFileInfo* info = nullptr);

}  // namespace dtrain::nn
