// The DTRN tensor archive (layout in serialize.h) and checkpoints on top of it.
//
// Writing is one pass: a placeholder prefix, the header, then each tensor's bytes
// (CRC'd as they are written); the real prefix is written last with pwrite, then
// fsync and rename. Reading is two passes over the file: first the checksum over
// everything after the prefix (streamed, constant memory), so a corrupt byte is
// reported as a checksum mismatch rather than whatever it breaks; then the header is
// parsed and validated, and each tensor is read straight into its own storage.
#include "dtrain/engine/serialize.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstring>
#include <set>
#include <vector>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/nn/module.h"
#include "dtrain/engine/optim/optimizer.h"

namespace dtrain {

static_assert(std::endian::native == std::endian::little,
              "the DTRN archive stores raw little-endian tensor data; big-endian hosts are not "
              "supported");

namespace {

constexpr char kMagic[4] = {'D', 'T', 'R', 'N'};
constexpr size_t kPrefixSize = 32;
constexpr uint64_t kAlign = 64;
constexpr const char* kCheckpointFormat = "dtrain-checkpoint";

// ---- CRC-32, slicing by 8 ----
using CrcTables = std::array<std::array<uint32_t, 256>, 8>;

constexpr CrcTables make_crc_tables() {
  CrcTables t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    t[0][i] = c;
  }
  for (uint32_t i = 0; i < 256; ++i) {
    for (size_t s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xffu];
  }
  return t;
}

constexpr CrcTables kCrcTables = make_crc_tables();

// ---- little-endian fields of the prefix ----
void put_le(unsigned char* p, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
uint64_t get_le(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

std::string errno_str() { return std::strerror(errno); }

// A file descriptor that is closed when it goes out of scope.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  // Closes now and reports failure (close can report a deferred write error).
  bool close() {
    int fd = fd_;
    fd_ = -1;
    return ::close(fd) == 0;
  }

 private:
  int fd_;
};

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    DTRAIN_CHECK(w > 0, IoError, "cannot write '{}': {}", path, errno_str());
    p += w;
    n -= static_cast<size_t>(w);
  }
}

// Reads exactly n bytes at `offset`; false at end of file.
bool pread_all(int fd, void* data, size_t n, uint64_t offset, const std::string& path) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    ssize_t r = ::pread(fd, p, n, static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    DTRAIN_CHECK(r >= 0, IoError, "cannot read '{}': {}", path, errno_str());
    if (r == 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
    offset += static_cast<uint64_t>(r);
  }
  return true;
}

void fsync_dir_of(const std::string& path) {
  size_t slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;  // the rename itself succeeded; a directory we cannot open is not fatal
  Fd guard(fd);
  DTRAIN_CHECK(::fsync(fd) == 0 || errno == EINVAL, IoError, "cannot fsync directory '{}': {}", dir,
               errno_str());
}

bool dtype_from_name(const std::string& name, DType& out) {
  for (DType t :
       {DType::f32, DType::f64, DType::f16, DType::bf16, DType::i32, DType::i64, DType::u8}) {
    if (name == dtype_name(t)) {
      out = t;
      return true;
    }
  }
  return false;
}

uint64_t align_up(uint64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

struct Entry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t offset;
  uint64_t nbytes;
};

// Parses and validates the JSON header; throws DataFormatError naming `path`.
std::vector<Entry> parse_entries(const nlohmann::json& header, uint64_t payload_len,
                                 const std::string& path) {
  auto fail = [&](const std::string& what) {
    DTRAIN_THROW(DataFormatError, "archive '{}': {}", path, what);
  };
  if (!header.is_object() || !header.contains("tensors") || !header["tensors"].is_array() ||
      !header.contains("metadata")) {
    fail("the header has no 'tensors' array or no 'metadata'");
  }
  std::vector<Entry> entries;
  std::set<std::string> names;
  for (const nlohmann::json& j : header["tensors"]) {
    if (!j.is_object() || !j.contains("name") || !j["name"].is_string()) {
      fail("a tensor entry has no name");
    }
    Entry e;
    e.name = j["name"].get<std::string>();
    if (e.name.empty() || !names.insert(e.name).second) {
      fail(fmt::format("tensor name '{}' is empty or repeated", e.name));
    }
    auto field = [&](const char* key) -> const nlohmann::json& {
      if (!j.contains(key)) fail(fmt::format("tensor '{}' has no '{}'", e.name, key));
      return j[key];
    };
    const nlohmann::json& dt = field("dtype");
    if (!dt.is_string() || !dtype_from_name(dt.get<std::string>(), e.dtype)) {
      fail(fmt::format("tensor '{}' has unknown dtype {}", e.name, dt.dump()));
    }
    const nlohmann::json& shape = field("shape");
    if (!shape.is_array()) fail(fmt::format("tensor '{}' has a malformed shape", e.name));
    uint64_t numel = 1;
    for (const nlohmann::json& d : shape) {
      if (!d.is_number_unsigned()) {
        fail(fmt::format("tensor '{}' has a malformed shape {}", e.name, shape.dump()));
      }
      uint64_t v = d.get<uint64_t>();
      if (v > (uint64_t{1} << 48) || (v != 0 && numel > (uint64_t{1} << 48) / v)) {
        fail(fmt::format("tensor '{}' has an impossible shape {}", e.name, shape.dump()));
      }
      numel *= v;
      e.shape.push_back(static_cast<int64_t>(v));
    }
    const nlohmann::json& off = field("offset");
    const nlohmann::json& nb = field("nbytes");
    if (!off.is_number_unsigned() || !nb.is_number_unsigned()) {
      fail(fmt::format("tensor '{}' has a malformed offset or size", e.name));
    }
    e.offset = off.get<uint64_t>();
    e.nbytes = nb.get<uint64_t>();
    if (e.nbytes != numel * dtype_size(e.dtype)) {
      fail(fmt::format("tensor '{}' ({} {}) should have {} bytes, the header says {}", e.name,
                       dtype_name(e.dtype), shape_str(e.shape), numel * dtype_size(e.dtype),
                       e.nbytes));
    }
    if (e.offset > payload_len || e.nbytes > payload_len - e.offset) {
      fail(fmt::format("tensor '{}' (bytes {}..{}) lies outside the {}-byte payload", e.name,
                       e.offset, e.offset + e.nbytes, payload_len));
    }
    entries.push_back(std::move(e));
  }
  return entries;
}

// Rethrows e with "checkpoint '<path>': " in front unless it already names the file.
template <typename E>
[[noreturn]] void rethrow_in_file(const E& e, const std::string& path) {
  if (e.message().find("'" + path + "'") != std::string::npos) throw e;
  throw E(fmt::format("checkpoint '{}': {}", path, e.message()));
}

}  // namespace

uint32_t crc32(const void* data, size_t size, uint32_t crc) {
  const auto* p = static_cast<const unsigned char*>(data);
  const CrcTables& t = kCrcTables;
  crc = ~crc;
  while (size >= 8) {
    uint32_t lo = crc ^ static_cast<uint32_t>(get_le(p, 4));
    uint32_t hi = static_cast<uint32_t>(get_le(p + 4, 4));
    crc = t[7][lo & 0xffu] ^ t[6][(lo >> 8) & 0xffu] ^ t[5][(lo >> 16) & 0xffu] ^ t[4][lo >> 24] ^
          t[3][hi & 0xffu] ^ t[2][(hi >> 8) & 0xffu] ^ t[1][(hi >> 16) & 0xffu] ^ t[0][hi >> 24];
    p += 8;
    size -= 8;
  }
  while (size-- > 0) crc = t[0][(crc ^ *p++) & 0xffu] ^ (crc >> 8);
  return ~crc;
}

void save_archive(const std::string& path, const TensorMap& tensors, const nlohmann::json& metadata,
                  const WriteProgress& progress) {
  NoGradGuard no_grad;
  std::vector<Tensor> data;
  nlohmann::json list = nlohmann::json::array();
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    DTRAIN_CHECK(!name.empty(), InvalidArgument, "save_archive '{}': empty tensor name", path);
    DTRAIN_CHECK(t.defined(), InvalidArgument, "save_archive '{}': tensor '{}' is undefined", path,
                 name);
    // A device tensor is copied to the host (to() waits for the copy); CPU tensors are
    // written from their own memory as before.
    Tensor c = t.device().is_cpu() ? t.contiguous() : t.contiguous().to(Device::cpu());
    offset = align_up(offset);
    list.push_back({{"name", name},
                    {"dtype", dtype_name(c.dtype())},
                    {"shape", c.shape()},
                    {"offset", offset},
                    {"nbytes", c.nbytes()}});
    offset += c.nbytes();
    data.push_back(c);
  }
  const uint64_t payload_len = offset;
  const std::string header =
      nlohmann::json{{"metadata", metadata}, {"tensors", std::move(list)}}.dump();

  const std::string tmp = path + ".tmp";
  const uint64_t head = kPrefixSize + header.size(), total = head + payload_len;
  if (progress) progress(0, total);  // the caller's clock starts before the first byte
  int raw_fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  DTRAIN_CHECK(raw_fd >= 0, IoError, "cannot create '{}': {}", tmp, errno_str());
  Fd fd(raw_fd);
  try {
    unsigned char prefix[kPrefixSize] = {};
    write_all(fd.get(), prefix, kPrefixSize, tmp);  // placeholder, rewritten below
    write_all(fd.get(), header.data(), header.size(), tmp);
    uint32_t crc = crc32(header.data(), header.size());
    if (progress) progress(head, total);
    static const unsigned char kZeros[kAlign] = {};
    constexpr uint64_t kPiece = uint64_t{8} << 20;  // progress granularity
    uint64_t written = 0;
    for (const Tensor& c : data) {
      uint64_t pad = align_up(written) - written;
      write_all(fd.get(), kZeros, pad, tmp);
      crc = crc32(kZeros, pad, crc);
      written += pad;
      const auto* bytes = static_cast<const unsigned char*>(c.raw_data());
      for (uint64_t at = 0; at < c.nbytes(); at += kPiece) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(kPiece, c.nbytes() - at));
        write_all(fd.get(), bytes + at, n, tmp);
        crc = crc32(bytes + at, n, crc);
        written += n;
        if (progress) progress(head + written, total);
      }
    }
    if (progress && head + written != total) progress(total, total);  // trailing empty tensors
    std::memcpy(prefix, kMagic, 4);
    put_le(prefix + 4, kArchiveVersion, 4);
    put_le(prefix + 8, header.size(), 8);
    put_le(prefix + 16, payload_len, 8);
    put_le(prefix + 24, crc, 4);
    DTRAIN_CHECK(::pwrite(fd.get(), prefix, kPrefixSize, 0) == static_cast<ssize_t>(kPrefixSize),
                 IoError, "cannot write '{}': {}", tmp, errno_str());
    DTRAIN_CHECK(::fsync(fd.get()) == 0, IoError, "cannot fsync '{}': {}", tmp, errno_str());
    DTRAIN_CHECK(fd.close(), IoError, "cannot close '{}': {}", tmp, errno_str());
    DTRAIN_CHECK(::rename(tmp.c_str(), path.c_str()) == 0, IoError,
                 "cannot rename '{}' to '{}': {}", tmp, path, errno_str());
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  fsync_dir_of(path);
}

Archive load_archive(const std::string& path) {
  int raw_fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  DTRAIN_CHECK(raw_fd >= 0, IoError, "cannot open '{}': {}", path, errno_str());
  Fd fd(raw_fd);
  struct stat st {};
  DTRAIN_CHECK(::fstat(fd.get(), &st) == 0, IoError, "cannot stat '{}': {}", path, errno_str());
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);

  unsigned char prefix[kPrefixSize] = {};
  size_t got = static_cast<size_t>(std::min<uint64_t>(file_size, kPrefixSize));
  DTRAIN_CHECK(pread_all(fd.get(), prefix, got, 0, path), IoError, "cannot read '{}'", path);
  DTRAIN_CHECK(got < 4 || std::memcmp(prefix, kMagic, 4) == 0, DataFormatError,
               "archive '{}': bad magic (not a dtrain archive; expected \"DTRN\")", path);
  DTRAIN_CHECK(got == kPrefixSize, DataFormatError,
               "archive '{}': truncated ({} bytes, shorter than the {}-byte prefix)", path,
               file_size, kPrefixSize);
  const uint32_t version = static_cast<uint32_t>(get_le(prefix + 4, 4));
  DTRAIN_CHECK(version >= 1 && version <= kArchiveVersion, DataFormatError,
               "archive '{}': format version {} is not supported (this build reads 1..{})", path,
               version, kArchiveVersion);
  const uint64_t header_len = get_le(prefix + 8, 8);
  const uint64_t payload_len = get_le(prefix + 16, 8);
  const uint32_t stored_crc = static_cast<uint32_t>(get_le(prefix + 24, 4));
  const uint64_t body = file_size - kPrefixSize;
  DTRAIN_CHECK(header_len <= body && payload_len <= body - header_len, DataFormatError,
               "archive '{}': truncated (the prefix promises {} header + {} payload bytes, the "
               "file has {} after the prefix)",
               path, header_len, payload_len, body);
  DTRAIN_CHECK(header_len + payload_len == body, DataFormatError,
               "archive '{}': {} unexpected trailing bytes after the payload", path,
               body - header_len - payload_len);

  // Pass 1: the checksum over header and payload.
  {
    std::vector<unsigned char> buf(std::min<uint64_t>(body, uint64_t{1} << 20));
    uint32_t crc = 0;
    for (uint64_t pos = 0; pos < body;) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), body - pos));
      DTRAIN_CHECK(pread_all(fd.get(), buf.data(), n, kPrefixSize + pos, path), DataFormatError,
                   "archive '{}': truncated while reading", path);
      crc = crc32(buf.data(), n, crc);
      pos += n;
    }
    DTRAIN_CHECK(crc == stored_crc, DataFormatError,
                 "archive '{}': checksum mismatch (stored {:08x}, computed {:08x}): the file is "
                 "corrupt",
                 path, stored_crc, crc);
  }

  // Pass 2: header, then tensors.
  std::string header_text(static_cast<size_t>(header_len), '\0');
  DTRAIN_CHECK(pread_all(fd.get(), header_text.data(), header_text.size(), kPrefixSize, path),
               DataFormatError, "archive '{}': truncated header", path);
  nlohmann::json header = nlohmann::json::parse(header_text, nullptr, /*allow_exceptions=*/false);
  DTRAIN_CHECK(!header.is_discarded(), DataFormatError,
               "archive '{}': the header is not valid JSON", path);
  Archive out;
  const uint64_t payload_start = kPrefixSize + header_len;
  for (const Entry& e : parse_entries(header, payload_len, path)) {
    Tensor t = empty(e.shape, TensorOptions{}.with_dtype(e.dtype));
    DTRAIN_CHECK(pread_all(fd.get(), t.raw_data(), e.nbytes, payload_start + e.offset, path),
                 DataFormatError, "archive '{}': truncated data for tensor '{}'", path, e.name);
    out.tensors.emplace(e.name, t);
  }
  out.metadata = header["metadata"];
  return out;
}

// ---------------------------------------------------------------- checkpoints

void save_checkpoint(const std::string& path, const nn::Module& model,
                     const optim::Optimizer* optimizer, const nlohmann::json& extra) {
  TensorMap tensors;
  for (const auto& [name, t] : model.state_dict()) tensors.emplace("model." + name, t);
  if (optimizer != nullptr) {
    for (const auto& [name, t] : optimizer->state_dict()) tensors.emplace("optim." + name, t);
  }
  nlohmann::json meta = {{"format", kCheckpointFormat},
                         {"optimizer", optimizer ? nlohmann::json(optimizer->name()) : nullptr},
                         {"extra", extra}};
  save_archive(path, tensors, meta);
}

nlohmann::json load_checkpoint(const std::string& path, nn::Module& model,
                               optim::Optimizer* optimizer) {
  Archive archive = load_archive(path);
  const nlohmann::json& meta = archive.metadata;
  DTRAIN_CHECK(meta.is_object() && meta.value("format", "") == kCheckpointFormat &&
                   meta.contains("optimizer") && meta.contains("extra"),
               DataFormatError, "'{}' is a dtrain archive but not a checkpoint (metadata {})", path,
               meta.dump());
  nn::StateDict model_state;
  optim::StateDict optim_state;
  for (auto& [name, t] : archive.tensors) {
    if (name.rfind("model.", 0) == 0) {
      model_state.emplace(name.substr(6), t);
    } else if (name.rfind("optim.", 0) == 0) {
      optim_state.emplace(name.substr(6), t);
    } else {
      DTRAIN_THROW(DataFormatError, "checkpoint '{}': unexpected tensor '{}'", path, name);
    }
  }
  try {
    model.check_state_dict(model_state, /*strict=*/true);
    if (optimizer != nullptr) {
      const nlohmann::json& saved = meta["optimizer"];
      DTRAIN_CHECK(saved.is_string(), InvalidArgument,
                   "checkpoint '{}' holds no optimizer state, but a {} optimizer was given", path,
                   optimizer->name());
      DTRAIN_CHECK(saved.get<std::string>() == optimizer->name(), InvalidArgument,
                   "checkpoint '{}' holds {} state, but the optimizer is {}", path,
                   saved.get<std::string>(), optimizer->name());
      optimizer->load_state_dict(optim_state);
    }
  } catch (const ShapeError& e) {
    rethrow_in_file(e, path);
  } catch (const DTypeError& e) {
    rethrow_in_file(e, path);
  } catch (const DataFormatError& e) {
    rethrow_in_file(e, path);
  } catch (const InvalidArgument& e) {
    rethrow_in_file(e, path);
  }
  model.load_state_dict(model_state, /*strict=*/true);
  return meta["extra"];
}

}  // namespace dtrain
