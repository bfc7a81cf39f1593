// The JSON model description (model_file.h): one walk over the layer list that
// infers shapes, and builds the layers when asked.
#include "dtrain/engine/nn/model_file.h"

#include <fmt/format.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "dtrain/common/error.h"

namespace dtrain::nn {

namespace {

using nlohmann::json;

// Where we are in the file, for messages: "m.json:12: layer 4 (linear)".
struct Where {
  const std::string& file;
  size_t index;
  std::string type;
  int64_t line = 0;  // 0: unknown
  std::string at() const { return line == 0 ? file : fmt::format("{}:{}", file, line); }
  std::string str() const { return fmt::format("{}: layer {} ({})", at(), index, type); }
};

// The line (1-based) on which each element of the top-level "layers" array starts:
// a scan of the text that skips strings and tracks bracket depth. Only used for
// messages; the JSON parser has already accepted the text.
std::vector<int64_t> layer_lines(const std::string& text) {
  std::vector<int64_t> lines;
  int64_t line = 1, depth = 0, array_depth = -1;
  std::string last_key, str;
  bool in_string = false, escape = false, want_element = false;
  for (char ch : text) {
    if (ch == '\n') ++line;
    if (in_string) {
      if (escape)
        escape = false;
      else if (ch == '\\')
        escape = true;
      else if (ch == '"')
        in_string = false;
      else
        str.push_back(ch);
      if (!in_string && depth == 1) last_key = str;
      continue;
    }
    if (std::isspace(static_cast<unsigned char>(ch))) continue;
    if (want_element && ch != ']') lines.push_back(line);
    want_element = false;
    if (ch == '"') {
      in_string = true;
      str.clear();
    } else if (ch == '{' || ch == '[') {
      ++depth;
      if (ch == '[' && depth == 2 && last_key == "layers") {
        array_depth = depth;
        want_element = true;
      }
    } else if (ch == '}' || ch == ']') {
      if (depth == array_depth) array_depth = -1;
      --depth;
    } else if (ch == ',' && depth == array_depth) {
      want_element = true;
    }
  }
  return lines;
}

const std::map<std::string, std::set<std::string>>& known_fields() {
  static const std::map<std::string, std::set<std::string>> kFields = {
      {"conv2d", {"in", "out", "kernel", "stride", "padding", "bias"}},
      {"linear", {"in", "out", "bias"}},
      {"maxpool2d", {"kernel", "stride", "padding"}},
      {"flatten", {}},
      {"relu", {}},
      {"tanh", {}},
      {"sigmoid", {}},
      {"gelu", {}},
      {"dropout", {"p"}},
      {"layernorm", {"dim"}},
  };
  return kFields;
}

std::string known_types() {
  std::vector<std::string> names;
  for (const auto& [name, fields] : known_fields()) names.push_back(name);
  return fmt::format("{}", fmt::join(names, ", "));
}

int64_t get_int(const json& l, const Where& w, const char* field, int64_t fallback, int64_t min) {
  if (!l.contains(field)) {
    DTRAIN_CHECK(fallback >= min, InvalidArgument, "{}: missing field '{}'", w.str(), field);
    return fallback;
  }
  const json& v = l[field];
  DTRAIN_CHECK(v.is_number_integer(), InvalidArgument, "{}: {} must be an integer, got {}", w.str(),
               field, v.dump());
  auto n = v.get<int64_t>();
  DTRAIN_CHECK(n >= min, InvalidArgument, "{}: {} must be >= {}, got {}", w.str(), field, min, n);
  return n;
}

bool get_bool(const json& l, const Where& w, const char* field) {
  if (!l.contains(field)) return true;
  DTRAIN_CHECK(l[field].is_boolean(), InvalidArgument, "{}: {} must be true or false, got {}",
               w.str(), field, l[field].dump());
  return l[field].get<bool>();
}

void expect_dims(const Shape& cur, size_t dims, const Where& w, const char* what) {
  DTRAIN_CHECK(cur.size() == dims, ShapeError,
               "{}: expects {} per sample, but the previous layer gives {}", w.str(), what,
               shape_str(cur));
}

void expect_in(int64_t in, int64_t have, const Where& w, const char* field) {
  DTRAIN_CHECK(in == have, ShapeError, "{}: {} = {}, but the previous layer gives {}", w.str(),
               field, in, have);
}

int64_t window_out(int64_t size, int64_t kernel, int64_t stride, int64_t pad, const Where& w,
                   const Shape& cur) {
  DTRAIN_CHECK(size + 2 * pad >= kernel, ShapeError,
               "{}: kernel = {} is larger than the padded input {} (from {})", w.str(), kernel,
               size + 2 * pad, shape_str(cur));
  return (size + 2 * pad - kernel) / stride + 1;
}

// Infers the layer's output shape from `cur` and, with `out`, appends the layer.
void walk_layer(const json& l, const Where& w, Shape& cur, Sequential* out, Generator* gen) {
  const std::string& t = w.type;
  if (t == "conv2d") {
    expect_dims(cur, 3, w, "[C,H,W]");
    int64_t in = get_int(l, w, "in", -1, 1), o = get_int(l, w, "out", -1, 1);
    int64_t k = get_int(l, w, "kernel", -1, 1), s = get_int(l, w, "stride", 1, 1);
    int64_t p = get_int(l, w, "padding", 0, 0);
    expect_in(in, cur[0], w, "in");
    cur = {o, window_out(cur[1], k, s, p, w, cur), window_out(cur[2], k, s, p, w, cur)};
    if (out) {
      out->push_back(std::make_shared<Conv2d>(
          Conv2dOptions(in, o, k).stride(s).padding(p).bias(get_bool(l, w, "bias")), *gen));
    }
  } else if (t == "linear") {
    DTRAIN_CHECK(!cur.empty(), ShapeError, "{}: expects [.., in], but the previous layer gives []",
                 w.str());
    int64_t in = get_int(l, w, "in", -1, 1), o = get_int(l, w, "out", -1, 1);
    expect_in(in, cur.back(), w, "in");
    cur.back() = o;
    if (out) {
      out->push_back(
          std::make_shared<Linear>(LinearOptions(in, o).bias(get_bool(l, w, "bias")), *gen));
    }
  } else if (t == "maxpool2d") {
    expect_dims(cur, 3, w, "[C,H,W]");
    int64_t k = get_int(l, w, "kernel", -1, 1), s = get_int(l, w, "stride", k, 1);
    int64_t p = get_int(l, w, "padding", 0, 0);
    cur = {cur[0], window_out(cur[1], k, s, p, w, cur), window_out(cur[2], k, s, p, w, cur)};
    if (out) out->push_back(std::make_shared<MaxPool2d>(MaxPool2dOptions{k, s, p}));
  } else if (t == "flatten") {
    int64_t n = 1;
    for (int64_t d : cur) n *= d;
    cur = {n};
    if (out) out->push_back(std::make_shared<Flatten>());
  } else if (t == "dropout") {
    double p = l.value("p", 0.5);
    DTRAIN_CHECK(p >= 0 && p < 1, InvalidArgument, "{}: p must be in [0, 1), got {}", w.str(), p);
    if (out) out->push_back(std::make_shared<Dropout>(p, *gen));
  } else if (t == "layernorm") {
    DTRAIN_CHECK(!cur.empty(), ShapeError, "{}: expects [.., dim], got []", w.str());
    int64_t d = get_int(l, w, "dim", -1, 1);
    expect_in(d, cur.back(), w, "dim");
    if (out) out->push_back(std::make_shared<LayerNorm>(d));
  } else if (out) {  // the activations keep the shape
    if (t == "relu") out->push_back(std::make_shared<ReLU>());
    if (t == "tanh") out->push_back(std::make_shared<Tanh>());
    if (t == "sigmoid") out->push_back(std::make_shared<Sigmoid>());
    if (t == "gelu") out->push_back(std::make_shared<GELU>());
  }
}

void check_fields(const json& l, const Where& w) {
  const auto& fields = known_fields().at(w.type);
  for (const auto& [key, value] : l.items()) {
    if (key == "type") continue;
    DTRAIN_CHECK(fields.count(key) == 1, InvalidArgument, "{}: unknown field '{}' (known: {})",
                 w.str(), key,
                 fields.empty() ? "none" : fmt::format("{}", fmt::join(fields, ", ")));
  }
}

json parse(const std::string& text, const std::string& name) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    DTRAIN_THROW(InvalidArgument, "{}: not valid JSON: {}", name, e.what());
  }
  DTRAIN_CHECK(j.is_object(), InvalidArgument, "{}: expected an object with input, classes, layers",
               name);
  for (const char* key : {"input", "classes", "layers"}) {
    DTRAIN_CHECK(j.contains(key), InvalidArgument, "{}: missing field '{}'", name, key);
  }
  return j;
}

ModelFileInfo walk(const json& j, const std::string& name, const std::vector<int64_t>& lines,
                   Sequential* out, Generator* gen) {
  ModelFileInfo info;
  const json& in = j["input"];
  DTRAIN_CHECK(in.is_array() && !in.empty(), InvalidArgument,
               "{}: input must be a list of sizes, e.g. [1,28,28], got {}", name, in.dump());
  for (const json& d : in) {
    DTRAIN_CHECK(d.is_number_integer() && d.get<int64_t>() > 0, InvalidArgument,
                 "{}: input sizes must be integers > 0, got {}", name, in.dump());
    info.input_shape.push_back(d.get<int64_t>());
  }
  DTRAIN_CHECK(j["classes"].is_number_integer() && j["classes"].get<int64_t>() > 1, InvalidArgument,
               "{}: classes must be an integer > 1, got {}", name, j["classes"].dump());
  info.num_classes = j["classes"].get<int64_t>();
  const json& layers = j["layers"];
  DTRAIN_CHECK(layers.is_array() && !layers.empty(), InvalidArgument,
               "{}: layers must be a non-empty list", name);
  Shape cur = info.input_shape;
  for (size_t i = 0; i < layers.size(); ++i) {
    const json& l = layers[i];
    const int64_t line = i < lines.size() ? lines[i] : 0;
    DTRAIN_CHECK(l.is_object() && l.contains("type") && l["type"].is_string(), InvalidArgument,
                 "{}: layer {}: expected an object with a \"type\", got {}",
                 Where{name, i, "", line}.at(), i, l.dump());
    Where w{name, i, l["type"].get<std::string>(), line};
    DTRAIN_CHECK(known_fields().count(w.type) == 1, InvalidArgument,
                 "{}: unknown layer type '{}'; known: {}", w.str(), w.type, known_types());
    check_fields(l, w);
    walk_layer(l, w, cur, out, gen);
    info.layer_shapes.push_back(shape_str(cur));
  }
  DTRAIN_CHECK(cur == Shape{info.num_classes}, ShapeError,
               "{}: the last layer gives {} per sample, but classes = {} needs [{}]", name,
               shape_str(cur), info.num_classes, info.num_classes);
  return info;
}

}  // namespace

bool is_model_file(const std::string& model) {
  return model.size() > 5 && model.compare(model.size() - 5, 5, ".json") == 0;
}

ModelFileInfo check_model_json(const std::string& text, const std::string& name) {
  return walk(parse(text, name), name, layer_lines(text), nullptr, nullptr);
}

std::shared_ptr<Sequential> model_from_json(const std::string& text, const std::string& name,
                                            Generator& gen, ModelFileInfo* info) {
  json j = parse(text, name);
  const std::vector<int64_t> lines = layer_lines(text);
  ModelFileInfo checked = walk(j, name, lines, nullptr, nullptr);  // all checks before any draw
  auto model = std::make_shared<Sequential>();
  walk(j, name, lines, model.get(), &gen);
  if (info) *info = checked;
  return model;
}

std::shared_ptr<Sequential> load_model_file(const std::string& path, Generator& gen,
                                            ModelFileInfo* info) {
  std::ifstream f(path);
  DTRAIN_CHECK(f.good(), IoError, "--model {}: cannot read the model file", path);
  std::stringstream text;
  text << f.rdbuf();
  return model_from_json(text.str(), path, gen, info);
}

}  // namespace dtrain::nn
