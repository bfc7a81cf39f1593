#include "tensorboard.h"

#include <fmt/format.h>
#include <unistd.h>

#include <array>
#include <bit>
#include <chrono>
#include <cmath>
#include <filesystem>

#include "dtrain/common/error.h"

namespace dtrain::cli {

namespace fs = std::filesystem;

namespace {

constexpr std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    table[i] = c;
  }
  return table;
}

constexpr std::array<uint32_t, 256> kCrc32cTable = make_crc32c_table();

void put_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

// Protobuf wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.
void put_tag(std::string& out, int field, int wire_type) {
  put_varint(out, static_cast<uint64_t>(field) << 3 | static_cast<uint64_t>(wire_type));
}

void put_bytes(std::string& out, int field, std::string_view bytes) {
  put_tag(out, field, 2);
  put_varint(out, bytes.size());
  out.append(bytes);
}

// Event.wall_time (1) and, when non-zero (proto3 leaves defaults out), Event.step (2).
std::string event_head(double wall_time, int64_t step) {
  std::string e;
  put_tag(e, 1, 1);
  put_le(e, std::bit_cast<uint64_t>(wall_time), 8);
  if (step != 0) {
    put_tag(e, 2, 0);
    put_varint(e, static_cast<uint64_t>(step));
  }
  return e;
}

std::string summary_value(const Scalar& s) {
  std::string v;
  put_bytes(v, 1, s.tag);
  put_tag(v, 2, 5);
  put_le(v, std::bit_cast<uint32_t>(s.value), 4);
  return v;
}

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string host_name() {
  std::array<char, 256> buf{};
  if (::gethostname(buf.data(), buf.size() - 1) != 0) return "host";
  return buf.data();
}

}  // namespace

uint32_t crc32c(std::string_view data) {
  uint32_t c = 0xFFFFFFFFu;
  for (unsigned char b : data) c = kCrc32cTable[(c ^ b) & 0xff] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(std::string_view data) {
  const uint32_t c = crc32c(data);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

std::string frame_record(std::string_view data) {
  std::string length;
  put_le(length, data.size(), 8);
  std::string r = length;
  put_le(r, masked_crc32c(length), 4);
  r.append(data);
  put_le(r, masked_crc32c(data), 4);
  return r;
}

std::string file_version_event(double wall_time) {
  std::string e = event_head(wall_time, 0);
  put_bytes(e, 3, "brain.Event:2");
  return e;
}

std::string scalars_event(double wall_time, int64_t step, const std::vector<Scalar>& scalars) {
  std::string summary;
  for (const Scalar& s : scalars) put_bytes(summary, 1, summary_value(s));
  std::string e = event_head(wall_time, step);
  put_bytes(e, 5, summary);
  return e;
}

std::string session_start_event(double wall_time, int64_t step) {
  std::string log;
  put_tag(log, 1, 0);
  put_varint(log, 1);  // SessionLog.START
  std::string e = event_head(wall_time, step);
  put_bytes(e, 7, log);
  return e;
}

std::string event_file_name(int64_t unix_seconds, std::string_view host, int pid, int rank) {
  return fmt::format("events.out.tfevents.{}.{}.{}.rank{}", unix_seconds, host, pid, rank);
}

EventWriter::EventWriter(std::string path) : path_(std::move(path)) {
  out_.open(path_, std::ios::binary | std::ios::trunc);
  DTRAIN_CHECK(out_.is_open(), IoError, "cannot create the TensorBoard event file {}", path_);
  write_record(file_version_event(unix_now()));
  flush();
}

void EventWriter::add_scalars(int64_t step, const std::vector<Scalar>& scalars, double wall_time) {
  write_record(scalars_event(wall_time, step, scalars));
}

void EventWriter::add_session_start(int64_t step, double wall_time) {
  write_record(session_start_event(wall_time, step));
}

void EventWriter::write_record(std::string_view event) {
  const std::string r = frame_record(event);
  out_.write(r.data(), static_cast<std::streamsize>(r.size()));
  DTRAIN_CHECK(out_.good(), IoError, "writing the TensorBoard event file {} failed", path_);
}

void EventWriter::flush() {
  out_.flush();
  DTRAIN_CHECK(out_.good(), IoError, "writing the TensorBoard event file {} failed", path_);
}

std::string tensorboard_dir(const std::string& flag, const std::string& metrics_path) {
  if (flag == "none") return "";
  if (!flag.empty()) return flag;
  const fs::path parent = fs::path(metrics_path).parent_path();
  return parent.empty() ? "." : parent.string();
}

double gradient_norm(const nn::Module& model) {
  double sum = 0;
  for (const Tensor& p : model.parameters()) {
    Tensor g = p.grad();
    if (!g.defined()) continue;
    Tensor h = g.to(Device::cpu()).to(DType::f64).contiguous();
    const double* d = h.data<double>();
    for (int64_t i = 0; i < h.numel(); ++i) sum += d[i] * d[i];
  }
  return std::sqrt(sum);
}

TensorBoardCallback::TensorBoardCallback(std::string dir, int rank, TensorBoardSources sources)
    : dir_(std::move(dir)), rank_(rank), sources_(std::move(sources)) {}

void TensorBoardCallback::on_train_begin(const TrainBegin& begin) {
  std::error_code ec;
  fs::create_directories(dir_, ec);
  DTRAIN_CHECK(!ec, IoError, "cannot create the TensorBoard folder {}: {}", dir_, ec.message());
  const auto now = static_cast<int64_t>(unix_now());
  writer_ = std::make_unique<EventWriter>(
      (fs::path(dir_) / event_file_name(now, host_name(), static_cast<int>(::getpid()), rank_))
          .string());
  if (begin.start_step > 0) writer_->add_session_start(begin.start_step, unix_now());
  last_log_step_ = begin.start_step;
  if (sources_.sync_seconds) last_sync_seconds_ = sources_.sync_seconds();
}

void TensorBoardCallback::on_log(const StepEnd& log) {
  std::vector<Scalar> s = {{"train/loss", static_cast<float>(log.loss)},
                           {"train/lr", static_cast<float>(log.lr)},
                           {"train/samples_per_s", static_cast<float>(log.samples_per_s)}};
  if (sources_.model) {
    s.push_back({"train/grad_norm", static_cast<float>(gradient_norm(*sources_.model))});
  }
  if (sources_.sync_seconds && log.step > last_log_step_) {
    const double total = sources_.sync_seconds();
    const double per_step = (total - last_sync_seconds_) / double(log.step - last_log_step_);
    s.push_back({"train/sync_ms", static_cast<float>(per_step * 1000)});
    last_sync_seconds_ = total;
  }
  last_log_step_ = log.step;
  writer_->add_scalars(log.step, s, unix_now());
  writer_->flush();
}

void TensorBoardCallback::on_train_end(const TrainStats& /*stats*/) {
  if (writer_) writer_->flush();
}

// "test_accuracy" -> "test/accuracy": the metric's first '_' becomes a '/'.
void TensorBoardCallback::on_eval(const TrainStats& stats) {
  std::vector<Scalar> s;
  for (const auto& [name, value] : stats.eval) {
    std::string tag = name;
    const size_t at = tag.find('_');
    if (at != std::string::npos) tag[at] = '/';
    s.push_back({tag, static_cast<float>(value)});
  }
  if (s.empty() || !writer_) return;
  writer_->add_scalars(stats.steps, s, unix_now());
  writer_->flush();
}

}  // namespace dtrain::cli
