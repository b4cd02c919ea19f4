#include "lib/ingest/ingestor.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "lib/common/logging.h"
#include "lib/common/process.h"
#include "lib/common/status_macros.h"

namespace meterd::ingest {

using aggregate::SealedPartition;

namespace {

std::vector<int32_t> PartitionsOf(const rd_kafka_topic_partition_list_t* list) {
  std::vector<int32_t> partitions;
  for (int i = 0; i < list->cnt; ++i) partitions.push_back(list->elems[i].partition);
  return partitions;
}

// Bounds the rebalance callback's Postgres work so a dead database cannot wedge the group.
constexpr absl::Duration kRebalanceDeadline = absl::Seconds(20);

absl::Status CheckTopic(rd_kafka_t* rk, const std::string& brokers, const std::string& topic,
                        absl::Duration timeout) {
  rd_kafka_topic_t* handle = rd_kafka_topic_new(rk, topic.c_str(), nullptr);
  const rd_kafka_metadata_t* metadata = nullptr;
  rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 0, handle, &metadata,
                                              static_cast<int>(absl::ToInt64Milliseconds(timeout)));
  rd_kafka_topic_destroy(handle);
  if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
    return absl::UnavailableError(
        absl::StrCat("cannot reach Kafka at ", brokers, ": ", rd_kafka_err2str(err)));
  }
  absl::Status status;
  if (metadata->topic_cnt != 1 || metadata->topics[0].err != RD_KAFKA_RESP_ERR_NO_ERROR ||
      metadata->topics[0].partition_cnt == 0) {
    status = absl::NotFoundError(absl::StrCat(
        "Kafka topic '", topic, "' not found at ", brokers, ": ",
        metadata->topic_cnt == 1 ? rd_kafka_err2str(metadata->topics[0].err) : "no metadata"));
  }
  rd_kafka_metadata_destroy(metadata);
  return status;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Ingestor>> Ingestor::Create(
    IngestOptions options, std::unique_ptr<store::FlushWriter> writer,
    const event::MeterRegistry* meters, const Clock* clock) {
  if (options.shards < 1) return absl::InvalidArgumentError("--shards must be at least 1");
  std::unique_ptr<Ingestor> ingestor(new Ingestor(std::move(options)));
  const IngestOptions& o = ingestor->options_;

  KafkaProperties properties = {
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
  ASSIGN_OR_RETURN(rd_kafka_conf_t * conf, BuildKafkaConf(properties));
  rd_kafka_conf_set_opaque(conf, ingestor.get());
  rd_kafka_conf_set_rebalance_cb(conf, &Ingestor::OnRebalance);
  char error[512];
  ingestor->consumer_ = rd_kafka_new(RD_KAFKA_CONSUMER, conf, error, sizeof(error));
  if (ingestor->consumer_ == nullptr) {
    rd_kafka_conf_destroy(conf);
    return absl::InvalidArgumentError(absl::StrCat("cannot create Kafka consumer: ", error));
  }
  rd_kafka_poll_set_consumer(ingestor->consumer_);
  RETURN_IF_ERROR(CheckTopic(ingestor->consumer_, o.brokers, o.topic, o.startup_timeout));

  std::vector<Shard*> shard_pointers;
  ShardOptions shard_options;
  shard_options.topic = o.topic;
  shard_options.parse_limits = o.parse_limits;
  shard_options.dedup = o.dedup;
  shard_options.max_unflushed_keys = std::max<size_t>(1, o.max_unflushed_keys / o.shards);
  Ingestor* self = ingestor.get();
  for (int i = 0; i < o.shards; ++i) {
    ASSIGN_OR_RETURN(auto shard, Shard::Create(i, ingestor->consumer_, meters, clock, shard_options,
                                               [self] { self->flusher_->RequestFlush(); }));
    shard_pointers.push_back(shard.get());
    ingestor->shards_.push_back(std::move(shard));
  }
  ingestor->flusher_ = std::make_unique<Flusher>(
      std::move(shard_pointers), std::move(writer),
      FlusherOptions{.interval = o.flush_interval, .on_committed = o.on_committed});
  return ingestor;
}

Ingestor::~Ingestor() {
  if (flusher_) flusher_->Stop();
  for (auto& shard : shards_) shard->Stop();
  shards_.clear();
  if (consumer_ == nullptr) return;
  if (subscribed_ && !ever_assigned_.load()) {
    // librdkafka 2.0.2 aborts in rd_kafka_sticky_assignor_state_destroy when a
    // cooperative-sticky consumer that never received an assignment is destroyed (upstream
    // issue 4312, fixed in 2.3.0). consumer_close has already left the group and nothing was
    // consumed, so the handle is left to the process exit instead of destroyed.
    LOG_INFO(
        "leaving the Kafka handle to process exit: no assignment was ever received "
        "(librdkafka 2.0.2 bug 4312)");
    return;
  }
  rd_kafka_destroy(consumer_);
}

void Ingestor::OnRebalance(rd_kafka_t* rk, rd_kafka_resp_err_t err,
                           rd_kafka_topic_partition_list_t* partitions, void* opaque) {
  auto* self = static_cast<Ingestor*>(opaque);
  if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
    self->Assign(partitions);
  } else if (err == RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS) {
    self->Revoke(partitions);
  } else {
    LOG_ERROR("rebalance error: {}", rd_kafka_err2str(err));
    rd_kafka_assign(rk, nullptr);
  }
}

void Ingestor::Assign(rd_kafka_topic_partition_list_t* partitions) {
  ever_assigned_.store(true);
  auto offsets = flusher_->LoadOffsets(kRebalanceDeadline);
  if (!offsets.ok()) {
    // Without the stored offsets no safe start exists; take nothing and let the group
    // reassign (the session times out and another member, or we later, get them).
    LOG_ERROR("cannot load offsets for assigned partitions [{}]: {}",
              absl::StrJoin(PartitionsOf(partitions), ","), offsets.status().message());
    return;
  }
  for (int i = 0; i < partitions->cnt; ++i) {
    rd_kafka_topic_partition_t& tp = partitions->elems[i];
    auto it = offsets->find(tp.partition);
    const int64_t stored = it == offsets->end() ? SealedPartition::kNoStoredOffset : it->second;
    Shard* shard = ShardFor(tp.partition);
    // The log's bounds: the dedup re-read starts no lower than the log start, and a stored
    // offset outside them is a gap the shard reports.
    int64_t low = -1, high = -1;
    if (stored != SealedPartition::kNoStoredOffset) shard->LogBounds(tp.partition, &low, &high);
    const int64_t read_from = shard->AddPartition(tp.partition, stored, low, high);
    // Forward before assigning, on every assignment (librdkafka clears it on revoke).
    rd_kafka_queue_t* partition_queue =
        rd_kafka_queue_get_partition(consumer_, tp.topic, tp.partition);
    rd_kafka_queue_forward(partition_queue, shard->queue());
    rd_kafka_queue_destroy(partition_queue);
    tp.offset = read_from;
    LOG_INFO("assigned partition {} to shard {} at offset {}{}", tp.partition, shard->index(),
             stored == SealedPartition::kNoStoredOffset ? std::string("beginning")
                                                        : std::to_string(stored),
             read_from >= 0 && read_from < stored
                 ? absl::StrCat(" (re-reading from ", read_from, " to rebuild the dedup window)")
                 : "");
  }
  if (rd_kafka_error_t* error = rd_kafka_incremental_assign(consumer_, partitions)) {
    LOG_ERROR("incremental assign failed: {}", rd_kafka_error_string(error));
    rd_kafka_error_destroy(error);
    return;
  }
  assigned_partitions_.fetch_add(partitions->cnt, std::memory_order_relaxed);
}

void Ingestor::Revoke(rd_kafka_topic_partition_list_t* partitions) {
  const std::vector<int32_t> revoked = PartitionsOf(partitions);
  LOG_INFO("revoking partitions [{}]{}", absl::StrJoin(revoked, ","),
           rd_kafka_assignment_lost(consumer_) ? " (assignment lost)" : "");
  // Flush before acknowledging, so the next owner starts exactly where we stopped. Even for a
  // lost assignment this is safe: the offset CAS refuses if someone else already advanced it.
  last_revoke_status_ = flusher_->FlushAndRelease(revoked, kRebalanceDeadline);
  assigned_partitions_.fetch_sub(partitions->cnt, std::memory_order_relaxed);
  if (rd_kafka_error_t* error = rd_kafka_incremental_unassign(consumer_, partitions)) {
    LOG_ERROR("incremental unassign failed: {}", rd_kafka_error_string(error));
    rd_kafka_error_destroy(error);
  }
}

IngestSnapshot Ingestor::Snapshot() const {
  IngestSnapshot s;
  for (const auto& shard : shards_) {
    s.messages += shard->stats().messages.load(std::memory_order_relaxed);
    s.events += shard->stats().events.load(std::memory_order_relaxed);
    s.rejected += shard->stats().rejected.load(std::memory_order_relaxed);
    s.duplicates += shard->stats().duplicates.load(std::memory_order_relaxed);
    s.offset_gaps += shard->stats().offset_gaps.load(std::memory_order_relaxed);
    s.seek_failures += shard->stats().seek_failures.load(std::memory_order_relaxed);
    s.dedup_ids += shard->stats().dedup_ids.load(std::memory_order_relaxed);
    s.unflushed_keys += shard->stats().live_keys.load(std::memory_order_relaxed);
    s.paused_shards += shard->stats().paused.load(std::memory_order_relaxed) ? 1 : 0;
  }
  s.assigned_partitions = assigned_partitions_.load(std::memory_order_relaxed);
  s.shards = static_cast<int64_t>(shards_.size());
  return s;
}

void Ingestor::LogStats(absl::Duration elapsed) {
  const IngestSnapshot s = Snapshot();
  const FlushStats& f = flusher_->stats();
  LOG_INFO(
      "stats: {:.0f} events/s, {} events, {} rejected, {} duplicates, {} unflushed keys, {} "
      "paused shards, {} flushes ({} failed, {} fenced), last flush {} events as {} rows",
      static_cast<double>(s.events - last_logged_events_) / absl::ToDoubleSeconds(elapsed),
      s.events, s.rejected, s.duplicates, s.unflushed_keys, s.paused_shards, f.flushes.load(),
      f.failures.load(), f.fenced.load(), f.last_events.load(), f.last_rows.load());
  last_logged_events_ = s.events;
}

absl::Status Ingestor::Run(const std::function<bool()>& stop) {
  rd_kafka_topic_partition_list_t* topics = rd_kafka_topic_partition_list_new(1);
  rd_kafka_topic_partition_list_add(topics, options_.topic.c_str(), RD_KAFKA_PARTITION_UA);
  rd_kafka_resp_err_t err = rd_kafka_subscribe(consumer_, topics);
  rd_kafka_topic_partition_list_destroy(topics);
  if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
    return absl::UnavailableError(absl::StrCat("subscribe failed: ", rd_kafka_err2str(err)));
  }
  subscribed_ = true;
  LOG_INFO("consuming topic {} as group {} with {} shards, flush every {}", options_.topic,
           options_.group, shards_.size(), absl::FormatDuration(options_.flush_interval));
  flusher_->Start();

  absl::Status result;
  absl::Time last_stats = absl::Now();
  absl::Time last_error_log = absl::InfinitePast();
  while (!stop()) {
    // Messages go to the shard queues; this queue carries rebalances and errors only.
    rd_kafka_message_t* message = rd_kafka_consumer_poll(consumer_, 100);
    if (message != nullptr) {
      if (message->err == RD_KAFKA_RESP_ERR__FATAL) {
        char reason[512];
        rd_kafka_fatal_error(consumer_, reason, sizeof(reason));
        result = absl::InternalError(absl::StrCat("fatal Kafka error: ", reason));
        rd_kafka_message_destroy(message);
        break;
      }
      if (message->err == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET && message->rkt != nullptr &&
          message->partition >= 0) {
        ShardFor(message->partition)->PositionOutOfRange(message->partition);
      } else if (message->err != RD_KAFKA_RESP_ERR_NO_ERROR &&
                 absl::Now() - last_error_log > absl::Seconds(5)) {
        // librdkafka retries on its own; we keep waiting and say so at most every 5 s.
        LOG_WARN("Kafka: {} (retrying)", rd_kafka_message_errstr(message));
        last_error_log = absl::Now();
      }
      rd_kafka_message_destroy(message);
    }
    const absl::Time now = absl::Now();
    if (now - last_stats >= options_.stats_interval) {
      LogStats(now - last_stats);
      last_stats = now;
    }
  }

  LOG_INFO("stopping: flushing and leaving the group");
  // Close revokes every partition through OnRebalance, which flushes each before unassigning.
  last_revoke_status_ = absl::OkStatus();
  err = rd_kafka_consumer_close(consumer_);
  if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
    LOG_WARN("consumer close: {}", rd_kafka_err2str(err));
  }
  if (result.ok() && !last_revoke_status_.ok()) {
    // Nothing is lost (offsets were not advanced), but this was not a clean stop.
    result = absl::UnavailableError(absl::StrCat(
        "final flush failed (", last_revoke_status_.message(),
        "); the unflushed events will be counted again from the offsets stored in Postgres"));
  }
  flusher_->Stop();
  // Anything still pending (a failed final flush) was already logged and left unadvanced.
  LogStats(absl::Now() - last_stats);
  const FlushStats& f = flusher_->stats();
  LOG_INFO(
      "flush summary: {} flushes wrote {} events as {} rows; largest flush {} events, "
      "{} rows",
      f.flushes.load(), f.events.load(), f.rows.load(), f.max_events.load(), f.max_rows.load());
  return result;
}

}  // namespace meterd::ingest
