#include "lib/ingest/flusher.h"

#include <algorithm>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_join.h"
#include "lib/common/backoff.h"
#include "lib/common/logging.h"

namespace meterd::ingest {

using aggregate::SealedPartition;

namespace {

void StoreMax(std::atomic<int64_t>& target, int64_t value) {
  if (value > target.load(std::memory_order_relaxed))
    target.store(value, std::memory_order_relaxed);
}

std::vector<event::OrgId> TouchedOrgs(const std::vector<SealedPartition>& batch) {
  absl::flat_hash_set<event::OrgId> orgs;
  for (const SealedPartition& p : batch) {
    for (const auto& [key, quantity] : p.deltas.counters) orgs.insert(key.org);
  }
  return {orgs.begin(), orgs.end()};
}

}  // namespace

Flusher::Flusher(std::vector<Shard*> shards, std::unique_ptr<store::FlushWriter> writer,
                 FlusherOptions options)
    : shards_(std::move(shards)), options_(options), writer_(std::move(writer)) {}

Flusher::~Flusher() { Stop(); }

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
  absl::Time due = clock.Now() + options_.interval;
  Backoff backoff({.initial = absl::Milliseconds(200), .max = options_.max_backoff});
  while (true) {
    {
      std::unique_lock lock(wake_mu_);
      while (!stopping_ && !wake_requested_ && clock.Now() < due) {
        clock.WaitUntil(wake_, lock, due);
      }
      if (stopping_) return;
      wake_requested_ = false;
    }
    const absl::Time started = clock.Now();
    absl::Status status;
    {
      std::lock_guard lock(mu_);
      std::vector<SealedPartition> sealed;
      for (Shard* shard : shards_) {
        auto part = shard->Seal({}, /*release=*/false);
        std::move(part.begin(), part.end(), std::back_inserter(sealed));
      }
      status = WritePendingLocked(std::move(sealed));
      // After the flush, so it never delays one; skipped while flushes fail (Postgres is
      // down: the failure is already reported, and a second connection attempt would only
      // stretch the tick).
      if (status.ok()) RefreshMetersLocked();
    }
    stats_.last_ok.store(status.ok(), std::memory_order_relaxed);
    if (status.ok()) {
      backoff.Reset();
      due = std::max(started + options_.interval, clock.Now());
    } else {
      const absl::Duration delay = backoff.Next();
      due = clock.Now() + delay;
      LOG_WARN("flush failed, retrying in {}: {}", absl::FormatDuration(delay), status.message());
    }
  }
}

absl::Status Flusher::WritePendingLocked(std::vector<SealedPartition> fresh) {
  for (SealedPartition& s : fresh) {
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
      stats_.failures.fetch_add(1, std::memory_order_relaxed);
      if (!shards_paused_) {
        for (Shard* shard : shards_) shard->Pause();
        shards_paused_ = true;
      }
      return outcome.status();
    }
    if (outcome->fenced.empty()) {
      const auto rows = static_cast<int64_t>(outcome->rows_upserted);
      stats_.flushes.fetch_add(1, std::memory_order_relaxed);
      stats_.rows.fetch_add(rows, std::memory_order_relaxed);
      stats_.events.fetch_add(events, std::memory_order_relaxed);
      stats_.last_rows.store(rows, std::memory_order_relaxed);
      stats_.last_events.store(events, std::memory_order_relaxed);
      StoreMax(stats_.max_rows, rows);
      StoreMax(stats_.max_events, events);
      stats_.last_success_unix_ms.store(absl::ToUnixMillis(options_.clock->Now()),
                                        std::memory_order_relaxed);
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
      stats_.fenced.fetch_add(1, std::memory_order_relaxed);
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
  const absl::Time give_up = clock.Now() + deadline;
  std::unique_lock lock(mu_);
  std::vector<SealedPartition> sealed;
  for (Shard* shard : shards_) {
    std::vector<int32_t> mine;
    for (int32_t p : partitions) {
      if (ShardFor(p) == shard) mine.push_back(p);
    }
    if (mine.empty()) continue;
    auto part = shard->Seal(mine, /*release=*/true);
    std::move(part.begin(), part.end(), std::back_inserter(sealed));
  }
  Backoff backoff({.initial = absl::Milliseconds(100), .max = absl::Seconds(5)});
  absl::Status status = WritePendingLocked(std::move(sealed));
  while (!status.ok() && clock.Now() + backoff.current() < give_up) {
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
  const absl::Time give_up = clock.Now() + deadline;
  Backoff backoff({.initial = absl::Milliseconds(100), .max = absl::Seconds(5)});
  while (true) {
    absl::StatusOr<absl::flat_hash_map<int32_t, int64_t>> offsets;
    {
      std::lock_guard lock(mu_);
      offsets = writer_->LoadOffsets();
    }
    if (offsets.ok() || clock.Now() + backoff.current() > give_up) return offsets;
    const absl::Duration delay = backoff.Next();
    LOG_WARN("loading offsets failed, retrying in {}: {}", absl::FormatDuration(delay),
             offsets.status().message());
    clock.SleepFor(delay);
  }
}

}  // namespace meterd::ingest
