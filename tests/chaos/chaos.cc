// The chaos driver: meterd instances as child processes against an embedded Kafka controlled
// in this process and a private Postgres, under continuous load with malformed and re-sent
// events, with a seeded schedule of faults. Exits non-zero unless Postgres ends up holding
// exactly the produced totals, per (org, meter, industry, day), and every malformed event is
// a rejected row.
//
//   meterd_chaos --seed S --seconds N [--rate EVENTS_PER_S] [--partitions P]
//
// Faults: SIGKILL of an instance (restarted after 0-2 s), an instance joining or leaving,
// a zombie (SIGSTOP past its 6 s session timeout, then SIGCONT: its late flush must be fenced),
// Postgres stopped, crashed (immediate shutdown) or frozen with its connections open for
// longer than a flush, the broker down for 1-5 s, 200-800 ms of broker latency, injected Fetch
// and Heartbeat errors. Same seed, same schedule (the faults, their order, targets and
// delays); what the processes do in between depends on timing.
#include <signal.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "lib/devtools/dev_broker.h"
#include "lib/devtools/loadgen.h"
#include "tests/support/harness.h"

ABSL_FLAG(uint64_t, seed, 1, "Seed of the fault schedule (and of the load)");
ABSL_FLAG(int, seconds, 60, "How long faults are injected");
ABSL_FLAG(int, rate, 3'000, "Events per second produced while faults run");
ABSL_FLAG(int, partitions, 16, "Partitions of the embedded broker's topic");

namespace meterd::testing {
namespace {

constexpr char kTopic[] = "usage-events";
constexpr int kMaxInstances = 3;
// Kafka protocol API keys the broker fails requests of.
constexpr int16_t kFetch = 1;
constexpr int16_t kHeartbeat = 12;

class Chaos {
 public:
  Chaos(uint64_t seed, std::string dir) : rng_(seed), dir_(std::move(dir)), start_(absl::Now()) {}

  bool Setup(int partitions) {
    url_ = SharedPostgres().CreateMigratedDatabase("chaos");
    auto broker = devtools::DevBroker::Start(kTopic, partitions);
    if (!broker.ok()) {
      std::fprintf(stderr, "chaos: %s\n", std::string(broker.status().message()).c_str());
      return false;
    }
    broker_ = std::move(broker).value();
    Launch(0);
    Launch(1);
    return true;
  }

  // One fault, chosen and parameterised by the seeded generator: the first kKinds steps are a
  // seeded permutation of every kind (so even a short run has each at least once), then any.
  void Step() {
    if (order_.empty()) {
      for (int k = 0; k < kKinds; ++k) order_.push_back(k);
      std::shuffle(order_.begin(), order_.end(), rng_);
    }
    const int kind = steps_ < kKinds ? order_[steps_] : Uniform(0, kKinds - 1);
    ++steps_;
    ++counts_[kind];
    switch (kind) {
      case 0: {
        const int i = RunningInstance();
        if (i < 0) break;
        Log("SIGKILL instance %d", i);  // Its partitions move after the session timeout.
        instances_[i]->Signal(SIGKILL);
        instances_[i]->Wait(absl::Seconds(10));
        instances_[i].reset();
        absl::SleepFor(absl::Milliseconds(Uniform(0, 2'000)));
        Launch(i);
        break;
      }
      case 1: {
        for (int i = 0; i < kMaxInstances; ++i) {
          if (!instances_[i]) {
            Launch(i);
            return;
          }
        }
        Log("join skipped: %d instances already", kMaxInstances);
        --counts_[kind];
        break;
      }
      case 2: {
        if (Running() < 2) {
          Log("leave skipped: one instance left");
          --counts_[kind];
          break;
        }
        const int i = RunningInstance();
        Log("SIGTERM instance %d (leaves the group)", i);
        instances_[i]->Signal(SIGTERM);
        const int code = instances_[i]->Wait(absl::Seconds(60));
        if (code != 0) Log("instance %d exited %d on SIGTERM", i, code);
        clean_exits_ok_ &= code == 0;
        instances_[i].reset();
        break;
      }
      case 3: {
        const int i = RunningInstance();
        if (i < 0 || Running() < 2) {
          Log("zombie skipped: one instance left");
          --counts_[kind];
          break;
        }
        Log("zombie: SIGSTOP instance %d for 8 s (session timeout 6 s)", i);
        instances_[i]->Signal(SIGSTOP);
        absl::SleepFor(absl::Seconds(8));
        instances_[i]->Signal(SIGCONT);
        Log("SIGCONT instance %d", i);
        break;
      }
      case 4: {
        const int down_ms = Uniform(0, 3'000);
        switch (Uniform(0, 2)) {
          case 0:
            Log("Postgres stopped (fast) for %d ms", down_ms);
            SharedPostgres().Stop();
            break;
          case 1:
            Log("Postgres crashed (immediate shutdown) for %d ms", down_ms);
            SharedPostgres().Crash();
            break;
          default:
            Log("Postgres frozen (SIGSTOP, connections open) for %d ms", down_ms + 2'000);
            SharedPostgres().Pause();
            absl::SleepFor(absl::Milliseconds(down_ms + 2'000));  // Longer than a flush.
            SharedPostgres().Resume();
            return;
        }
        absl::SleepFor(absl::Milliseconds(down_ms));
        SharedPostgres().Start();
        break;
      }
      case 5: {
        const int down_ms = Uniform(1'000, 5'000);
        Log("broker down for %d ms", down_ms);
        broker_->SetDown(true);
        absl::SleepFor(absl::Milliseconds(down_ms));
        broker_->SetDown(false);
        break;
      }
      case 6: {
        const int rtt_ms = Uniform(200, 800);
        Log("broker latency %d ms for 5 s", rtt_ms);
        broker_->SetRtt(absl::Milliseconds(rtt_ms));
        absl::SleepFor(absl::Seconds(5));
        broker_->SetRtt(absl::ZeroDuration());
        break;
      }
      default: {
        const int count = Uniform(1, 10);
        Log("next %d Fetch and Heartbeat requests fail", count);
        broker_->FailRequests(kFetch, count, RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION);
        broker_->FailRequests(kHeartbeat, count, RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS);
        break;
      }
    }
  }

  // Waits a seeded pause between faults.
  void Pause() { absl::SleepFor(absl::Milliseconds(Uniform(1'000, 4'000))); }

  // At least one instance left running, then stops them all; every one must exit 0.
  bool StopAll() {
    if (Running() == 0) Launch(0);
    bool ok = clean_exits_ok_;
    for (int i = 0; i < kMaxInstances; ++i) {
      if (!instances_[i]) continue;
      instances_[i]->Signal(SIGTERM);
      const int code = instances_[i]->Wait(absl::Seconds(60));
      if (code != 0) {
        Log("instance %d exited %d on the final SIGTERM; log %s", i, code,
            instances_[i]->log_path());
        ok = false;
      }
      instances_[i].reset();
    }
    return ok;
  }

  // How many faults of each kind ran.
  std::string Counts() const {
    static constexpr const char* kNames[kKinds] = {
        "kill", "join", "leave", "zombie", "postgres", "broker_down", "latency", "request_errors"};
    std::string out;
    for (int k = 0; k < kKinds; ++k)
      absl::StrAppend(&out, k ? ", " : "", kNames[k], " ", counts_[k]);
    return out;
  }

  const std::string& url() const { return url_; }
  const std::string& bootstrap() const { return broker_->bootstrap(); }

  template <typename... Args>
  void Log(const absl::FormatSpec<Args...>& format, const Args&... args) {
    std::fprintf(stderr, "chaos %7.1fs: %s\n", absl::ToDoubleSeconds(absl::Now() - start_),
                 absl::StrFormat(format, args...).c_str());
  }

 private:
  int Uniform(int low, int high) { return std::uniform_int_distribution<int>(low, high)(rng_); }
  int Running() const {
    int n = 0;
    for (const auto& p : instances_) n += p ? 1 : 0;
    return n;
  }
  // A seeded choice among the running instances; -1 if none.
  int RunningInstance() {
    std::vector<int> running;
    for (int i = 0; i < kMaxInstances; ++i) {
      if (instances_[i]) running.push_back(i);
    }
    if (running.empty()) return -1;
    return running[Uniform(0, static_cast<int>(running.size()) - 1)];
  }
  void Launch(int i) {
    Log("start instance %d", i);
    instances_[i] = std::make_unique<ChildProcess>(
        std::vector<std::string>{MeterdBinary(), "run", "--pg", url_, "--brokers",
                                 broker_->bootstrap(), "--topic", kTopic, "--group", "chaos",
                                 "--flush-interval", "500ms", "--billing=false",
                                 "--pg-connect-timeout", "3s", "--pg-statement-timeout", "5s",
                                 "--kafka-property", "session.timeout.ms=6000"},
        absl::StrCat(dir_, "/meterd-", i, "-", ++launches_, ".log"));
  }

  static constexpr int kKinds = 8;
  std::mt19937_64 rng_;
  std::vector<int> order_;
  int steps_ = 0;
  int counts_[kKinds] = {};
  const std::string dir_;
  const absl::Time start_;
  std::string url_;
  std::unique_ptr<devtools::DevBroker> broker_;
  std::unique_ptr<ChildProcess> instances_[kMaxInstances];
  int launches_ = 0;
  bool clean_exits_ok_ = true;
};

int Main(uint64_t seed, int seconds, int rate, int partitions) {
  const std::string dir = TempDir("meterd-chaos");
  Chaos chaos(seed, dir);
  chaos.Log("seed %d, %d s of faults at %d events/s, %d partitions, logs in %s", seed, seconds,
            rate, partitions, dir);
  if (!chaos.Setup(partitions)) return 2;

  devtools::LoadgenOptions load;
  load.brokers = chaos.bootstrap();
  load.topic = kTopic;
  load.events = static_cast<int64_t>(rate) * seconds;
  load.orgs = 500;
  load.malformed_share = 0.01;
  load.duplicate_share = 0.05;
  load.seed = seed;
  load.rate = rate;
  absl::StatusOr<devtools::LoadgenResult> produced;
  std::thread producer([&] { produced = devtools::RunLoadgen(load); });

  const absl::Time faults_end = absl::Now() + absl::Seconds(seconds);
  while (absl::Now() < faults_end) {
    chaos.Pause();
    if (absl::Now() >= faults_end) break;
    chaos.Step();
  }
  producer.join();
  if (!produced.ok()) {
    chaos.Log("loadgen failed: %s", std::string(produced.status().message()));
    return 2;
  }
  chaos.Log("faults over; produced %d events (%d valid, %d malformed, %d re-sent)",
            produced->produced, produced->valid, produced->malformed, produced->duplicates);

  // Settle: totals should reach what was produced.
  const int64_t want = SumOf(produced->totals);
  const int64_t got = WaitForSum(chaos.url(), want, absl::Seconds(180));
  const bool stopped_cleanly = chaos.StopAll();
  const std::string diff = DiffTotals(produced->totals, StoredTotals(chaos.url()));
  const int64_t rejected = QueryInt(chaos.url(), "SELECT count(*) FROM shared.rejected_events");
  chaos.Log("faults: %s", chaos.Counts());
  chaos.Log("quantity produced %d, stored %d; rejected rows %d for %d malformed", want, got,
            rejected, produced->malformed);
  bool ok = true;
  if (!diff.empty()) {
    chaos.Log("MISMATCH per key: %s", diff);
    ok = false;
  }
  if (rejected != produced->malformed) {
    chaos.Log("MISMATCH: %d rejected rows for %d malformed events", rejected, produced->malformed);
    ok = false;
  }
  if (!stopped_cleanly) {
    chaos.Log("an instance did not exit 0 on SIGTERM");
    ok = false;
  }
  // Under a sanitizer build, any report in any instance's log fails the run.
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string log = ReadFile(entry.path().string());
    for (const char* report : {"ERROR: AddressSanitizer", "runtime error:", "ThreadSanitizer"}) {
      if (log.find(report) != std::string::npos) {
        chaos.Log("sanitizer report in %s", entry.path().string());
        ok = false;
      }
    }
  }
  chaos.Log("%s (seed %d)", ok ? "EXACT: every key matches" : "FAILED", seed);
  if (ok) std::filesystem::remove_all(dir);  // Logs are kept only for a failed run.
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace meterd::testing

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return meterd::testing::Main(absl::GetFlag(FLAGS_seed), absl::GetFlag(FLAGS_seconds),
                               absl::GetFlag(FLAGS_rate), absl::GetFlag(FLAGS_partitions));
}
