// The process log (see logging.h): a formatter that reads the writer's context, one
// logger with a distributing sink (stderr, plus a file once a command opens one).
#include "logging.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/dist_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <unistd.h>
#include <CLI/CLI.hpp>

#include <array>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <utility>

#include "dtrain/common/error.h"

namespace dtrain::cli {

namespace {

namespace fs = std::filesystem;

const std::vector<std::string> kLevels = {"trace", "debug", "info", "warn", "error"};
const std::vector<std::string> kFormats = {"text", "json"};

spdlog::level::level_enum parse_level(const std::string& name) {
  if (name == "trace") return spdlog::level::trace;
  if (name == "debug") return spdlog::level::debug;
  if (name == "warn") return spdlog::level::warn;
  if (name == "error") return spdlog::level::err;
  return spdlog::level::info;
}

const char* level_name(spdlog::level::level_enum l) {
  switch (l) {
    case spdlog::level::trace:
      return "trace";
    case spdlog::level::debug:
      return "debug";
    case spdlog::level::info:
      return "info";
    case spdlog::level::warn:
      return "warn";
    case spdlog::level::err:
      return "error";
    case spdlog::level::critical:
      return "critical";
    default:
      return "off";
  }
}

std::string host_name() {
  std::array<char, 256> buf{};
  if (::gethostname(buf.data(), buf.size() - 1) != 0) return "?";
  return buf.data();
}

// "2026-12-07 12:00:01.123" (UTC); `t` between date and time.
std::string utc_time(std::chrono::system_clock::time_point tp, char t) {
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(tp.time_since_epoch()).count();
  std::time_t secs = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  ::gmtime_r(&secs, &tm);
  return fmt::format("{:04}-{:02}-{:02}{}{:02}:{:02}:{:02}.{:03}", tm.tm_year + 1900, tm.tm_mon + 1,
                     tm.tm_mday, t, tm.tm_hour, tm.tm_min, tm.tm_sec, ms % 1000);
}

std::string who(const LogContext& c) {
  switch (c.role) {
    case LogRole::kLaunch:
      return "launch";
    case LogRole::kCoordinator:
      return "coordinator";
    default:
      break;
  }
  std::string gen = c.generation == 0 ? "-" : std::to_string(c.generation);
  return fmt::format("rank {}/{} local {} gen {}", c.rank, c.world_size, c.local_rank, gen);
}

std::string text_line(const spdlog::details::log_msg& msg, const LogContext& c,
                      std::string_view text) {
  if (c.role == LogRole::kPlain) return fmt::format("{}\n", text);
  return fmt::format("{} {} {} host {}] {}\n", utc_time(msg.time, ' '),
                     spdlog::level::to_short_c_str(msg.level), who(c), c.host, text);
}

std::string json_line(const spdlog::details::log_msg& msg, const LogContext& c,
                      std::string_view text) {
  nlohmann::json j;
  j["time"] = utc_time(msg.time, 'T') + "Z";
  j["level"] = level_name(msg.level);
  const bool worker = c.role == LogRole::kRank;
  j["role"] = worker ? "rank" : c.role == LogRole::kLaunch ? "launch" : "coordinator";
  j["rank"] = worker ? nlohmann::json(c.rank) : nlohmann::json();
  j["local_rank"] = worker ? nlohmann::json(c.local_rank) : nlohmann::json();
  j["generation"] = worker && c.generation > 0 ? nlohmann::json(c.generation) : nlohmann::json();
  j["host"] = c.host;
  j["msg"] = std::string(text);
  // Replace, not throw, on bytes that are not UTF-8 (a path, a child's output).
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

// The context every formatter reads; a worker's generation changes while it runs.
struct LogState {
  mutable std::mutex mu;
  LogContext context;

  LogContext snapshot() const {
    std::lock_guard<std::mutex> lock(mu);
    return context;
  }
};

class ContextFormatter final : public spdlog::formatter {
 public:
  ContextFormatter(std::shared_ptr<const LogState> state, bool json)
      : state_(std::move(state)), json_(json) {}

  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    const LogContext c = state_->snapshot();
    std::string_view text(msg.payload.data(), msg.payload.size());
    std::string line = json_ ? json_line(msg, c, text) : text_line(msg, c, text);
    dest.append(line.data(), line.data() + line.size());
  }

  std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<ContextFormatter>(state_, json_);
  }

 private:
  std::shared_ptr<const LogState> state_;
  bool json_;
};

// spdlog's default logger in this binary: it keeps the context and the sinks.
class ProcessLogger final : public spdlog::logger {
 public:
  ProcessLogger(std::shared_ptr<LogState> state, std::shared_ptr<spdlog::sinks::dist_sink_mt> sinks)
      : spdlog::logger("dtrain", sinks), state_(std::move(state)), sinks_(std::move(sinks)) {}

  LogState& state() { return *state_; }
  const std::shared_ptr<LogState>& shared_state() const { return state_; }
  spdlog::sinks::dist_sink_mt& sinks() { return *sinks_; }

 private:
  std::shared_ptr<LogState> state_;
  std::shared_ptr<spdlog::sinks::dist_sink_mt> sinks_;
};

ProcessLogger& process_logger() {
  auto* l = dynamic_cast<ProcessLogger*>(spdlog::default_logger_raw());
  DTRAIN_CHECK(l != nullptr, InternalError,
               "the process log is not installed (install_process_logger() in main)");
  return *l;
}

std::string pick(const std::string& given, const EnvReader& env, const std::string& var) {
  if (!given.empty()) return given;
  std::optional<std::string> v = env(var);
  return v ? *v : "";
}

// `label` names where the value came from: "--log-level loud", "DTRAIN_LOG_LEVEL=loud".
void check_member(const std::string& value, const std::vector<std::string>& allowed,
                  const std::string& label) {
  for (const std::string& a : allowed) {
    if (value == a) return;
  }
  DTRAIN_THROW(InvalidArgument, "{}: expected one of {}", label, fmt::join(allowed, ", "));
}

}  // namespace

void add_log_options(CLI::App* app, LogOptions& o) {
  app->add_option("--log-level", o.level,
                  "trace | debug | info | warn | error (default: $DTRAIN_LOG_LEVEL, else info)")
      ->check(CLI::IsMember(kLevels));
  app->add_option("--log-dir", o.dir,
                  "Folder for the log files (rank-<r>.log, launch.log, coordinator.log); "
                  "default: $DTRAIN_LOG_DIR, else train's run folder/logs; none: no files");
  app->add_option("--log-format", o.format,
                  "Log files as text or json lines (default: $DTRAIN_LOG_FORMAT, else text)")
      ->check(CLI::IsMember(kFormats));
}

LogOptions resolve_log_options(LogOptions given, const EnvReader& env) {
  const bool level_given = !given.level.empty();
  const bool format_given = !given.format.empty();
  given.level = pick(given.level, env, "DTRAIN_LOG_LEVEL");
  given.format = pick(given.format, env, "DTRAIN_LOG_FORMAT");
  given.dir = pick(given.dir, env, "DTRAIN_LOG_DIR");
  if (given.level.empty()) given.level = "info";
  if (given.format.empty()) given.format = "text";
  check_member(given.level, kLevels,
               (level_given ? "--log-level " : "DTRAIN_LOG_LEVEL=") + given.level);
  check_member(given.format, kFormats,
               (format_given ? "--log-format " : "DTRAIN_LOG_FORMAT=") + given.format);
  return given;
}

std::vector<std::string> log_env(const LogOptions& o) {
  std::vector<std::string> env = {"DTRAIN_LOG_LEVEL=" + o.level, "DTRAIN_LOG_FORMAT=" + o.format};
  if (!o.dir.empty()) {
    std::error_code ec;
    fs::path abs = o.dir == "none" ? fs::path(o.dir) : fs::absolute(o.dir, ec);
    env.push_back("DTRAIN_LOG_DIR=" + (ec ? o.dir : abs.string()));
  }
  return env;
}

void install_process_logger() {
  auto state = std::make_shared<LogState>();
  state->context.host = host_name();
  auto console = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  console->set_formatter(std::make_unique<ContextFormatter>(state, false));
  auto sinks = std::make_shared<spdlog::sinks::dist_sink_mt>();
  sinks->add_sink(console);
  auto logger = std::make_shared<ProcessLogger>(state, sinks);
  logger->set_level(spdlog::level::info);
  logger->flush_on(spdlog::level::trace);  // every line: a killed worker keeps its log
  // The one place the default logger is set (see the file comment of logging.h).
  spdlog::set_default_logger(std::move(logger));
}

void configure_process_log(const LogOptions& o, const LogContext& context) {
  ProcessLogger& l = process_logger();
  {
    std::lock_guard<std::mutex> lock(l.state().mu);
    std::string host = l.state().context.host;
    l.state().context = context;
    if (l.state().context.host.empty()) l.state().context.host = host;
  }
  l.set_level(parse_level(o.level));
}

LogContext worker_log_context(const WorkerIdentity& id) {
  LogContext c;
  c.role = LogRole::kRank;
  c.rank = id.rank;
  c.world_size = id.world_size;
  c.local_rank = id.local_rank;
  return c;
}

std::string log_file_name(const LogContext& c) {
  switch (c.role) {
    case LogRole::kLaunch:
      return "launch.log";
    case LogRole::kCoordinator:
      return "coordinator.log";
    default:
      return fmt::format("rank-{}.log", c.rank);
  }
}

std::string open_log_file(const LogOptions& o, const std::string& dir) {
  ProcessLogger& l = process_logger();
  std::error_code ec;
  fs::create_directories(dir, ec);
  DTRAIN_CHECK(!ec, IoError, "--log-dir {}: cannot create the folder: {}", dir, ec.message());
  const std::string path = (fs::path(dir) / log_file_name(l.state().snapshot())).string();
  std::shared_ptr<spdlog::sinks::basic_file_sink_mt> file;
  try {
    file = std::make_shared<spdlog::sinks::basic_file_sink_mt>(path, /*truncate=*/false);
  } catch (const spdlog::spdlog_ex& e) {
    DTRAIN_THROW(IoError, "--log-dir {}: cannot write {}: {}", dir, path, e.what());
  }
  file->set_formatter(std::make_unique<ContextFormatter>(l.shared_state(), o.format == "json"));
  l.sinks().add_sink(std::move(file));
  return path;
}

void set_log_membership(uint64_t generation, int rank, int world_size) {
  auto* l = dynamic_cast<ProcessLogger*>(spdlog::default_logger_raw());
  if (l == nullptr) return;  // not the dtrain binary (a test linking the session)
  std::lock_guard<std::mutex> lock(l->state().mu);
  l->state().context.generation = generation;
  l->state().context.rank = rank;
  l->state().context.world_size = world_size;
}

std::optional<std::string> error_message(const std::string& line) {
  if (!line.empty() && line[0] == '{') {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_object() || !j.contains("level") || !j.contains("msg")) return std::nullopt;
    if (!j["level"].is_string() || !j["msg"].is_string()) return std::nullopt;
    const std::string level = j["level"].get<std::string>();
    if (level != "error" && level != "critical") return std::nullopt;
    return j["msg"].get<std::string>();
  }
  // "2026-12-07 12:00:01.123 E rank ...] message"
  if (line.size() < 26 || line[23] != ' ' || (line[24] != 'E' && line[24] != 'C')) {
    return std::nullopt;
  }
  size_t end = line.find("] ");
  if (end == std::string::npos) return std::nullopt;
  return line.substr(end + 2);
}

std::vector<std::string> last_error_messages(const std::string& path, size_t n) {
  std::ifstream in(path);
  std::vector<std::string> found;
  std::string line;
  while (std::getline(in, line)) {
    std::optional<std::string> msg = error_message(line);
    if (!msg) continue;
    found.push_back(std::move(*msg));
    if (found.size() > n) found.erase(found.begin());
  }
  return found;
}

}  // namespace dtrain::cli
