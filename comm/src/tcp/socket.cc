// POSIX socket helpers for the tcp backend (see socket.h).
#include "tcp/socket.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <memory>
#include <thread>

#include "dtrain/common/error.h"

namespace dtrain::comm::tcp {
namespace {

struct AddrInfoDeleter {
  void operator()(addrinfo* ai) const { freeaddrinfo(ai); }
};
using AddrInfoPtr = std::unique_ptr<addrinfo, AddrInfoDeleter>;

AddrInfoPtr resolve(const std::string& host, int port, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
  addrinfo* res = nullptr;
  std::string service = std::to_string(port);
  int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &res);
  DTRAIN_CHECK(rc == 0, CommError, "tcp: cannot resolve '{}': {}", host, gai_strerror(rc));
  return AddrInfoPtr(res);
}

// Waits for `events` on fd until the deadline; returns false on timeout.
bool wait_for(int fd, short events, Deadline deadline) {
  for (;;) {
    pollfd p{fd, events, 0};
    int rc = ::poll(&p, 1, poll_timeout_ms(deadline));
    if (rc > 0) return true;
    if (rc == 0) {
      if (Clock::now() >= deadline) return false;
      continue;
    }
    if (errno != EINTR) DTRAIN_THROW(CommError, "tcp: poll failed: {}", errno_text(errno));
  }
}

bool retryable_connect_error(int err) {
  return err == ECONNREFUSED || err == ETIMEDOUT || err == ENETUNREACH || err == EHOSTUNREACH ||
         err == ECONNRESET || err == EAGAIN;
}

}  // namespace

Fd& Fd::operator=(Fd&& o) noexcept {
  if (this != &o) {
    reset();
    fd_ = o.release();
  }
  return *this;
}

void Fd::reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

HostPort parse_host_port(const std::string& text) {
  HostPort hp;
  size_t colon;
  if (!text.empty() && text[0] == '[') {
    size_t close = text.find(']');
    DTRAIN_CHECK(close != std::string::npos && close + 1 < text.size() && text[close + 1] == ':',
                 InvalidArgument, "tcp: bad address '{}', expected [v6addr]:port", text);
    hp.host = text.substr(1, close - 1);
    colon = close + 1;
  } else {
    colon = text.rfind(':');
    DTRAIN_CHECK(colon != std::string::npos && colon > 0, InvalidArgument,
                 "tcp: bad address '{}', expected host:port", text);
    hp.host = text.substr(0, colon);
  }
  std::string port = text.substr(colon + 1);
  DTRAIN_CHECK(
      !port.empty() && port.size() <= 5 &&
          std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; }),
      InvalidArgument, "tcp: bad port in address '{}'", text);
  hp.port = std::stoi(port);
  DTRAIN_CHECK(hp.port > 0 && hp.port < 65536, InvalidArgument, "tcp: bad port in address '{}'",
               text);
  return hp;
}

std::string format_host_port(const std::string& host, int port) {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

std::string errno_text(int err) {
  char buf[256];
  // GNU strerror_r returns the message pointer (which may or may not be buf).
  const char* msg = strerror_r(err, buf, sizeof(buf));
  return msg;
}

std::string loss_reason(int err) {
  switch (err) {
    case 0:
      return "connection closed";
    case ECONNRESET:
      return "connection reset";
    case EPIPE:
      return "broken pipe";
    case ETIMEDOUT:
      return "connection timed out";
    case EHOSTUNREACH:
      return "host unreachable";
    case ENETUNREACH:
      return "network unreachable";
    default:
      return errno_text(err);
  }
}

int poll_timeout_ms(Deadline deadline) {
  auto left = deadline - Clock::now();
  if (left <= Clock::duration::zero()) return 0;
  auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
  return static_cast<int>(std::min<long long>(ms, INT_MAX));
}

void set_nonblocking(int fd) {
  int flags = ::fcntl(fd, F_GETFL, 0);
  DTRAIN_CHECK(flags >= 0 && ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0, CommError,
               "tcp: fcntl(O_NONBLOCK) failed: {}", errno_text(errno));
}

void set_nodelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

void set_buffers(int fd, int buffer_bytes) {
  if (buffer_bytes <= 0) return;  // keep the kernel's autotuning
  ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buffer_bytes, sizeof(buffer_bytes));
  ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buffer_bytes, sizeof(buffer_bytes));
}

Fd listen_on(const std::string& bind_address, int buffer_bytes, int* port) {
  AddrInfoPtr res = resolve(bind_address, 0, /*passive=*/true);
  int last_err = 0;
  for (addrinfo* ai = res.get(); ai != nullptr; ai = ai->ai_next) {
    Fd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
    if (!fd.valid()) {
      last_err = errno;
      continue;
    }
    int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    set_buffers(fd.get(), buffer_bytes);
    if (::bind(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(fd.get(), SOMAXCONN) != 0) {
      last_err = errno;
      continue;
    }
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    DTRAIN_CHECK(::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&ss), &len) == 0, CommError,
                 "tcp: getsockname failed: {}", errno_text(errno));
    *port = ss.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
                                     : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
    set_nonblocking(fd.get());
    return fd;
  }
  DTRAIN_THROW(CommError, "tcp: cannot listen on '{}': {}", bind_address, errno_text(last_err));
}

Fd connect_to(const HostPort& addr, int buffer_bytes, Deadline deadline, const std::string& who) {
  AddrInfoPtr res = resolve(addr.host, addr.port, /*passive=*/false);
  int last_err = 0;
  auto backoff = std::chrono::milliseconds(5);
  for (;;) {
    for (addrinfo* ai = res.get(); ai != nullptr; ai = ai->ai_next) {
      Fd fd(
          ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol));
      if (!fd.valid()) {
        last_err = errno;
        continue;
      }
      set_buffers(fd.get(), buffer_bytes);
      int rc = ::connect(fd.get(), ai->ai_addr, ai->ai_addrlen);
      if (rc != 0 && errno == EINPROGRESS) {
        if (!wait_for(fd.get(), POLLOUT, deadline)) {
          last_err = ETIMEDOUT;
          continue;
        }
        int err = 0;
        socklen_t len = sizeof(err);
        ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
        rc = err == 0 ? 0 : -1;
        errno = err;
      }
      if (rc == 0) return fd;
      last_err = errno;
      if (!retryable_connect_error(last_err)) {
        DTRAIN_THROW(CommError, "tcp: cannot connect to {} at {}: {}", who,
                     format_host_port(addr.host, addr.port), errno_text(last_err));
      }
    }
    if (Clock::now() + backoff >= deadline) break;
    std::this_thread::sleep_for(backoff);
    backoff = std::min(backoff * 2, std::chrono::milliseconds(200));
  }
  DTRAIN_THROW(TimeoutError,
               "tcp: could not connect to {} at {} before the timeout (last error: {})", who,
               format_host_port(addr.host, addr.port), errno_text(last_err));
}

void write_all(int fd, const void* data, size_t bytes, Deadline deadline, const std::string& who) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    ssize_t k = ::send(fd, p, bytes, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (k > 0) {
      p += k;
      bytes -= static_cast<size_t>(k);
      continue;
    }
    if (k < 0 && errno == EINTR) continue;
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      DTRAIN_CHECK(wait_for(fd, POLLOUT, deadline), TimeoutError, "tcp: timed out sending to {}",
                   who);
      continue;
    }
    DTRAIN_THROW(CommError, "tcp: lost connection to {} ({})", who, loss_reason(errno));
  }
}

bool read_all(int fd, void* data, size_t bytes, Deadline deadline, const std::string& who) {
  char* p = static_cast<char*>(data);
  while (bytes > 0) {
    ssize_t k = ::recv(fd, p, bytes, MSG_DONTWAIT);
    if (k > 0) {
      p += k;
      bytes -= static_cast<size_t>(k);
      continue;
    }
    if (k == 0) return false;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      DTRAIN_CHECK(wait_for(fd, POLLIN, deadline), TimeoutError, "tcp: timed out waiting for {}",
                   who);
      continue;
    }
    DTRAIN_THROW(CommError, "tcp: lost connection to {} ({})", who, loss_reason(errno));
  }
  return true;
}

std::string host_name() {
  char buf[256] = {};
  DTRAIN_CHECK(::gethostname(buf, sizeof(buf) - 1) == 0, CommError, "tcp: gethostname failed: {}",
               errno_text(errno));
  return buf;
}

}  // namespace dtrain::comm::tcp
