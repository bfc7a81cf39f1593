// dtrain status: a running job's state from its coordinator (GetJobStatus): the
// job's state, generation, restarts and last committed checkpoint, and per rank its
// host, pid, state, heartbeat age and the progress its heartbeats carry (step,
// samples/s, loss; train_callbacks.h HeartbeatProgress). --json prints the same
// as one JSON object. The coordinator, job id, token and TLS CA default to the
// worker environment (DTRAIN_COORDINATOR, DTRAIN_JOB_ID, DTRAIN_JOB_TOKEN,
// DTRAIN_TLS_CA), so inside a job's shell `dtrain status` needs no flag.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cstdlib>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "commands.h"
#include "dtrain/common/error.h"
#include "dtrain/coordinator/client.h"

namespace dtrain::cli {

namespace {

struct StatusConfig {
  std::string coordinator;
  std::string job_id = "default";
  std::string token;
  std::string tls_ca;
  double timeout_s = 5;
  bool json = false;
};

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : fallback;
}

coordinator::ClientOptions client_options(const StatusConfig& c) {
  coordinator::ClientOptions o;
  o.address = c.coordinator;
  o.job_id = c.job_id;
  o.token = c.token;
  o.tls_from_env();
  if (!c.tls_ca.empty()) o.tls_ca_file = c.tls_ca;
  const auto ms = std::chrono::milliseconds(static_cast<int64_t>(c.timeout_s * 1000));
  o.connect_timeout = ms;
  o.call_timeout = ms;
  return o;
}

nlohmann::json to_json(const coordinator::JobStatus& s) {
  nlohmann::json workers = nlohmann::json::array();
  for (const coordinator::WorkerStatus& w : s.workers) {
    workers.push_back({{"rank", w.rank},
                       {"host", w.host},
                       {"pid", w.pid},
                       {"state", coordinator::worker_state_name(w.state)},
                       {"heartbeat_age_ms", w.last_heartbeat_age.count()},
                       {"step", w.progress.step},
                       {"samples_per_s", w.progress.samples_per_s},
                       {"loss", w.progress.loss}});
  }
  return {{"job_id", s.job_id},
          {"state", coordinator::job_state_name(s.state)},
          {"world_size", s.world_size},
          {"generation", s.generation},
          {"restarts", s.restarts},
          {"max_restarts", s.max_restarts},
          {"uptime_s", s.uptime.count() / 1000.0},
          {"last_checkpoint", s.last_checkpoint.name},
          {"reason", s.reason},
          {"workers", workers}};
}

double job_samples_per_s(const coordinator::JobStatus& s) {
  double total = 0;
  for (const coordinator::WorkerStatus& w : s.workers) total += w.progress.samples_per_s;
  return total;
}

void print_table(const coordinator::JobStatus& s) {
  fmt::print("job '{}': {}, world size {}, generation {}, restarts {} of {}, up {:.1f} s\n",
             s.job_id, coordinator::job_state_name(s.state), s.world_size, s.generation, s.restarts,
             s.max_restarts, s.uptime.count() / 1000.0);
  fmt::print("last checkpoint: {}; {:.0f} samples/s over the ranks\n",
             s.last_checkpoint.name.empty() ? "none" : s.last_checkpoint.name,
             job_samples_per_s(s));
  if (!s.reason.empty()) fmt::print("reason: {}\n", s.reason);
  fmt::print("{:>4}  {:<16} {:>8}  {:<8} {:>9} {:>8} {:>10} {:>8}\n", "rank", "host", "pid",
             "state", "beat_age", "step", "samples/s", "loss");
  for (const coordinator::WorkerStatus& w : s.workers) {
    const bool any = w.progress.step >= 0;
    fmt::print("{:>4}  {:<16} {:>8}  {:<8} {:>7.1f} s {:>8} {:>10} {:>8}\n", w.rank, w.host, w.pid,
               coordinator::worker_state_name(w.state), w.last_heartbeat_age.count() / 1000.0,
               any ? std::to_string(w.progress.step) : "-",
               any ? fmt::format("{:.0f}", w.progress.samples_per_s) : "-",
               any ? fmt::format("{:.4f}", w.progress.loss) : "-");
  }
}

int run_status(const StatusConfig& c) {
  DTRAIN_CHECK(!c.coordinator.empty(), InvalidArgument,
               "dtrain status: no coordinator: pass --coordinator HOST:PORT or set "
               "DTRAIN_COORDINATOR");
  coordinator::CoordinatorClient client =
      coordinator::CoordinatorClient::connect(client_options(c));
  const coordinator::JobStatus s = client.status();
  if (c.json) {
    fmt::print("{}\n", to_json(s).dump());
  } else {
    print_table(s);
  }
  return 0;
}

}  // namespace

Command add_status_command(CLI::App& app) {
  auto c = std::make_shared<StatusConfig>();
  c->coordinator = env_or("DTRAIN_COORDINATOR", "");
  c->job_id = env_or("DTRAIN_JOB_ID", "default");
  c->token = env_or("DTRAIN_JOB_TOKEN", "");
  CLI::App* s = app.add_subcommand("status", "A running job's state from its coordinator");
  s->add_option("--coordinator", c->coordinator, "HOST:PORT (default: $DTRAIN_COORDINATOR)");
  s->add_option("--job-id", c->job_id, "The job's id (default: $DTRAIN_JOB_ID or default)");
  s->add_option("--token", c->token, "The job token (default: $DTRAIN_JOB_TOKEN)");
  s->add_option("--tls-ca", c->tls_ca, "PEM CA of a TLS coordinator (default: $DTRAIN_TLS_CA)");
  s->add_option("--timeout", c->timeout_s, "Seconds to wait for the coordinator")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  s->add_flag("--json", c->json, "One JSON object instead of the table");
  return {s, [c] { return run_status(*c); }};
}

}  // namespace dtrain::cli
