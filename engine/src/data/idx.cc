// IDX reader and writer; see idx.h for the format.
#include "dtrain/engine/data/idx.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

namespace dtrain::data {
namespace {

constexpr uint8_t kTypeU8 = 0x08;

uint32_t load_be32(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

void store_be32(unsigned char* p, uint32_t v) {
  p[0] = static_cast<unsigned char>(v >> 24);
  p[1] = static_cast<unsigned char>(v >> 16);
  p[2] = static_cast<unsigned char>(v >> 8);
  p[3] = static_cast<unsigned char>(v);
}

// "8000 images of 28x28" for image files, "8000 labels" for label files, else the shape.
std::string describe(uint32_t magic, const Shape& shape) {
  if (magic == kIdxMagicU8Images) {
    return fmt::format("{} images of {}x{}", shape[0], shape[1], shape[2]);
  }
  if (magic == kIdxMagicU8Labels) return fmt::format("{} labels", shape[0]);
  return fmt::format("an array of shape {}", shape_str(shape));
}

// Closes a FILE* on scope exit.
struct FileCloser {
  FILE* f;
  ~FileCloser() {
    if (f) std::fclose(f);
  }
};

// Reads exactly n bytes; returns the number actually read.
size_t read_some(FILE* f, void* dst, size_t n) { return n == 0 ? 0 : std::fread(dst, 1, n, f); }

struct Header {
  uint32_t magic = 0;
  Shape shape;
  uint64_t header_bytes = 0;
  uint64_t body_bytes = 0;
};

Header parse_header(const std::string& path, FILE* f, uint64_t file_size) {
  unsigned char head[4];
  DTRAIN_CHECK(file_size >= 4 && read_some(f, head, 4) == 4, DataFormatError,
               "{}: file is {} bytes, too short for an IDX header", path, file_size);
  Header h;
  h.magic = load_be32(head);
  DTRAIN_CHECK(head[0] == 0 && head[1] == 0 && head[3] >= 1, DataFormatError,
               "{}: bad magic number 0x{:08x}: not an IDX file (MNIST uses 0x00000803 for "
               "images, 0x00000801 for labels)",
               path, h.magic);
  DTRAIN_CHECK(head[2] == kTypeU8, DataFormatError,
               "{}: IDX element type 0x{:02x} is not supported (only unsigned byte, 0x08)", path,
               head[2]);
  const uint32_t ndims = head[3];
  h.header_bytes = 4 + 4ull * ndims;
  std::vector<unsigned char> dims(4ull * ndims);
  DTRAIN_CHECK(file_size >= h.header_bytes && read_some(f, dims.data(), dims.size()) == dims.size(),
               DataFormatError, "{}: truncated header: {} dimensions need {} bytes, file has {}",
               path, ndims, h.header_bytes, file_size);
  uint64_t total = 1;
  for (uint32_t i = 0; i < ndims; ++i) {
    uint32_t d = load_be32(&dims[4ull * i]);
    DTRAIN_CHECK(d <= static_cast<uint32_t>(std::numeric_limits<int32_t>::max()), DataFormatError,
                 "{}: dimension {} has size {}, beyond 2^31-1", path, i, d);
    DTRAIN_CHECK(d == 0 || total <= std::numeric_limits<uint64_t>::max() / d, DataFormatError,
                 "{}: header sizes overflow 64 bits", path);
    total *= d;
    h.shape.push_back(static_cast<int64_t>(d));
  }
  h.body_bytes = total;  // one byte per element
  return h;
}

}  // namespace

IdxArray read_idx(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  DTRAIN_CHECK(f != nullptr, IoError, "{}: cannot open IDX file: {}", path, std::strerror(errno));
  FileCloser closer{f};
  struct stat st {};
  DTRAIN_CHECK(::fstat(::fileno(f), &st) == 0, IoError, "{}: cannot stat: {}", path,
               std::strerror(errno));
  DTRAIN_CHECK(S_ISREG(st.st_mode), IoError, "{}: not a regular file", path);
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);

  Header h = parse_header(path, f, file_size);
  const uint64_t follow = file_size - h.header_bytes;
  DTRAIN_CHECK(follow >= h.body_bytes, DataFormatError,
               "{}: truncated: header says {} ({} bytes) but only {} bytes follow", path,
               describe(h.magic, h.shape), h.body_bytes, follow);
  DTRAIN_CHECK(follow == h.body_bytes, DataFormatError,
               "{}: {} trailing bytes after {} ({} bytes): not a well-formed IDX file", path,
               follow - h.body_bytes, describe(h.magic, h.shape), h.body_bytes);

  IdxArray out;
  out.shape = h.shape;
  out.data = empty(h.shape, TensorOptions{}.with_dtype(DType::u8));
  size_t got = read_some(f, out.data.raw_data(), static_cast<size_t>(h.body_bytes));
  DTRAIN_CHECK(got == h.body_bytes, IoError, "{}: read error after {} of {} data bytes: {}", path,
               got, h.body_bytes, std::ferror(f) ? std::strerror(errno) : "unexpected end of file");
  return out;
}

IdxArray read_idx_images(const std::string& path) {
  IdxArray a = read_idx(path);
  DTRAIN_CHECK(a.shape.size() == 3, DataFormatError,
               "{}: expected an IDX image file (magic 0x{:08x}, [N,H,W]), got {} dimensions {}",
               path, kIdxMagicU8Images, a.shape.size(), shape_str(a.shape));
  return a;
}

IdxArray read_idx_labels(const std::string& path) {
  IdxArray a = read_idx(path);
  DTRAIN_CHECK(a.shape.size() == 1, DataFormatError,
               "{}: expected an IDX label file (magic 0x{:08x}, [N]), got {} dimensions {}", path,
               kIdxMagicU8Labels, a.shape.size(), shape_str(a.shape));
  return a;
}

IdxImagesLabels read_idx_pair(const std::string& images_path, const std::string& labels_path) {
  IdxImagesLabels p{read_idx_images(images_path), read_idx_labels(labels_path)};
  DTRAIN_CHECK(p.images.shape[0] == p.labels.shape[0], DataFormatError,
               "{}: {} labels, but the image file {} holds {} images", labels_path,
               p.labels.shape[0], images_path, p.images.shape[0]);
  return p;
}

void write_idx(const std::string& path, const Tensor& data) {
  DTRAIN_CHECK(data.defined(), InvalidArgument, "write_idx {}: undefined tensor", path);
  DTRAIN_CHECK(data.dtype() == DType::u8, DTypeError,
               "write_idx {}: IDX files hold u8 here, got a {} tensor", path,
               dtype_name(data.dtype()));
  DTRAIN_CHECK(data.dim() >= 1 && data.dim() <= 255, ShapeError,
               "write_idx {}: need 1 to 255 dimensions, got shape {}", path,
               shape_str(data.shape()));
  std::vector<unsigned char> header(4 + 4 * static_cast<size_t>(data.dim()));
  header[2] = kTypeU8;
  header[3] = static_cast<unsigned char>(data.dim());
  for (int64_t i = 0; i < data.dim(); ++i) {
    DTRAIN_CHECK(data.size(i) <= std::numeric_limits<int32_t>::max(), ShapeError,
                 "write_idx {}: dimension {} of shape {} does not fit the IDX header", path, i,
                 shape_str(data.shape()));
    store_be32(&header[4 + 4 * static_cast<size_t>(i)], static_cast<uint32_t>(data.size(i)));
  }
  Tensor body = data.contiguous();

  std::string tmp = path + ".tmp.XXXXXX";
  int fd = ::mkstemp(tmp.data());
  DTRAIN_CHECK(fd >= 0, IoError, "{}: cannot create a temporary file beside it: {}", path,
               std::strerror(errno));
  auto fail = [&](const char* what) {
    int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    DTRAIN_THROW(IoError, "{}: {} failed: {}", path, what, std::strerror(err));
  };
  auto write_all = [&](const void* p, size_t n) {
    const char* c = static_cast<const char*>(p);
    while (n > 0) {
      ssize_t w = ::write(fd, c, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) fail("write");
      c += w;
      n -= static_cast<size_t>(w);
    }
  };
  write_all(header.data(), header.size());
  write_all(body.raw_data(), body.nbytes());
  if (::fchmod(fd, 0644) != 0) fail("chmod");
  if (::fsync(fd) != 0) fail("fsync");
  if (::close(fd) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    DTRAIN_THROW(IoError, "{}: close failed: {}", path, std::strerror(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    DTRAIN_THROW(IoError, "{}: rename from {} failed: {}", path, tmp, std::strerror(err));
  }
}

}  // namespace dtrain::data
