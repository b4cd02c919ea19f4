#include "lib/kafka/acked_producer.h"

#include "absl/strings/str_cat.h"

namespace meterd::kafka {

absl::StatusOr<std::unique_ptr<AckedProducer>> AckedProducer::Create(const Properties& properties) {
  for (const auto& [name, value] : properties) {
    if ((name == "enable.idempotence" && value != "true") ||
        (name == "acks" && value != "all" && value != "-1")) {
      return absl::InvalidArgumentError(absl::StrCat(
          "HTTP ingest needs an idempotent producer with acks=all; refusing ", name, "=", value));
    }
  }
  std::unique_ptr<AckedProducer> producer(new AckedProducer());
  // A client waits for the acknowledgement: 10 s without one is a 503 it can retry, not a hang.
  Properties all = {{"enable.idempotence", "true"},
                    {"acks", "all"},
                    {"linger.ms", "1"},
                    {"message.timeout.ms", "10000"}};
  all.insert(all.end(), properties.begin(), properties.end());
  absl::StatusOr<Handle> handle = NewClient(RD_KAFKA_PRODUCER, all, [](rd_kafka_conf_t* conf) {
    rd_kafka_conf_set_dr_msg_cb(conf, &AckedProducer::OnDelivery);
  });
  if (!handle.ok()) return handle.status();
  producer->handle_ = std::move(*handle);
  producer->poller_ = std::thread([p = producer.get()] {
    while (!p->stopping_.load(std::memory_order_relaxed)) rd_kafka_poll(p->handle_.get(), 50);
  });
  return producer;
}

AckedProducer::~AckedProducer() { Close(absl::Seconds(10)); }

void AckedProducer::Close(absl::Duration timeout) {
  if (closed_) return;
  closed_ = true;
  stopping_ = true;
  if (poller_.joinable()) poller_.join();
  // On this thread from here: flush serves the reports; what is left is purged, and the purge's
  // reports (an error each) are served too.
  rd_kafka_flush(handle_.get(), static_cast<int>(absl::ToInt64Milliseconds(timeout)));
  rd_kafka_purge(handle_.get(), RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
  for (int i = 0; i < 50 && in_flight_.load(std::memory_order_relaxed) > 0; ++i) {
    rd_kafka_poll(handle_.get(), 100);
  }
}

void AckedProducer::OnDelivery(rd_kafka_t*, const rd_kafka_message_t* message, void*) {
  std::unique_ptr<Done> done(static_cast<Done*>(message->_private));
  if (done == nullptr) return;
  if (message->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
    (*done)(absl::OkStatus());
  } else {
    (*done)(absl::UnavailableError(
        absl::StrCat("Kafka did not acknowledge: ", rd_kafka_err2str(message->err))));
  }
}

void AckedProducer::Send(const std::string& topic, std::string_view key, std::string_view value,
                         Done done) {
  in_flight_.fetch_add(1, std::memory_order_relaxed);
  auto* callback = new Done([this, done = std::move(done)](absl::Status status) {
    in_flight_.fetch_sub(1, std::memory_order_relaxed);
    done(std::move(status));
  });
  const rd_kafka_resp_err_t err = rd_kafka_producev(
      handle_.get(), RD_KAFKA_V_TOPIC(topic.c_str()), RD_KAFKA_V_KEY(key.data(), key.size()),
      RD_KAFKA_V_VALUE(const_cast<char*>(value.data()), value.size()),
      RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_OPAQUE(callback), RD_KAFKA_V_END);
  if (err == RD_KAFKA_RESP_ERR_NO_ERROR) return;
  std::unique_ptr<Done> refused(callback);
  (*refused)(err == RD_KAFKA_RESP_ERR__QUEUE_FULL
                 ? absl::ResourceExhaustedError("Kafka producer queue full")
                 : absl::UnavailableError(absl::StrCat("produce failed: ", rd_kafka_err2str(err))));
}

}  // namespace meterd::kafka
