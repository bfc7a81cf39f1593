// CheckpointStore; see checkpoint_store.h.
#include "dtrain/common/checkpoint_store.h"

#include <fcntl.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <system_error>

#include "dtrain/common/error.h"

namespace dtrain::ckpt {

namespace fs = std::filesystem;

namespace {

constexpr const char* kManifestFile = "manifest.json";
constexpr const char* kLatestFile = "latest";
constexpr const char* kManifestFormat = "dtrain-checkpoint-manifest";
constexpr int kManifestVersion = 1;

std::string errno_text(int err) { return std::strerror(err); }

// A checkpoint folder name: "step-" followed by at least 8 digits.
bool parse_name(const std::string& name, int64_t* step) {
  const std::string prefix = "step-";
  if (name.size() < prefix.size() + 8 || name.compare(0, prefix.size(), prefix) != 0) return false;
  int64_t v = 0;
  for (size_t i = prefix.size(); i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return false;
    if (v > (INT64_MAX - 9) / 10) return false;
    v = v * 10 + (name[i] - '0');
  }
  if (step) *step = v;
  return true;
}

// A file name inside a checkpoint folder: no path separators, not "." or "..".
bool safe_file_name(const std::string& f) {
  return !f.empty() && f != "." && f != ".." && f.find('/') == std::string::npos &&
         f.find('\0') == std::string::npos;
}

void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  DTRAIN_CHECK(fd >= 0, IoError, "cannot open directory '{}' to fsync it: {}", dir,
               errno_text(errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  DTRAIN_CHECK(rc == 0, IoError, "fsync of directory '{}' failed: {}", dir, errno_text(err));
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  DTRAIN_CHECK(in.good(), IoError, "cannot open '{}': {}", path, errno_text(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  DTRAIN_CHECK(!in.bad(), IoError, "cannot read '{}'", path);
  return ss.str();
}

// Deletes a checkpoint folder: the manifest first, so a crash half-way leaves an
// uncommitted folder (which the next commit cleans up), never a committed torn one.
void remove_checkpoint_folder(const std::string& dir) {
  std::error_code ec;
  fs::remove(fs::path(dir) / kManifestFile, ec);
  DTRAIN_CHECK(!ec, IoError, "cannot delete '{}/{}': {}", dir, kManifestFile, ec.message());
  fsync_dir(dir);
  fs::remove_all(dir, ec);
  DTRAIN_CHECK(!ec, IoError, "cannot delete checkpoint folder '{}': {}", dir, ec.message());
}

template <typename T>
T get_field(const nlohmann::json& j, const char* key, const std::string& where) {
  DTRAIN_CHECK(j.contains(key), CheckpointError, "{}: malformed manifest: missing field '{}'",
               where, key);
  const auto& v = j.at(key);
  if constexpr (std::is_same_v<T, std::string>) {
    DTRAIN_CHECK(v.is_string(), CheckpointError,
                 "{}: malformed manifest: field '{}' must be a string, got {}", where, key,
                 v.type_name());
  } else if constexpr (std::is_unsigned_v<T>) {
    DTRAIN_CHECK(v.is_number_unsigned(), CheckpointError,
                 "{}: malformed manifest: field '{}' must be a non-negative integer, got {}", where,
                 key, v.dump());
  } else {
    DTRAIN_CHECK(v.is_number_integer(), CheckpointError,
                 "{}: malformed manifest: field '{}' must be an integer, got {}", where, key,
                 v.dump());
  }
  return v.get<T>();
}

}  // namespace

std::string checkpoint_name(int64_t step) {
  DTRAIN_CHECK(step >= 0, InvalidArgument, "checkpoint step must be >= 0, got {}", step);
  return fmt::format("step-{:08d}", step);
}

std::string shard_file_name(int rank, int world_size) {
  return fmt::format("shard-{:05d}-of-{:05d}.dtrn", rank, world_size);
}

std::string file_checksum(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  DTRAIN_CHECK(fd >= 0, IoError, "cannot open '{}': {}", path, errno_text(errno));
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> st(XXH3_createState(), &XXH3_freeState);
  if (!st || XXH3_64bits_reset(st.get()) != XXH_OK) {
    ::close(fd);
    DTRAIN_THROW(InternalError, "xxHash: cannot create a hash state for '{}'", path);
  }
  std::vector<char> buf(1 << 20);
  for (;;) {
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      ::close(fd);
      DTRAIN_THROW(IoError, "cannot read '{}': {}", path, errno_text(err));
    }
    if (n == 0) break;
    XXH3_64bits_update(st.get(), buf.data(), static_cast<size_t>(n));
  }
  ::close(fd);
  return fmt::format("xxh3-64:{:016x}", static_cast<uint64_t>(XXH3_64bits_digest(st.get())));
}

void write_file_atomic(const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  DTRAIN_CHECK(fd >= 0, IoError, "cannot create '{}': {}", tmp, errno_text(errno));
  size_t done = 0;
  while (done < content.size()) {
    ssize_t n = ::write(fd, content.data() + done, content.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      ::close(fd);
      DTRAIN_THROW(IoError, "cannot write '{}': {}", tmp, errno_text(err));
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    int err = errno;
    ::close(fd);
    DTRAIN_THROW(IoError, "fsync of '{}' failed: {}", tmp, errno_text(err));
  }
  DTRAIN_CHECK(::close(fd) == 0, IoError, "cannot close '{}': {}", tmp, errno_text(errno));
  DTRAIN_CHECK(::rename(tmp.c_str(), path.c_str()) == 0, IoError, "cannot rename '{}' to '{}': {}",
               tmp, path, errno_text(errno));
  fs::path parent = fs::path(path).parent_path();
  fsync_dir(parent.empty() ? "." : parent.string());
}

nlohmann::json Manifest::to_json() const {
  nlohmann::json shard_list = nlohmann::json::array();
  for (const auto& s : shards) {
    shard_list.push_back(
        {{"rank", s.rank}, {"file", s.file}, {"bytes", s.bytes}, {"checksum", s.checksum}});
  }
  return {{"format", kManifestFormat},
          {"version", kManifestVersion},
          {"name", name},
          {"step", step},
          {"epoch", epoch},
          {"world_size", world_size},
          {"generation", generation},
          {"shards", shard_list},
          {"config", config}};
}

Manifest Manifest::from_json(const nlohmann::json& j, const std::string& where) {
  DTRAIN_CHECK(j.is_object(), CheckpointError, "{}: malformed manifest: expected a JSON object",
               where);
  auto format = get_field<std::string>(j, "format", where);
  DTRAIN_CHECK(format == kManifestFormat, CheckpointError,
               "{}: not a checkpoint manifest (format '{}', expected '{}')", where, format,
               kManifestFormat);
  auto version = get_field<int64_t>(j, "version", where);
  DTRAIN_CHECK(version == kManifestVersion, CheckpointError,
               "{}: manifest version {} is not supported (this build reads version {})", where,
               version, kManifestVersion);
  Manifest m;
  m.name = get_field<std::string>(j, "name", where);
  m.step = get_field<int64_t>(j, "step", where);
  m.epoch = get_field<int64_t>(j, "epoch", where);
  m.world_size = static_cast<int32_t>(get_field<int64_t>(j, "world_size", where));
  m.generation = get_field<uint64_t>(j, "generation", where);
  DTRAIN_CHECK(m.step >= 0 && m.epoch >= 0, CheckpointError,
               "{}: malformed manifest: negative step {} or epoch {}", where, m.step, m.epoch);
  DTRAIN_CHECK(m.name == checkpoint_name(m.step), CheckpointError,
               "{}: malformed manifest: name '{}' does not match step {} (expected '{}')", where,
               m.name, m.step, checkpoint_name(m.step));
  DTRAIN_CHECK(m.world_size >= 1, CheckpointError,
               "{}: malformed manifest: world_size must be >= 1, got {}", where, m.world_size);
  DTRAIN_CHECK(j.contains("shards") && j.at("shards").is_array(), CheckpointError,
               "{}: malformed manifest: 'shards' must be an array", where);
  const auto& list = j.at("shards");
  DTRAIN_CHECK(list.size() == static_cast<size_t>(m.world_size), CheckpointError,
               "{}: malformed manifest: {} shards listed for world_size {}", where, list.size(),
               m.world_size);
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string at = fmt::format("{} (shards[{}])", where, i);
    DTRAIN_CHECK(list[i].is_object(), CheckpointError, "{}: malformed manifest: not an object", at);
    ShardEntry e;
    e.rank = static_cast<int32_t>(get_field<int64_t>(list[i], "rank", at));
    e.file = get_field<std::string>(list[i], "file", at);
    e.bytes = get_field<uint64_t>(list[i], "bytes", at);
    e.checksum = get_field<std::string>(list[i], "checksum", at);
    DTRAIN_CHECK(e.rank == static_cast<int32_t>(i), CheckpointError,
                 "{}: malformed manifest: rank {} where rank {} was expected", at, e.rank, i);
    DTRAIN_CHECK(safe_file_name(e.file), CheckpointError,
                 "{}: malformed manifest: shard file '{}' is not a plain file name", at, e.file);
    DTRAIN_CHECK(e.checksum.rfind("xxh3-64:", 0) == 0 && e.checksum.size() == 8 + 16,
                 CheckpointError, "{}: malformed manifest: checksum '{}' is not xxh3-64:<16 hex>",
                 at, e.checksum);
    m.shards.push_back(std::move(e));
  }
  if (j.contains("config")) m.config = j.at("config");
  return m;
}

CheckpointStore::CheckpointStore(std::string root) : root_(std::move(root)) {
  DTRAIN_CHECK(!root_.empty(), InvalidArgument, "checkpoint root folder must not be empty");
  std::error_code ec;
  fs::create_directories(root_, ec);
  DTRAIN_CHECK(!ec, IoError, "cannot create checkpoint root '{}': {}", root_, ec.message());
  DTRAIN_CHECK(fs::is_directory(root_), IoError, "checkpoint root '{}' is not a directory", root_);
}

std::string CheckpointStore::folder(const std::string& name) const {
  return (fs::path(root_) / name).string();
}

Manifest CheckpointStore::read_manifest(const std::string& name) const {
  DTRAIN_CHECK(parse_name(name, nullptr), CheckpointError,
               "'{}' is not a checkpoint name (expected step-<8 digits>) in '{}'", name, root_);
  const std::string path = (fs::path(folder(name)) / kManifestFile).string();
  DTRAIN_CHECK(fs::exists(path), CheckpointError, "{}: missing (checkpoint {} is not committed)",
               path, name);
  std::string text;
  try {
    text = read_text(path);
  } catch (const IoError& e) {
    DTRAIN_THROW(CheckpointError, "{}: unreadable: {}", path, e.message());
  }
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    DTRAIN_THROW(CheckpointError, "{}: malformed manifest: {}", path, e.what());
  }
  Manifest m = Manifest::from_json(j, path);
  DTRAIN_CHECK(m.name == name, CheckpointError,
               "{}: manifest names checkpoint '{}' but lies in folder '{}'", path, m.name, name);
  return m;
}

void CheckpointStore::verify(const Manifest& m) const {
  DTRAIN_CHECK(m.shards.size() == static_cast<size_t>(m.world_size), CheckpointError,
               "checkpoint {}: {} shards for world_size {}", m.name, m.shards.size(), m.world_size);
  for (const auto& s : m.shards) verify_shard(m, s);
}

void CheckpointStore::verify_shard(const Manifest& m, const ShardEntry& s) const {
  const std::string path = (fs::path(folder(m.name)) / s.file).string();
  std::error_code ec;
  DTRAIN_CHECK(fs::is_regular_file(path, ec), CheckpointError,
               "checkpoint {}: shard {} (rank {}) is missing", m.name, path, s.rank);
  uint64_t size = fs::file_size(path, ec);
  DTRAIN_CHECK(!ec, CheckpointError, "checkpoint {}: shard {} (rank {}) is unreadable: {}", m.name,
               path, s.rank, ec.message());
  DTRAIN_CHECK(size == s.bytes, CheckpointError,
               "checkpoint {}: shard {} (rank {}) is {} bytes, the manifest says {} (truncated "
               "or overwritten)",
               m.name, path, s.rank, size, s.bytes);
  std::string sum;
  try {
    sum = file_checksum(path);
  } catch (const IoError& e) {
    DTRAIN_THROW(CheckpointError, "checkpoint {}: shard {} (rank {}) is unreadable: {}", m.name,
                 path, s.rank, e.message());
  }
  DTRAIN_CHECK(sum == s.checksum, CheckpointError,
               "checkpoint {}: shard {} (rank {}) is corrupt: checksum {} but the manifest says {}",
               m.name, path, s.rank, sum, s.checksum);
}

void CheckpointStore::commit(const Manifest& m, int keep_last) const {
  DTRAIN_CHECK(keep_last >= 0, InvalidArgument, "keep_last must be >= 0, got {}", keep_last);
  DTRAIN_CHECK(m.name == checkpoint_name(m.step), CheckpointError,
               "commit: manifest name '{}' does not match step {} (expected '{}')", m.name, m.step,
               checkpoint_name(m.step));
  DTRAIN_CHECK(m.world_size >= 1, CheckpointError, "commit {}: world_size must be >= 1, got {}",
               m.name, m.world_size);
  for (size_t i = 0; i < m.shards.size(); ++i) {
    DTRAIN_CHECK(m.shards[i].rank == static_cast<int32_t>(i) && safe_file_name(m.shards[i].file),
                 CheckpointError,
                 "commit {}: shard entry {} (rank {}, file '{}') is out of order "
                 "or not a plain file name",
                 m.name, i, m.shards[i].rank, m.shards[i].file);
  }
  verify(m);
  // Round-trip through from_json so nothing is committed that could not be read back.
  const std::string manifest_path = (fs::path(folder(m.name)) / kManifestFile).string();
  Manifest::from_json(m.to_json(), manifest_path);
  write_file_atomic(manifest_path, m.to_json().dump(2) + "\n");
  write_file_atomic((fs::path(root_) / kLatestFile).string(), m.name + "\n");

  // Retention, only now that the new checkpoint is committed and `latest` points at it.
  // m counts as one of the keep_last; anything newer than m is left alone.
  if (keep_last > 0) {
    int kept = 1;
    for (const auto& c : committed()) {
      if (c.step >= m.step) continue;
      if (kept < keep_last) {
        ++kept;
      } else {
        remove_checkpoint_folder(folder(c.name));
      }
    }
  }
  // Uncommitted folders older than this step: shards of a checkpoint that never committed.
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(root_, ec)) {
    int64_t step = 0;
    const std::string name = entry.path().filename().string();
    if (!entry.is_directory() || !parse_name(name, &step) || step >= m.step) continue;
    if (!fs::exists(entry.path() / kManifestFile)) remove_checkpoint_folder(entry.path().string());
  }
}

std::optional<Manifest> CheckpointStore::latest() const {
  const std::string path = (fs::path(root_) / kLatestFile).string();
  if (!fs::exists(path)) return std::nullopt;
  std::string text;
  try {
    text = read_text(path);
  } catch (const IoError& e) {
    DTRAIN_THROW(CheckpointError, "{}: unreadable: {}", path, e.message());
  }
  if (!text.empty() && text.back() == '\n') text.pop_back();
  DTRAIN_CHECK(parse_name(text, nullptr), CheckpointError,
               "{}: malformed: expected 'step-<8 digits>', got '{}'", path,
               text.substr(0, std::min<size_t>(text.size(), 64)));
  return read_manifest(text);
}

std::vector<Manifest> CheckpointStore::committed() const {
  std::vector<Manifest> out;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(root_, ec)) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_directory() || !parse_name(name, nullptr)) continue;
    if (!fs::exists(entry.path() / kManifestFile)) continue;
    try {
      out.push_back(read_manifest(name));
    } catch (const CheckpointError&) {
      // not readable: not committed
    }
  }
  DTRAIN_CHECK(!ec, IoError, "cannot list checkpoint root '{}': {}", root_, ec.message());
  std::sort(out.begin(), out.end(),
            [](const Manifest& a, const Manifest& b) { return a.step > b.step; });
  return out;
}

std::optional<Manifest> CheckpointStore::find_resumable(
    const std::function<void(const std::string&)>& log) const {
  auto say = [&](const std::string& s) {
    if (log) log(s);
  };
  std::optional<int64_t> bound;  // only checkpoints at or below `latest` are candidates
  try {
    if (auto l = latest()) {
      bound = l->step;
      try {
        verify(*l);
        return l;
      } catch (const CheckpointError& e) {
        say(fmt::format("checkpoint {} skipped: {}", l->name, e.message()));
      }
    }
  } catch (const CheckpointError& e) {
    say(fmt::format("latest pointer skipped: {}", e.message()));
  }
  for (const auto& m : committed()) {
    if (bound && m.step >= *bound) continue;
    try {
      verify(m);
      return m;
    } catch (const CheckpointError& e) {
      say(fmt::format("checkpoint {} skipped: {}", m.name, e.message()));
    }
  }
  return std::nullopt;
}

}  // namespace dtrain::ckpt
