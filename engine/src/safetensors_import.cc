// safetensors import; see safetensors_import.h.
#include "dtrain/engine/safetensors_import.h"

#include <fmt/format.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <set>

#include "dtrain/common/error.h"

namespace dtrain::nn {

namespace {

std::string read_whole_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  DTRAIN_CHECK(in.good(), IoError, "cannot open {}", path);
  std::string blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  DTRAIN_CHECK(!in.bad(), IoError, "cannot read {}", path);
  return blob;
}

struct StDType {
  DType stored;  // what the file holds
  DType ours;    // what we keep (bf16/f16 -> f32)
};

bool parse_dtype(const std::string& s, StDType& out) {
  static const std::map<std::string, StDType> kTypes = {
      {"F32", {DType::f32, DType::f32}},   {"F64", {DType::f64, DType::f64}},
      {"BF16", {DType::bf16, DType::f32}}, {"F16", {DType::f16, DType::f32}},
      {"I32", {DType::i32, DType::i32}},   {"I64", {DType::i64, DType::i64}},
      {"U8", {DType::u8, DType::u8}}};
  auto it = kTypes.find(s);
  if (it == kTypes.end()) return false;
  out = it->second;
  return true;
}

float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;  // +-0
  } else {     // subnormal: normalise
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    u = sign | (static_cast<uint32_t>(112 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

Tensor decode(const StDType& t, const Shape& shape, const char* bytes) {
  Tensor out = empty(shape, TensorOptions{.dtype = t.ours});
  if (t.stored == t.ours) {
    std::memcpy(out.raw_data(), bytes, out.nbytes());
    return out;
  }
  float* dst = out.data<float>();
  for (int64_t i = 0; i < out.numel(); ++i) {
    uint16_t h;
    std::memcpy(&h, bytes + 2 * i, 2);
    dst[i] = t.stored == DType::bf16 ? bf16_to_f32(h) : f16_to_f32(h);
  }
  return out;
}

// One header entry, validated against the data section of `size` bytes.
Tensor read_entry(const std::string& path, const std::string& name, const nlohmann::json& e,
                  const char* data, uint64_t size) {
  auto fault = [&](const std::string& what) {
    DTRAIN_THROW(DataFormatError, "{}: safetensors tensor '{}': {}", path, name, what);
  };
  if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") ||
      !e.contains("data_offsets")) {
    fault("expected an object with dtype, shape and data_offsets, got " + e.dump());
  }
  StDType t{};
  if (!e["dtype"].is_string() || !parse_dtype(e["dtype"].get<std::string>(), t)) {
    fault("unknown dtype " + e["dtype"].dump() + " (known: F32, F64, BF16, F16, I32, I64, U8)");
  }
  Shape shape;
  if (!e["shape"].is_array()) fault("shape is not an array");
  for (const auto& d : e["shape"]) {
    if (!d.is_number_unsigned()) fault("shape " + e["shape"].dump() + " is not a list of sizes");
    shape.push_back(d.get<int64_t>());
  }
  const auto& off = e["data_offsets"];
  if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
      !off[1].is_number_unsigned()) {
    fault("data_offsets " + off.dump() + " is not [begin, end]");
  }
  const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
  const uint64_t want = static_cast<uint64_t>(shape_numel(shape)) * dtype_size(t.stored);
  if (begin > end || end > size) {
    fault(fmt::format("data_offsets [{}, {}] outside the {} bytes of data", begin, end, size));
  }
  if (end - begin != want) {
    fault(fmt::format("data_offsets [{}, {}] hold {} bytes, but {} {} needs {}", begin, end,
                      end - begin, e["dtype"].get<std::string>(), shape_str(shape), want));
  }
  return decode(t, shape, data + begin);
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += "\n  " + x;
  return s;
}

bool under_any(const std::string& key, const std::vector<std::string>& prefixes) {
  for (const auto& p : prefixes) {
    if (key.rfind(p, 0) == 0) return true;
  }
  return false;
}

}  // namespace

std::string NameMap::apply(const std::string& theirs) const {
  if (auto it = exact.find(theirs); it != exact.end()) return it->second;
  for (const auto& [from, to] : prefixes) {
    if (theirs.rfind(from, 0) == 0) return to + theirs.substr(from.size());
  }
  return theirs;
}

std::pair<std::string, std::string> parse_prefix_rule(const std::string& rule) {
  const size_t eq = rule.find('=');
  DTRAIN_CHECK(eq != std::string::npos && eq > 0, InvalidArgument,
               "prefix rule '{}': expected THEIR_PREFIX=OUR_PREFIX (e.g. features.=0.)", rule);
  return {rule.substr(0, eq), rule.substr(eq + 1)};
}

NameMap read_name_map(const std::string& path) {
  const std::string text = read_whole_file(path);
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  DTRAIN_CHECK(!j.is_discarded() && j.is_object(), DataFormatError,
               "{}: a name map must be a JSON object {{\"their.name\": \"our.name\"}}", path);
  NameMap m;
  for (const auto& [k, v] : j.items()) {
    DTRAIN_CHECK(v.is_string(), DataFormatError, "{}: name map entry '{}' is not a string: {}",
                 path, k, v.dump());
    if (!k.empty() && k.back() == '*') {
      m.prefixes.emplace_back(k.substr(0, k.size() - 1), v.get<std::string>());
    } else {
      m.exact[k] = v.get<std::string>();
    }
  }
  return m;
}

std::map<std::string, Tensor> read_safetensors(const std::string& path) {
  const std::string blob = read_whole_file(path);
  DTRAIN_CHECK(blob.size() >= 8, DataFormatError,
               "{}: {} bytes, shorter than the 8-byte safetensors header length", path,
               blob.size());
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | static_cast<uint8_t>(blob[i]);
  DTRAIN_CHECK(hlen <= blob.size() - 8, DataFormatError,
               "{}: safetensors header length {} runs past the file ({} bytes)", path, hlen,
               blob.size());
  nlohmann::json header = nlohmann::json::parse(blob.begin() + 8, blob.begin() + 8 + hlen, nullptr,
                                                /*allow_exceptions=*/false);
  DTRAIN_CHECK(!header.is_discarded(), DataFormatError,
               "{}: the safetensors header ({} bytes) is not valid JSON", path, hlen);
  DTRAIN_CHECK(header.is_object(), DataFormatError,
               "{}: the safetensors header is not a JSON object", path);
  const char* data = blob.data() + 8 + hlen;
  const uint64_t size = blob.size() - 8 - hlen;
  std::map<std::string, Tensor> out;
  for (const auto& [name, e] : header.items()) {
    if (name == "__metadata__") continue;
    out.emplace(name, read_entry(path, name, e, data, size));
  }
  return out;
}

ImportReport load_safetensors(Module& model, const std::string& path,
                              const ImportOptions& options) {
  const std::map<std::string, Tensor> file = read_safetensors(path);
  const StateDict ours = model.state_dict();
  StateDict staged;
  std::map<std::string, std::string> source;  // our key -> their name (mismatched too)
  std::vector<std::string> errors;
  ImportReport report;
  for (const auto& [theirs, t] : file) {
    const std::string key = options.names.apply(theirs);
    const std::string label =
        key == theirs ? "'" + theirs + "'" : fmt::format("'{}' (as '{}')", theirs, key);
    auto it = ours.find(key);
    if (under_any(key, options.keep_fresh) || (it == ours.end() && options.allow_unused)) {
      report.unused.push_back(theirs);
    } else if (it == ours.end()) {
      errors.push_back(fmt::format("tensor {} matches no parameter of the model", label));
    } else if (source.count(key)) {
      errors.push_back(
          fmt::format("tensors '{}' and '{}' both map to '{}'", source[key], theirs, key));
    } else {
      source[key] = theirs;
      if (t.shape() != it->second.shape()) {
        errors.push_back(fmt::format("{}: shape {} in the file, {} in the model", label,
                                     shape_str(t.shape()), shape_str(it->second.shape())));
      } else if (t.dtype() != it->second.dtype()) {
        errors.push_back(fmt::format("{}: dtype {} in the file, {} in the model", label,
                                     dtype_name(t.dtype()), dtype_name(it->second.dtype())));
      } else {
        staged.emplace(key, t);
      }
    }
  }
  for (const auto& [key, t] : ours) {
    if (!source.count(key) && !under_any(key, options.keep_fresh)) {
      errors.push_back(fmt::format("model parameter '{}' {} has no tensor in the file", key,
                                   shape_str(t.shape())));
    }
  }
  DTRAIN_CHECK(errors.empty(), InvalidArgument,
               "{}: {} mismatch(es) between the file and the model {}, nothing loaded:{}", path,
               errors.size(), model.type_name(), join(errors));
  model.load_state_dict(staged, /*strict=*/false);
  for (const auto& [k, t] : staged) report.loaded.push_back(k);
  return report;
}

}  // namespace dtrain::nn
