// POSIX socket helpers for the tcp backend: an owning descriptor, "host:port"
// addresses, listening and connecting, and whole-buffer reads and writes bounded by
// a deadline (non-blocking sockets + poll; SIGPIPE is never raised: MSG_NOSIGNAL).
//
// Deliberately not here: the mesh, the handshake and the request queues
// (transport.cc).
#pragma once

#include <chrono>
#include <cstddef>
#include <string>

namespace dtrain::comm::tcp {

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;

// An owned file descriptor, closed on destruction.
// Thread-safety: REQUIRES external synchronization.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset();

 private:
  int fd_ = -1;
};

struct HostPort {
  std::string host;
  int port = 0;
};

// "host:port", "[v6addr]:port"; throws InvalidArgument on anything else.
HostPort parse_host_port(const std::string& text);
std::string format_host_port(const std::string& host, int port);

// strerror_r as a std::string, and the short words used in peer-loss messages.
std::string errno_text(int err);
std::string loss_reason(int err);  // "connection reset", "connection closed" (0), ...

// Milliseconds left until `deadline` for poll(): >= 0, rounded up.
int poll_timeout_ms(Deadline deadline);

// A non-blocking listening socket bound to `bind_address` on an ephemeral port.
// buffer_bytes > 0 sets SO_SNDBUF/SO_RCVBUF, inherited by accepted sockets.
Fd listen_on(const std::string& bind_address, int buffer_bytes, int* port);

// Connects to `addr` (retrying refused connections until the deadline) and returns a
// non-blocking socket. Throws CommError / TimeoutError naming `who`.
Fd connect_to(const HostPort& addr, int buffer_bytes, Deadline deadline, const std::string& who);

// Socket tuning for data connections.
void set_nonblocking(int fd);
void set_nodelay(int fd);
void set_buffers(int fd, int buffer_bytes);

// Whole-buffer I/O on a non-blocking socket for the handshake. write_all throws
// CommError/TimeoutError naming `who`; read_all returns false on EOF.
void write_all(int fd, const void* data, size_t bytes, Deadline deadline, const std::string& who);
bool read_all(int fd, void* data, size_t bytes, Deadline deadline, const std::string& who);

// This host's name (gethostname), used as the advertised address for wildcard binds.
std::string host_name();

}  // namespace dtrain::comm::tcp
