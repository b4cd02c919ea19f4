#include "lib/ingest/shard.h"

#include <fcntl.h>
#include <unistd.h>

#include <boost/asio/read.hpp>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "lib/common/logging.h"
#include "lib/common/status_macros.h"
#include "lib/event/binary_mode.h"

namespace meterd::ingest {

using aggregate::SealedPartition;

ShardMetrics::ShardMetrics(MetricsRegistry& r)
    : messages(r.AddCounter("meterd_messages_total", "Kafka messages consumed")),
      events(r.AddCounter("meterd_events_total", "Valid usage events counted")),
      rejected(r.AddCounter("meterd_rejected_events_total",
                            "Events refused (to shared.rejected_events)")),
      duplicates(r.AddCounter("meterd_duplicate_events_total",
                              "Events not counted because the partition counted the same "
                              "(source, id) within the dedup window")),
      offset_gaps(r.AddCounter("meterd_offset_gaps_total",
                               "Log ranges found missing (retention, recreated topic); each is a "
                               "rejected_events row with reason offset_gap")),
      seek_failures(
          r.AddCounter("meterd_seek_failures_total", "Partition seeks that failed (retried)")),
      dedup_ids(r.AddGauge("meterd_dedup_ids", "(source, id) fingerprints remembered for dedup")),
      unflushed_keys(
          r.AddGauge("meterd_unflushed_keys", "Counter keys not yet written to Postgres")),
      paused_shards(r.AddGauge("meterd_paused_shards",
                               "Shards not draining (Postgres down or key cap reached)")),
      last_counted_unix_ms(r.AddGauge("meterd_last_counted_unix_ms",
                                      "When an event was last counted (Unix ms, 0: never)")) {}

absl::StatusOr<std::unique_ptr<Shard>> Shard::Create(int index, kafka::PartitionSource* source,
                                                     const event::MeterRegistry* meters,
                                                     const Clock* clock, ShardOptions options,
                                                     ShardMetrics* metrics,
                                                     MetricsRegistry* registry,
                                                     FlushRequest request_flush) {
  std::unique_ptr<Shard> shard(new Shard(index, source, meters, clock, options, metrics, registry,
                                         std::move(request_flush)));
  if (absl::Status status = shard->Open(); !status.ok()) return status;
  return shard;
}

Shard::Shard(int index, kafka::PartitionSource* source, const event::MeterRegistry* meters,
             const Clock* clock, ShardOptions options, ShardMetrics* metrics,
             MetricsRegistry* registry, FlushRequest request_flush)
    : index_(index),
      source_(source),
      clock_(clock),
      options_(options),
      metrics_(metrics),
      registry_(registry),
      request_flush_(std::move(request_flush)),
      wakeup_(io_),
      parser_(meters, options.parse_limits) {}

absl::Status Shard::Open() {
  int fds[2];
  if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("shard ", index_, ": pipe2 failed"));
  }
  wakeup_.assign(fds[0]);
  wakeup_write_fd_ = fds[1];
  ASSIGN_OR_RETURN(queue_, source_->NewQueue());
  // One byte arrives when the queue goes from empty to non-empty.
  queue_->NotifyOn(wakeup_write_fd_);
  ArmWakeup();
  thread_ = std::thread([this] {
    auto guard = boost::asio::make_work_guard(io_);
    io_.run();
  });
  return absl::OkStatus();
}

Shard::~Shard() {
  Stop();
  for (const auto& [partition, owned] : partitions_) DropLag(partition);
  metrics_->unflushed_keys->Add(-published_keys_);
  metrics_->dedup_ids->Add(-published_ids_);
  if (paused_) metrics_->paused_shards->Add(-1);
  if (queue_ != nullptr) queue_->NotifyOn(-1);
  queue_.reset();
  if (wakeup_write_fd_ >= 0) close(wakeup_write_fd_);
}

void Shard::Stop() {
  if (!thread_.joinable()) return;
  boost::asio::post(io_, [this] {
    boost::system::error_code ignored;
    wakeup_.cancel(ignored);
    io_.stop();
  });
  thread_.join();
}

void Shard::ArmWakeup() {
  wakeup_.async_read_some(boost::asio::buffer(wakeup_buffer_),
                          [this](const boost::system::error_code& error, size_t) {
                            if (error == boost::asio::error::operation_aborted) return;
                            Drain();
                            ArmWakeup();
                          });
}

void Shard::Drain() {
  // Fair to posted work: after kDrainBatchesPerTurn batches the rest of the queue waits behind
  // whatever was posted meanwhile (a seal, an assignment, a revoke), so a queue that never runs
  // dry (a broker catching up faster than we parse) cannot hold a flush or a rebalance back for
  // more than a few milliseconds.
  constexpr int kDrainBatchesPerTurn = 4;
  for (int turn = 0; !paused_; ++turn) {
    if (turn == kDrainBatchesPerTurn) {
      boost::asio::post(io_, [this] { Drain(); });
      return;
    }
    const std::span<const kafka::Message> batch = queue_->Poll(options_.consume_batch);
    if (batch.empty()) break;
    const absl::Time now = clock_->Now();  // Once per batch, not per event.
    for (const kafka::Message& message : batch) Process(message, now);
    queue_->Release();  // Before any wait: held messages pin the client's fetch buffers.
    adder_.Apply();     // Before anything else on this thread reads or moves the counters.
    metrics_->messages->Add(static_cast<int64_t>(batch.size()));
    Publish(now);
    if (static_cast<size_t>(published_keys_) >= options_.max_unflushed_keys) {
      // Backpressure: stop draining; librdkafka stops fetching once its own buffer is full.
      SetPaused(true);
      if (!flush_requested_) {
        flush_requested_ = true;
        request_flush_();
      }
    }
  }
}

void Shard::Process(const kafka::Message& message, absl::Time now) {
  if (message.status == kafka::Message::Status::kOutOfRange) {
    // The source stopped this partition instead of jumping (auto.offset.reset=error). We look
    // at the log's bounds, record what cannot be read, and seek ourselves.
    auto it = partitions_.find(message.partition);
    if (it != partitions_.end()) OutOfRange(it->second, message.partition);
    return;
  }
  if (message.status == kafka::Message::Status::kError) {
    LOG_WARN("shard {}: consume error on partition {}: {}", index_, message.partition,
             message.error);
    return;
  }
  auto it = partitions_.find(message.partition);
  if (it == partitions_.end()) return;  // Revoked meanwhile: its new owner counts it.
  OwnedPartition& owned = it->second;
  // The dedup window ages by when messages were produced (the same on a re-read), not by event
  // time, which a producer sets and may be days old for late data.
  // Clamped to this host's clock plus the accepted skew: one producer stamping the future (or
  // microseconds as milliseconds) must not age every other id out of the window.
  const int64_t now_micros = absl::ToUnixMicros(now);
  const int64_t timestamp_ms = message.timestamp_ms;
  const int64_t sent_micros =
      timestamp_ms >= 0
          ? std::min(timestamp_ms * 1000,
                     now_micros + absl::ToInt64Microseconds(options_.parse_limits.max_future_skew))
          : now_micros;
  if (owned.stopped) return;  // Its seek failed: nothing of it is read until a rebalance.
  if (message.offset < owned.warm_until) {
    // Counted before (by us or an earlier owner): only its ids go into the window.
    const std::optional<std::string_view> bytes = MessageBytes(message);
    if (!bytes) return;
    const event::ParsedMessage& parsed = parser_.Parse(*bytes, now);
    for (const event::UsageEvent& e : parsed.events) {
      owned.dedup.SeenOrRemember(e.org, e.source, e.id, sent_micros);
    }
    return;
  }
  // After a seek back, messages already counted may be delivered again.
  if (owned.next_offset != SealedPartition::kNoStoredOffset && message.offset < owned.next_offset) {
    return;
  }
  owned.next_offset = message.offset + 1;
  const std::optional<std::string_view> bytes = MessageBytes(message);
  if (!bytes) {  // A tombstone or empty message.
    owned.deltas.Reject(message.offset, event::RejectReason::kNotJson, "empty message", "");
    ++batch_rejected_;
    return;
  }
  const event::ParsedMessage& parsed = parser_.Parse(*bytes, now);
  adder_.Apply();  // The previous message's events, whose slots were prefetched meanwhile.
  size_t duplicates = 0;
  for (const event::UsageEvent& e : parsed.events) {
    if (owned.dedup.SeenOrRemember(e.org, e.source, e.id, sent_micros)) {
      ++duplicates;  // A producer's re-send: counted already (or in this interval's deltas).
      continue;
    }
    adder_.Stage(&owned.deltas, e);
  }
  if (parsed.rejections.size() > aggregate::PartitionCounters::kMaxRejectionsPerMessage) {
    owned.deltas.RejectMessage(message.offset, parsed.rejections,
                               parsed.events.size() + parsed.rejections.size(), *bytes);
  } else {
    for (const event::Rejection& r : parsed.rejections) {
      owned.deltas.Reject(message.offset, r.reason, r.detail, r.raw);
    }
  }
  batch_events_ += static_cast<int64_t>(parsed.events.size() - duplicates);
  batch_duplicates_ += static_cast<int64_t>(duplicates);
  batch_rejected_ += static_cast<int64_t>(parsed.rejections.size());
  if (owned.oldest_timestamp_ms < 0 ||
      (timestamp_ms >= 0 && timestamp_ms < owned.oldest_timestamp_ms)) {
    owned.oldest_timestamp_ms = timestamp_ms;
  }
}

std::optional<std::string_view> Shard::MessageBytes(const kafka::Message& message) {
  const std::string_view value(message.value, message.size);
  if (message.binary_mode) {
    header_pairs_.clear();
    for (const kafka::Header& h : message.headers) header_pairs_.emplace_back(h.name, h.value);
    if (event::StructuredFromBinary(header_pairs_, value, &binary_event_)) return binary_event_;
  }
  if (message.value == nullptr) return std::nullopt;
  return value;
}

size_t Shard::LiveKeys() const {
  // Rejected rows are unflushed state too: each counts as a key, and each KiB of raw bytes
  // they hold counts as another, so refused input is bounded like counted input.
  size_t live = 0;
  for (const auto& [partition, owned] : partitions_) {
    live += owned.deltas.counters.size() + owned.deltas.rejected.size() +
            owned.deltas.rejected_bytes / 1024;
  }
  return live;
}

int64_t Shard::ReadFrom(int64_t stored_offset, int64_t log_start) const {
  if (stored_offset == SealedPartition::kNoStoredOffset) return kafka::kOffsetBeginning;
  // Log start unknown: no re-read rather than a guess (below the start the position would
  // be out of range).
  if (log_start < 0) return stored_offset;
  // Messages hold one event or more, so max_ids messages back hold at least max_ids events.
  return std::max(stored_offset - static_cast<int64_t>(options_.dedup.max_ids),
                  std::min(log_start, stored_offset));
}

int64_t Shard::AddPartition(int32_t partition, int64_t stored_offset, int64_t log_start,
                            int64_t log_end) {
  return RunOnShard([&] {
    partitions_.erase(partition);
    OwnedPartition& owned =
        partitions_.emplace(partition, OwnedPartition(stored_offset, options_.dedup)).first->second;
    RegisterLag(partition, owned);
    if (stored_offset == SealedPartition::kNoStoredOffset || log_start < 0 || log_end < 0) {
      return ReadFrom(stored_offset, log_start);
    }
    std::string gap;
    int64_t resume = stored_offset;
    if (stored_offset > log_end) {
      // Recreated, or truncated by an unclean leader election: one cannot tell. Restarting at
      // the start would count a truncated log's messages twice; restarting at the end counts
      // nothing twice and names the range it did not count.
      gap = PastEndDetail(stored_offset, log_start, log_end);
      resume = log_end;
    } else if (stored_offset < log_start) {
      gap = absl::StrCat("messages [", stored_offset, ", ", log_start,
                         ") were deleted (retention) before meterd read them");
      resume = log_start;
    }
    if (gap.empty()) return ReadFrom(stored_offset, log_start);
    // The CAS still expects what Postgres holds; the next flush moves it to `resume`.
    owned.next_offset = resume;
    owned.warm_until = resume;
    RecordGap(owned, partition, stored_offset, gap);
    return resume;
  });
}

bool Shard::LogBounds(int32_t partition, int64_t* low, int64_t* high) const {
  const absl::Status status = source_->LogBounds(partition, low, high);
  if (status.ok()) return true;
  *low = *high = -1;
  LOG_ERROR("shard {}: partition {}: cannot read the log's bounds: {}", index_, partition,
            status.message());
  return false;
}

bool Shard::SeekTo(int32_t partition, int64_t offset) {
  for (int attempt = 1; attempt <= 3; ++attempt) {
    const absl::Status status = source_->Seek(partition, offset);
    if (status.ok()) return true;
    LOG_ERROR("shard {}: seek of partition {} to {} failed (attempt {} of 3): {}", index_,
              partition, offset, attempt, status.message());
    metrics_->seek_failures->Add();
    clock_->SleepFor(absl::Milliseconds(100 * attempt));
  }
  return false;
}

void Shard::OutOfRange(OwnedPartition& owned, int32_t partition) {
  const int64_t position = owned.next_offset;
  int64_t low = -1, high = -1;
  if (position == SealedPartition::kNoStoredOffset || !LogBounds(partition, &low, &high)) {
    // Nothing to compare with: try the same position again (librdkafka backs off).
    SeekTo(partition,
           position == SealedPartition::kNoStoredOffset ? kafka::kOffsetBeginning : position);
    return;
  }
  int64_t resume = position;
  if (position < low) {
    RecordGap(owned, partition, position,
              absl::StrCat("messages [", position, ", ", low,
                           ") were deleted (retention) before meterd read them"));
    resume = low;
  } else if (position > high) {
    RecordGap(owned, partition, position, PastEndDetail(position, low, high));
    resume = high;
  }
  // Else a stale error (the position is inside the log): resume where we are.
  owned.next_offset = resume;
  owned.warm_until = std::min(owned.warm_until, resume);
  if (!SeekTo(partition, resume)) StopPartition(owned, partition);
}

std::string Shard::PastEndDetail(int64_t stored, int64_t low, int64_t high) {
  return absl::StrCat(
      "stored next offset ", stored, " is past the log end ", high,
      " (topic deleted and recreated, or truncated); NOT counted: messages [", low, ", ", high,
      ") (they may be new, or counted before a truncation); to count them, stop meterd and set "
      "shared.ingest_offsets.next_offset to ",
      low, " for this partition");
}

void Shard::StopPartition(OwnedPartition& owned, int32_t partition) {
  owned.stopped = true;
  LOG_ERROR(
      "shard {}: partition {} stopped: its position could not be set; nothing of it is "
      "counted until the next rebalance (restart this instance to force one)",
      index_, partition);
}

void Shard::RecordGap(OwnedPartition& owned, int32_t partition, int64_t at,
                      const std::string& what) {
  LOG_ERROR("shard {}: partition {}: offset gap: {}", index_, partition, what);
  owned.deltas.Reject(at, event::RejectReason::kOffsetGap, what, "");
  metrics_->offset_gaps->Add();
}

void Shard::SealOne(int32_t partition, OwnedPartition& owned,
                    std::vector<SealedPartition>& sealed) {
  if (owned.next_offset == SealedPartition::kNoStoredOffset ||
      owned.next_offset == owned.expected_offset) {
    return;  // Nothing consumed since the last seal.
  }
  SealedPartition& s = sealed.emplace_back();
  s.partition = partition;
  s.expected_offset = owned.expected_offset;
  s.next_offset = owned.next_offset;
  s.oldest_timestamp_ms = owned.oldest_timestamp_ms;
  owned.oldest_timestamp_ms = -1;
  s.deltas = std::move(owned.deltas);
  // Not reserved to the previous interval's size: a reservation is allocated at the seal,
  // while the sealed maps still exist, and keys scattered over it make all of it resident, so
  // every seal doubled the maps' memory (bench/README.md, "Memory per live key").
  owned.deltas = {};
  owned.expected_offset = owned.next_offset;
}

std::vector<SealedPartition> Shard::SealAll() {
  return RunOnShard([&] {
    std::vector<SealedPartition> sealed;
    for (auto& [partition, owned] : partitions_) SealOne(partition, owned, sealed);
    Publish(clock_->Now());
    return sealed;
  });
}

std::vector<SealedPartition> Shard::SealAndRelease(const std::vector<int32_t>& partitions) {
  return RunOnShard([&] {
    std::vector<SealedPartition> sealed;
    for (int32_t partition : partitions) {
      auto it = partitions_.find(partition);
      if (it == partitions_.end()) continue;
      SealOne(partition, it->second, sealed);
      DropLag(partition);
      partitions_.erase(it);
    }
    Publish(clock_->Now());
    return sealed;
  });
}

void Shard::ResetPartition(int32_t partition, int64_t stored_offset) {
  RunOnShard([&] {
    auto it = partitions_.find(partition);
    if (it == partitions_.end()) return;
    // Seek on this thread, the queue's only consumer: nothing of the partition can be counted
    // between the seek and the reset. librdkafka drops messages fetched before the seek. The
    // dedup re-read starts no lower than the log start.
    int64_t low = -1, high = -1;
    if (stored_offset != SealedPartition::kNoStoredOffset && options_.dedup.max_ids > 0) {
      LogBounds(partition, &low, &high);
    }
    const bool sought = SeekTo(partition, ReadFrom(stored_offset, low));
    // The window remembered ids of the dropped deltas: rebuild it from the log.
    it->second = OwnedPartition(stored_offset, options_.dedup);
    RegisterLag(partition, it->second);
    // Reading on from where the consumer is would skip what the dropped deltas covered.
    if (!sought) StopPartition(it->second, partition);
    LOG_WARN("shard {}: partition {} fenced; dropped unflushed deltas, resuming at offset {}",
             index_, partition, stored_offset);
  });
}

void Shard::PositionOutOfRange(int32_t partition) {
  boost::asio::post(io_, [this, partition] {
    auto it = partitions_.find(partition);
    if (it != partitions_.end()) OutOfRange(it->second, partition);
  });
}

void Shard::Pause() {
  boost::asio::post(io_, [this] { SetPaused(true); });
}

void Shard::Resume() {
  boost::asio::post(io_, [this] {
    flush_requested_ = false;
    if (!paused_) return;
    SetPaused(false);
    Drain();  // The wake-up byte came while paused; it will not come again for queued data.
  });
}

void Shard::Publish(absl::Time now) {
  if (batch_events_ > 0) {
    metrics_->events->Add(batch_events_);
    metrics_->last_counted_unix_ms->SetMax(absl::ToUnixMillis(now));  // Shards race: latest wins.
  }
  if (batch_rejected_ > 0) metrics_->rejected->Add(batch_rejected_);
  if (batch_duplicates_ > 0) metrics_->duplicates->Add(batch_duplicates_);
  batch_events_ = batch_rejected_ = batch_duplicates_ = 0;
  const auto keys = static_cast<int64_t>(LiveKeys());
  int64_t ids = 0;
  for (const auto& [partition, owned] : partitions_) {
    ids += static_cast<int64_t>(owned.dedup.size());
    owned.position->store(owned.next_offset, std::memory_order_relaxed);
  }
  metrics_->unflushed_keys->Add(keys - published_keys_);
  metrics_->dedup_ids->Add(ids - published_ids_);
  published_keys_ = keys;
  published_ids_ = ids;
}

void Shard::SetPaused(bool paused) {
  if (paused == paused_) return;
  paused_ = paused;
  metrics_->paused_shards->Add(paused ? 1 : -1);
}

void Shard::RegisterLag(int32_t partition, const OwnedPartition& owned) {
  const Labels labels = {{"partition", std::to_string(partition)}};
  registry_->Remove("meterd_partition_lag", labels);
  registry_->AddCallbackGauge(
      "meterd_partition_lag",
      "Messages in the partition's log after what this instance has read (-1: unknown)", labels,
      [source = source_, partition, position = owned.position]() -> int64_t {
        const int64_t end = source->CachedLogEnd(partition);
        const int64_t at = position->load(std::memory_order_relaxed);
        if (end < 0 || at < 0) return -1;
        return std::max<int64_t>(0, end - at);
      });
}

void Shard::DropLag(int32_t partition) {
  registry_->Remove("meterd_partition_lag", {{"partition", std::to_string(partition)}});
}

}  // namespace meterd::ingest
