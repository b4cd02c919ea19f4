#include "lib/billing/overage_worker.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "lib/common/backoff.h"
#include "lib/common/logging.h"
#include "lib/common/status_macros.h"
#include "lib/store/pg_connection.h"

namespace meterd::billing {

OverageMetrics::OverageMetrics(MetricsRegistry& r)
    : refreshes(r.AddCounter("meterd_overage_refreshes_total", "Overage worker refresh rounds")),
      orgs_refreshed(r.AddCounter("meterd_overage_orgs_refreshed_total",
                                  "Orgs whose charges were recomputed")),
      alerts_raised(r.AddCounter("meterd_quota_alerts_total", "Quota alerts raised")),
      failures(
          r.AddCounter("meterd_overage_failures_total", "Overage refreshes that failed (retried)")),
      failed_orgs(r.AddCounter(
          "meterd_overage_failed_orgs_total",
          "Orgs whose charges could not be computed alone (logged, skipped until next usage)")),
      pending_orgs(r.AddGauge("meterd_overage_pending_orgs", "Touched orgs waiting for a refresh")),
      open_close_failures(r.AddGauge("meterd_billing_close_failures",
                                     "Subscription periods close-period could not invoice, "
                                     "unresolved (shared.billing_close_failures)")) {}

OverageWorker::OverageWorker(std::string conninfo, OverageWorkerOptions options)
    : conninfo_(std::move(conninfo)),
      options_(options),
      metrics_(RegistryOrOwn(options.metrics, own_metrics_)) {}

// A refresh waiting on rows an app transaction holds (usage tracked by a trigger refreshes
// the same charges) gives up after 10 s and is retried with backoff, never waits unbounded.
static store::PgTimeouts WorkerTimeouts() {
  store::PgTimeouts timeouts;
  timeouts.statement = absl::Seconds(60);
  timeouts.lock = absl::Seconds(10);
  return timeouts;
}

absl::StatusOr<std::unique_ptr<OverageWorker>> OverageWorker::Create(std::string conninfo,
                                                                     OverageWorkerOptions options) {
  std::unique_ptr<OverageWorker> worker(new OverageWorker(std::move(conninfo), options));
  ASSIGN_OR_RETURN(worker->conn_, store::Connect(worker->conninfo_, WorkerTimeouts()));
  return worker;
}

OverageWorker::~OverageWorker() { Stop(absl::ZeroDuration()); }

void OverageWorker::Start() {
  thread_ = std::thread([this] {
    CountOpenCloseFailures();
    Loop();
  });
}

void OverageWorker::Stop(absl::Duration deadline) {
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    stop_deadline_ = options_.clock->Steady() + deadline;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void OverageWorker::OrgsTouched(const std::vector<event::OrgId>& orgs) {
  if (orgs.empty()) return;
  {
    std::lock_guard lock(mu_);
    if (overflowed_) return;  // A full refresh is already due; it covers these too.
    for (const event::OrgId& org : orgs) pending_.insert(org);
    if (pending_.size() > options_.max_pending_orgs) {
      pending_.clear();
      overflowed_ = true;
      LOG_WARN(
          "overage worker: more than {} orgs pending; next refresh covers every subscribed org",
          options_.max_pending_orgs);
    }
    metrics_.pending_orgs->Set(static_cast<int64_t>(pending_.size()));
  }
  wake_.notify_one();
}

void OverageWorker::Loop() {
  const Clock& clock = *options_.clock;
  Backoff backoff({.initial = absl::Milliseconds(200), .max = options_.max_backoff});
  absl::Duration retry_in = absl::ZeroDuration();  // After a failed refresh.
  while (true) {
    std::vector<event::OrgId> orgs;
    bool all_subscribed = false;
    {
      std::unique_lock lock(mu_);
      auto ready = [this] { return stopping_ || overflowed_ || !pending_.empty(); };
      const absl::Time retry_at = clock.Steady() + retry_in;
      while (!stopping_ && clock.Steady() < retry_at) clock.WaitUntil(wake_, lock, retry_at);
      const absl::Time idle_until = clock.Steady() + kCloseFailuresEvery;
      while (!ready() && clock.Steady() < idle_until) clock.WaitUntil(wake_, lock, idle_until);
      if (!ready()) {
        // Idle: refresh the close-failures gauge (the close is a cron; this is its alarm).
        lock.unlock();
        CountOpenCloseFailures();
        continue;
      }
      if (pending_.empty() && !overflowed_) return;  // Stopping with nothing to do.
      if (stopping_ && clock.Steady() > stop_deadline_) {
        LOG_WARN("overage worker: stopping with {} orgs not refreshed (recomputed on next touch)",
                 pending_.size());
        return;
      }
      orgs.assign(pending_.begin(), pending_.end());
      pending_.clear();
      all_subscribed = overflowed_;
      overflowed_ = false;
      metrics_.pending_orgs->Set(0);
    }
    absl::Status status = absl::OkStatus();
    if (all_subscribed) {
      // After an overflow: every org with a live subscription, refreshed in batches like any
      // other list (so one that cannot be priced is isolated the same way).
      absl::StatusOr<std::vector<event::OrgId>> subscribed = SubscribedOrgs();
      status = subscribed.status();
      if (subscribed.ok()) orgs.insert(orgs.end(), subscribed->begin(), subscribed->end());
    }
    if (status.ok()) status = Refresh(orgs);
    if (status.ok()) {
      backoff.Reset();
      retry_in = absl::ZeroDuration();
      continue;
    }
    metrics_.failures->Add();
    retry_in = backoff.Next();
    LOG_WARN("overage worker: refresh failed, retrying in {}: {}", absl::FormatDuration(retry_in),
             status.message());
    std::lock_guard lock(mu_);
    if (all_subscribed) overflowed_ = true;
    for (const event::OrgId& org : orgs) pending_.insert(org);
  }
}

absl::Status OverageWorker::EnsureConnected() {
  if (conn_ && conn_->is_open()) return absl::OkStatus();
  conn_.reset();
  ASSIGN_OR_RETURN(conn_, store::Connect(conninfo_, WorkerTimeouts()));
  return absl::OkStatus();
}

void OverageWorker::CountOpenCloseFailures() {
  if (!EnsureConnected().ok()) return;
  absl::Status status = store::CatchPq([&]() -> absl::Status {
    pqxx::read_transaction tx(*conn_);
    metrics_.open_close_failures->Set(
        tx.exec1("SELECT count(*) FROM shared.billing_close_failures WHERE resolved_at IS NULL")[0]
            .as<int64_t>());
    return absl::OkStatus();
  });
  if (absl::IsUnavailable(status)) conn_.reset();
}

absl::StatusOr<std::vector<event::OrgId>> OverageWorker::SubscribedOrgs() {
  RETURN_IF_ERROR(EnsureConnected());
  std::vector<event::OrgId> orgs;
  absl::Status status = store::CatchPq([&]() -> absl::Status {
    pqxx::read_transaction tx(*conn_);
    for (const auto& row : tx.exec(
             "SELECT DISTINCT org_id::text FROM shared.subscriptions WHERE status <> 'ended'")) {
      if (auto org = event::ParseOrgId(row[0].as<std::string>())) orgs.push_back(*org);
    }
    return absl::OkStatus();
  });
  if (absl::IsUnavailable(status)) conn_.reset();
  if (!status.ok()) return status;
  return orgs;
}

absl::Status OverageWorker::Refresh(const std::vector<event::OrgId>& orgs) {
  // Sorted, so concurrent refreshes lock usage_charges rows in the same order.
  std::vector<event::OrgId> sorted = orgs;
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  for (size_t start = 0; start < sorted.size(); start += options_.batch_orgs) {
    const size_t end = std::min(sorted.size(), start + options_.batch_orgs);
    const std::vector<event::OrgId> batch(sorted.begin() + start, sorted.begin() + end);
    absl::Status status = RefreshBatch(batch);
    if (absl::IsUnavailable(status)) return status;  // Retried whole, with backoff.
    if (status.ok()) continue;
    // Postgres answered but refused the batch: one org (e.g. usage whose charge does not fit
    // int64 micros) must not hold back the others, nor be retried forever.
    for (const event::OrgId& org : batch) {
      status = RefreshBatch({org});
      if (absl::IsUnavailable(status)) return status;
      if (!status.ok()) {
        metrics_.failed_orgs->Add();
        LOG_ERROR(
            "overage worker: charges of org {} cannot be computed; skipped until its next "
            "usage: {}",
            event::OrgIdToString(org), status.message());
      }
    }
  }
  metrics_.refreshes->Add();
  return absl::OkStatus();
}

absl::Status OverageWorker::RefreshBatch(const std::vector<event::OrgId>& orgs) {
  RETURN_IF_ERROR(EnsureConnected());
  std::string array = "{";
  for (size_t i = 0; i < orgs.size(); ++i) {
    if (i > 0) array += ',';
    array += event::OrgIdToString(orgs[i]);
  }
  array += '}';
  int64_t alerts = 0;
  absl::Status status = store::CatchPq([&]() -> absl::Status {
    pqxx::work tx(*conn_);
    alerts =
        tx.exec_params1("SELECT shared.refresh_usage_charges($1::uuid[])", array)[0].as<int64_t>(0);
    tx.commit();
    return absl::OkStatus();
  });
  if (absl::IsUnavailable(status)) conn_.reset();
  if (!status.ok()) return status;
  metrics_.orgs_refreshed->Add(static_cast<int64_t>(orgs.size()));
  if (alerts > 0) {
    metrics_.alerts_raised->Add(alerts);
    LOG_INFO("overage worker: raised {} quota alert(s)", alerts);
  }
  return absl::OkStatus();
}

}  // namespace meterd::billing
