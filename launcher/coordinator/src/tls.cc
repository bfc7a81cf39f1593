#include "tls.h"

#include <fstream>
#include <sstream>

#include "dtrain/common/error.h"

namespace dtrain::coordinator {

namespace {

// The whole PEM file; it must look like PEM so that a swapped path fails here, by name.
std::string read_pem(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  DTRAIN_CHECK(in.good(), IoError, "coordinator TLS: cannot read the {} file '{}'", what, path);
  std::ostringstream s;
  s << in.rdbuf();
  std::string pem = s.str();
  DTRAIN_CHECK(pem.find("-----BEGIN ") != std::string::npos, InvalidArgument,
               "coordinator TLS: the {} file '{}' is not PEM (no -----BEGIN line)", what, path);
  return pem;
}

}  // namespace

std::shared_ptr<grpc::ServerCredentials> server_credentials(const std::string& cert_file,
                                                            const std::string& key_file) {
  if (cert_file.empty() && key_file.empty()) return grpc::InsecureServerCredentials();
  DTRAIN_CHECK(!cert_file.empty() && !key_file.empty(), InvalidArgument,
               "coordinator TLS: give both a certificate and a key (--tls-cert, --tls-key)");
  grpc::SslServerCredentialsOptions ssl;
  ssl.pem_key_cert_pairs.push_back(
      {read_pem(key_file, "private key"), read_pem(cert_file, "certificate")});
  return grpc::SslServerCredentials(ssl);
}

std::shared_ptr<grpc::ChannelCredentials> channel_credentials(const std::string& ca_file) {
  if (ca_file.empty()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = read_pem(ca_file, "CA certificate");
  return grpc::SslCredentials(ssl);
}

bool is_loopback(const std::string& host) {
  std::string h = host;
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  return h == "localhost" || h == "::1" || h.rfind("127.", 0) == 0;
}

}  // namespace dtrain::coordinator
