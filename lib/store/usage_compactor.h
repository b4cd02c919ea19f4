#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include <pqxx/pqxx>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/common/clock.h"
#include "lib/common/metrics.h"
#include "lib/store/pg_connection.h"

namespace meterd::store {

struct UsageCompactorOptions {
  // Pause between folds while the log is drained; a fold that moved a full batch is followed
  // by the next at once.
  absl::Duration interval = absl::Seconds(2);
  // Delta rows per fold transaction: bounds how long a fold holds its keys' row locks (a tracked
  // write to the same key waits for it, as it waited for a flush's upsert before).
  int max_rows_per_fold = 500'000;
  absl::Duration max_backoff = absl::Seconds(30);
  PgTimeouts timeouts = {};
  const Clock* clock = &SystemClock::Get();
  MetricsRegistry* metrics = nullptr;  // Where CompactorMetrics go (null: a private one).
};

struct CompactorMetrics {
  explicit CompactorMetrics(MetricsRegistry& registry);
  Counter* folds;       // Folds that moved at least one delta row.
  Counter* delta_rows;  // Delta rows moved into shared.api_usage_meters.
  Counter* keys;        // Rows of api_usage_meters those were summed into (upserts).
  Counter* failures;    // Folds that failed (retried with backoff; nothing is lost).
  Gauge* last_fold_ms;  // Duration of the last fold that moved rows.
  // Read every kStatusEvery (shared.usage_delta_log_status()): rows in the log (an estimate),
  // and rows no fold can move because their meter is not in shared.meters.
  Gauge* log_rows;
  Gauge* unfoldable_rows;
};

struct FoldResult {
  int64_t delta_rows = 0;
  int64_t keys = 0;
};

// Folds the usage delta log (shared.api_usage_deltas, appended by every flush) into
// shared.api_usage_meters on its own thread and connection, by shared.fold_usage_deltas():
// one transaction per batch, so a delta is never in both places or neither. Readers see the
// deltas through the table's inheritance whether folded or not: a slow or failing compactor
// delays nothing but the log's shrinking, and loses nothing.
class UsageCompactor {
 public:
  static absl::StatusOr<std::unique_ptr<UsageCompactor>> Create(std::string conninfo,
                                                                UsageCompactorOptions options);
  ~UsageCompactor();

  void Start();
  // Stops after the fold in progress, if any.
  void Stop();
  // One fold, on the caller's thread (not while the compactor runs: the connection is its).
  absl::StatusOr<FoldResult> FoldOnce();
  const CompactorMetrics& metrics() const { return metrics_; }

 private:
  UsageCompactor(std::string conninfo, UsageCompactorOptions options);
  absl::Status EnsureConnected();
  // Runs `body` on conn_, catching libpqxx's exceptions; a lost connection is dropped, for the
  // next call to open again.
  template <typename F>
  absl::Status OnConnection(F&& body) {
    absl::Status status = CatchPq(std::forward<F>(body));
    if (absl::IsUnavailable(status)) conn_.reset();
    return status;
  }
  void Loop();
  // After a fold that moved rows, when this role owns the log.
  void Vacuum();
  static constexpr absl::Duration kStatusEvery = absl::Seconds(30);
  void ReadStatus();

  const std::string conninfo_;
  const UsageCompactorOptions options_;
  std::unique_ptr<MetricsRegistry> own_metrics_;  // When options.metrics is null.
  CompactorMetrics metrics_;
  std::unique_ptr<pqxx::connection> conn_;  // The compactor's thread only (or FoldOnce's).
  // VACUUM needs the table's owner: when meterd's role is not, autovacuum does it (its
  // thresholds on the log are low), and this is logged once.
  bool can_vacuum_ = false;
  int64_t unfoldable_logged_ = 0;  // The compactor's thread only.

  std::mutex mu_;
  std::condition_variable wake_;
  bool stopping_ = false;  // Guarded by mu_.
  std::thread thread_;
};

}  // namespace meterd::store
