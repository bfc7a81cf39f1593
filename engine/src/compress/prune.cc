#include "dtrain/engine/compress/prune.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/nn/layers.h"

namespace dtrain::compress {

namespace {

void collect_prunable(const nn::Module& m, const std::string& prefix,
                      std::vector<std::string>& out) {
  if (dynamic_cast<const nn::Linear*>(&m) != nullptr ||
      dynamic_cast<const nn::Conv2d*>(&m) != nullptr) {
    out.push_back(prefix + "weight");
  }
  for (const auto& [name, child] : m.named_children()) {
    collect_prunable(*child, prefix + name + ".", out);
  }
}

std::map<std::string, Tensor> params_by_name(const nn::Module& model) {
  std::map<std::string, Tensor> out;
  for (auto& [name, t] : model.named_parameters()) out[name] = t;
  return out;
}

// One weight tensor's share of a pruning: its values and where its mask goes.
struct Slot {
  std::string name;
  Tensor weight;
  Tensor mask;
};

// Zeroes the `count` smallest |w| over `slots` (ties by position) in weights and masks.
void zero_smallest(std::vector<Slot*>& slots, int64_t count) {
  struct Ref {
    float mag;
    int32_t slot;
    int64_t index;
  };
  std::vector<Ref> refs;
  for (size_t s = 0; s < slots.size(); ++s) {
    const float* w = slots[s]->weight.data<float>();
    for (int64_t i = 0; i < slots[s]->weight.numel(); ++i) {
      refs.push_back({std::fabs(w[i]), static_cast<int32_t>(s), i});
    }
  }
  auto less = [](const Ref& a, const Ref& b) {
    if (a.mag != b.mag) return a.mag < b.mag;
    if (a.slot != b.slot) return a.slot < b.slot;
    return a.index < b.index;
  };
  if (count <= 0) return;
  std::nth_element(refs.begin(), refs.begin() + (count - 1), refs.end(), less);
  for (int64_t k = 0; k < count; ++k) {
    const Ref& r = refs[static_cast<size_t>(k)];
    slots[r.slot]->weight.data<float>()[r.index] = 0.0f;
    slots[r.slot]->mask.data<float>()[r.index] = 0.0f;
  }
}

void multiply_in_place(Tensor& t, const Tensor& mask) {
  float* p = t.data<float>();
  const float* m = mask.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] *= m[i];
}

}  // namespace

std::vector<std::string> prunable_weights(const nn::Module& model) {
  std::vector<std::string> out;
  collect_prunable(model, "", out);
  return out;
}

PruneMasks PruneMasks::prune_by_magnitude(nn::Module& model, const PruneOptions& options) {
  DTRAIN_CHECK(options.sparsity >= 0.0 && options.sparsity < 1.0, InvalidArgument,
               "prune: sparsity must be in [0, 1), got {}", options.sparsity);
  std::vector<std::string> names = prunable_weights(model);
  DTRAIN_CHECK(!names.empty(), InvalidArgument, "prune: {} has no Linear or Conv2d weight to prune",
               model.describe());
  auto params = params_by_name(model);
  std::vector<Slot> slots;
  for (const std::string& n : names) {
    Tensor w = params.at(n);
    DTRAIN_CHECK(w.dtype() == DType::f32 && w.is_contiguous() && w.device().is_cpu(),
                 InvalidArgument, "prune: {} must be a contiguous f32 CPU tensor", n);
    Tensor mask = zeros(w.shape());
    std::fill_n(mask.data<float>(), mask.numel(), 1.0f);
    slots.push_back({n, w, mask});
  }
  NoGradGuard ng;
  auto count_of = [&](int64_t n) {
    return static_cast<int64_t>(std::floor(options.sparsity * static_cast<double>(n)));
  };
  if (options.global) {
    std::vector<Slot*> all;
    int64_t n = 0;
    for (Slot& s : slots) {
      all.push_back(&s);
      n += s.weight.numel();
    }
    zero_smallest(all, count_of(n));
  } else {
    for (Slot& s : slots) {
      std::vector<Slot*> one{&s};
      zero_smallest(one, count_of(s.weight.numel()));
    }
  }
  PruneMasks out;
  out.options_ = options;
  for (Slot& s : slots) out.masks_[s.name] = s.mask;
  return out;
}

void PruneMasks::apply(nn::Module& model) const {
  auto params = params_by_name(model);
  for (const auto& [name, mask] : masks_) {
    auto it = params.find(name);
    DTRAIN_CHECK(it != params.end(), InvalidArgument, "prune mask '{}': no such parameter", name);
    multiply_in_place(it->second, mask);
  }
}

void PruneMasks::mask_gradients(nn::Module& model) const {
  auto params = params_by_name(model);
  for (const auto& [name, mask] : masks_) {
    auto it = params.find(name);
    DTRAIN_CHECK(it != params.end(), InvalidArgument, "prune mask '{}': no such parameter", name);
    Tensor g = it->second.grad();
    if (g.defined()) multiply_in_place(g, mask);
  }
}

SparsityReport weight_sparsity(const nn::Module& model) {
  auto params = params_by_name(model);
  SparsityReport r;
  for (const std::string& n : prunable_weights(model)) {
    Tensor w = params.at(n).contiguous();
    const float* p = w.data<float>();
    for (int64_t i = 0; i < w.numel(); ++i) r.zeros += p[i] == 0.0f;
    r.total += w.numel();
  }
  return r;
}

namespace {

constexpr char kHex[] = "0123456789abcdef";

// The mask as bits (LSB first within each byte), two hex digits per byte.
std::string pack_bits(const Tensor& mask) {
  const float* m = mask.data<float>();
  std::vector<uint8_t> bytes(static_cast<size_t>((mask.numel() + 7) / 8), 0);
  for (int64_t i = 0; i < mask.numel(); ++i) {
    if (m[i] != 0.0f) bytes[static_cast<size_t>(i / 8)] |= static_cast<uint8_t>(1u << (i % 8));
  }
  std::string out;
  for (uint8_t b : bytes) {
    out += kHex[b >> 4];
    out += kHex[b & 15];
  }
  return out;
}

int hex_value(char c, const std::string& name) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  DTRAIN_THROW(DataFormatError, "prune mask '{}': bad hex digit '{}'", name, c);
}

Tensor unpack_bits(const std::string& hex, const Shape& shape, const std::string& name) {
  Tensor mask = zeros(shape);
  DTRAIN_CHECK(static_cast<int64_t>(hex.size()) == 2 * ((mask.numel() + 7) / 8), DataFormatError,
               "prune mask '{}': {} hex digits for {} weights", name, hex.size(), mask.numel());
  float* m = mask.data<float>();
  for (int64_t i = 0; i < mask.numel(); ++i) {
    size_t byte = static_cast<size_t>(i / 8);
    int v = hex_value(hex[2 * byte], name) * 16 + hex_value(hex[2 * byte + 1], name);
    m[i] = (v >> (i % 8)) & 1 ? 1.0f : 0.0f;
  }
  return mask;
}

}  // namespace

nlohmann::json PruneMasks::to_json() const {
  nlohmann::json masks = nlohmann::json::object();
  for (const auto& [name, mask] : masks_) {
    masks[name] = {{"shape", mask.shape()}, {"bits", pack_bits(mask)}};
  }
  return {{"sparsity", options_.sparsity}, {"global", options_.global}, {"masks", masks}};
}

PruneMasks PruneMasks::from_json(const nlohmann::json& j, const nn::Module& model) {
  DTRAIN_CHECK(j.is_object() && j.contains("masks") && j.contains("sparsity"), DataFormatError,
               "prune masks: expected {{\"sparsity\", \"global\", \"masks\"}}, got {}",
               j.dump().substr(0, 200));
  auto params = params_by_name(model);
  PruneMasks out;
  out.options_.sparsity = j.at("sparsity").get<double>();
  out.options_.global = j.value("global", false);
  for (const auto& [name, entry] : j.at("masks").items()) {
    auto it = params.find(name);
    DTRAIN_CHECK(it != params.end(), InvalidArgument, "prune mask '{}': {} has no such parameter",
                 name, model.describe());
    Shape shape = entry.at("shape").get<Shape>();
    DTRAIN_CHECK(shape == it->second.shape(), ShapeError,
                 "prune mask '{}': shape {} does not fit the parameter's {}", name,
                 shape_str(shape), shape_str(it->second.shape()));
    out.masks_[name] = unpack_bits(entry.at("bits").get<std::string>(), shape, name);
  }
  return out;
}

}  // namespace dtrain::compress
