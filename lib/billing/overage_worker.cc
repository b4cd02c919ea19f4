#include "lib/billing/overage_worker.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "lib/common/logging.h"
#include "lib/common/status_macros.h"
#include "lib/store/pg_connection.h"

namespace meterd::billing {

absl::StatusOr<std::unique_ptr<OverageWorker>> OverageWorker::Create(std::string conninfo,
                                                                     OverageWorkerOptions options) {
  std::unique_ptr<OverageWorker> worker(new OverageWorker(std::move(conninfo), options));
  ASSIGN_OR_RETURN(worker->conn_, store::Connect(worker->conninfo_));
  return worker;
}

OverageWorker::~OverageWorker() { Stop(absl::ZeroDuration()); }

void OverageWorker::Start() {
  thread_ = std::thread([this] { Loop(); });
}

void OverageWorker::Stop(absl::Duration deadline) {
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    stop_deadline_ = absl::Now() + deadline;
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
    stats_.pending_orgs.store(static_cast<int64_t>(pending_.size()), std::memory_order_relaxed);
  }
  wake_.notify_one();
}

void OverageWorker::Loop() {
  absl::Duration backoff = absl::ZeroDuration();
  while (true) {
    std::vector<event::OrgId> orgs;
    bool all_subscribed = false;
    {
      std::unique_lock lock(mu_);
      auto ready = [this] { return stopping_ || overflowed_ || !pending_.empty(); };
      if (backoff > absl::ZeroDuration()) {
        wake_.wait_for(lock, absl::ToChronoMilliseconds(backoff), [this] { return stopping_; });
      }
      wake_.wait(lock, ready);
      if (pending_.empty() && !overflowed_) return;  // Stopping with nothing to do.
      if (stopping_ && absl::Now() > stop_deadline_) {
        LOG_WARN("overage worker: stopping with {} orgs not refreshed (recomputed on next touch)",
                 pending_.size());
        return;
      }
      orgs.assign(pending_.begin(), pending_.end());
      pending_.clear();
      all_subscribed = overflowed_;
      overflowed_ = false;
      stats_.pending_orgs.store(0, std::memory_order_relaxed);
    }
    absl::Status status = Refresh(orgs, all_subscribed);
    if (status.ok()) {
      backoff = absl::ZeroDuration();
      continue;
    }
    stats_.failures.fetch_add(1, std::memory_order_relaxed);
    backoff = std::min(options_.max_backoff, std::max(backoff * 2, absl::Milliseconds(200)));
    LOG_WARN("overage worker: refresh failed, retrying in {}: {}", absl::FormatDuration(backoff),
             status.message());
    std::lock_guard lock(mu_);
    if (all_subscribed) overflowed_ = true;
    for (const event::OrgId& org : orgs) pending_.insert(org);
  }
}

absl::Status OverageWorker::Refresh(const std::vector<event::OrgId>& orgs, bool all_subscribed) {
  if (!conn_ || !conn_->is_open()) {
    conn_.reset();
    ASSIGN_OR_RETURN(conn_, store::Connect(conninfo_));
  }
  absl::Status status = store::CatchPq([&]() -> absl::Status {
    int64_t alerts = 0;
    if (all_subscribed) {
      pqxx::work tx(*conn_);
      alerts += tx.exec1(
                      "SELECT shared.refresh_usage_charges(array_agg(org_id)) "
                      "FROM shared.subscriptions WHERE status <> 'ended'")[0]
                    .as<int64_t>(0);
      tx.commit();
    }
    // Sorted, so concurrent refreshes lock usage_charges rows in the same order.
    std::vector<event::OrgId> sorted = orgs;
    std::sort(sorted.begin(), sorted.end());
    for (size_t start = 0; start < sorted.size(); start += options_.batch_orgs) {
      const size_t end = std::min(sorted.size(), start + options_.batch_orgs);
      std::string array = "{";
      for (size_t i = start; i < end; ++i) {
        if (i > start) array += ',';
        array += event::OrgIdToString(sorted[i]);
      }
      array += '}';
      pqxx::work tx(*conn_);
      alerts +=
          tx.exec_params1("SELECT shared.refresh_usage_charges($1::uuid[])", array)[0].as<int64_t>(
              0);
      tx.commit();
      stats_.orgs_refreshed.fetch_add(static_cast<int64_t>(end - start), std::memory_order_relaxed);
    }
    stats_.refreshes.fetch_add(1, std::memory_order_relaxed);
    if (alerts > 0) {
      stats_.alerts_raised.fetch_add(alerts, std::memory_order_relaxed);
      LOG_INFO("overage worker: raised {} quota alert(s)", alerts);
    }
    return absl::OkStatus();
  });
  if (absl::IsUnavailable(status)) conn_.reset();
  return status;
}

}  // namespace meterd::billing
