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

// The messages of one SendAll. `remaining` counts the unsettled messages plus one for the
// sender, so the batch outlives SendAll's own loop; whoever settles the last frees it.
struct AckedProducer::Batch {
  struct Slot {  // Each message's opaque: its batch and its index.
    Batch* batch;
    size_t index;
  };

  AckedProducer* producer;
  std::atomic<size_t> remaining;
  std::vector<uint8_t> ok;  // Each index written once, before `remaining` drops.
  std::vector<Slot> slots;
  AllDone done;

  void Settle(size_t index, bool delivered) {
    ok[index] = delivered ? 1 : 0;
    producer->in_flight_.fetch_sub(1, std::memory_order_relaxed);
    Release();
  }
  void Release() {
    if (remaining.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    std::vector<bool> result(ok.begin(), ok.end());
    AllDone finish = std::move(done);
    delete this;
    finish(std::move(result));
  }
};

void AckedProducer::OnDelivery(rd_kafka_t*, const rd_kafka_message_t* message, void*) {
  auto* slot = static_cast<Batch::Slot*>(message->_private);
  if (slot == nullptr) return;
  slot->batch->Settle(slot->index, message->err == RD_KAFKA_RESP_ERR_NO_ERROR);
}

void AckedProducer::SendAll(const std::string& topic, const std::vector<Message>& messages,
                            AllDone done) {
  auto* batch = new Batch{this, messages.size() + 1, std::vector<uint8_t>(messages.size(), 0),
                          std::vector<Batch::Slot>(messages.size()), std::move(done)};
  in_flight_.fetch_add(static_cast<int64_t>(messages.size()), std::memory_order_relaxed);
  for (size_t i = 0; i < messages.size(); ++i) {
    batch->slots[i] = {batch, i};
    const Message& m = messages[i];
    const rd_kafka_resp_err_t err = rd_kafka_producev(
        handle_.get(), RD_KAFKA_V_TOPIC(topic.c_str()), RD_KAFKA_V_KEY(m.key.data(), m.key.size()),
        RD_KAFKA_V_VALUE(const_cast<char*>(m.value.data()), m.value.size()),
        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_OPAQUE(&batch->slots[i]),
        RD_KAFKA_V_END);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) batch->Settle(i, false);
  }
  batch->Release();
}

}  // namespace meterd::kafka
