#include "lib/ingest/flusher.h"

#include <algorithm>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_join.h"
#include "lib/common/backoff.h"
#include "lib/common/logging.h"
#include "lib/ingest/flush_pacer.h"

namespace meterd::ingest {

using aggregate::SealedPartition;

namespace {

std::vector<event::OrgId> TouchedOrgs(const std::vector<SealedPartition>& batch) {
  absl::flat_hash_set<event::OrgId> orgs;
  for (const SealedPartition& p : batch) {
    p.ForEachDelta([&](const aggregate::CounterKey& key, int64_t) { orgs.insert(key.org); });
  }
  return {orgs.begin(), orgs.end()};
}

constexpr char kIntervalChanges[] = "meterd_flush_interval_changes_total";
constexpr char kIntervalChangesHelp[] =
    "Adaptive flushing's interval changes: longer when a flush took more than half the "
    "interval, shorter when cheap again";

}  // namespace

FlushMetrics::FlushMetrics(MetricsRegistry& r, const Clock* clock)
    : flushes(r.AddCounter("meterd_flushes_total", "Committed flush transactions")),
      failures(r.AddCounter("meterd_flush_failures_total", "Flush attempts that failed (retried)")),
      fenced(r.AddCounter("meterd_fenced_partitions_total", "Partitions whose offset CAS failed")),
      rows(r.AddCounter("meterd_flushed_rows_total",
                        "Counter rows written (delta rows appended to the usage log)")),
      events(r.AddCounter("meterd_flushed_events_total", "Events covered by committed flushes")),
      last_rows(r.AddGauge("meterd_last_flush_rows", "Rows in the latest committed flush")),
      last_events(r.AddGauge("meterd_last_flush_events", "Events in the latest committed flush")),
      largest_rows(r.AddGauge("meterd_largest_flush_rows", "Rows in the largest committed flush")),
      largest_events(
          r.AddGauge("meterd_largest_flush_events", "Events in the largest committed flush")),
      last_success_unix_ms(r.AddGauge("meterd_last_flush_unix_ms",
                                      "When a flush last committed (Unix ms, 0: never)")),
      duration(r.AddHistogram("meterd_flush_duration_seconds",
                              "Committed flushes: seal, write and commit",
                              {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10})),
      visible_latency(r.AddHistogram(
          "meterd_event_visible_latency_seconds",
          "Per partition and committed flush: from the Kafka timestamp of its oldest message to "
          "the commit that made it visible",
          {0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300})),
      interval_ms(r.AddGauge("meterd_flush_interval_ms",
                             "Interval between flushes chosen by adaptive flushing (ms)")),
      interval_longer(
          r.AddCounter(kIntervalChanges, kIntervalChangesHelp, {{"direction", "longer"}})),
      interval_shorter(
          r.AddCounter(kIntervalChanges, kIntervalChangesHelp, {{"direction", "shorter"}})) {
  r.AddCallbackGauge("meterd_last_flush_age_seconds",
                     "Seconds since a flush last committed (-1: never)", {},
                     [last = last_success_unix_ms, clock]() -> int64_t {
                       const int64_t at = last->value();
                       return at == 0 ? -1 : (absl::ToUnixMillis(clock->Now()) - at) / 1000;
                     });
}

Flusher::Flusher(std::vector<Shard*> shards, std::unique_ptr<store::FlushWriter> writer,
                 FlusherOptions options)
    : shards_(std::move(shards)),
      options_(options),
      registry_(&RegistryOrOwn(options.metrics, own_metrics_)),
      metrics_(*registry_, options.clock),
      writer_(std::move(writer)) {}

Flusher::~Flusher() {
  Stop();
  // Its callback reads the clock, which may go before the registry does.
  registry_->Remove("meterd_last_flush_age_seconds");
}

void Flusher::Start() {
  thread_ = std::thread([this] { Loop(); });
}

void Flusher::Stop() {
  {
    std::lock_guard lock(wake_mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Flusher::RequestFlush() {
  {
    std::lock_guard lock(wake_mu_);
    wake_requested_ = true;
  }
  wake_.notify_all();
}

void Flusher::Loop() {
  const Clock& clock = *options_.clock;
  // Fixed rate: the next flush is due one interval after the previous one started, so the
  // time a flush takes does not stretch the period (event -> visible stays within
  // interval + one flush). While flushes fail (Postgres unavailable) the retry comes after an
  // exponential backoff instead; the shards are paused meanwhile.
  const absl::Duration longest = std::max(options_.interval, options_.max_interval);
  FlushPacer pacer({.interval = options_.interval, .max_interval = longest});
  metrics_.interval_ms->Set(absl::ToInt64Milliseconds(pacer.current()));
  absl::Time due = clock.Steady() + options_.interval;
  Backoff backoff({.initial = absl::Milliseconds(200), .max = options_.max_backoff});
  while (true) {
    {
      std::unique_lock lock(wake_mu_);
      while (!stopping_ && !wake_requested_ && clock.Steady() < due) {
        clock.WaitUntil(wake_, lock, due);
      }
      if (stopping_) return;
      wake_requested_ = false;
    }
    const absl::Time started = clock.Steady();
    absl::Duration took;  // Seal, write and commit: what the pacer weighs (not a lock wait).
    absl::Status status;
    {
      std::lock_guard lock(mu_);
      const absl::Time locked = clock.Steady();
      std::vector<SealedPartition> sealed;
      for (Shard* shard : shards_) {
        auto part = shard->SealAll();
        std::move(part.begin(), part.end(), std::back_inserter(sealed));
      }
      status = WritePendingLocked(std::move(sealed));
      took = clock.Steady() - locked;
      // After the flush, so it never delays one; skipped while flushes fail (Postgres is
      // down: the failure is already reported, and a second connection attempt would only
      // stretch the tick).
      if (status.ok()) RefreshMetersLocked();
    }
    last_ok_.store(status.ok(), std::memory_order_relaxed);
    if (status.ok()) {
      metrics_.duration->Observe(absl::ToDoubleSeconds(took));
      backoff.Reset();
      const absl::Duration before = pacer.current();
      const absl::Duration interval = pacer.After(took);
      if (interval != before) {
        (interval > before ? metrics_.interval_longer : metrics_.interval_shorter)->Add();
        metrics_.interval_ms->Set(absl::ToInt64Milliseconds(interval));
        LOG_INFO(
            "adaptive flushing: a flush took {}, so flushing every {} instead of {} "
            "(between --flush-interval {} and --max-visibility-latency {})",
            absl::FormatDuration(took), absl::FormatDuration(interval),
            absl::FormatDuration(before), absl::FormatDuration(options_.interval),
            absl::FormatDuration(longest));
      }
      due = std::max(started + interval, clock.Steady());
    } else {
      const absl::Duration delay = backoff.Next();
      due = clock.Steady() + delay;
      LOG_WARN("flush failed, retrying in {}: {}", absl::FormatDuration(delay), status.message());
    }
  }
}

absl::Status Flusher::WritePendingLocked(std::vector<SealedPartition> fresh) {
  for (SealedPartition& s : fresh) {
    // Off the shard's thread, one partition at a time: its map's memory goes back as its
    // rows are made, so what waits for Postgres costs 32 bytes per key.
    aggregate::Compact(s);
    auto it = std::find_if(pending_.begin(), pending_.end(),
                           [&](const SealedPartition& p) { return p.partition == s.partition; });
    if (it == pending_.end()) {
      pending_.push_back(std::move(s));
    } else {
      aggregate::MergeInto(*it, std::move(s));
    }
  }
  if (pending_.empty()) {
    // Nothing to write; if deltas were given up (a revoke during an outage) the shards resume
    // and the next flush tells whether Postgres is back.
    if (shards_paused_) ResumeShardsLocked();
    return absl::OkStatus();
  }

  int64_t events = 0;
  for (const SealedPartition& p : pending_) events += p.deltas.events;
  // A fenced partition is dropped and the rest retried; bounded by the partition count.
  for (size_t attempt = 0; attempt <= pending_.size(); ++attempt) {
    auto outcome = writer_->Write(pending_);
    if (!outcome.ok()) {
      metrics_.failures->Add();
      if (!shards_paused_) {
        for (Shard* shard : shards_) shard->Pause();
        shards_paused_ = true;
      }
      return outcome.status();
    }
    if (outcome->fenced.empty()) {
      const auto rows = static_cast<int64_t>(outcome->rows_written);
      const absl::Time committed = options_.clock->Now();
      metrics_.flushes->Add();
      metrics_.rows->Add(rows);
      metrics_.events->Add(events);
      metrics_.last_rows->Set(rows);
      metrics_.last_events->Set(events);
      metrics_.largest_rows->SetMax(rows);
      metrics_.largest_events->SetMax(events);
      metrics_.last_success_unix_ms->Set(absl::ToUnixMillis(committed));
      for (const SealedPartition& p : pending_) {
        if (p.oldest_timestamp_ms < 0) continue;
        metrics_.visible_latency->Observe(std::max(
            0.0, absl::ToDoubleSeconds(committed - absl::FromUnixMillis(p.oldest_timestamp_ms))));
      }
      LOG_DEBUG("flushed {} events as {} rows over {} partitions", events, rows, pending_.size());
      if (options_.on_committed) options_.on_committed(TouchedOrgs(pending_));
      pending_.clear();
      ResumeShardsLocked();
      return absl::OkStatus();
    }
    std::vector<SealedPartition> committed_before;  // An earlier, ambiguous commit landed.
    for (const store::FencedPartition& f : outcome->fenced) {
      LOG_WARN("partition {}: offset fence failed (Postgres holds {}); another writer owns it",
               f.partition, f.stored_offset);
      metrics_.fenced->Add();
      std::erase_if(pending_, [&](SealedPartition& p) {
        if (p.partition != f.partition) return false;
        events -= p.deltas.events;
        if (f.stored_offset == p.next_offset) committed_before.push_back(std::move(p));
        return true;
      });
      ShardFor(f.partition)->ResetPartition(f.partition, f.stored_offset);
    }
    if (!committed_before.empty() && options_.on_committed) {
      // Postgres holds exactly what these deltas would have advanced to: the commit that
      // looked failed (a cut connection) went through, so their orgs' charges are due.
      options_.on_committed(TouchedOrgs(committed_before));
    }
    if (pending_.empty()) {
      // Everything was fenced (e.g. the retry of a commit that did succeed): nothing left to
      // write, so whatever paused the shards is over.
      ResumeShardsLocked();
      return absl::OkStatus();
    }
  }
  return absl::AbortedError("offset fence kept failing");
}

void Flusher::RefreshMetersLocked() {
  const absl::Status status = writer_->RefreshMeters();
  if (status.ok()) {
    if (meters_refresh_failing_) LOG_INFO("meters: refresh works again");
    meters_refresh_failing_ = false;
    return;
  }
  // Once per failure streak: the next tick retries, and counting goes on with the meters
  // already loaded.
  if (!meters_refresh_failing_) {
    LOG_WARN("meters: refresh failed, keeping the meters loaded so far: {}", status.message());
  }
  meters_refresh_failing_ = true;
}

void Flusher::ResumeShardsLocked() {
  for (Shard* shard : shards_) shard->Resume();
  shards_paused_ = false;
}

absl::Status Flusher::FlushAndRelease(const std::vector<int32_t>& partitions,
                                      absl::Duration deadline) {
  const Clock& clock = *options_.clock;
  const absl::Time give_up = clock.Steady() + deadline;
  std::unique_lock lock(mu_);
  std::vector<SealedPartition> sealed;
  for (Shard* shard : shards_) {
    std::vector<int32_t> mine;
    for (int32_t p : partitions) {
      if (ShardFor(p) == shard) mine.push_back(p);
    }
    if (mine.empty()) continue;
    auto part = shard->SealAndRelease(mine);
    std::move(part.begin(), part.end(), std::back_inserter(sealed));
  }
  Backoff backoff({.initial = absl::Milliseconds(100), .max = absl::Seconds(5)});
  absl::Status status = WritePendingLocked(std::move(sealed));
  while (!status.ok() && clock.Steady() + backoff.current() < give_up) {
    lock.unlock();
    clock.SleepFor(backoff.Next());
    lock.lock();
    status = WritePendingLocked({});
  }
  if (!status.ok()) {
    std::erase_if(pending_, [&](const SealedPartition& p) {
      return std::find(partitions.begin(), partitions.end(), p.partition) != partitions.end();
    });
    LOG_ERROR(
        "could not flush revoked partitions [{}]: {}; their unflushed deltas are dropped and "
        "will be counted again from the offset stored in Postgres",
        absl::StrJoin(partitions, ","), status.message());
  }
  return status;
}

absl::StatusOr<absl::flat_hash_map<int32_t, int64_t>> Flusher::LoadOffsets(
    absl::Duration deadline) {
  const Clock& clock = *options_.clock;
  const absl::Time give_up = clock.Steady() + deadline;
  Backoff backoff({.initial = absl::Milliseconds(100), .max = absl::Seconds(5)});
  while (true) {
    absl::StatusOr<absl::flat_hash_map<int32_t, int64_t>> offsets;
    {
      std::lock_guard lock(mu_);
      offsets = writer_->LoadOffsets();
    }
    if (offsets.ok() || clock.Steady() + backoff.current() > give_up) return offsets;
    const absl::Duration delay = backoff.Next();
    LOG_WARN("loading offsets failed, retrying in {}: {}", absl::FormatDuration(delay),
             offsets.status().message());
    clock.SleepFor(delay);
  }
}

}  // namespace meterd::ingest
