#include "proto/clients/cpp/meterd_emitter.h"

#include <fcntl.h>
#include <librdkafka/rdkafka.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <iterator>
#include <random>

namespace meterd::clients {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

void AppendJsonString(std::string* out, std::string_view text) {
  out->push_back('"');
  for (const char c : text) {
    switch (c) {
      case '"':
        out->append("\\\"");
        break;
      case '\\':
        out->append("\\\\");
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char escaped[8];
          std::snprintf(escaped, sizeof(escaped), "\\u%04x", static_cast<unsigned char>(c));
          out->append(escaped);
        } else {
          out->push_back(c);
        }
    }
  }
  out->push_back('"');
}

bool ValidUsage(const Usage& usage) {
  static constexpr std::string_view kIndustries[] = {"hs", "rest", "auto", "ret", "edu", "payroll"};
  return usage.org.size() == 36 && !usage.meter.empty() && usage.quantity >= 0 &&
         std::find(std::begin(kIndustries), std::end(kIndustries), usage.industry) !=
             std::end(kIndustries);
}

// Counts the per-event objects ({"index": …}) listed under `key` in meterd's answer, up to
// `until_key` (or the end). The ids this client sends are UUIDs, so "index" cannot occur
// inside one; whitespace between tokens is allowed.
int64_t CountItems(const std::string& body, std::string_view key, std::string_view until_key) {
  const size_t start = body.find(std::string("\"").append(key).append("\""));
  if (start == std::string::npos) return 0;
  const size_t end = until_key.empty()
                         ? body.size()
                         : body.find(std::string("\"").append(until_key).append("\""), start);
  int64_t count = 0;
  for (size_t at = body.find("\"index\"", start); at != std::string::npos && at < end;
       at = body.find("\"index\"", at + 1)) {
    ++count;
  }
  return count;
}

bool Retryable(int status) {
  return status == 0 || status == 408 || status == 429 || status == 502 || status == 503 ||
         status == 504;
}

}  // namespace

std::string NewEventId() {
  thread_local std::mt19937_64 random([] {
    std::random_device device;
    return (static_cast<uint64_t>(device()) << 32) ^ device();
  }());
  const uint64_t high = (random() & ~uint64_t{0xf000}) | 0x4000;                   // Version 4.
  const uint64_t low = (random() & ~(uint64_t{0xc} << 60)) | (uint64_t{8} << 60);  // Variant.
  char text[37];
  std::snprintf(text, sizeof(text), "%08x-%04x-%04x-%04x-%012llx",
                static_cast<unsigned>(high >> 32), static_cast<unsigned>((high >> 16) & 0xffff),
                static_cast<unsigned>(high & 0xffff), static_cast<unsigned>(low >> 48),
                static_cast<unsigned long long>(low & 0xffffffffffffULL));
  return text;
}

std::string UsageEventJson(const Usage& usage, std::string_view source, std::string_view id,
                           std::chrono::system_clock::time_point at) {
  const auto since_epoch = at.time_since_epoch();
  const time_t seconds = std::chrono::duration_cast<std::chrono::seconds>(since_epoch).count();
  const int64_t millis = std::chrono::duration_cast<milliseconds>(since_epoch).count() % 1000;
  tm utc{};
  gmtime_r(&seconds, &utc);
  char time_text[64];
  std::snprintf(time_text, sizeof(time_text), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
                utc.tm_year + 1900, utc.tm_mon + 1, utc.tm_mday, utc.tm_hour, utc.tm_min,
                utc.tm_sec, static_cast<int>(millis));
  std::string out = "{\"specversion\":\"1.0\",\"id\":";
  AppendJsonString(&out, id);
  out += ",\"source\":";
  AppendJsonString(&out, source);
  out += ",\"type\":";
  AppendJsonString(&out, usage.meter);
  out += ",\"subject\":";
  AppendJsonString(&out, usage.org);
  out += ",\"time\":\"";
  out += time_text;
  out += "\",\"datacontenttype\":\"application/json\",\"data\":{\"quantity\":";
  out += std::to_string(usage.quantity);
  out += ",\"industry\":";
  AppendJsonString(&out, usage.industry);
  out += "}}";
  return out;
}

// KafkaEmitter

std::unique_ptr<KafkaEmitter> KafkaEmitter::Create(const Options& options, std::string* error) {
  std::unique_ptr<KafkaEmitter> emitter(new KafkaEmitter(options));
  rd_kafka_conf_t* conf = rd_kafka_conf_new();
  char reason[512];
  std::vector<std::pair<std::string, std::string>> properties = {
      {"bootstrap.servers", options.brokers}, {"linger.ms", "5"}};
  properties.insert(properties.end(), options.properties.begin(), options.properties.end());
  // Last, so nothing overrides them: no duplicates from the producer's own retries, and an
  // acknowledgement means every in-sync replica has the event.
  properties.push_back({"enable.idempotence", "true"});
  properties.push_back({"acks", "all"});
  for (const auto& [name, value] : properties) {
    if (rd_kafka_conf_set(conf, name.c_str(), value.c_str(), reason, sizeof(reason)) !=
        RD_KAFKA_CONF_OK) {
      *error = name + ": " + reason;
      rd_kafka_conf_destroy(conf);
      return nullptr;
    }
  }
  rd_kafka_conf_set_dr_msg_cb(conf, &KafkaEmitter::OnDelivery);
  rd_kafka_conf_set_opaque(conf, emitter.get());
  emitter->producer_ = rd_kafka_new(RD_KAFKA_PRODUCER, conf, reason, sizeof(reason));
  if (emitter->producer_ == nullptr) {
    *error = reason;
    rd_kafka_conf_destroy(conf);
    return nullptr;
  }
  return emitter;
}

KafkaEmitter::~KafkaEmitter() {
  if (producer_ == nullptr) return;
  rd_kafka_flush(producer_, 10000);
  rd_kafka_destroy(producer_);
}

void KafkaEmitter::OnDelivery(rd_kafka_s* /*producer*/, const rd_kafka_message_s* message,
                              void* opaque) {
  auto* self = static_cast<KafkaEmitter*>(opaque);
  std::lock_guard lock(self->mu_);
  if (message->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
    ++self->stats_.accepted;
  } else {
    ++self->stats_.failed;
  }
}

bool KafkaEmitter::Emit(const Usage& usage) {
  if (!ValidUsage(usage)) {
    std::lock_guard lock(mu_);
    ++stats_.skipped;
    return false;
  }
  const std::string json =
      UsageEventJson(usage, options_.source, NewEventId(), std::chrono::system_clock::now());
  // The key meterd's own producer uses (lowercase): an org's events share a partition.
  std::string key = usage.org;
  for (char& c : key) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (int attempt = 0; attempt < 2; ++attempt) {
    const rd_kafka_resp_err_t err = rd_kafka_producev(
        producer_, RD_KAFKA_V_TOPIC(options_.topic.c_str()), RD_KAFKA_V_KEY(key.data(), key.size()),
        RD_KAFKA_V_VALUE(const_cast<char*>(json.data()), json.size()),
        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR) {
      {
        std::lock_guard lock(mu_);
        ++stats_.emitted;
      }
      rd_kafka_poll(producer_, 0);
      return true;
    }
    if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL) break;
    rd_kafka_poll(producer_, 0);  // Serve delivery reports once; never wait.
  }
  std::lock_guard lock(mu_);
  ++stats_.dropped;
  return false;
}

void KafkaEmitter::Poll() { rd_kafka_poll(producer_, 0); }

bool KafkaEmitter::Flush(std::chrono::milliseconds timeout) {
  return rd_kafka_flush(producer_, static_cast<int>(timeout.count())) == RD_KAFKA_RESP_ERR_NO_ERROR;
}

EmitterStats KafkaEmitter::Stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

// HttpEmitter

std::unique_ptr<HttpEmitter> HttpEmitter::Create(const Options& options, std::string* error) {
  if (options.api_key.empty() || options.host.empty() || options.port <= 0 ||
      options.port > 65535 || options.batch_size == 0 || options.batch_size > 1000 ||
      options.max_queue == 0 || options.max_attempts <= 0) {
    *error =
        "HttpEmitter: api_key, host, port (1-65535), batch_size (1-1000), max_queue and "
        "max_attempts are required";
    return nullptr;
  }
  std::unique_ptr<HttpEmitter> emitter(new HttpEmitter(options));
  emitter->sender_ = std::thread([raw = emitter.get()] { raw->Run(); });
  return emitter;
}

HttpEmitter::~HttpEmitter() { Close(milliseconds(0)); }

bool HttpEmitter::Emit(const Usage& usage) {
  const bool valid = ValidUsage(usage);
  std::string json =
      valid ? UsageEventJson(usage, options_.source, NewEventId(), std::chrono::system_clock::now())
            : std::string();
  std::lock_guard lock(mu_);
  if (!valid || closed_) {
    ++stats_.skipped;
    return false;
  }
  if (queue_.size() >= options_.max_queue) {
    queue_.pop_front();
    ++stats_.dropped;
  }
  if (queue_.empty()) first_queued_at_ = Clock::now();
  queue_.push_back(std::move(json));
  ++stats_.emitted;
  // Wake the sender for the first event (it starts the flush_interval clock) and a full batch.
  if (queue_.size() == 1 || queue_.size() >= options_.batch_size) wake_.notify_one();
  return true;
}

bool HttpEmitter::Flush(std::chrono::milliseconds timeout) {
  const Clock::time_point deadline = Clock::now() + timeout;
  std::unique_lock lock(mu_);
  ++flushes_;
  wake_.notify_all();
  const bool done = wake_.wait_until(
      lock, deadline, [&] { return (queue_.empty() && in_flight_ == 0) || stop_.load(); });
  --flushes_;
  return done && queue_.empty() && in_flight_ == 0;
}

EmitterStats HttpEmitter::Close(std::chrono::milliseconds timeout) {
  {
    std::lock_guard lock(mu_);
    closed_ = true;
  }
  if (timeout > milliseconds(0)) Flush(timeout);
  stop_.store(true);
  {
    std::lock_guard lock(mu_);
    wake_.notify_all();
  }
  // The sender's socket waits poll in slices of 50 ms and check stop_, so this is prompt.
  if (sender_.joinable()) sender_.join();
  return Stats();
}

EmitterStats HttpEmitter::Stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

bool HttpEmitter::Stopping() const { return stop_.load(); }

void HttpEmitter::Run() {
  std::unique_lock lock(mu_);
  for (;;) {
    if (stop_.load()) {
      stats_.failed += static_cast<int64_t>(queue_.size());
      queue_.clear();
      wake_.notify_all();
      break;
    }
    if (queue_.empty()) {
      wake_.wait_for(lock, milliseconds(500));
      continue;
    }
    const Clock::time_point due = first_queued_at_ + options_.flush_interval;
    if (queue_.size() < options_.batch_size && flushes_ == 0 && !closed_ && Clock::now() < due) {
      wake_.wait_until(lock, due);
      continue;
    }
    const size_t n = std::min(options_.batch_size, queue_.size());
    std::vector<std::string> batch(std::make_move_iterator(queue_.begin()),
                                   std::make_move_iterator(queue_.begin() + n));
    queue_.erase(queue_.begin(), queue_.begin() + n);
    first_queued_at_ = Clock::now();
    in_flight_ = n;
    lock.unlock();
    SendBatch(batch);
    lock.lock();
    in_flight_ = 0;
    wake_.notify_all();
  }
  lock.unlock();
  Disconnect();
}

void HttpEmitter::SendBatch(const std::vector<std::string>& events) {
  std::string body = "[";
  for (size_t i = 0; i < events.size(); ++i) {
    if (i > 0) body += ',';
    body += events[i];
  }
  body += ']';
  std::mt19937 jitter(std::random_device{}());
  Answer answer;
  int attempt = 1;
  for (;; ++attempt) {
    answer = Post(body);
    if (answer.status == 202 || answer.status == 400) {
      // 400: every event was refused; re-sending cannot help.
      int64_t rejected = CountItems(answer.body, "rejected", "");
      // A 400 without per-event results (not_a_batch, ...) refused them all.
      if (answer.status == 400 && rejected == 0) rejected = static_cast<int64_t>(events.size());
      const int64_t accepted =
          answer.status == 202 ? CountItems(answer.body, "accepted", "rejected") : 0;
      std::lock_guard lock(mu_);
      stats_.accepted += accepted;
      stats_.rejected += rejected;
      stats_.retries += attempt - 1;
      if (rejected > 0) last_error_ = answer.body.substr(0, 300);
      return;
    }
    if (!Retryable(answer.status) || attempt >= options_.max_attempts || Stopping()) break;
    const int64_t backoff = std::min<int64_t>(
        options_.max_backoff.count(), options_.min_backoff.count() << std::min(attempt - 1, 20));
    int64_t delay = backoff / 2 + std::uniform_int_distribution<int64_t>(0, backoff / 2)(jitter);
    delay = std::max<int64_t>(delay, answer.retry_after.count());
    std::unique_lock lock(mu_);
    if (wake_.wait_for(lock, milliseconds(delay), [&] { return stop_.load(); })) break;
  }
  std::lock_guard lock(mu_);
  stats_.failed += static_cast<int64_t>(events.size());
  stats_.retries += attempt - 1;
  last_error_ = answer.status == 0 ? answer.error
                                   : "meterd answered " + std::to_string(answer.status) + ": " +
                                         answer.body.substr(0, 300);
}

bool HttpEmitter::Connect(std::string* error) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(options_.port);
  if (const int rc = getaddrinfo(options_.host.c_str(), port.c_str(), &hints, &found); rc != 0) {
    *error = std::string("getaddrinfo: ") + gai_strerror(rc);
    return false;
  }
  for (addrinfo* a = found; a != nullptr && fd_ < 0; a = a->ai_next) {
    const int fd =
        socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) continue;
    if (connect(fd, a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
      *error = std::string("connect: ") + std::strerror(errno);
      close(fd);
      continue;
    }
    // Wait for the connection in slices, so Close's deadline can cut it.
    const Clock::time_point deadline = Clock::now() + options_.io_timeout;
    bool connected = false;
    while (!Stopping() && Clock::now() < deadline) {
      pollfd p{fd, POLLOUT, 0};
      const int ready = poll(&p, 1, 50);
      if (ready < 0 && errno != EINTR) break;
      if (ready <= 0) continue;
      int so_error = 0;
      socklen_t length = sizeof(so_error);
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &length);
      if (so_error != 0) {
        *error = std::string("connect: ") + std::strerror(so_error);
      } else {
        connected = true;
      }
      break;
    }
    if (!connected) {
      if (error->empty()) *error = "connect: timed out";
      close(fd);
      continue;
    }
    const int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    fd_ = fd;
  }
  freeaddrinfo(found);
  if (fd_ >= 0) error->clear();
  return fd_ >= 0;
}

void HttpEmitter::Disconnect() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
  read_buffer_.clear();
}

HttpEmitter::Answer HttpEmitter::Post(const std::string& body) {
  Answer answer;
  if (fd_ < 0 && !Connect(&answer.error)) return answer;
  const Clock::time_point deadline = Clock::now() + options_.io_timeout;
  // Waits until `fd_` is ready for `events`; false on the deadline, Close or an error.
  auto wait = [&](short events) {
    while (!Stopping() && Clock::now() < deadline) {
      pollfd p{fd_, events, 0};
      const int ready = poll(&p, 1, 50);
      if (ready > 0) return true;
      if (ready < 0 && errno != EINTR) return false;
    }
    answer.error = Stopping() ? "stopped by Close before meterd answered" : "timed out";
    return false;
  };
  auto fail = [&](const std::string& why) {
    if (answer.error.empty()) answer.error = why;
    answer.status = 0;
    Disconnect();
    return answer;
  };
  std::string request = "POST " + options_.path + " HTTP/1.1\r\nHost: " + options_.host +
                        "\r\nContent-Type: application/cloudevents-batch+json\r\n"
                        "Authorization: Bearer " +
                        options_.api_key + "\r\nContent-Length: " + std::to_string(body.size()) +
                        "\r\n\r\n";
  request += body;
  for (size_t sent = 0; sent < request.size();) {
    const ssize_t n = send(fd_, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
    } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      if (!wait(POLLOUT)) return fail("timed out sending");
    } else {
      return fail(std::string("send: ") + std::strerror(errno));
    }
  }
  // Reads until `read_buffer_` holds at least `size` bytes; false at EOF or on an error.
  auto fill = [&](size_t size) {
    char chunk[16384];
    while (read_buffer_.size() < size) {
      const ssize_t n = recv(fd_, chunk, sizeof(chunk), 0);
      if (n > 0) {
        read_buffer_.append(chunk, static_cast<size_t>(n));
      } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        if (!wait(POLLIN)) return false;
      } else {
        if (answer.error.empty()) answer.error = n == 0 ? "connection closed" : "recv failed";
        return false;
      }
    }
    return true;
  };
  // Reads a CRLF-terminated line (without the CRLF); false at EOF or on an error.
  auto line = [&](std::string* out) {
    for (;;) {
      const size_t end = read_buffer_.find("\r\n");
      if (end != std::string::npos) {
        *out = read_buffer_.substr(0, end);
        read_buffer_.erase(0, end + 2);
        return true;
      }
      if (read_buffer_.size() > 64 * 1024 || !fill(read_buffer_.size() + 1)) return false;
    }
  };
  std::string status_line;
  if (!line(&status_line) || status_line.size() < 12 || status_line.compare(0, 5, "HTTP/") != 0) {
    return fail("no HTTP answer");
  }
  const int status = std::atoi(status_line.c_str() + 9);
  bool close_after = status_line.compare(0, 8, "HTTP/1.0") == 0;
  bool chunked = false;
  long long content_length = -1;
  for (std::string header; line(&header) && !header.empty();) {
    const size_t colon = header.find(':');
    if (colon == std::string::npos) continue;
    std::string value = header.substr(colon + 1);
    value.erase(0, value.find_first_not_of(" \t"));
    const std::string name = header.substr(0, colon);
    if (strcasecmp(name.c_str(), "content-length") == 0) {
      content_length = std::atoll(value.c_str());
    } else if (strcasecmp(name.c_str(), "retry-after") == 0) {
      // Delta-seconds only; meterd sends that. An HTTP date is ignored (plain backoff).
      if (!value.empty() && std::isdigit(static_cast<unsigned char>(value[0])))
        answer.retry_after = milliseconds(std::atoll(value.c_str()) * 1000);
    } else if (strcasecmp(name.c_str(), "connection") == 0) {
      close_after = close_after || strncasecmp(value.c_str(), "close", 5) == 0;
    } else if (strcasecmp(name.c_str(), "transfer-encoding") == 0) {
      chunked = strcasestr(value.c_str(), "chunked") != nullptr;
    }
  }
  constexpr size_t kMaxBody = 1 << 20;
  if (chunked) {
    for (std::string size_line; line(&size_line);) {
      const size_t size = std::strtoul(size_line.c_str(), nullptr, 16);
      if (size == 0) {
        for (std::string trailer; line(&trailer) && !trailer.empty();) {
        }
        break;
      }
      if (answer.body.size() + size > kMaxBody || !fill(size + 2)) return fail("bad chunked body");
      answer.body.append(read_buffer_, 0, size);
      read_buffer_.erase(0, size + 2);
    }
  } else if (content_length >= 0) {
    if (static_cast<size_t>(content_length) > kMaxBody || !fill(content_length)) {
      return fail("short body");
    }
    answer.body = read_buffer_.substr(0, content_length);
    read_buffer_.erase(0, content_length);
  } else {
    fill(kMaxBody);  // Until the server closes.
    answer.body = std::move(read_buffer_);
    close_after = true;
  }
  answer.status = status;
  answer.error.clear();
  if (close_after) Disconnect();
  return answer;
}

}  // namespace meterd::clients
