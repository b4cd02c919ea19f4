#include "lib/store/usage_compactor.h"

#include "lib/common/backoff.h"
#include "lib/common/logging.h"
#include "lib/common/status_macros.h"

namespace meterd::store {

CompactorMetrics::CompactorMetrics(MetricsRegistry& r)
    : folds(r.AddCounter("meterd_usage_folds_total",
                         "Folds of the usage delta log into shared.api_usage_meters")),
      delta_rows(r.AddCounter("meterd_usage_folded_delta_rows_total",
                              "Delta rows moved from shared.api_usage_deltas by folds")),
      keys(r.AddCounter("meterd_usage_folded_keys_total",
                        "Rows of shared.api_usage_meters the folded deltas were summed into")),
      failures(r.AddCounter("meterd_usage_fold_failures_total",
                            "Folds that failed (retried with backoff; nothing is lost)")),
      last_fold_ms(r.AddGauge("meterd_usage_last_fold_ms",
                              "Duration of the last fold that moved rows (ms)")),
      log_rows(r.AddGauge("meterd_usage_log_rows",
                          "Rows in shared.api_usage_deltas (Postgres's estimate)")),
      unfoldable_rows(r.AddGauge("meterd_usage_unfoldable_rows",
                                 "Delta rows whose meter is not in shared.meters (never folded, "
                                 "still counted)")) {}

UsageCompactor::UsageCompactor(std::string conninfo, UsageCompactorOptions options)
    : conninfo_(std::move(conninfo)),
      options_(options),
      metrics_(RegistryOrOwn(options.metrics, own_metrics_)) {}

absl::StatusOr<std::unique_ptr<UsageCompactor>> UsageCompactor::Create(
    std::string conninfo, UsageCompactorOptions options) {
  if (options.max_rows_per_fold < 1) {
    return absl::InvalidArgumentError("usage compactor: max_rows_per_fold must be at least 1");
  }
  std::unique_ptr<UsageCompactor> compactor(new UsageCompactor(std::move(conninfo), options));
  RETURN_IF_ERROR(compactor->EnsureConnected());
  return compactor;
}

UsageCompactor::~UsageCompactor() { Stop(); }

absl::Status UsageCompactor::EnsureConnected() {
  if (conn_ && conn_->is_open()) return absl::OkStatus();
  conn_.reset();
  ASSIGN_OR_RETURN(auto conn, Connect(conninfo_, options_.timeouts));
  bool owner = false;
  RETURN_IF_ERROR(CatchPq([&]() -> absl::Status {
    pqxx::nontransaction tx(*conn);
    owner = tx.exec1(
                  "SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class "
                  "WHERE oid = 'shared.api_usage_deltas'::regclass")[0]
                .as<bool>();
    return absl::OkStatus();
  }));
  if (!owner && !can_vacuum_) {
    LOG_INFO(
        "usage compactor: this role does not own shared.api_usage_deltas, so autovacuum (not "
        "the compactor) reclaims the log's folded rows");
  }
  can_vacuum_ = owner;
  conn_ = std::move(conn);
  return absl::OkStatus();
}

absl::StatusOr<FoldResult> UsageCompactor::FoldOnce() {
  RETURN_IF_ERROR(EnsureConnected());
  FoldResult result;
  const absl::Time start = options_.clock->Steady();
  absl::Status status = OnConnection([&]() -> absl::Status {
    pqxx::work tx(*conn_);
    const pqxx::row row = tx.exec_params1(
        "SELECT delta_rows, keys FROM shared.fold_usage_deltas($1)", options_.max_rows_per_fold);
    result.delta_rows = row[0].as<int64_t>();
    result.keys = row[1].as<int64_t>();
    tx.commit();
    return absl::OkStatus();
  });
  if (!status.ok()) {
    metrics_.failures->Add();
    return status;
  }
  if (result.delta_rows > 0) {
    metrics_.folds->Add();
    metrics_.delta_rows->Add(result.delta_rows);
    metrics_.keys->Add(result.keys);
    metrics_.last_fold_ms->Set(absl::ToInt64Milliseconds(options_.clock->Steady() - start));
    if (can_vacuum_) Vacuum();
  }
  return result;
}

void UsageCompactor::Vacuum() {
  // The folded rows' space, for the next flushes' COPY to reuse. No truncation: it would wait
  // for an AccessExclusive lock the flushes' appends keep taking away. The fold is committed
  // whatever happens here: a failure is logged, and autovacuum or the next fold's VACUUM does
  // the work.
  absl::Status status = OnConnection([&]() -> absl::Status {
    pqxx::nontransaction vacuum(*conn_);
    vacuum.exec0("VACUUM (TRUNCATE false, SKIP_LOCKED) shared.api_usage_deltas");
    return absl::OkStatus();
  });
  if (!status.ok())
    LOG_WARN("usage compactor: VACUUM of the delta log failed: {}", status.message());
}

void UsageCompactor::ReadStatus() {
  if (!EnsureConnected().ok()) return;
  absl::Status status = OnConnection([&]() -> absl::Status {
    pqxx::nontransaction tx(*conn_);
    const pqxx::row row =
        tx.exec1("SELECT estimated_rows, unfoldable_rows FROM shared.usage_delta_log_status()");
    metrics_.log_rows->Set(row[0].as<int64_t>());
    const auto unfoldable = row[1].as<int64_t>();
    metrics_.unfoldable_rows->Set(unfoldable);
    if (unfoldable != unfoldable_logged_ && unfoldable > 0) {
      LOG_WARN(
          "usage compactor: {} delta rows name a meter that is not in shared.meters; they stay "
          "in shared.api_usage_deltas (counted, never folded) until the meter exists again",
          unfoldable);
    }
    unfoldable_logged_ = unfoldable;
    return absl::OkStatus();
  });
}

void UsageCompactor::Start() {
  thread_ = std::thread([this] { Loop(); });
}

void UsageCompactor::Stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void UsageCompactor::Loop() {
  const Clock& clock = *options_.clock;
  Backoff backoff({.initial = absl::Milliseconds(200), .max = options_.max_backoff});
  absl::Duration wait = options_.interval;
  absl::Time status_due = clock.Steady();
  while (true) {
    if (clock.Steady() >= status_due) {
      ReadStatus();
      status_due = clock.Steady() + kStatusEvery;
    }
    {
      std::unique_lock lock(mu_);
      const absl::Time until = clock.Steady() + wait;
      while (!stopping_ && clock.Steady() < until) clock.WaitUntil(wake_, lock, until);
      if (stopping_) return;
    }
    absl::StatusOr<FoldResult> folded = FoldOnce();
    if (!folded.ok()) {
      wait = backoff.Next();
      LOG_WARN("usage compactor: fold failed, retrying in {} (the deltas stay visible): {}",
               absl::FormatDuration(wait), folded.status().message());
      continue;
    }
    backoff.Reset();
    // A full batch: more may be waiting, fold again at once.
    wait =
        folded->delta_rows >= options_.max_rows_per_fold ? absl::ZeroDuration() : options_.interval;
  }
}

}  // namespace meterd::store
