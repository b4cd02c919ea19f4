#include "lib/kafka/producer.h"

#include "absl/strings/str_cat.h"

namespace meterd::kafka {

absl::StatusOr<std::unique_ptr<Producer>> Producer::Create(const Properties& properties) {
  std::unique_ptr<Producer> producer(new Producer());
  Properties all = {{"linger.ms", "5"}};
  all.insert(all.end(), properties.begin(), properties.end());
  Producer* self = producer.get();
  absl::StatusOr<Handle> handle = NewClient(RD_KAFKA_PRODUCER, all, [self](rd_kafka_conf_t* conf) {
    rd_kafka_conf_set_dr_msg_cb(conf, &Producer::OnDelivery);
    rd_kafka_conf_set_opaque(conf, self);
  });
  if (!handle.ok()) return handle.status();
  producer->handle_ = std::move(*handle);
  return producer;
}

void Producer::OnDelivery(rd_kafka_t*, const rd_kafka_message_t* message, void* opaque) {
  auto* self = static_cast<Producer*>(opaque);
  if (message->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
    ++self->delivered_;
  } else if (self->failed_++ == 0) {
    self->first_error_ = rd_kafka_err2str(message->err);
  }
}

absl::Status Producer::Send(const std::string& topic, int32_t partition, std::string_view key,
                            std::string_view value,
                            const std::vector<std::pair<std::string, std::string>>& headers) {
  while (true) {
    rd_kafka_headers_t* list = nullptr;
    if (!headers.empty()) {
      list = rd_kafka_headers_new(headers.size());
      for (const auto& [name, data] : headers) {
        rd_kafka_header_add(list, name.data(), static_cast<ssize_t>(name.size()), data.data(),
                            static_cast<ssize_t>(data.size()));
      }
    }
    const rd_kafka_resp_err_t err = rd_kafka_producev(
        handle_.get(), RD_KAFKA_V_TOPIC(topic.c_str()), RD_KAFKA_V_PARTITION(partition),
        RD_KAFKA_V_KEY(key.data(), key.size()),
        RD_KAFKA_V_VALUE(const_cast<char*>(value.data()), value.size()),
        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_HEADERS(list), RD_KAFKA_V_END);
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR) break;  // The message owns the headers now.
    if (list != nullptr) rd_kafka_headers_destroy(list);
    if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL) {
      return absl::UnavailableError(absl::StrCat("produce failed: ", rd_kafka_err2str(err)));
    }
    rd_kafka_poll(handle_.get(), 10);  // Local queue full: serve deliveries, then retry.
  }
  rd_kafka_poll(handle_.get(), 0);
  return absl::OkStatus();
}

absl::Status Producer::Flush(absl::Duration timeout) {
  rd_kafka_flush(handle_.get(), static_cast<int>(absl::ToInt64Milliseconds(timeout)));
  const int outstanding = rd_kafka_outq_len(handle_.get());
  if (outstanding == 0 && failed_ == 0) return absl::OkStatus();
  return absl::UnavailableError(
      absl::StrCat(failed_, " deliveries failed, ", outstanding, " not confirmed: ", first_error_));
}

}  // namespace meterd::kafka
