// Typed errors shared by every dtrain module (engine, comm, parallel, launcher).
//
// Library code reports failures by throwing a subclass of dtrain::Error; it never
// calls exit()/abort() and never relies on assert for runtime conditions. Every
// error carries the source location that raised it and a message a user can act on
// ("linear 'fc1': expected input [N,576], got [64,1024]"). The CLI maps errors to a
// one-line message and a non-zero exit code.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace dtrain {

enum class ErrorKind {
  kInvalidArgument,  // a bad flag, option or parameter value
  kShape,            // tensor shapes that do not fit together
  kDType,            // an unsupported or mismatched element type
  kIo,               // a file that is missing, unreadable or unwritable
  kDataFormat,       // a file whose contents are malformed or truncated
  kNumerical,        // NaN/inf where a finite value is required
  kUnsupported,      // a feature not available in this build or on this device
  kComm,             // a communication failure (lost peer, aborted communicator)
  kTimeout,          // an operation that did not finish in time
  kCheckpoint,       // a checkpoint that is missing, corrupt, uncommitted or inconsistent
  kInternal,         // a broken invariant inside dtrain (a bug)
};

const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, std::string message, const char* file = nullptr, int line = 0);
  ErrorKind kind() const { return kind_; }
  // The message without the location suffix.
  const std::string& message() const { return message_; }
  // "file.cc:123" or "" when unknown.
  const std::string& where() const { return where_; }

 private:
  ErrorKind kind_;
  std::string message_;
  std::string where_;
};

#define DTRAIN_DEFINE_ERROR(Name, Kind)                                          \
  class Name : public Error {                                                    \
   public:                                                                       \
    explicit Name(std::string message, const char* file = nullptr, int line = 0) \
        : Error(ErrorKind::Kind, std::move(message), file, line) {}              \
  };

DTRAIN_DEFINE_ERROR(InvalidArgument, kInvalidArgument)
DTRAIN_DEFINE_ERROR(ShapeError, kShape)
DTRAIN_DEFINE_ERROR(DTypeError, kDType)
DTRAIN_DEFINE_ERROR(IoError, kIo)
DTRAIN_DEFINE_ERROR(DataFormatError, kDataFormat)
DTRAIN_DEFINE_ERROR(NumericalError, kNumerical)
DTRAIN_DEFINE_ERROR(UnsupportedError, kUnsupported)
DTRAIN_DEFINE_ERROR(CommError, kComm)
DTRAIN_DEFINE_ERROR(TimeoutError, kTimeout)
DTRAIN_DEFINE_ERROR(CheckpointError, kCheckpoint)
DTRAIN_DEFINE_ERROR(InternalError, kInternal)
#undef DTRAIN_DEFINE_ERROR

}  // namespace dtrain

// Throws ErrType(fmt::format(...)) with the current file and line when cond is false.
//   DTRAIN_CHECK(x.dim() == 2, ShapeError, "matmul: expected a 2-D input, got {}", s);
#define DTRAIN_CHECK(cond, ErrType, ...)                                       \
  do {                                                                         \
    if (!(cond)) {                                                             \
      throw ::dtrain::ErrType(::fmt::format(__VA_ARGS__), __FILE__, __LINE__); \
    }                                                                          \
  } while (0)

#define DTRAIN_THROW(ErrType, ...) \
  throw ::dtrain::ErrType(::fmt::format(__VA_ARGS__), __FILE__, __LINE__)
