#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/common/clock.h"
#include "lib/common/metrics.h"

namespace meterd::stripe {

struct ExporterOptions {
  std::string api_base = "https://api.stripe.com";  // --stripe-api-base (tests: a local fake).
  std::string secret_key;                           // sk_… / rk_…; never logged.
  int senders = 4;                                  // Concurrent connections to Stripe.
  int batch = 20;  // Rows one sender claims (and holds locked) per transaction.
  absl::Duration request_timeout = absl::Seconds(30);
  absl::Duration idle_poll = absl::Seconds(5);      // How often an idle sender looks for new rows.
  absl::Duration retry_initial = absl::Seconds(1);  // A row's first retry; doubles per attempt.
  absl::Duration max_backoff = absl::Minutes(10);
  absl::Duration status_every = absl::Seconds(10);  // Backlog gauges refresh.
  MetricsRegistry* metrics = nullptr;               // Null: a private registry.
};

// The exporter's metrics, registered by name.
struct ExporterMetrics {
  explicit ExporterMetrics(MetricsRegistry& registry);
  Counter* sent;         // Rows Stripe accepted (2xx, or a replay of an earlier 2xx).
  Counter* retried_5xx;  // Attempts to retry later, by cause.
  Counter* retried_429;
  Counter* retried_network;  // Timeouts, resets, connection and TLS errors.
  Counter* refused;          // Rows Stripe refused (4xx): state failed, with Stripe's message.
  Counter* auth_failures;    // 401 (every sender pauses, rows untouched) and 403 (retried).
  Gauge* pending;            // Rows not yet sent (outbox backlog).
  Gauge* failed_rows;        // Rows in state failed (need shared.retry_stripe_exports()).
  Gauge* oldest_pending_seconds;
};

// What one Drain() did.
struct DrainSummary {
  int64_t sent = 0;
  int64_t refused = 0;
  int64_t still_pending = 0;  // Rows left (retries due later than the deadline, or errors).
  int64_t failed_rows = 0;    // Every row in state failed, from this run or earlier.
  bool status_known = false;  // The two counts above were read (Postgres answered).
};

// Sends shared.stripe_outbox to Stripe: `senders` threads, each with its own Postgres
// connection and keep-alive HTTP connection, claim due rows (FOR UPDATE SKIP LOCKED, so
// several meterd processes share the work), send each with its identifier as the
// Idempotency-Key, and mark it in the transaction that claimed it. Retries (5xx, timeouts,
// network errors, 429 honouring Retry-After for every sender) back off per row, exponentially
// with jitter up to max_backoff; a 4xx refusal marks the row failed with Stripe's error; a
// 401/403 pauses every sender without touching rows.
class StripeExporter {
 public:
  // InvalidArgument naming the flag when the key or base URL cannot work.
  static absl::StatusOr<std::unique_ptr<StripeExporter>> Create(std::string conninfo,
                                                                ExporterOptions options);
  ~StripeExporter();

  // Runs the senders until Stop().
  void Start();
  void Stop();
  // Runs the senders until no row is pending (each sent or failed) or `deadline` passes.
  DrainSummary Drain(absl::Duration deadline);
  const ExporterMetrics& metrics() const { return metrics_; }

 private:
  StripeExporter(std::string conninfo, ExporterOptions options);
  void SenderLoop(int index, bool drain);
  bool RefreshStatus();  // False when the backlog could not be read.
  // Waits until `until` or until stopped; false when stopped.
  bool WaitUntil(absl::Time until);
  bool Stopping();

  const std::string conninfo_;
  const ExporterOptions options_;
  std::unique_ptr<MetricsRegistry> own_metrics_;
  ExporterMetrics metrics_;

  std::mutex mu_;
  std::condition_variable wake_;
  bool stopping_ = false;                               // Guarded by mu_.
  absl::Time paused_until_ = absl::InfinitePast();      // Guarded by mu_: 429 / auth pause.
  absl::Time drain_deadline_ = absl::InfiniteFuture();  // Guarded by mu_.
  std::atomic<int64_t> drained_sent_{0};
  std::atomic<int64_t> drained_refused_{0};
  std::vector<std::thread> threads_;
};

}  // namespace meterd::stripe
