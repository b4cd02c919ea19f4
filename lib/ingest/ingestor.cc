#include "lib/ingest/ingestor.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "lib/common/logging.h"
#include "lib/common/process.h"
#include "lib/common/status_macros.h"
#include "lib/kafka/rdkafka_source.h"

namespace meterd::ingest {

using aggregate::SealedPartition;

namespace {

// Bounds the rebalance callback's Postgres work so a dead database cannot wedge the group.
constexpr absl::Duration kRebalanceDeadline = absl::Seconds(20);

}  // namespace

absl::StatusOr<kafka::Properties> ConsumerProperties(const IngestOptions& o) {
  kafka::Properties properties = {
      {"bootstrap.servers", o.brokers},
      {"group.id", o.group},
      {"partition.assignment.strategy", "cooperative-sticky"},
      // A crashed member's partitions move after its session times out: 10 s, not librdkafka's
      // 45 s, so a restart resumes within seconds (heartbeats must be well inside it).
      {"session.timeout.ms", "10000"},
      {"heartbeat.interval.ms", "1000"},
      {"enable.auto.commit", "false"},
      {"enable.auto.offset.store", "false"},
      // Never jump silently: an out-of-range position reaches the shard as an error, which
      // records the range it cannot read (offset_gap) and seeks itself.
      {"auto.offset.reset", "error"},
      {"enable.partition.eof", "false"},
      {"queued.max.messages.kbytes", "65536"},
      {"fetch.max.bytes", "16777216"},
      // Bounds event -> visible latency when a broker does not answer a fetch as soon as data
      // arrives (librdkafka's mock does not); a real broker answers early either way.
      {"fetch.wait.max.ms", "100"},
  };
  for (const auto& [key, value] : o.kafka_properties) {
    if (key == "auto.offset.reset" || key == "enable.auto.commit") {
      return absl::InvalidArgumentError(
          absl::StrCat("--kafka-property ", key,
                       " is managed by meterd (offsets live in Postgres; a position "
                       "outside the log is recorded as offset_gap, never skipped)"));
    }
  }
  properties.insert(properties.end(), o.kafka_properties.begin(), o.kafka_properties.end());
  return properties;
}

absl::StatusOr<std::unique_ptr<Ingestor>> Ingestor::Create(
    IngestOptions options, std::unique_ptr<store::FlushWriter> writer,
    const event::MeterRegistry* meters, const Clock* clock) {
  if (options.shards < 1) return absl::InvalidArgumentError("--shards must be at least 1");
  ASSIGN_OR_RETURN(kafka::Properties properties, ConsumerProperties(options));
  ASSIGN_OR_RETURN(std::unique_ptr<kafka::RdKafkaSource> source,
                   kafka::RdKafkaSource::Create({.brokers = options.brokers,
                                                 .topic = options.topic,
                                                 .properties = std::move(properties),
                                                 .startup_timeout = options.startup_timeout}));
  return CreateWithSource(std::move(options), std::move(source), std::move(writer), meters, clock);
}

absl::StatusOr<std::unique_ptr<Ingestor>> Ingestor::CreateWithSource(
    IngestOptions options, std::unique_ptr<kafka::PartitionSource> source,
    std::unique_ptr<store::FlushWriter> writer, const event::MeterRegistry* meters,
    const Clock* clock) {
  if (options.shards < 1) return absl::InvalidArgumentError("--shards must be at least 1");
  std::unique_ptr<Ingestor> ingestor(new Ingestor(std::move(options), clock));
  const IngestOptions& o = ingestor->options_;
  ingestor->source_ = std::move(source);
  MetricsRegistry& metrics = RegistryOrOwn(o.metrics, ingestor->own_metrics_);
  ingestor->metrics_ = &metrics;
  ingestor->shard_metrics_ = std::make_unique<ShardMetrics>(metrics);
  metrics.AddGauge("meterd_shards", "Shard threads")->Set(o.shards);
  kafka::PartitionSource* source_pointer = ingestor->source_.get();
  metrics.AddCallbackGauge("meterd_assigned_partitions", "Kafka partitions this instance owns", {},
                           [source_pointer] { return source_pointer->AssignedCount(); });
  ingestor->first_assignment_unix_ms_ =
      metrics.AddGauge("meterd_first_assignment_unix_ms",
                       "When this instance first received partitions (Unix ms, 0: not yet)");

  std::vector<Shard*> shard_pointers;
  ShardOptions shard_options;
  shard_options.topic = o.topic;
  shard_options.parse_limits = o.parse_limits;
  shard_options.dedup = o.dedup;
  shard_options.max_unflushed_keys = std::max<size_t>(1, o.max_unflushed_keys / o.shards);
  Ingestor* self = ingestor.get();
  for (int i = 0; i < o.shards; ++i) {
    ASSIGN_OR_RETURN(auto shard,
                     Shard::Create(i, ingestor->source_.get(), meters, clock, shard_options,
                                   ingestor->shard_metrics_.get(), &metrics,
                                   [self] { self->flusher_->RequestFlush(); }));
    shard_pointers.push_back(shard.get());
    ingestor->shards_.push_back(std::move(shard));
  }
  ingestor->flusher_ =
      std::make_unique<Flusher>(std::move(shard_pointers), std::move(writer),
                                FlusherOptions{.interval = o.flush_interval,
                                               .max_interval = o.max_visibility_latency,
                                               .on_committed = o.on_committed,
                                               .clock = clock,
                                               .metrics = &metrics});
  return ingestor;
}

Ingestor::~Ingestor() {
  if (flusher_) flusher_->Stop();
  for (auto& shard : shards_) shard->Stop();
  // Its callback reads the source, which goes with this object; the registry may not.
  if (metrics_ != nullptr) metrics_->Remove("meterd_assigned_partitions");
}

absl::Status Ingestor::Readiness() const {
  if (source_->AssignedCount() == 0) return absl::UnavailableError("no partitions assigned");
  if (!flusher_->last_ok()) return absl::UnavailableError("last flush failed");
  return absl::OkStatus();
}

bool Ingestor::OnAssign(std::vector<kafka::AssignedPartition>& partitions) {
  if (first_assignment_unix_ms_->value() == 0) {
    first_assignment_unix_ms_->Set(absl::ToUnixMillis(clock_->Now()));
  }
  // Without the stored offsets no safe start exists, and declining an assignment leaves the
  // partitions with nobody (the member keeps heartbeating): keep trying while Postgres is
  // away, as a flush does, unless meterd is stopping.
  auto offsets = flusher_->LoadOffsets(kRebalanceDeadline);
  while (!offsets.ok()) {
    std::vector<int32_t> ids;
    for (const kafka::AssignedPartition& a : partitions) ids.push_back(a.partition);
    const bool stopping = stop_ != nullptr && (*stop_)();
    LOG_ERROR("cannot load offsets for assigned partitions [{}]: {}; {}", absl::StrJoin(ids, ","),
              offsets.status().message(), stopping ? "stopping, taking none" : "retrying");
    if (stopping) return false;
    offsets = flusher_->LoadOffsets(kRebalanceDeadline);
  }
  for (kafka::AssignedPartition& assigned : partitions) {
    auto it = offsets->find(assigned.partition);
    const int64_t stored = it == offsets->end() ? SealedPartition::kNoStoredOffset : it->second;
    Shard* shard = ShardFor(assigned.partition);
    // The log's bounds: the dedup re-read starts no lower than the log start, and a stored
    // offset outside them is a gap the shard reports.
    int64_t low = -1, high = -1;
    if (stored != SealedPartition::kNoStoredOffset)
      shard->LogBounds(assigned.partition, &low, &high);
    const int64_t read_from = shard->AddPartition(assigned.partition, stored, low, high);
    source_->Route(assigned.partition, shard->queue());
    assigned.start_offset = read_from;
    LOG_INFO("assigned partition {} to shard {} at offset {}{}", assigned.partition, shard->index(),
             stored == SealedPartition::kNoStoredOffset ? std::string("beginning")
                                                        : std::to_string(stored),
             read_from >= 0 && read_from < stored
                 ? absl::StrCat(" (re-reading from ", read_from, " to rebuild the dedup window)")
                 : "");
  }
  return true;
}

void Ingestor::OnRevoke(const std::vector<int32_t>& revoked, bool lost) {
  LOG_INFO("revoking partitions [{}]{}", absl::StrJoin(revoked, ","),
           lost ? " (assignment lost)" : "");
  // Flush before acknowledging, so the next owner starts exactly where we stopped. Even for a
  // lost assignment this is safe: the offset CAS refuses if someone else already advanced it.
  last_revoke_status_ = flusher_->FlushAndRelease(revoked, kRebalanceDeadline);
}

void Ingestor::LogStats(absl::Duration elapsed) {
  auto value = [this](const char* name) { return metrics_->Value(name).value_or(0); };
  const int64_t events = value("meterd_events_total");
  LOG_INFO(
      "stats: {:.0f} events/s, {} events, {} rejected, {} duplicates, {} unflushed keys, {} "
      "paused shards, {} flushes ({} failed, {} fenced), last flush {} events as {} rows",
      static_cast<double>(events - last_logged_events_) / absl::ToDoubleSeconds(elapsed), events,
      value("meterd_rejected_events_total"), value("meterd_duplicate_events_total"),
      value("meterd_unflushed_keys"), value("meterd_paused_shards"), value("meterd_flushes_total"),
      value("meterd_flush_failures_total"), value("meterd_fenced_partitions_total"),
      value("meterd_last_flush_events"), value("meterd_last_flush_rows"));
  last_logged_events_ = events;
}

absl::Status Ingestor::Run(const std::function<bool()>& stop) {
  stop_ = &stop;
  RETURN_IF_ERROR(source_->Subscribe(this));
  LOG_INFO("consuming topic {} as group {} with {} shards, flush every {}", options_.topic,
           options_.group, shards_.size(), absl::FormatDuration(options_.flush_interval));
  flusher_->Start();

  absl::Status result;
  absl::Time last_stats = clock_->Steady();
  absl::Time last_error_log = absl::InfinitePast();
  while (!stop()) {
    const kafka::PollEvent event = source_->Poll(absl::Milliseconds(100));
    if (event.kind == kafka::PollEvent::Kind::kFatal) {
      result = absl::InternalError(absl::StrCat("fatal Kafka error: ", event.text));
      break;
    }
    if (event.kind == kafka::PollEvent::Kind::kOutOfRange) {
      ShardFor(event.partition)->PositionOutOfRange(event.partition);
    } else if (event.kind == kafka::PollEvent::Kind::kError &&
               clock_->Steady() - last_error_log > absl::Seconds(5)) {
      // The client retries on its own; we keep waiting and say so at most every 5 s.
      LOG_WARN("Kafka: {} (retrying)", event.text);
      last_error_log = clock_->Steady();
    }
    const absl::Time now = clock_->Steady();
    if (now - last_stats >= options_.stats_interval) {
      LogStats(now - last_stats);
      last_stats = now;
    }
  }

  LOG_INFO("stopping: flushing and leaving the group");
  // Close revokes every partition through OnRebalance, which flushes each before unassigning.
  last_revoke_status_ = absl::OkStatus();
  if (absl::Status closed = source_->Close(); !closed.ok()) LOG_WARN("{}", closed.message());
  stop_ = nullptr;
  if (result.ok() && !last_revoke_status_.ok()) {
    // Nothing is lost (offsets were not advanced), but this was not a clean stop.
    result = absl::UnavailableError(absl::StrCat(
        "final flush failed (", last_revoke_status_.message(),
        "); the unflushed events will be counted again from the offsets stored in Postgres"));
  }
  flusher_->Stop();
  // Anything still pending (a failed final flush) was already logged and left unadvanced.
  LogStats(clock_->Steady() - last_stats);
  const FlushMetrics& f = flusher_->metrics();
  LOG_INFO("flush summary: {} flushes wrote {} events as {} rows; largest flush {} events, {} rows",
           f.flushes->value(), f.events->value(), f.rows->value(), f.largest_events->value(),
           f.largest_rows->value());
  return result;
}

}  // namespace meterd::ingest
