#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <pqxx/pqxx>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/common/clock.h"
#include "lib/common/metrics.h"
#include "lib/event/usage_event.h"

namespace meterd::billing {

struct OverageWorkerOptions {
  // Orgs per refresh statement.
  size_t batch_orgs = 5'000;
  // Touched orgs held while Postgres is slow; beyond this the worker falls back to refreshing
  // every subscribed org once (the only full scan, and only after an overflow).
  size_t max_pending_orgs = 1'000'000;
  absl::Duration max_backoff = absl::Seconds(30);
  const Clock* clock = &SystemClock::Get();  // Retry and idle waits.
  MetricsRegistry* metrics = nullptr;        // Where OverageMetrics go (null: a private one).
};

// The worker's metrics, registered by name.
struct OverageMetrics {
  explicit OverageMetrics(MetricsRegistry& registry);
  Counter* refreshes;
  Counter* orgs_refreshed;
  Counter* alerts_raised;
  Counter* failures;
  // Orgs whose charges could not be computed on their own (e.g. an amount beyond int64
  // micros): logged and skipped until touched again, never retried in a loop.
  Counter* failed_orgs;
  Gauge* pending_orgs;
  // Subscription periods `meterd close-period` could not invoice and nobody resolved yet
  // (shared.billing_close_failures), read at start and every minute while idle.
  Gauge* open_close_failures;
};

// Keeps shared.usage_charges and shared.usage_alerts current for the orgs each flush touched,
// on its own thread with its own connection. The flusher only hands over org ids (a short
// lock, no I/O), so a slow or failing worker never delays a flush; failed refreshes are
// retried with backoff and lose nothing (charges are recomputed from usage, not accumulated).
class OverageWorker {
 public:
  static absl::StatusOr<std::unique_ptr<OverageWorker>> Create(std::string conninfo,
                                                               OverageWorkerOptions options);
  ~OverageWorker();

  void Start();
  // Finishes what is pending (bounded by `deadline`), then stops.
  void Stop(absl::Duration deadline = absl::Seconds(5));
  // Thread-safe; called by the flusher after each commit.
  void OrgsTouched(const std::vector<event::OrgId>& orgs);
  const OverageMetrics& metrics() const { return metrics_; }

 private:
  OverageWorker(std::string conninfo, OverageWorkerOptions options);
  void Loop();
  static constexpr absl::Duration kCloseFailuresEvery = absl::Minutes(1);
  absl::Status EnsureConnected();
  void CountOpenCloseFailures();
  // Refreshes `orgs` in batches; a batch Postgres refuses is retried org by org, and an org
  // that fails alone is logged, counted and dropped. Unavailable: retry everything later.
  absl::Status Refresh(const std::vector<event::OrgId>& orgs);
  absl::Status RefreshBatch(const std::vector<event::OrgId>& orgs);
  absl::StatusOr<std::vector<event::OrgId>> SubscribedOrgs();

  const std::string conninfo_;
  const OverageWorkerOptions options_;
  std::unique_ptr<MetricsRegistry> own_metrics_;  // When options.metrics is null.
  OverageMetrics metrics_;
  std::unique_ptr<pqxx::connection> conn_;  // Worker thread only.

  std::mutex mu_;
  std::condition_variable wake_;
  absl::flat_hash_set<event::OrgId> pending_;  // Guarded by mu_.
  bool overflowed_ = false;                    // Guarded by mu_.
  bool stopping_ = false;                      // Guarded by mu_.
  absl::Time stop_deadline_;                   // Guarded by mu_.
  std::thread thread_;
};

}  // namespace meterd::billing
