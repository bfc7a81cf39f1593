// The JSON model description (dtrain/engine/nn/model_file.h): a file equal to seed-cnn
// builds seed-cnn exactly (parameter count, weights, initial loss for the same seed),
// and every bad file is one clear error naming the layer and the field.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <sstream>

#include "dtrain/common/error.h"
#include "dtrain/engine/nn/model_file.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/ops.h"

namespace dtrain::nn {
namespace {

std::string read(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

const std::string kSeedCnn = std::string(DTRAIN_SOURCE_DIR) + "/examples/models/seed-cnn.json";

TEST(ModelFile, SeedCnnFileIsSeedCnn) {
  Generator g1(7), g2(7);
  ModelFileInfo info;
  auto from_file = load_model_file(kSeedCnn, g1, &info);
  auto builtin = make_model("seed-cnn", g2);
  EXPECT_EQ(from_file->num_parameters(), builtin->num_parameters());
  EXPECT_EQ(info.input_shape, (Shape{1, 28, 28}));
  EXPECT_EQ(info.layer_shapes.at(8), "[576]");
  auto a = from_file->state_dict(), b = builtin->state_dict();
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, t] : b) {
    ASSERT_TRUE(a.count(name)) << name;
    Tensor x = a.at(name).contiguous(), y = t.contiguous();
    ASSERT_EQ(x.shape(), y.shape()) << name;
    ASSERT_EQ(0, std::memcmp(x.raw_data(), y.raw_data(), x.nbytes())) << name;
  }
  Generator data(3);
  nn::Batch batch = make_random_batch("seed-cnn", 8, data);
  double l1 = cross_entropy(from_file->forward(batch.input), batch.target).item();
  double l2 = cross_entropy(builtin->forward(batch.input), batch.target).item();
  EXPECT_EQ(l1, l2);
}

TEST(ModelFile, ShapeInferenceMatchesForward) {
  std::string text = read(std::string(DTRAIN_SOURCE_DIR) + "/examples/models/small-cnn.json");
  Generator g(1);
  ModelFileInfo info;
  auto m = model_from_json(text, "small-cnn.json", g, &info);
  Tensor y = m->forward(zeros({2, 1, 28, 28}));
  EXPECT_EQ(y.shape(), (Shape{2, 10}));
  EXPECT_EQ(info.layer_shapes.at(3), "[32,6,6]");  // (14 - 3) / 2 + 1
}

// The message of the error `text` raises, checking its type.
template <typename E>
std::string error_of(const std::string& text) {
  try {
    check_model_json(text, "m.json");
  } catch (const E& e) {
    return e.message();
  } catch (const std::exception& e) {
    return std::string("wrong error type: ") + e.what();
  }
  return "no error";
}

std::string with_layers(const std::string& layers, int classes = 10) {
  return R"({"input": [1, 28, 28], "classes": )" + std::to_string(classes) + R"(, "layers": [)" +
         layers + "]}";
}

TEST(ModelFile, WrongInNamesLayerAndField) {
  std::string text = with_layers(R"({"type":"conv2d","in":1,"out":64,"kernel":3},{"type":"relu"},
      {"type":"maxpool2d","kernel":2},{"type":"conv2d","in":64,"out":1,"kernel":3},
      {"type":"flatten"},{"type":"linear","in":500,"out":10})");
  EXPECT_EQ(error_of<ShapeError>(text),
            "m.json:3: layer 5 (linear): in = 500, but the previous layer gives 121");
  EXPECT_EQ(error_of<ShapeError>(with_layers(R"({"type":"conv2d","in":3,"out":4,"kernel":3})")),
            "m.json:1: layer 0 (conv2d): in = 3, but the previous layer gives 1");
}

TEST(ModelFile, ErrorsNameTheLineOfTheLayer) {
  std::string text = R"({
  "input": [1, 28, 28], "classes": 10,
  "layers": [
    {"type": "flatten"},
    {"type": "linear",
     "in": 500, "out": 10}
  ]
})";
  EXPECT_EQ(error_of<ShapeError>(text),
            "m.json:5: layer 1 (linear): in = 500, but the previous layer gives 784");
  EXPECT_EQ(error_of<InvalidArgument>(
                "{\"layers\": [\n[1],\n\n {\"type\": \"relu\", \"x\": \"[{\"}, {\"type\": \"x\"}],"
                "\n \"input\": [1], \"classes\": 2}"),
            "m.json:2: layer 0: expected an object with a \"type\", got [1]");
}

TEST(ModelFile, BadFilesAreOneClearError) {
  EXPECT_EQ(error_of<InvalidArgument>(with_layers(R"({"type":"flatten"},{"type":"conv3d"})")),
            "m.json:1: layer 1 (conv3d): unknown layer type 'conv3d'; known: conv2d, dropout, "
            "flatten, gelu, layernorm, linear, maxpool2d, relu, sigmoid, tanh");
  EXPECT_EQ(error_of<InvalidArgument>(with_layers(R"({"type":"conv2d","in":1,"out":4})")),
            "m.json:1: layer 0 (conv2d): missing field 'kernel'");
  EXPECT_EQ(error_of<InvalidArgument>(with_layers(
                R"({"type":"flatten"},{"type":"linear","in":784,"out":10,"bais":false})")),
            "m.json:1: layer 1 (linear): unknown field 'bais' (known: bias, in, out)");
  EXPECT_EQ(
      error_of<InvalidArgument>(with_layers(R"({"type":"conv2d","in":1,"out":"4","kernel":3})")),
      "m.json:1: layer 0 (conv2d): out must be an integer, got \"4\"");
  EXPECT_EQ(error_of<ShapeError>(
                with_layers(R"({"type":"flatten"},{"type":"linear","in":784,"out":12})")),
            "m.json: the last layer gives [12] per sample, but classes = 10 needs [10]");
  EXPECT_EQ(
      error_of<ShapeError>(with_layers(R"({"type":"flatten"},{"type":"maxpool2d","kernel":2})")),
      "m.json:1: layer 1 (maxpool2d): expects [C,H,W] per sample, but the previous layer "
      "gives [784]");
  EXPECT_EQ(error_of<ShapeError>(with_layers(R"({"type":"conv2d","in":1,"out":1,"kernel":29})")),
            "m.json:1: layer 0 (conv2d): kernel = 29 is larger than the padded input 28 (from "
            "[1,28,28])");
  EXPECT_EQ(error_of<InvalidArgument>(R"({"input": [1,28,28], "layers": []})"),
            "m.json: missing field 'classes'");
  EXPECT_NE(error_of<InvalidArgument>("{\"input\": [1,28,28],\n \"classes\": 10,,}")
                .find("m.json: not valid JSON"),
            std::string::npos);
  Generator g;
  EXPECT_THROW(load_model_file("/nonexistent/m.json", g), IoError);
}

}  // namespace
}  // namespace dtrain::nn
