#include "lib/kafka/rdkafka_source.h"

#include "absl/strings/str_cat.h"
#include "lib/common/logging.h"

namespace meterd::kafka {
namespace {

class RdKafkaQueue final : public MessageQueue {
 public:
  explicit RdKafkaQueue(rd_kafka_t* consumer) : queue_(rd_kafka_queue_new(consumer)) {}
  ~RdKafkaQueue() override {
    Release();
    rd_kafka_queue_io_event_enable(queue_, -1, nullptr, 0);
    rd_kafka_queue_destroy(queue_);
  }

  rd_kafka_queue_t* raw() const { return queue_; }

  void NotifyOn(int fd) override {
    // librdkafka writes the payload when the queue goes from empty to non-empty.
    rd_kafka_queue_io_event_enable(queue_, fd, "1", 1);
  }

  std::span<const Message> Poll(size_t max) override {
    Release();
    if (raw_.size() < max) raw_.resize(max);
    const ssize_t count = rd_kafka_consume_batch_queue(queue_, 0, raw_.data(), max);
    held_ = count > 0 ? static_cast<size_t>(count) : 0;
    messages_.clear();
    messages_.reserve(held_);  // Convert takes an element's index: no reallocation.
    headers_.clear();
    header_ranges_.clear();
    for (size_t i = 0; i < held_; ++i) {
      const rd_kafka_message_t* m = raw_[i];
      // End of partition is no news (enable.partition.eof is off unless overridden).
      if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF) Convert(*m, messages_.emplace_back());
    }
    // Spans into headers_ only once it stops growing.
    for (const auto& [index, begin, count] : header_ranges_) {
      messages_[index].headers = std::span<const Header>(headers_.data() + begin, count);
    }
    return messages_;
  }

 private:
  void Release() override {
    for (size_t i = 0; i < held_; ++i) rd_kafka_message_destroy(raw_[i]);
    held_ = 0;
    messages_.clear();
  }

  void Convert(const rd_kafka_message_t& m, Message& out) {
    out.partition = m.partition;
    out.offset = m.offset;
    if (m.err != RD_KAFKA_RESP_ERR_NO_ERROR) {
      out.status = m.err == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET ? Message::Status::kOutOfRange
                                                                 : Message::Status::kError;
      out.error = rd_kafka_message_errstr(&m);
      return;
    }
    out.timestamp_ms = rd_kafka_message_timestamp(&m, nullptr);
    out.value = static_cast<const char*>(m.payload);
    out.size = m.payload == nullptr ? 0 : m.len;
    // Structured mode (the common case) has no ce_ headers: one cheap lookup, no copy.
    rd_kafka_headers_t* headers = nullptr;
    const void* unused_value;
    size_t unused_size;
    if (rd_kafka_message_headers(&m, &headers) != RD_KAFKA_RESP_ERR_NO_ERROR ||
        headers == nullptr ||
        rd_kafka_header_get_last(headers, "ce_specversion", &unused_value, &unused_size) !=
            RD_KAFKA_RESP_ERR_NO_ERROR) {
      return;
    }
    out.binary_mode = true;
    const size_t begin = headers_.size();
    const char* name;
    const void* data;
    size_t size;
    for (size_t i = 0;
         rd_kafka_header_get_all(headers, i, &name, &data, &size) == RD_KAFKA_RESP_ERR_NO_ERROR;
         ++i) {
      headers_.push_back({std::string_view(name), std::string_view(static_cast<const char*>(data),
                                                                   data == nullptr ? 0 : size)});
    }
    header_ranges_.push_back(
        {static_cast<size_t>(&out - messages_.data()), begin, headers_.size() - begin});
  }

  struct HeaderRange {
    size_t message, begin, count;
  };
  rd_kafka_queue_t* const queue_;
  std::vector<rd_kafka_message_t*> raw_;  // raw_[0, held_): the last batch, until Release.
  size_t held_ = 0;
  std::vector<Message> messages_;
  std::vector<Header> headers_;
  std::vector<HeaderRange> header_ranges_;
};

std::vector<int32_t> PartitionsOf(const rd_kafka_topic_partition_list_t* list) {
  std::vector<int32_t> partitions;
  for (int i = 0; i < list->cnt; ++i) partitions.push_back(list->elems[i].partition);
  return partitions;
}

}  // namespace

absl::StatusOr<std::unique_ptr<RdKafkaSource>> RdKafkaSource::Create(RdKafkaSourceOptions options) {
  std::unique_ptr<RdKafkaSource> source(new RdKafkaSource(std::move(options)));
  RdKafkaSource* self = source.get();
  absl::StatusOr<Handle> consumer =
      NewClient(RD_KAFKA_CONSUMER, self->options_.properties, [self](rd_kafka_conf_t* conf) {
        rd_kafka_conf_set_opaque(conf, self);
        rd_kafka_conf_set_rebalance_cb(conf, &RdKafkaSource::OnRebalance);
      });
  if (!consumer.ok()) return consumer.status();
  source->consumer_ = std::move(*consumer);
  rd_kafka_poll_set_consumer(source->consumer_.get());
  absl::StatusOr<int> partitions =
      PartitionCount(source->consumer_.get(), source->options_.brokers, source->options_.topic,
                     source->options_.startup_timeout);
  if (!partitions.ok()) return partitions.status();
  return source;
}

RdKafkaSource::~RdKafkaSource() {
  if (subscribed_ && !ever_assigned_) {
    // librdkafka 2.0.2 aborts in rd_kafka_sticky_assignor_state_destroy when a
    // cooperative-sticky consumer that never received an assignment is destroyed (upstream
    // issue 4312, fixed in 2.3.0). Close has already left the group and nothing was
    // consumed, so the handle is left to the process exit instead of destroyed.
    LOG_INFO(
        "leaving the Kafka handle to process exit: no assignment was ever received "
        "(librdkafka 2.0.2 bug 4312)");
    (void)consumer_.release();
    return;
  }
  // Close already left the group (the Ingestor's Run ends with it); without the flag a
  // destroy would close again and call the listener, which may be gone by now.
  if (consumer_ != nullptr) {
    rd_kafka_destroy_flags(consumer_.release(), RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
  }
}

absl::StatusOr<std::unique_ptr<MessageQueue>> RdKafkaSource::NewQueue() {
  return std::make_unique<RdKafkaQueue>(consumer_.get());
}

void RdKafkaSource::Route(int32_t partition, MessageQueue* queue) {
  // On every assignment (librdkafka clears the forwarding on revoke), before assigning.
  rd_kafka_queue_t* partition_queue =
      rd_kafka_queue_get_partition(consumer_.get(), options_.topic.c_str(), partition);
  rd_kafka_queue_forward(partition_queue, static_cast<RdKafkaQueue*>(queue)->raw());
  rd_kafka_queue_destroy(partition_queue);
}

absl::Status RdKafkaSource::Subscribe(GroupListener* listener) {
  listener_ = listener;
  rd_kafka_topic_partition_list_t* topics = rd_kafka_topic_partition_list_new(1);
  rd_kafka_topic_partition_list_add(topics, options_.topic.c_str(), RD_KAFKA_PARTITION_UA);
  const rd_kafka_resp_err_t err = rd_kafka_subscribe(consumer_.get(), topics);
  rd_kafka_topic_partition_list_destroy(topics);
  if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
    return absl::UnavailableError(absl::StrCat("subscribe failed: ", rd_kafka_err2str(err)));
  }
  subscribed_ = true;
  return absl::OkStatus();
}

void RdKafkaSource::OnRebalance(rd_kafka_t* rk, rd_kafka_resp_err_t err,
                                rd_kafka_topic_partition_list_t* partitions, void* opaque) {
  auto* self = static_cast<RdKafkaSource*>(opaque);
  if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
    self->Assign(partitions);
  } else if (err == RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS) {
    self->Revoke(partitions);
  } else {
    LOG_ERROR("rebalance error: {}", rd_kafka_err2str(err));
    rd_kafka_assign(rk, nullptr);
  }
}

void RdKafkaSource::Assign(rd_kafka_topic_partition_list_t* partitions) {
  ever_assigned_ = true;
  std::vector<AssignedPartition> assigned;
  for (int32_t partition : PartitionsOf(partitions)) assigned.push_back({partition});
  if (listener_ == nullptr || !listener_->OnAssign(assigned)) return;
  for (int i = 0; i < partitions->cnt; ++i) partitions->elems[i].offset = assigned[i].start_offset;
  if (rd_kafka_error_t* error = rd_kafka_incremental_assign(consumer_.get(), partitions)) {
    LOG_ERROR("incremental assign failed: {}", rd_kafka_error_string(error));
    rd_kafka_error_destroy(error);
    return;
  }
  std::lock_guard lock(assigned_mu_);
  for (const kafka::AssignedPartition& a : assigned) assigned_.insert(a.partition);
}

void RdKafkaSource::Revoke(rd_kafka_topic_partition_list_t* partitions) {
  const std::vector<int32_t> revoked = PartitionsOf(partitions);
  if (listener_ != nullptr) listener_->OnRevoke(revoked, rd_kafka_assignment_lost(consumer_.get()));
  {
    std::lock_guard lock(assigned_mu_);
    for (int32_t partition : revoked) assigned_.erase(partition);
  }
  if (rd_kafka_error_t* error = rd_kafka_incremental_unassign(consumer_.get(), partitions)) {
    LOG_ERROR("incremental unassign failed: {}", rd_kafka_error_string(error));
    rd_kafka_error_destroy(error);
  }
}

PollEvent RdKafkaSource::Poll(absl::Duration timeout) {
  PollEvent event;
  // Messages go to the routed queues; this queue carries rebalances and errors only.
  rd_kafka_message_t* message =
      rd_kafka_consumer_poll(consumer_.get(), static_cast<int>(absl::ToInt64Milliseconds(timeout)));
  if (message == nullptr) return event;
  if (message->err == RD_KAFKA_RESP_ERR__FATAL) {
    char reason[512];
    rd_kafka_fatal_error(consumer_.get(), reason, sizeof(reason));
    event = {PollEvent::Kind::kFatal, -1, reason};
  } else if (message->err == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET && message->rkt != nullptr &&
             message->partition >= 0) {
    event = {PollEvent::Kind::kOutOfRange, message->partition, rd_kafka_message_errstr(message)};
  } else if (message->err != RD_KAFKA_RESP_ERR_NO_ERROR) {
    event = {PollEvent::Kind::kError, message->partition, rd_kafka_message_errstr(message)};
  }
  rd_kafka_message_destroy(message);
  return event;
}

absl::Status RdKafkaSource::Close() {
  const rd_kafka_resp_err_t err = rd_kafka_consumer_close(consumer_.get());
  if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
    return absl::UnavailableError(absl::StrCat("consumer close: ", rd_kafka_err2str(err)));
  }
  return absl::OkStatus();
}

absl::Status RdKafkaSource::Seek(int32_t partition, int64_t offset) {
  rd_kafka_topic_partition_list_t* list = rd_kafka_topic_partition_list_new(1);
  rd_kafka_topic_partition_list_add(list, options_.topic.c_str(), partition)->offset = offset;
  absl::Status status;
  rd_kafka_error_t* error = rd_kafka_seek_partitions(consumer_.get(), list, 10'000);
  if (error != nullptr) {
    status = absl::UnavailableError(rd_kafka_error_string(error));
    rd_kafka_error_destroy(error);
  } else if (list->elems[0].err != RD_KAFKA_RESP_ERR_NO_ERROR) {
    status = absl::UnavailableError(rd_kafka_err2str(list->elems[0].err));
  }
  rd_kafka_topic_partition_list_destroy(list);
  return status;
}

absl::Status RdKafkaSource::LogBounds(int32_t partition, int64_t* low, int64_t* high) {
  const rd_kafka_resp_err_t err = rd_kafka_query_watermark_offsets(
      consumer_.get(), options_.topic.c_str(), partition, low, high, 5'000);
  if (err == RD_KAFKA_RESP_ERR_NO_ERROR) return absl::OkStatus();
  *low = *high = -1;
  return absl::UnavailableError(rd_kafka_err2str(err));
}

int RdKafkaSource::AssignedCount() const {
  std::lock_guard lock(assigned_mu_);
  return static_cast<int>(assigned_.size());
}

int64_t RdKafkaSource::CachedLogEnd(int32_t partition) const {
  int64_t low = -1, high = -1;
  // From the last fetch response: local, no request.
  if (rd_kafka_get_watermark_offsets(consumer_.get(), options_.topic.c_str(), partition, &low,
                                     &high) != RD_KAFKA_RESP_ERR_NO_ERROR) {
    return -1;
  }
  return high;
}

}  // namespace meterd::kafka
