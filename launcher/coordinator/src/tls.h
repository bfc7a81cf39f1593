// TLS credentials for the coordinator's server and client (gRPC SSL), from PEM files.
// Errors name the file and what is wrong with it (IoError / InvalidArgument).
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

namespace dtrain::coordinator {

// Plaintext when both are empty; TLS with this certificate chain and key otherwise.
std::shared_ptr<grpc::ServerCredentials> server_credentials(const std::string& cert_file,
                                                            const std::string& key_file);
// Plaintext when ca_file is empty; TLS verifying the server against ca_file otherwise.
std::shared_ptr<grpc::ChannelCredentials> channel_credentials(const std::string& ca_file);

// True for 127.0.0.0/8, ::1 and "localhost": the addresses that need no token.
bool is_loopback(const std::string& host);

}  // namespace dtrain::coordinator
