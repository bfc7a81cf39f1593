// The reference models: a registry of ModelInfo plus a builder per name. Each model
// is a ReferenceModel, a Sequential that appends its expected input to any shape or
// dtype error raised by one of its layers.
#include "dtrain/engine/nn/models.h"

#include <fmt/format.h>

#include "dtrain/engine/nn/layers.h"
#include "dtrain/engine/nn/mobilenet.h"

namespace dtrain::nn {

namespace {

const std::vector<ModelInfo>& registry() {
  static const std::vector<ModelInfo> kModels = {
      {"seed-cnn", "f32 [B,1,28,28]", "i64 [B] in [0,10)", {1, 28, 28}, DType::f32, 10},
      {"mlp", "f32 [B,784] or [B,1,28,28]", "i64 [B] in [0,10)", {784}, DType::f32, 10},
      {"seed-lstm", "i64 tokens [B,20] in [0,1000)", "i64 [B] in [0,1000)", {20}, DType::i64, 1000},
      {"mobilenet", "f32 [B,1,28,28]", "i64 [B] in [0,10)", {1, 28, 28}, DType::f32, 10},
  };
  return kModels;
}

// Rethrows e as the same error type with a new message, keeping its source location.
template <typename E>
[[noreturn]] void rethrow_with_message(const E& e, const std::string& message) {
  const std::string& where = e.where();
  size_t colon = where.rfind(':');
  if (colon == std::string::npos) throw E(message);
  throw E(message, where.substr(0, colon).c_str(), std::stoi(where.substr(colon + 1)));
}

class ReferenceModel final : public Sequential {
 public:
  explicit ReferenceModel(const ModelInfo& info) : Sequential(info.name), info_(info) {}

  Tensor forward(const Tensor& x) override {
    try {
      return Sequential::forward(x);
    } catch (const ShapeError& e) {
      rethrow_with_message(e, hint(e.message(), x));
    } catch (const DTypeError& e) {
      rethrow_with_message(e, hint(e.message(), x));
    }
  }

 private:
  std::string hint(const std::string& message, const Tensor& x) const {
    return fmt::format("{}; {} expects input {}, got {} {}", message, info_.name, info_.input,
                       dtype_name(x.dtype()), shape_str(x.shape()));
  }

  const ModelInfo& info_;  // an entry of registry(), which lives for the whole program
};

void build_seed_cnn(Sequential& m, Generator& gen) {
  m.push_back(std::make_shared<Conv2d>(1, 32, 3, gen));
  m.push_back(std::make_shared<ReLU>());
  m.push_back(std::make_shared<MaxPool2d>(2));
  m.push_back(std::make_shared<Conv2d>(32, 64, 3, gen));
  m.push_back(std::make_shared<ReLU>());
  m.push_back(std::make_shared<MaxPool2d>(2));
  m.push_back(std::make_shared<Conv2d>(64, 64, 3, gen));
  m.push_back(std::make_shared<ReLU>());
  m.push_back(std::make_shared<Flatten>());
  m.push_back(std::make_shared<Linear>(576, 64, gen));
  m.push_back(std::make_shared<ReLU>());
  m.push_back(std::make_shared<Linear>(64, 10, gen));
}

void build_mlp(Sequential& m, Generator& gen) {
  m.push_back(std::make_shared<Flatten>());
  m.push_back(std::make_shared<Linear>(784, 256, gen));
  m.push_back(std::make_shared<ReLU>());
  m.push_back(std::make_shared<Linear>(256, 256, gen));
  m.push_back(std::make_shared<ReLU>());
  m.push_back(std::make_shared<Linear>(256, 10, gen));
}

void build_seed_lstm(Sequential& m, Generator& gen) {
  m.push_back(std::make_shared<Embedding>(1000, 128, gen));
  m.push_back(std::make_shared<LSTM>(128, 128, gen));
  m.push_back(std::make_shared<LastTimeStep>());
  m.push_back(std::make_shared<Linear>(128, 1000, gen));
}

}  // namespace

std::vector<std::string> model_names() {
  std::vector<std::string> names;
  for (const ModelInfo& m : registry()) names.push_back(m.name);
  return names;
}

const ModelInfo& model_info(const std::string& name) {
  for (const ModelInfo& m : registry()) {
    if (m.name == name) return m;
  }
  DTRAIN_THROW(InvalidArgument, "unknown model '{}'; known models: {}", name,
               fmt::join(model_names(), ", "));
}

std::shared_ptr<Sequential> make_model(const std::string& name, Generator& gen) {
  const ModelInfo& info = model_info(name);
  auto model = std::make_shared<ReferenceModel>(info);
  if (name == "seed-cnn") {
    build_seed_cnn(*model, gen);
  } else if (name == "mlp") {
    build_mlp(*model, gen);
  } else if (name == "mobilenet") {
    build_mobilenet(*model, gen);  // nn/mobilenet.cc
  } else {
    build_seed_lstm(*model, gen);
  }
  return model;
}

Batch make_random_batch(const std::string& name, int64_t batch_size, Generator& gen) {
  const ModelInfo& info = model_info(name);
  DTRAIN_CHECK(batch_size > 0, InvalidArgument, "make_random_batch: batch size must be > 0, got {}",
               batch_size);
  Shape shape = info.input_shape;
  shape.insert(shape.begin(), batch_size);
  Batch b;
  b.input = empty(shape, TensorOptions{}.with_dtype(info.input_dtype));
  if (info.input_dtype == DType::i64) {
    int64_t* p = b.input.data<int64_t>();
    for (int64_t i = 0; i < b.input.numel(); ++i) {
      p[i] = static_cast<int64_t>(gen.below(static_cast<uint64_t>(info.num_classes)));
    }
  } else {
    float* p = b.input.data<float>();
    for (int64_t i = 0; i < b.input.numel(); ++i) p[i] = static_cast<float>(gen.normal());
  }
  b.target = empty({batch_size}, TensorOptions{}.with_dtype(DType::i64));
  int64_t* t = b.target.data<int64_t>();
  for (int64_t i = 0; i < batch_size; ++i) {
    t[i] = static_cast<int64_t>(gen.below(static_cast<uint64_t>(info.num_classes)));
  }
  return b;
}

}  // namespace dtrain::nn
