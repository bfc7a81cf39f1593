// Image files, the image-folder data set, the record file and the Fashion-MNIST unpack
// (data/image_folder.h, data/records.h, data/fashion_mnist.h). The PNG, record and gzip
// fixtures are written by python3 from the formats' specifications, independently of
// the readers under test.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "dtrain/common/error.h"
#include "dtrain/engine/data/fashion_mnist.h"
#include "dtrain/engine/data/idx.h"
#include "dtrain/engine/data/image_folder.h"
#include "dtrain/engine/data/records.h"
#include "subprocess.h"

namespace fs = std::filesystem;

namespace dtrain::data {
namespace {

fs::path scratch(const std::string& name) {
  return dtrain::testing::scratch_dir("dtrain_test_image_data", name);
}

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary) << bytes;
}

bool python(const std::string& script) {
  fs::path f = scratch("py") / "fixture.py";
  write_bytes(f, script);
  return std::system(("python3 " + f.string()).c_str()) == 0;
}

TEST(ImageFiles, PgmAndPpmWithComments) {
  fs::path d = scratch("pnm");
  write_bytes(d / "a.pgm", std::string("P5\n# a comment\n3 2\n255\n") + "\x01\x02\x03\x04\x05\x06");
  Image g = read_image((d / "a.pgm").string());
  EXPECT_EQ(g.size_str(), "1x2x3 (CxHxW)");
  EXPECT_EQ(g.pixels, (std::vector<uint8_t>{1, 2, 3, 4, 5, 6}));
  write_bytes(d / "b.ppm", std::string("P6 2 1 255\n") + "\x0a\x0b\x0c\x14\x15\x16");
  Image c = read_image((d / "b.ppm").string());
  EXPECT_EQ(c.size_str(), "3x1x2 (CxHxW)");
  EXPECT_EQ(c.pixels, (std::vector<uint8_t>{10, 20, 11, 21, 12, 22}));  // planar CHW
  Image back;
  write_pnm((d / "c.ppm").string(), c);
  EXPECT_EQ(read_image((d / "c.ppm").string()).pixels, c.pixels);
  write_bytes(d / "short.pgm", std::string("P5 3 2 255\n") + "\x01\x02");
  EXPECT_THROW(read_image((d / "short.pgm").string()), DataFormatError);
  write_bytes(d / "ascii.pgm", "P2 1 1 255\n7\n");
  EXPECT_THROW(read_image((d / "ascii.pgm").string()), DataFormatError);
  EXPECT_THROW(read_image((d / "x.jpg").string()), DataFormatError);
}

TEST(ImageFiles, PngWrittenByPython) {
  fs::path d = scratch("png");
  // A minimal PNG encoder (zlib + CRC, filter 0 rows): RGB 2x2 and grey 3x1.
  ASSERT_TRUE(python(R"(
import struct, zlib, sys
def png(path, w, h, ctype, rows):
    def chunk(t, data):
        c = struct.pack('>I', len(data)) + t + data
        return c + struct.pack('>I', zlib.crc32(t + data) & 0xffffffff)
    raw = b''.join(b'\x00' + bytes(r) for r in rows)
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, ctype, 0, 0, 0))
                + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))
png(')" + (d / "rgb.png").string() +
                     R"(', 2, 2, 2, [[1,2,3, 4,5,6], [7,8,9, 10,11,12]])
png(')" + (d / "grey.png").string() +
                     R"(', 3, 1, 0, [[0, 128, 255]])
)"));
  Image rgb = read_image((d / "rgb.png").string());
  EXPECT_EQ(rgb.size_str(), "3x2x2 (CxHxW)");
  EXPECT_EQ(rgb.pixels, (std::vector<uint8_t>{1, 4, 7, 10, 2, 5, 8, 11, 3, 6, 9, 12}));
  Image grey = read_image((d / "grey.png").string());
  EXPECT_EQ(grey.size_str(), "1x1x3 (CxHxW)");
  EXPECT_EQ(grey.pixels, (std::vector<uint8_t>{0, 128, 255}));
}

Image grey(int64_t h, int64_t w, uint8_t v) {
  return {1, h, w, std::vector<uint8_t>(static_cast<size_t>(h * w), v)};
}

TEST(ImageFolder, ClassesSortedLabelsAndScale) {
  fs::path root = scratch("folder");
  fs::create_directories(root / "zebra");
  fs::create_directories(root / "ant");
  fs::create_directories(root / "empty");
  write_pnm((root / "zebra" / "1.pgm").string(), grey(4, 4, 255));
  write_pnm((root / "ant" / "2.pgm").string(), grey(4, 4, 51));
  write_pnm((root / "ant" / "1.pgm").string(), grey(4, 4, 0));
  write_bytes(root / "ant" / "notes.txt", "skipped");
  ImageFolderDataset ds(root.string());
  EXPECT_EQ(ds.classes(), (std::vector<std::string>{"ant", "zebra"}));
  ASSERT_EQ(ds.size(), 3);
  EXPECT_EQ(ds.images().shape(), (Shape{3, 1, 4, 4}));
  const int64_t* y = ds.labels().data<int64_t>();
  EXPECT_EQ((std::vector<int64_t>{y[0], y[1], y[2]}), (std::vector<int64_t>{0, 0, 1}));
  const float* x = ds.images().data<float>();
  EXPECT_EQ(x[0], 0.0f);             // ant/1.pgm
  EXPECT_EQ(x[16], 51.0f / 255.0f);  // ant/2.pgm
  EXPECT_EQ(x[32], 1.0f);            // zebra/1.pgm
}

TEST(ImageFolder, WrongSizeNamesTheFileAndBothSizes) {
  fs::path root = scratch("wrong");
  fs::create_directories(root / "a");
  fs::create_directories(root / "b");
  write_pnm((root / "a" / "x.pgm").string(), grey(28, 28, 1));
  write_pnm((root / "b" / "y.pgm").string(), grey(32, 30, 1));
  try {
    ImageFolderDataset ds(root.string());
    FAIL() << "accepted";
  } catch (const DataFormatError& e) {
    EXPECT_EQ(e.message(), "imagefolder: " + (root / "b" / "y.pgm").string() +
                               " is 1x32x30 (CxHxW), but " + (root / "a" / "x.pgm").string() +
                               " is 1x28x28 (CxHxW); all images must agree");
  }
  EXPECT_THROW(ImageFolderDataset((root / "none").string()), IoError);
}

TEST(Records, PythonWrittenFileReadsBackAndRoundTrips) {
  fs::path d = scratch("records");
  const std::string py = (d / "py.rec").string();
  ASSERT_TRUE(python(R"(
import struct
C, H, W, K = 1, 2, 3, 4
recs = [(3, bytes(range(6))), (0, bytes([255] * 6))]
with open(')" + py + R"(', 'wb') as f:
    f.write(b'DTRREC01' + struct.pack('<IIIIQ', C, H, W, K, len(recs)))
    for label, px in recs:
        f.write(struct.pack('<I', label) + px)
)"));
  RecordDataset ds(py);
  ASSERT_EQ(ds.size(), 2);
  EXPECT_EQ(ds.num_classes(), 4);
  EXPECT_EQ(ds.images().shape(), (Shape{2, 1, 2, 3}));
  EXPECT_EQ(ds.labels().data<int64_t>()[0], 3);
  EXPECT_EQ(ds.images().data<float>()[5], 5.0f / 255.0f);
  EXPECT_EQ(ds.images().data<float>()[6], 1.0f);
  // write_records gives the same bytes python wrote.
  Tensor img = empty({2, 1, 2, 3}, TensorOptions{}.with_dtype(DType::u8));
  for (int i = 0; i < 6; ++i) img.data<uint8_t>()[i] = static_cast<uint8_t>(i);
  for (int i = 6; i < 12; ++i) img.data<uint8_t>()[i] = 255;
  Tensor lab = empty({2}, TensorOptions{}.with_dtype(DType::i64));
  lab.data<int64_t>()[0] = 3;
  lab.data<int64_t>()[1] = 0;
  const std::string ours = (d / "ours.rec").string();
  write_records(ours, img, lab, 4);
  std::ifstream a(py, std::ios::binary), b(ours, std::ios::binary);
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(a), {}),
            std::string(std::istreambuf_iterator<char>(b), {}));
}

TEST(Records, BadFilesAreNamed) {
  fs::path d = scratch("bad_records");
  Tensor img = zeros({2, 1, 2, 2}, TensorOptions{}.with_dtype(DType::u8));
  Tensor lab = zeros({2}, TensorOptions{}.with_dtype(DType::i64));
  const std::string f = (d / "r.rec").string();
  write_records(f, img, lab, 2);
  fs::resize_file(f, fs::file_size(f) - 1);
  try {
    RecordDataset ds(f);
    FAIL() << "accepted";
  } catch (const DataFormatError& e) {
    EXPECT_EQ(e.message(), "records " + f +
                               ": 47 bytes, but the header (2 records of 1x2x2) "
                               "needs 48");
  }
  write_bytes(d / "junk.rec", std::string(40, 'x'));
  EXPECT_THROW(RecordDataset((d / "junk.rec").string()), DataFormatError);
  lab.data<int64_t>()[1] = 2;
  EXPECT_THROW(write_records(f, img, lab, 2), InvalidArgument);
}

TEST(FashionMnist, GunzipMatchesPython) {
  fs::path d = scratch("gz");
  ASSERT_TRUE(python("import gzip\nopen('" + (d / "a.gz").string() +
                     "', 'wb').write(gzip.compress(bytes(range(256)) * 1000))\n"));
  gunzip_file((d / "a.gz").string(), (d / "a").string());
  std::ifstream in(d / "a", std::ios::binary);
  std::string s((std::istreambuf_iterator<char>(in)), {});
  ASSERT_EQ(s.size(), 256000u);
  for (size_t i = 0; i < s.size(); ++i) ASSERT_EQ(static_cast<uint8_t>(s[i]), i % 256);
  write_bytes(d / "bad.gz", "\x1f\x8b\x08\x00garbage");
  EXPECT_THROW(gunzip_file((d / "bad.gz").string(), (d / "bad").string()), DataFormatError);
  EXPECT_THROW(prepare_fashion_mnist((d / "cache").string(), (d / "nowhere").string()), IoError);
}

TEST(FashionMnist, DebianPackageUnpacksToTheStandardSplit) {
  if (!fs::exists(std::string(kFashionMnistDebianDir) + "/t10k-labels-idx1-ubyte.gz"))
    GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  std::string dir = prepare_fashion_mnist(scratch("fashion").string());
  IdxArray labels = read_idx_labels(dir + "/t10k-labels-idx1-ubyte");
  ASSERT_EQ(labels.shape, (Shape{10000}));
  std::vector<int> count(10, 0);
  for (int64_t i = 0; i < 10000; ++i) ++count.at(labels.data.data<uint8_t>()[i]);
  for (int c : count) EXPECT_EQ(c, 1000);  // the test split is balanced, 1000 per class
}

}  // namespace
}  // namespace dtrain::data
