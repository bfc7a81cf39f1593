// FileStore: a Store whose keys are files in a shared folder (see store.h).
//
// Keys are encoded into file names (letters, digits, '-', '_' and '.' kept, every
// other byte as %XX), values are written to a unique temporary file (mkstemp) and
// renamed into place (atomic on POSIX), and get() polls for the file with a short backoff.
// Deliberately not here: deletion, watches, anything needing a server.
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "dtrain/comm/store.h"
#include "dtrain/common/error.h"

namespace dtrain::comm {
namespace {

std::string encode_key(const std::string& key) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : key) {
    bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '-' || c == '_' || c == '.';
    if (plain && !(out.empty() && c == '.')) {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out.empty() ? std::string("%") : out;
}

}  // namespace

FileStore::FileStore(std::string dir) : dir_(std::move(dir)) {
  std::error_code ec;
  std::filesystem::create_directories(dir_, ec);
  DTRAIN_CHECK(std::filesystem::is_directory(dir_), IoError,
               "file store: cannot create folder '{}'", dir_);
}

std::string FileStore::path_of(const std::string& key) const {
  return (std::filesystem::path(dir_) / ("k_" + encode_key(key))).string();
}

void FileStore::set(const std::string& key, const std::string& value) {
  std::string final_path = path_of(key);
  std::string tmp = (std::filesystem::path(dir_) / ".tmp_XXXXXX").string();
  int fd = ::mkstemp(tmp.data());  // a unique name, created atomically
  DTRAIN_CHECK(fd >= 0, IoError, "file store: cannot create a file in '{}'", dir_);
  size_t done = 0;
  while (done < value.size()) {
    ssize_t k = ::write(fd, value.data() + done, value.size() - done);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) break;
    done += static_cast<size_t>(k);
  }
  ::close(fd);
  DTRAIN_CHECK(done == value.size(), IoError, "file store: cannot write '{}'", tmp);
  std::error_code ec;
  std::filesystem::rename(tmp, final_path, ec);
  DTRAIN_CHECK(!ec, IoError, "file store: cannot rename '{}' to '{}': {}", tmp, final_path,
               ec.message());
}

std::string FileStore::get(const std::string& key, std::chrono::milliseconds timeout) {
  std::string path = path_of(key);
  auto deadline = std::chrono::steady_clock::now() + timeout;
  auto backoff = std::chrono::milliseconds(1);
  for (;;) {
    std::ifstream in(path, std::ios::binary);
    if (in) {
      std::ostringstream ss;
      ss << in.rdbuf();
      return ss.str();
    }
    DTRAIN_CHECK(std::chrono::steady_clock::now() < deadline, TimeoutError,
                 "file store: key '{}' did not appear in '{}' within {} ms", key, dir_,
                 timeout.count());
    std::this_thread::sleep_for(backoff);
    backoff = std::min(backoff * 2, std::chrono::milliseconds(50));
  }
}

}  // namespace dtrain::comm
