// Conversions between the wire messages (proto/coordinator.proto) and the plain C++
// views in types.h (enum values this build does not know map to kUnknown), and the
// duration text both the server's and the client's messages use.
#pragma once

#include <chrono>
#include <string>

#include "dtrain/coordinator/types.h"
#include "dtrain/proto/coordinator.pb.h"

namespace dtrain::coordinator {

JobState from_proto(::dtrain::v1::JobState s);
WorkerState from_proto(::dtrain::v1::WorkerState s);
JoinResult from_proto(const ::dtrain::v1::JoinResponse& r);
HeartbeatResult from_proto(const ::dtrain::v1::HeartbeatResponse& r);
JobStatus from_proto(const ::dtrain::v1::JobStatus& s);
CheckpointRef from_proto(const ::dtrain::v1::CheckpointRef& c);

// "250 ms", "2.5 s".
std::string format_duration(std::chrono::milliseconds d);

}  // namespace dtrain::coordinator
