// A small binary tensor archive, and model/optimizer checkpoints built on it.
//
// File layout (all integers little-endian; version 1):
//
//   offset  size  field
//   0       4     magic "DTRN"
//   4       4     u32 format version
//   8       8     u64 header length H (bytes of JSON)
//   16      8     u64 payload length P
//   24      4     u32 CRC-32 (IEEE 802.3, as zlib) of the header and the payload
//   28      4     u32 reserved (0)
//   32      H     JSON header: {"metadata": <any JSON>, "tensors": [{"name", "dtype",
//                 "shape", "offset", "nbytes"}, ...]}; offsets are relative to the
//                 payload start and 64-byte aligned
//   32+H    P     raw tensor data, little-endian, row-major
//
// Writing goes to "<path>.tmp", is fsync'ed, then renamed over <path> (and the
// directory fsync'ed), so a crash leaves either the old file or the new one.
// Reading checks everything before returning anything and throws DataFormatError
// naming the file and the problem (bad magic, newer version, truncated, checksum
// mismatch, malformed header, unknown dtype, a tensor outside the payload); IoError
// when the file cannot be opened, read or written.
//
// Not here: sharding across ranks and the checkpoint manifest (the coordinator's
// job), safetensors export, and a faster checksum (crc32c/xxhash, a later issue).
// Big-endian hosts are not supported (a static_assert in serialize.cc says so).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "dtrain/engine/tensor.h"

namespace dtrain {

namespace nn {
class Module;
}
namespace optim {
class Optimizer;
}

// name -> tensor (the same type as nn::StateDict and optim::StateDict).
using TensorMap = std::map<std::string, Tensor>;

constexpr uint32_t kArchiveVersion = 1;

// CRC-32 (polynomial 0xEDB88320, reflected; crc32("123456789") == 0xCBF43926).
// Pass the previous result as `crc` to continue over several buffers.
uint32_t crc32(const void* data, size_t size, uint32_t crc = 0);

struct Archive {
  TensorMap tensors;
  nlohmann::json metadata;
};

// Bytes written so far of the file's total: 0 before the first byte, then after the
// header and after every piece of tensor data (at most 8 MiB); the last call has
// written == total.
using WriteProgress = std::function<void(uint64_t written, uint64_t total)>;

// Writes `tensors` (CPU tensors of any dtype and strides) and `metadata` to path,
// reporting to `progress` (when set) as the bytes go out.
void save_archive(const std::string& path, const TensorMap& tensors,
                  const nlohmann::json& metadata = nlohmann::json::object(),
                  const WriteProgress& progress = {});
// Reads and validates an archive written by save_archive.
Archive load_archive(const std::string& path);

// ---- checkpoints: model weights, optional optimizer state, user JSON ----
// Tensor names are "model.<state_dict key>" and "optim.<state_dict key>"; the
// metadata holds {"format": "dtrain-checkpoint", "optimizer": name or null,
// "extra": extra}.
void save_checkpoint(const std::string& path, const nn::Module& model,
                     const optim::Optimizer* optimizer,
                     const nlohmann::json& extra = nlohmann::json::object());
// Loads into `model` (strictly: every key, shape and dtype must match) and, when
// given, `optimizer` (which must be of the type that was saved). Nothing is changed
// unless the whole checkpoint fits. Returns `extra`.
nlohmann::json load_checkpoint(const std::string& path, nn::Module& model,
                               optim::Optimizer* optimizer);

}  // namespace dtrain
