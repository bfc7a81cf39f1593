#include "launch_nodes.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "dtrain/common/error.h"
#include "dtrain/coordinator/client.h"

namespace dtrain::cli {

void validate(const NodeLayout& n) {
  DTRAIN_CHECK(n.nnodes >= 1, InvalidArgument, "launch: --nnodes must be >= 1, got {}", n.nnodes);
  DTRAIN_CHECK(n.node_rank >= 0 && n.node_rank < n.nnodes, InvalidArgument,
               "launch: --node-rank {} is out of range for --nnodes {} (expected 0..{})",
               n.node_rank, n.nnodes, n.nnodes - 1);
  DTRAIN_CHECK(!n.multi_node() || !n.coordinator.empty(), InvalidArgument,
               "launch: --nnodes {} needs --coordinator HOST:PORT (node 0 starts it there, the "
               "other nodes join it)",
               n.nnodes);
  if (!n.coordinator.empty()) split_host_port(n.coordinator);
}

std::pair<std::string, int> split_host_port(const std::string& host_port) {
  const size_t colon = host_port.rfind(':');
  DTRAIN_CHECK(colon != std::string::npos && colon > 0 && colon + 1 < host_port.size(),
               InvalidArgument, "launch: --coordinator '{}' is not HOST:PORT", host_port);
  const std::string port_text = host_port.substr(colon + 1);
  char* end = nullptr;
  const long port = std::strtol(port_text.c_str(), &end, 10);
  DTRAIN_CHECK(*end == '\0' && port >= 1 && port <= 65535, InvalidArgument,
               "launch: --coordinator '{}': port '{}' is not in 1..65535", host_port, port_text);
  return {host_port.substr(0, colon), static_cast<int>(port)};
}

std::string local_address_towards(const std::string& host_port) {
  auto [host, port] = split_host_port(host_port);
  if (host.size() >= 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  const int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
  DTRAIN_CHECK(rc == 0, CommError, "launch: cannot resolve the coordinator host '{}': {}", host,
               ::gai_strerror(rc));
  std::string found;
  for (addrinfo* a = res; a != nullptr && found.empty(); a = a->ai_next) {
    const int fd = ::socket(a->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    sockaddr_storage local{};
    socklen_t len = sizeof local;
    if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0 &&
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) == 0) {
      char text[INET6_ADDRSTRLEN] = {};
      const void* raw =
          local.ss_family == AF_INET
              ? static_cast<const void*>(&reinterpret_cast<sockaddr_in*>(&local)->sin_addr)
              : static_cast<const void*>(&reinterpret_cast<sockaddr_in6*>(&local)->sin6_addr);
      if (::inet_ntop(local.ss_family, raw, text, sizeof text) != nullptr) found = text;
    }
    ::close(fd);
  }
  ::freeaddrinfo(res);
  DTRAIN_CHECK(!found.empty(), CommError, "launch: no route from this node to the coordinator {}",
               host_port);
  return found;
}

void check_coordinator_job(const coordinator::ClientOptions& options, int world_size,
                           bool elastic) {
  coordinator::CoordinatorClient client = coordinator::CoordinatorClient::connect(options);
  coordinator::JobStatus st = client.status();  // a different job id fails here, by name
  DTRAIN_CHECK(elastic || st.world_size == world_size, InvalidArgument,
               "launch: this node's job '{}' has world size {} (--nnodes x --nproc-per-node) but "
               "the coordinator {} runs it with world size {}",
               options.job_id, world_size, options.address, st.world_size);
}

}  // namespace dtrain::cli
