// Client driver for bench/http.sh: meterd's HTTP ingest against producing the same events
// straight to Kafka, each measured against its baseline in the same run.
//   http_ingest_bench orgs --orgs N   N organization ids (LoadgenOrgId under --seed), one a line
//   http_ingest_bench run --brokers B --topic T --pg URL --http 127.0.0.1:PORT --keys FILE
//       [--single_brokers B2 --single_topic T2 --single_http 127.0.0.1:PORT2]
//       [--meterd_pid P --broker_pid P --single_meterd_pid P --single_broker_pid P
//        --postgres_pid P] [--json FILE]
// `run`, with meterd consuming its topic throughout (both ways pay for meterd's counting):
//   (a)  direct:  --events events produced by one librdkafka producer set up as meterd's
//                 AckedProducer (idempotent, acks=all, linger.ms=1), keyed by org; events/s from
//                 the first send to the last acknowledgement;
//   (b)  batches: the same events (their own ids) as POST /v1/events batches of --batch, one org
//                 and that org's key each, from --batch_clients keep-alive connections; (a) and
//                 (b) alternate --rounds times and the median round's ratio is reported, because
//                 the machine is shared and a round of (a) lasts well under a second;
//   (c0) direct single: --single_clients senders, each producing one event and awaiting its
//                 acknowledgement before the next: what the broker alone allows (c);
//   (c)  single:  one event per request from --single_clients keep-alive connections;
//   (d0) direct open loop at half of (c)'s rate, each event timed from when it was due;
//   (d)  latency: HTTP open loop at that rate over --latency_connections connections, each
//                 request timed from when it was due (a request waiting for a free connection
//                 counts its wait: no coordinated omission).
// (c0)/(c) alternate in --slices slices of --single_seconds in all, then (d0)/(d) likewise, on
// --single_brokers and the meterd at --single_http if given. After each phase the driver waits
// until Postgres holds every event acknowledged so far, and at the end compares every (org,
// meter, industry, day) total exactly. A 429, a 503 or a dropped connection is retried with the
// same event ids (meterd deduplicates them), at most kMaxAttempts times. CPU per process per
// phase comes from /proc. Prints a table and one JSON line on stdout; exits 1 only if the totals
// are not exact (timings are printed, never asserted).
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include <librdkafka/rdkafka.h>
#include <simdjson.h>
#include <pqxx/pqxx>

#include "absl/container/flat_hash_map.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "lib/devtools/loadgen.h"
#include "lib/event/usage_event.h"
#include "lib/kafka/client.h"
#include "lib/kafka/producer.h"

ABSL_FLAG(std::string, brokers, "", "Kafka bootstrap servers");
ABSL_FLAG(std::string, topic, "usage-events", "Topic meterd consumes and produces to");
ABSL_FLAG(std::string, pg, "", "meterd's Postgres URL (for the exactness check)");
ABSL_FLAG(std::string, http, "127.0.0.1:8080", "meterd's --http-listen address (IPv4:port)");
ABSL_FLAG(std::string, keys, "", "File of 'org token' lines: one ingest API key per org");
ABSL_FLAG(int, orgs, 200, "orgs: how many organization ids to print");
ABSL_FLAG(uint64_t, seed, 7, "Seed for organization ids and event content");
ABSL_FLAG(int64_t, events, 200'000, "Events in (a) and in (b)");
ABSL_FLAG(int, batch, 100, "Events per request in (b)");
ABSL_FLAG(int, batch_clients, 8, "Keep-alive connections in (b)");
ABSL_FLAG(int, rounds, 5, "Rounds of (a) then (b); the ratio reported is the median round's");
ABSL_FLAG(int, linger_ms, 1, "linger.ms of the direct producers (meterd's AckedProducer: 1)");
ABSL_FLAG(int, single_clients, 64, "Keep-alive connections in (c), senders in (c0)");
ABSL_FLAG(int, single_seconds, 10, "Length of (c)");
ABSL_FLAG(int64_t, single_max_requests, 400'000, "Bound on (c)'s requests");
ABSL_FLAG(int, latency_connections, 256,
          "Keep-alive connections in (d): enough that requests rarely wait for a free one");
ABSL_FLAG(int, latency_seconds, 10, "Length of (d)");
ABSL_FLAG(int, slices, 5, "(c0)/(c) and (d0)/(d) alternate in this many slices");
ABSL_FLAG(int, days, 3, "Event times spread over the last N days");
ABSL_FLAG(int, settle_seconds, 120, "Bound on each wait for Postgres to hold what was acked");
ABSL_FLAG(int, meterd_pid, 0, "For the CPU breakdown: meterd's pid");
ABSL_FLAG(int, broker_pid, 0, "For the CPU breakdown: the embedded broker's pid");
ABSL_FLAG(int, postgres_pid, 0, "For the CPU breakdown: the postmaster's pid");
ABSL_FLAG(std::string, single_brokers, "", "(c0) to (d) on this broker (default --brokers) ...");
ABSL_FLAG(std::string, single_topic, "", "... and topic (default --topic) ...");
ABSL_FLAG(std::string, single_http, "", "... with this meterd (default --http) consuming it");
ABSL_FLAG(int, single_meterd_pid, 0, "For the CPU breakdown of (c0) to (d): that meterd's pid");
ABSL_FLAG(int, single_broker_pid, 0, "For the CPU breakdown of (c0) to (d): that broker's pid");
ABSL_FLAG(std::string, json, "", "Also write the JSON result to this file");

namespace {

constexpr int kMaxAttempts = 10;
constexpr const char* kMeters[] = {"api_calls", "data_exports", "ai_requests"};

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "http_ingest_bench: %s\n", message.c_str());
  std::exit(2);
}

template <typename T>
T OrDie(absl::StatusOr<T> value) {
  if (!value.ok()) Die(std::string(value.status().message()));
  return std::move(value).value();
}

void Progress(const std::string& line) {
  std::fprintf(stderr, "http_ingest_bench: %s\n", line.c_str());
}

uint64_t SplitMix64(uint64_t state) {
  uint64_t z = state + 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// ---------------------------------------------------------------------------------------------
// Events and what Postgres must hold for them.

struct OrgKey {
  std::string org;  // UUID text: the events' subject and the Kafka key.
  std::string token;
  std::string_view industry;
};

// What an event counts for.
struct EventMeta {
  int org;
  int meter;
  int32_t day;  // Days since 1970-01-01 (UTC): the event time's.
  int64_t quantity;
  int64_t micros;  // The event time.
};

// Event n's content depends only on n, so (a) and (b) send the same events; the id carries the
// phase, so they are distinct events for meterd's deduplication.
class EventFactory {
 public:
  EventFactory(std::vector<OrgKey> orgs, uint64_t seed, int days)
      : orgs_(std::move(orgs)),
        seed_(seed),
        now_micros_(absl::ToUnixMicros(absl::Now())),
        // A minute of margin, as loadgen: every event stays inside meterd's accepted window.
        span_micros_(days * 86'400'000'000LL - 60'000'000) {}

  EventMeta Meta(int64_t n, int org) const {
    const uint64_t r = SplitMix64(seed_ * 0x100000001b3ULL ^ static_cast<uint64_t>(n));
    const int meter = r % 10 < 8 ? 0 : (r % 10 == 8 ? 1 : 2);
    const int64_t micros =
        now_micros_ - 60'000'000 - static_cast<int64_t>((r >> 16) % span_micros_);
    return {org, meter, static_cast<int32_t>(micros / 86'400'000'000LL),
            meter == 2 ? 1 + static_cast<int64_t>((r >> 8) % 3) : 1, micros};
  }

  // Appends event n for org index `org` as a structured-mode CloudEvent with id "<tag>-<n>":
  // the tag names the phase (and round), so each phase's events are new to meterd's dedup.
  void AppendJson(std::string_view tag, int64_t n, int org, std::string* out) const {
    const EventMeta m = Meta(n, org);
    const OrgKey& o = orgs_[org];
    absl::StrAppendFormat(
        out,
        R"({"specversion":"1.0","id":"%s-%016x","source":"%s/http-bench","type":"%s","subject":"%s","time":"%s","datacontenttype":"application/json","data":{"quantity":%d,"industry":"%s"}})",
        tag, n, o.industry, kMeters[m.meter], o.org,
        absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::FromUnixMicros(m.micros),
                         absl::UTCTimeZone()),
        m.quantity, o.industry);
  }

  const OrgKey& org(int i) const { return orgs_[i]; }
  int org_count() const { return static_cast<int>(orgs_.size()); }

 private:
  const std::vector<OrgKey> orgs_;
  const uint64_t seed_;
  const int64_t now_micros_;
  const int64_t span_micros_;
};

// Everything Kafka acknowledged (to the direct producer, or to meterd before it answered 202),
// per (org, meter, day); an org has one industry.
class Ledger {
 public:
  void Add(const EventMeta& m) {
    totals_[{m.org, m.meter, m.day}] += m.quantity;
    quantity_ += m.quantity;
    ++events_;
  }
  int64_t quantity() const { return quantity_; }
  int64_t events() const { return events_; }
  const absl::flat_hash_map<std::tuple<int, int, int32_t>, int64_t>& totals() const {
    return totals_;
  }

  int64_t in_doubt = 0;  // Events of requests that never got a final answer.
  int64_t refused = 0;   // Events of requests answered with a final 4xx (nothing produced).

 private:
  absl::flat_hash_map<std::tuple<int, int, int32_t>, int64_t> totals_;
  int64_t quantity_ = 0;
  int64_t events_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Keep-alive HTTP/1.1 client: one thread, epoll, one request in flight per connection (no
// pipelining, as client libraries do). Plain sockets, so the client costs little of the two
// cores meterd, the broker and Postgres share with it.

struct Job {
  int64_t index = 0;  // Request number within the phase.
  absl::Time due;     // When the request was due: its latency starts here.
  int attempt = 0;
};

// Debian's Abseil has its own string_view (not std's): the parsing below uses absl's.
struct Reply {
  int status = 0;  // 0: the connection failed before a whole answer arrived.
  absl::string_view body;
};

// A whole response at the start of `in`: `length` 0 while incomplete, -1 if not HTTP.
struct ParsedResponse {
  ssize_t length = 0;
  int status = 0;
  bool close = false;
  absl::string_view body;
};

ParsedResponse ParseResponse(absl::string_view in) {
  ParsedResponse p;
  const size_t end = in.find("\r\n\r\n");
  if (end == absl::string_view::npos) {
    if (in.size() > 64 * 1024) p.length = -1;
    return p;
  }
  if (!absl::StartsWith(in, "HTTP/1.") || in.size() < 12 ||
      !absl::SimpleAtoi(in.substr(9, 3), &p.status)) {
    p.length = -1;
    return p;
  }
  size_t content_length = 0;
  bool first = true;
  for (absl::string_view line : absl::StrSplit(in.substr(0, end), "\r\n")) {
    if (first) {
      first = false;
      continue;
    }
    const size_t colon = line.find(':');
    if (colon == absl::string_view::npos) continue;
    const absl::string_view name = line.substr(0, colon);
    const absl::string_view value = absl::StripAsciiWhitespace(line.substr(colon + 1));
    if (absl::EqualsIgnoreCase(name, "content-length")) {
      if (!absl::SimpleAtoi(value, &content_length)) p.length = -1;
    } else if (absl::EqualsIgnoreCase(name, "connection")) {
      p.close = absl::EqualsIgnoreCase(value, "close");
    }
  }
  if (p.length < 0) return p;
  if (in.size() < end + 4 + content_length) return p;
  p.body = in.substr(end + 4, content_length);
  p.length = static_cast<ssize_t>(end + 4 + content_length);
  return p;
}

class KeepAliveClients {
 public:
  KeepAliveClients(const sockaddr_in& address, int connections)
      : address_(address), connections_(connections) {
    epoll_ = epoll_create1(EPOLL_CLOEXEC);
    timer_ = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (epoll_ < 0 || timer_ < 0) Die("epoll/timerfd");
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kTimerTag;
    epoll_ctl(epoll_, EPOLL_CTL_ADD, timer_, &ev);
    for (size_t i = 0; i < connections_.size(); ++i) Connect(i);
  }
  ~KeepAliveClients() {
    for (Connection& c : connections_) {
      if (c.fd >= 0) close(c.fd);
    }
    close(timer_);
    close(epoll_);
  }

  // Sends what `source` hands out until it is finished and nothing is in flight; false if
  // `give_up` came first. Source: bool Take(now, Job*, std::string* request), absl::Time
  // NextDue(), bool Finished(now), void OnReply(const Job&, const Reply&, now).
  template <typename Source>
  bool Run(Source& source, absl::Time give_up) {
    std::vector<size_t> idle;
    for (size_t i = 0; i < connections_.size(); ++i) idle.push_back(i);
    int in_flight = 0;
    std::vector<epoll_event> events(connections_.size() + 1);
    char buffer[64 * 1024];
    while (true) {
      absl::Time now = absl::Now();
      if (now > give_up) return false;
      while (!idle.empty()) {
        Connection& c = connections_[idle.back()];
        if (!source.Take(now, &c.job, &c.out)) break;
        idle.pop_back();
        c.busy = true;
        c.written = 0;
        ++in_flight;
        Write(c);
      }
      if (in_flight == 0 && source.Finished(now)) return true;
      // With no connection free, only an answer can let anything go: no timer (it would spin).
      ArmTimer(idle.empty() ? absl::InfiniteFuture() : source.NextDue(), now);
      const int n = epoll_wait(epoll_, events.data(), static_cast<int>(events.size()), 100);
      if (n < 0 && errno != EINTR) Die(absl::StrCat("epoll_wait: ", std::strerror(errno)));
      now = absl::Now();
      for (int e = 0; e < n; ++e) {
        if (events[e].data.u64 == kTimerTag) {
          uint64_t expirations;
          (void)!read(timer_, &expirations, sizeof(expirations));
          armed_ = absl::InfiniteFuture();  // Expired: the next ArmTimer sets it again.
          continue;
        }
        const size_t i = events[e].data.u64;
        Connection& c = connections_[i];
        const bool was_busy = c.busy;
        bool failed =
            (events[e].events & (EPOLLERR | EPOLLHUP)) != 0 && (events[e].events & EPOLLIN) == 0;
        if (!failed && (events[e].events & EPOLLOUT) && c.busy && c.written < c.out.size()) {
          failed = !Write(c);
        }
        if (!failed && (events[e].events & EPOLLIN)) {
          while (true) {
            const ssize_t got = recv(c.fd, buffer, sizeof(buffer), 0);
            if (got > 0) {
              c.in.append(buffer, static_cast<size_t>(got));
              continue;
            }
            if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
            if (got < 0 && errno == EINTR) continue;
            failed = true;  // Closed by the server (or an error).
            break;
          }
          const ParsedResponse p = ParseResponse(c.in);
          if (p.length < 0 || (p.length > 0 && !c.busy)) {
            Die(absl::StrCat("unexpected bytes from meterd: ", c.in.substr(0, 200)));
          }
          if (p.length > 0) {
            c.busy = false;
            --in_flight;
            const Job job = c.job;
            source.OnReply(job, Reply{p.status, p.body}, now);
            c.in.erase(0, static_cast<size_t>(p.length));
            if (p.close) failed = true;
          }
        }
        if (failed) {
          if (c.busy) {
            c.busy = false;
            --in_flight;
            const Job job = c.job;
            source.OnReply(job, Reply{}, now);
          }
          ++reconnects_;
          close(c.fd);
          c.fd = -1;
          c.in.clear();
          Connect(i);
        }
        if (was_busy && !c.busy) idle.push_back(i);
      }
    }
  }

  int64_t reconnects() const { return reconnects_; }

 private:
  static constexpr uint64_t kTimerTag = ~0ULL;

  struct Connection {
    int fd = -1;
    std::string out;
    size_t written = 0;
    std::string in;
    bool busy = false;
    bool want_write = false;
    Job job;
  };

  void Connect(size_t i) {
    Connection& c = connections_[i];
    for (int attempt = 0; attempt < 50; ++attempt) {
      c.fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (c.fd < 0) Die(absl::StrCat("socket: ", std::strerror(errno)));
      if (connect(c.fd, reinterpret_cast<const sockaddr*>(&address_), sizeof(address_)) == 0) {
        break;
      }
      close(c.fd);
      c.fd = -1;
      absl::SleepFor(absl::Milliseconds(100));
    }
    if (c.fd < 0) Die("cannot connect to meterd's HTTP listener");
    const int one = 1;
    setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    fcntl(c.fd, F_SETFL, fcntl(c.fd, F_GETFL) | O_NONBLOCK);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = i;
    c.want_write = false;
    epoll_ctl(epoll_, EPOLL_CTL_ADD, c.fd, &ev);
  }

  // Writes what the socket takes; asks for EPOLLOUT while something is left. False on error.
  bool Write(Connection& c) {
    while (c.written < c.out.size()) {
      const ssize_t n =
          send(c.fd, c.out.data() + c.written, c.out.size() - c.written, MSG_NOSIGNAL);
      if (n > 0) {
        c.written += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      return false;
    }
    const bool want = c.written < c.out.size();
    if (want != c.want_write) {
      epoll_event ev{};
      ev.events = want ? EPOLLIN | EPOLLOUT : EPOLLIN;
      ev.data.u64 = static_cast<uint64_t>(&c - connections_.data());
      epoll_ctl(epoll_, EPOLL_CTL_MOD, c.fd, &ev);
      c.want_write = want;
    }
    return true;
  }

  void ArmTimer(absl::Time due, absl::Time now) {
    if (due == armed_) return;
    armed_ = due;
    itimerspec spec{};  // Zero: disarmed.
    const int64_t ns = due == absl::InfiniteFuture()
                           ? 0
                           : std::max<int64_t>(1, absl::ToInt64Nanoseconds(due - now));
    spec.it_value.tv_sec = ns / 1'000'000'000;
    spec.it_value.tv_nsec = ns % 1'000'000'000;
    timerfd_settime(timer_, 0, &spec, nullptr);
  }

  const sockaddr_in address_;
  std::vector<Connection> connections_;
  int epoll_ = -1;
  int timer_ = -1;
  int64_t reconnects_ = 0;
  absl::Time armed_ = absl::InfiniteFuture();
};

// ---------------------------------------------------------------------------------------------
// The HTTP phases: what to send, when, and what a reply means.

struct Plan {
  int64_t first = 0;                                   // Number of the first request.
  int64_t max_requests = 0;                            // Bound on first attempts.
  absl::Duration duration = absl::InfiniteDuration();  // Closed loop: stop taking after this.
  double rate = 0;                                     // > 0: open loop, requests due at this rate.
};

struct Percentiles {
  int64_t count = 0;
  double p50_ms = 0, p90_ms = 0, p99_ms = 0, p999_ms = 0, max_ms = 0;
};

Percentiles Summarize(std::vector<double> ms) {  // By value: sorts its copy.
  Percentiles p;
  p.count = static_cast<int64_t>(ms.size());
  if (ms.empty()) return p;
  std::sort(ms.begin(), ms.end());
  auto at = [&](double q) {
    return ms[std::min(ms.size() - 1, static_cast<size_t>(std::ceil(q * ms.size())) - 1)];
  };
  p.p50_ms = at(0.5);
  p.p90_ms = at(0.9);
  p.p99_ms = at(0.99);
  p.p999_ms = at(0.999);
  p.max_ms = ms.back();
  return p;
}

// One phase's outcome, or several slices' added up.
struct PhaseResult {
  int64_t requests_ok = 0;           // Answered 202 (or, direct, acknowledged).
  int64_t events_ok = 0;             // Events acknowledged in those answers.
  int64_t retries = 0;               // Attempts after a 429/503/dropped connection.
  int64_t late = 0;                  // Open loop: first sent over 1 ms after it was due.
  std::map<int, int64_t> statuses;   // Every answer's status (0: connection dropped).
  double seconds = 0;                // First send to last final answer.
  std::vector<double> latencies_ms;  // Due to final answer, per request.
  std::vector<double> p99_by_slice;  // Each slice's p99.

  void Add(PhaseResult slice) {
    requests_ok += slice.requests_ok;
    events_ok += slice.events_ok;
    retries += slice.retries;
    late += slice.late;
    for (const auto& [status, count] : slice.statuses) statuses[status] += count;
    seconds += slice.seconds;
    p99_by_slice.push_back(Summarize(slice.latencies_ms).p99_ms);
    latencies_ms.insert(latencies_ms.end(), slice.latencies_ms.begin(), slice.latencies_ms.end());
  }
  double rate() const { return requests_ok / std::max(1e-9, seconds); }
  Percentiles latency() const { return Summarize(latencies_ms); }
};

// Requests of one phase. Request i carries events [i * per_request, (i + 1) * per_request);
// `build` writes request i's bytes, `meta` says what event n counts for.
class PhaseSource {
 public:
  using Build = std::function<void(int64_t request, std::string* out)>;
  using MetaOf = std::function<EventMeta(int64_t event)>;

  PhaseSource(Plan plan, int per_request, Build build, MetaOf meta, Ledger* ledger)
      : plan_(plan),
        per_request_(per_request),
        build_(std::move(build)),
        meta_(std::move(meta)),
        ledger_(ledger) {}

  void Start(absl::Time now) { start_ = last_answer_ = now; }

  bool Take(absl::Time now, Job* job, std::string* out) {
    if (!retries_.empty() && retries_.front().second <= now) {
      *job = retries_.front().first;
      retries_.pop_front();
      ++job->attempt;
      ++result_.retries;
    } else if (issued_ < plan_.max_requests && now - start_ < plan_.duration &&
               (plan_.rate <= 0 || DueOf(issued_) <= now)) {
      *job = Job{plan_.first + issued_, plan_.rate > 0 ? DueOf(issued_) : now, 1};
      // Open loop: sent over 1 ms after it was due means no connection was free (or the
      // client fell behind); its wait is in its latency, and this says how often that was.
      if (now - job->due > absl::Milliseconds(1)) ++result_.late;
      ++issued_;
    } else {
      return false;
    }
    out->clear();
    build_(job->index, out);
    return true;
  }

  absl::Time NextDue() const {
    absl::Time due = absl::InfiniteFuture();
    if (!retries_.empty()) due = retries_.front().second;
    if (issued_ < plan_.max_requests) {
      if (plan_.rate > 0) due = std::min(due, DueOf(issued_));
      if (plan_.duration != absl::InfiniteDuration()) due = std::min(due, start_ + plan_.duration);
    }
    return due;
  }

  bool Finished(absl::Time now) const {
    return retries_.empty() && (issued_ >= plan_.max_requests || now - start_ >= plan_.duration);
  }

  void OnReply(const Job& job, const Reply& reply, absl::Time now) {
    ++result_.statuses[reply.status];
    if (reply.status == 202) {
      Final(job, now);
      ++result_.requests_ok;
      const int64_t first = job.index * per_request_;
      if (absl::EndsWith(reply.body, "\"rejected\":[]}\n")) {
        for (int64_t n = first; n < first + per_request_; ++n) ledger_->Add(meta_(n));
        result_.events_ok += per_request_;
        return;
      }
      // Some events refused (none should be): count exactly the acknowledged ones.
      simdjson::dom::element doc;
      simdjson::dom::array accepted;
      if (parser_.parse(reply.body.data(), reply.body.size()).get(doc) ||
          doc["accepted"].get_array().get(accepted)) {
        Die(absl::StrCat("unreadable 202 body: ", std::string(reply.body)));
      }
      int64_t count = 0;
      for (simdjson::dom::element item : accepted) {
        int64_t index;
        if (item["index"].get(index)) Die("202 without indices");
        ledger_->Add(meta_(first + index));
        ++count;
      }
      result_.events_ok += count;
      ledger_->refused += per_request_ - count;
      return;
    }
    const bool retryable = reply.status == 0 || reply.status == 429 || reply.status == 503;
    if (retryable && job.attempt < kMaxAttempts) {
      retries_.emplace_back(job, now + absl::Milliseconds(50) * job.attempt);
      return;
    }
    Final(job, now);
    if (reply.status >= 400 && reply.status < 500) {
      ledger_->refused += per_request_;
    } else {
      ledger_->in_doubt += per_request_;  // Kafka may or may not have some of them.
    }
  }

  PhaseResult Finish() {
    result_.seconds = absl::ToDoubleSeconds(last_answer_ - start_);
    return std::move(result_);
  }

 private:
  absl::Time DueOf(int64_t i) const {
    return start_ + absl::Seconds(static_cast<double>(i) / plan_.rate);
  }
  void Final(const Job& job, absl::Time now) {
    result_.latencies_ms.push_back(absl::ToDoubleMilliseconds(now - job.due));
    last_answer_ = std::max(last_answer_, now);
  }

  const Plan plan_;
  const int per_request_;
  const Build build_;
  const MetaOf meta_;
  Ledger* ledger_;
  absl::Time start_;
  absl::Time last_answer_;
  int64_t issued_ = 0;
  std::deque<std::pair<Job, absl::Time>> retries_;  // With when each may go again.
  PhaseResult result_;
  simdjson::dom::parser parser_;
};

std::string RequestHead(const std::string& host, const OrgKey& key, bool batch, size_t length) {
  return absl::StrCat("POST /v1/events HTTP/1.1\r\nHost: ", host, "\r\nAuthorization: Bearer ",
                      key.token, "\r\nContent-Type: ",
                      batch ? "application/cloudevents-batch+json" : "application/cloudevents+json",
                      "\r\nContent-Length: ", length, "\r\n\r\n");
}

PhaseResult RunPhase(const sockaddr_in& address, int connections, PhaseSource& source,
                     absl::Duration bound) {
  KeepAliveClients clients(address, connections);
  const absl::Time start = absl::Now();
  source.Start(start);
  // A phase that outlives its bound leaves requests whose fate is unknown: no result then.
  if (!clients.Run(source, start + bound)) Die("a phase did not finish within its bound");
  if (clients.reconnects() > 0) Progress(absl::StrCat(clients.reconnects(), " reconnects"));
  return source.Finish();
}

// ---------------------------------------------------------------------------------------------
// Where CPU time goes: per process, from /proc, between two samples.

double TicksToSeconds(int64_t ticks) {
  return static_cast<double>(ticks) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// utime + stime of a /proc/.../stat file, with its comm and ppid; false if unreadable.
bool ReadStat(const std::string& path, int64_t* ticks, std::string* comm, int* ppid) {
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t open = text.find('('), close = text.rfind(')');
  if (open == std::string::npos || close == std::string::npos) return false;
  if (comm != nullptr) *comm = text.substr(open + 1, close - open - 1);
  const std::vector<std::string> fields = absl::StrSplit(text.substr(close + 2), ' ');
  if (fields.size() < 13) return false;
  int64_t utime = 0, stime = 0;
  if (ppid != nullptr && !absl::SimpleAtoi(fields[1], ppid)) return false;
  if (!absl::SimpleAtoi(fields[11], &utime) || !absl::SimpleAtoi(fields[12], &stime)) {
    return false;
  }
  *ticks = utime + stime;
  return true;
}

struct CpuSample {
  absl::Time at;
  int64_t meterd_rdkafka = 0, meterd_own = 0, broker = 0, postgres = 0, client = 0;
  int64_t machine_busy = 0;
};

// Whose CPU is counted: the meterd and broker a phase runs against, and the postmaster.
struct Processes {
  int meterd = 0;
  int broker = 0;
  int postmaster = 0;
};

CpuSample SampleCpu(const Processes& p) {
  CpuSample s;
  s.at = absl::Now();
  const int meterd = p.meterd, broker = p.broker, postmaster = p.postmaster;
  if (meterd > 0) {
    const std::string dir = absl::StrCat("/proc/", meterd, "/task");
    if (DIR* d = opendir(dir.c_str())) {
      while (dirent* entry = readdir(d)) {
        if (entry->d_name[0] == '.') continue;
        int64_t ticks;
        std::string comm;
        if (!ReadStat(absl::StrCat(dir, "/", entry->d_name, "/stat"), &ticks, &comm, nullptr)) {
          continue;
        }
        (absl::StartsWith(comm, "rdk:") ? s.meterd_rdkafka : s.meterd_own) += ticks;
      }
      closedir(d);
    }
  }
  if (broker > 0) ReadStat(absl::StrCat("/proc/", broker, "/stat"), &s.broker, nullptr, nullptr);
  ReadStat("/proc/self/stat", &s.client, nullptr, nullptr);
  if (postmaster > 0) {
    if (DIR* d = opendir("/proc")) {
      while (dirent* entry = readdir(d)) {
        int pid;
        if (!absl::SimpleAtoi(entry->d_name, &pid)) continue;
        int64_t ticks;
        int ppid;
        if (!ReadStat(absl::StrCat("/proc/", pid, "/stat"), &ticks, nullptr, &ppid)) continue;
        if (pid == postmaster || ppid == postmaster) s.postgres += ticks;
      }
      closedir(d);
    }
  }
  std::ifstream stat("/proc/stat");
  std::string cpu;
  int64_t v[8] = {};
  stat >> cpu >> v[0] >> v[1] >> v[2] >> v[3] >> v[4] >> v[5] >> v[6] >> v[7];
  s.machine_busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];  // All but idle and iowait.
  return s;
}

// Cores used, per party, over one or more intervals (a phase's rounds).
struct CpuShare {
  double meterd_own = 0, meterd_rdkafka = 0, broker = 0, postgres = 0, client = 0, rest = 0;
};

class CpuMeter {
 public:
  explicit CpuMeter(Processes processes) : processes_(processes) {}
  void Begin() { begin_ = SampleCpu(processes_); }
  void End() {
    const CpuSample end = SampleCpu(processes_);
    wall_ += absl::ToDoubleSeconds(end.at - begin_.at);
    used_.meterd_own += end.meterd_own - begin_.meterd_own;
    used_.meterd_rdkafka += end.meterd_rdkafka - begin_.meterd_rdkafka;
    used_.broker += end.broker - begin_.broker;
    used_.postgres += end.postgres - begin_.postgres;
    used_.client += end.client - begin_.client;
    used_.machine_busy += end.machine_busy - begin_.machine_busy;
  }
  CpuShare Cores() const {
    const double wall = std::max(1e-3, wall_);
    auto cores = [&](int64_t ticks) { return TicksToSeconds(ticks) / wall; };
    CpuShare s;
    s.meterd_own = cores(used_.meterd_own);
    s.meterd_rdkafka = cores(used_.meterd_rdkafka);
    s.broker = cores(used_.broker);
    s.postgres = cores(used_.postgres);
    s.client = cores(used_.client);
    s.rest = std::max(0.0, cores(used_.machine_busy) - s.meterd_own - s.meterd_rdkafka - s.broker -
                               s.postgres - s.client);
    return s;
  }

 private:
  const Processes processes_;
  CpuSample begin_;
  CpuSample used_;
  double wall_ = 0;
};

std::string CpuJson(const CpuShare& s) {
  return absl::StrFormat(
      R"({"meterd_threads":%.2f,"meterd_librdkafka_threads":%.2f,"broker":%.2f,"postgres":%.2f,"client":%.2f,"rest_of_machine":%.2f})",
      s.meterd_own, s.meterd_rdkafka, s.broker, s.postgres, s.client, s.rest);
}

std::string CpuLine(const char* phase, const CpuShare& s) {
  return absl::StrFormat(
      "  %-10s meterd %.2f (own threads %.2f + librdkafka %.2f), broker %.2f, postgres %.2f, "
      "client %.2f, rest of machine %.2f",
      phase, s.meterd_own + s.meterd_rdkafka, s.meterd_own, s.meterd_rdkafka, s.broker, s.postgres,
      s.client, s.rest);
}

// ---------------------------------------------------------------------------------------------
// Postgres: waiting for meterd, and the exact comparison.

int64_t StoredQuantity(pqxx::connection& conn) {
  pqxx::read_transaction tx(conn);
  return tx.exec1("SELECT coalesce(sum(quantity), 0) FROM shared.api_usage_meters")[0]
      .as<int64_t>();
}

// Waits until Postgres holds `ledger`'s quantity; the seconds it took, or -1 on timeout or
// overcount.
double WaitForStored(pqxx::connection& conn, const Ledger& ledger, const char* after) {
  const absl::Time start = absl::Now();
  const absl::Time give_up = start + absl::Seconds(absl::GetFlag(FLAGS_settle_seconds));
  int64_t stored = 0;
  while (absl::Now() < give_up) {
    stored = StoredQuantity(conn);
    if (stored == ledger.quantity()) return absl::ToDoubleSeconds(absl::Now() - start);
    if (stored > ledger.quantity() && ledger.in_doubt == 0) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  Progress(absl::StrCat("after ", after, ": Postgres holds ", stored, ", acknowledged ",
                        ledger.quantity()));
  return -1;
}

struct Exactness {
  bool exact = false;
  int64_t keys = 0, mismatched_keys = 0;
  int64_t stored_quantity = 0;
};

Exactness CompareTotals(pqxx::connection& conn, const Ledger& ledger, const EventFactory& factory) {
  std::map<std::tuple<std::string, std::string, std::string, std::string>, int64_t> want, got;
  for (const auto& [key, quantity] : ledger.totals()) {
    const auto& [org, meter, day] = key;
    want[{factory.org(org).org, kMeters[meter], std::string(factory.org(org).industry),
          meterd::event::DayToIsoDate(day)}] = quantity;
  }
  pqxx::read_transaction tx(conn);
  Exactness e;
  // Summed per key: unfolded deltas are rows of their own (migration 0025).
  for (const auto& row :
       tx.exec("SELECT org_id::text, meter, industry, usage_date::text, "
               "sum(quantity) FROM shared.api_usage_meters GROUP BY 1, 2, 3, 4")) {
    const int64_t quantity = row[4].as<int64_t>();
    got[{row[0].as<std::string>(), row[1].as<std::string>(), row[2].as<std::string>(),
         row[3].as<std::string>()}] = quantity;
    e.stored_quantity += quantity;
  }
  e.keys = static_cast<int64_t>(want.size());
  for (const auto& [key, quantity] : want) {
    auto it = got.find(key);
    if (it == got.end() || it->second != quantity) ++e.mismatched_keys;
  }
  for (const auto& [key, quantity] : got) {
    if (!want.contains(key)) ++e.mismatched_keys;
  }
  e.exact = e.mismatched_keys == 0 && ledger.in_doubt == 0;
  return e;
}

// ---------------------------------------------------------------------------------------------

std::vector<OrgKey> ReadKeys(const std::string& path) {
  std::ifstream in(path);
  if (!in) Die(absl::StrCat("cannot read --keys ", path));
  std::vector<OrgKey> keys;
  std::string org, token;
  while (in >> org >> token) {
    const int i = static_cast<int>(keys.size());
    keys.push_back({org, token, meterd::event::IndustryCode(meterd::devtools::LoadgenIndustry(i))});
  }
  if (keys.empty()) Die("--keys holds no keys");
  return keys;
}

sockaddr_in ParseAddress(const std::string& text) {
  const size_t colon = text.rfind(':');
  int port = 0;
  sockaddr_in address{};
  address.sin_family = AF_INET;
  if (colon == std::string::npos || !absl::SimpleAtoi(text.substr(colon + 1), &port) ||
      inet_pton(AF_INET, text.substr(0, colon).c_str(), &address.sin_addr) != 1) {
    Die(absl::StrCat("--http wants IPv4:port, got ", text));
  }
  address.sin_port = htons(static_cast<uint16_t>(port));
  return address;
}

std::string MachineModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (absl::StartsWith(line, "model name")) {
      return std::string(absl::StripAsciiWhitespace(line.substr(line.find(':') + 1)));
    }
  }
  return "unknown";
}

// The largest share of `bytes_per_org` any one partition gets under librdkafka's default
// partitioner (consistent_random: CRC32 of the key), against the mock's 5 MiB per partition.
double WorstPartitionMiB(const EventFactory& factory, int partitions, double bytes_per_org) {
  std::vector<double> bytes(partitions, 0);
  for (int i = 0; i < factory.org_count(); ++i) {
    const std::string& key = factory.org(i).org;
    const int32_t p = rd_kafka_msg_partitioner_consistent_random(nullptr, key.data(), key.size(),
                                                                 partitions, nullptr, nullptr);
    bytes[p] += bytes_per_org;
  }
  return *std::max_element(bytes.begin(), bytes.end()) / (1024.0 * 1024.0);
}

// The direct producers of (a), (c0) and (d0): set up as meterd's AckedProducer (lib/kafka/
// acked_producer.cc), with --linger_ms in place of its linger.ms=1 when meterd is given the same.
meterd::kafka::Properties DirectProperties(const std::string& brokers) {
  return {{"bootstrap.servers", brokers},
          {"enable.idempotence", "true"},
          {"acks", "all"},
          {"linger.ms", absl::StrCat(absl::GetFlag(FLAGS_linger_ms))},
          {"message.timeout.ms", "10000"}};
}

// (c0) and (d0): what (c) and (d) do, without HTTP and meterd in between, through one producer
// set up as (a)'s. Closed loop: `senders` each produce one event and wait for its
// acknowledgement before the next. Open loop: events due at `rate`, each timed from when it was
// due to its acknowledgement (sent up to 1 ms late: the wait between sends is rd_kafka_poll's,
// in whole milliseconds).
class DirectSingle {
 public:
  DirectSingle(const std::string& brokers, std::string topic, const EventFactory* factory,
               Ledger* ledger, std::function<int(int64_t)> org_of)
      : factory_(factory), ledger_(ledger), org_of_(std::move(org_of)), topic_(std::move(topic)) {
    rk_ = OrDie(meterd::kafka::NewClient(RD_KAFKA_PRODUCER, DirectProperties(brokers),
                                         [this](rd_kafka_conf_t* conf) {
                                           rd_kafka_conf_set_opaque(conf, this);
                                           rd_kafka_conf_set_dr_msg_cb(conf, &OnDelivery);
                                         }));
    partitions_ =
        OrDie(meterd::kafka::PartitionCount(rk_.get(), brokers, topic_, absl::Seconds(15)));
  }
  ~DirectSingle() { rd_kafka_flush(rk_.get(), 10'000); }
  int partitions() const { return partitions_; }

  PhaseResult Run(int senders, absl::Duration length, double rate) {
    result_ = PhaseResult();
    const absl::Time start = absl::Now(), give_up = start + length + absl::Seconds(30);
    last_ack_ = start;
    int64_t issued = 0;
    const int64_t open_loop_total = static_cast<int64_t>(rate * absl::ToDoubleSeconds(length));
    while (true) {
      const absl::Time now = absl::Now();
      if (now > give_up) Die("direct acknowledgements did not arrive");
      int wait_ms = 1;
      if (rate > 0) {
        for (; issued < open_loop_total; ++issued) {
          const absl::Time due = start + absl::Seconds(issued / rate);
          if (due > now) {
            wait_ms = static_cast<int>(std::ceil(absl::ToDoubleMilliseconds(due - now)));
            break;
          }
          Send(due);
        }
        if (issued == open_loop_total && in_flight_ == 0) break;
      } else if (now - start < length) {
        while (in_flight_ < senders) Send(absl::Now());
      } else if (in_flight_ == 0) {
        break;
      }
      rd_kafka_poll(rk_.get(), wait_ms);  // Serves acknowledgements as they come.
    }
    result_.seconds = absl::ToDoubleSeconds(last_ack_ - start);
    return std::move(result_);
  }

 private:
  struct Sent {
    int64_t n;
    absl::Time due;
  };

  void Send(absl::Time due) {
    payload_.clear();
    const int org = org_of_(next_);
    factory_->AppendJson("k", next_, org, &payload_);
    const std::string& key = factory_->org(org).org;
    auto* sent = new Sent{next_, due};
    const rd_kafka_resp_err_t err = rd_kafka_producev(
        rk_.get(), RD_KAFKA_V_TOPIC(topic_.c_str()), RD_KAFKA_V_KEY(key.data(), key.size()),
        RD_KAFKA_V_VALUE(payload_.data(), payload_.size()),
        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_OPAQUE(sent), RD_KAFKA_V_END);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) Die(rd_kafka_err2str(err));
    ++in_flight_;
    ++next_;
  }

  static void OnDelivery(rd_kafka_t*, const rd_kafka_message_t* message, void* opaque) {
    auto* self = static_cast<DirectSingle*>(opaque);
    std::unique_ptr<Sent> sent(static_cast<Sent*>(message->_private));
    const absl::Time now = absl::Now();
    --self->in_flight_;
    if (message->err != RD_KAFKA_RESP_ERR_NO_ERROR) {
      ++self->result_.statuses[0];
      ++self->ledger_->in_doubt;
      return;
    }
    ++self->result_.requests_ok;
    ++self->result_.events_ok;
    self->ledger_->Add(self->factory_->Meta(sent->n, self->org_of_(sent->n)));
    self->result_.latencies_ms.push_back(absl::ToDoubleMilliseconds(now - sent->due));
    self->last_ack_ = now;
  }

  const EventFactory* factory_;
  Ledger* ledger_;
  const std::function<int(int64_t)> org_of_;
  const std::string topic_;
  meterd::kafka::Handle rk_;
  int partitions_ = 0;
  std::string payload_;
  int in_flight_ = 0;
  int64_t next_ = 0;  // Event numbers go on across runs: ids stay unique.
  absl::Time last_ack_;
  PhaseResult result_;
};

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 == 1 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

int Run() {
  const std::string brokers = absl::GetFlag(FLAGS_brokers), topic = absl::GetFlag(FLAGS_topic);
  const std::string http = absl::GetFlag(FLAGS_http);
  const int64_t events = absl::GetFlag(FLAGS_events);
  const int batch = absl::GetFlag(FLAGS_batch), rounds = absl::GetFlag(FLAGS_rounds);
  const int batch_clients = absl::GetFlag(FLAGS_batch_clients);
  const int single_clients = absl::GetFlag(FLAGS_single_clients);
  const int single_seconds = absl::GetFlag(FLAGS_single_seconds);
  const int latency_seconds = absl::GetFlag(FLAGS_latency_seconds);
  const int latency_connections = absl::GetFlag(FLAGS_latency_connections);
  if (brokers.empty() || absl::GetFlag(FLAGS_pg).empty()) Die("--brokers and --pg are required");
  if (events <= 0 || batch <= 0 || events % batch != 0)
    Die("--events must be a multiple of --batch");
  if (rounds < 1) Die("--rounds must be at least 1");
  const sockaddr_in address = ParseAddress(http);
  // The single-event phases may run against their own broker and meterd (bench/http.sh: a fresh
  // 8-partition broker, as bench/e2e.sh's latency phase).
  const std::string single_brokers =
      absl::GetFlag(FLAGS_single_brokers).empty() ? brokers : absl::GetFlag(FLAGS_single_brokers);
  const std::string single_http =
      absl::GetFlag(FLAGS_single_http).empty() ? http : absl::GetFlag(FLAGS_single_http);
  const sockaddr_in single_address = ParseAddress(single_http);
  const Processes processes{absl::GetFlag(FLAGS_meterd_pid), absl::GetFlag(FLAGS_broker_pid),
                            absl::GetFlag(FLAGS_postgres_pid)};
  const Processes single_processes{
      absl::GetFlag(FLAGS_single_meterd_pid) ? absl::GetFlag(FLAGS_single_meterd_pid)
                                             : processes.meterd,
      absl::GetFlag(FLAGS_single_broker_pid) ? absl::GetFlag(FLAGS_single_broker_pid)
                                             : processes.broker,
      processes.postmaster};
  const EventFactory factory(ReadKeys(absl::GetFlag(FLAGS_keys)), absl::GetFlag(FLAGS_seed),
                             absl::GetFlag(FLAGS_days));
  const int orgs = factory.org_count();
  pqxx::connection pg(absl::GetFlag(FLAGS_pg));
  if (StoredQuantity(pg) != 0) Die("Postgres already holds usage: start from an empty database");
  Ledger ledger;

  // Events of (a) and (b): event n belongs to org (n / batch) % orgs, so a batch is one org's.
  // Single events go round the orgs, one per request.
  auto batch_org = [&](int64_t n) { return static_cast<int>((n / batch) % orgs); };
  auto single_org = [&](int64_t n) { return static_cast<int>(n % orgs); };
  auto batch_meta = [&](int64_t n) { return factory.Meta(n, batch_org(n)); };
  auto single_meta = [&](int64_t n) { return factory.Meta(n, single_org(n)); };
  auto batch_request = [&](std::string tag) {
    return [&, tag](int64_t k, std::string* out) {
      std::string body = "[";
      for (int64_t n = k * batch; n < (k + 1) * batch; ++n) {
        if (n > k * batch) body += ',';
        factory.AppendJson(tag, n, batch_org(n), &body);
      }
      body += ']';
      *out = RequestHead(http, factory.org(batch_org(k * batch)), true, body.size());
      *out += body;
    };
  };
  auto single_request = [&](std::string tag) {
    return [&, tag](int64_t n, std::string* out) {
      std::string body;
      factory.AppendJson(tag, n, single_org(n), &body);
      *out = RequestHead(single_http, factory.org(single_org(n)), false, body.size());
      *out += body;
    };
  };

  auto producer = OrDie(meterd::kafka::Producer::Create(DirectProperties(brokers)));
  const int partitions =
      OrDie(meterd::kafka::PartitionCount(producer->handle(), brokers, topic, absl::Seconds(15)));
  {
    // meterd reads along and the driver waits for it after every phase, so a partition must
    // hold what one phase puts on it before meterd reads it.
    std::string sample;
    factory.AppendJson("a1", 0, 0, &sample);
    const double per_event = sample.size() + 36 + 40;  // Value, key, record overhead.
    const double worst = WorstPartitionMiB(factory, partitions, per_event * events / orgs);
    Progress(
        absl::StrFormat("%d partitions; one phase puts at most %.1f MiB on a partition "
                        "(the embedded broker keeps 5 MiB)",
                        partitions, worst));
    if (worst > 4.5) Progress("WARNING: a partition may overflow; raise BENCH_PARTITIONS");
  }

  // Warm-up, both ways: the direct producer gets its producer id and metadata, meterd's producer
  // learns the topic's metadata on its first send (in a trial run that stalled the first
  // batches for ~0.9 s), and both get their connections going.
  Progress("warm-up: 100 events straight to Kafka, 50 HTTP batches, HTTP single events for 1 s");
  for (int64_t n = 0; n < 100; ++n) {
    std::string payload;
    factory.AppendJson("w", n, batch_org(n), &payload);
    const absl::Status sent = producer->Send(topic, meterd::kafka::Producer::kAnyPartition,
                                             factory.org(batch_org(n)).org, payload);
    if (!sent.ok()) Die(std::string(sent.message()));
  }
  if (absl::Status flushed = producer->Flush(absl::Seconds(30)); !flushed.ok()) {
    Die(std::string(flushed.message()));
  }
  for (int64_t n = 0; n < 100; ++n) ledger.Add(batch_meta(n));
  {
    PhaseSource batches(Plan{.max_requests = 50}, batch, batch_request("h"), batch_meta, &ledger);
    RunPhase(address, batch_clients, batches, absl::Seconds(60));
    PhaseSource singles(Plan{.max_requests = 100'000, .duration = absl::Seconds(1)}, 1,
                        single_request("i"), single_meta, &ledger);
    RunPhase(single_address, single_clients, singles, absl::Seconds(60));
  }
  std::vector<double> settle;  // Seconds meterd took to count each phase after it ended.
  settle.push_back(WaitForStored(pg, ledger, "warm-up"));

  // (a) and (b) in turns, `rounds` times, so that the shared machine's noise hits both alike.
  CpuMeter cpu_a(processes), cpu_b(processes);
  std::vector<double> direct_eps, batch_eps, ratios;
  int64_t b_retries = 0;
  std::map<int, int64_t> b_statuses;
  std::vector<double> b_latencies;
  for (int r = 1; r <= rounds; ++r) {
    const std::string a_tag = absl::StrCat("a", r), b_tag = absl::StrCat("b", r);
    std::vector<std::string> payloads(events);
    for (int64_t n = 0; n < events; ++n) factory.AppendJson(a_tag, n, batch_org(n), &payloads[n]);
    Progress(absl::StrFormat("(a) round %d: %d events straight to Kafka", r, events));
    cpu_a.Begin();
    const absl::Time a_start = absl::Now();
    const int64_t delivered_before = producer->delivered();
    for (int64_t n = 0; n < events; ++n) {
      const absl::Status sent = producer->Send(topic, meterd::kafka::Producer::kAnyPartition,
                                               factory.org(batch_org(n)).org, payloads[n]);
      if (!sent.ok()) Die(std::string(sent.message()));
    }
    if (absl::Status flushed = producer->Flush(absl::Seconds(120)); !flushed.ok()) {
      Die(std::string(flushed.message()));
    }
    const double a_seconds = absl::ToDoubleSeconds(absl::Now() - a_start);
    cpu_a.End();
    if (producer->delivered() - delivered_before != events) Die("(a) not every event delivered");
    for (int64_t n = 0; n < events; ++n) ledger.Add(batch_meta(n));
    payloads = {};
    direct_eps.push_back(events / a_seconds);
    settle.push_back(WaitForStored(pg, ledger, "(a)"));

    std::vector<std::string> requests(events / batch);
    for (size_t k = 0; k < requests.size(); ++k) batch_request(b_tag)(k, &requests[k]);
    Progress(
        absl::StrFormat("(b) round %d: the same events in %d HTTP batches over %d "
                        "keep-alive connections",
                        r, requests.size(), batch_clients));
    PhaseSource source(
        Plan{.max_requests = static_cast<int64_t>(requests.size())}, batch,
        [&](int64_t k, std::string* out) { *out = requests[k]; }, batch_meta, &ledger);
    cpu_b.Begin();
    const PhaseResult b = RunPhase(address, batch_clients, source, absl::Minutes(3));
    cpu_b.End();
    batch_eps.push_back(b.events_ok / std::max(1e-9, b.seconds));
    ratios.push_back(batch_eps.back() / direct_eps.back());
    b_retries += b.retries;
    for (const auto& [status, count] : b.statuses) b_statuses[status] += count;
    b_latencies.insert(b_latencies.end(), b.latencies_ms.begin(), b.latencies_ms.end());
    Progress(absl::StrFormat("round %d: direct %.0f events/s, HTTP batches %.0f events/s: %.2fx", r,
                             direct_eps.back(), batch_eps.back(), ratios.back()));
    settle.push_back(WaitForStored(pg, ledger, "(b)"));
  }
  producer.reset();

  // (c0)/(c), then (d0)/(d): single events, direct and over HTTP, in alternating slices, so
  // that both meet the same machine and the same broker log (the mock broker slows as its log
  // grows: it scans a partition's message sets on every fetch).
  const int slices = absl::GetFlag(FLAGS_slices);
  const absl::Duration single_slice = absl::Seconds(single_seconds) / slices;
  const absl::Duration latency_slice = absl::Seconds(latency_seconds) / slices;
  const std::string single_topic =
      absl::GetFlag(FLAGS_single_topic).empty() ? topic : absl::GetFlag(FLAGS_single_topic);
  DirectSingle direct_single(single_brokers, single_topic, &factory, &ledger, single_org);
  direct_single.Run(single_clients, absl::Seconds(1), 0);  // Warm-up: producer id, metadata.
  const int single_partitions = direct_single.partitions();
  PhaseResult c0, c, d0, d;
  CpuMeter cpu_c0(single_processes), cpu_c(single_processes), cpu_d0(single_processes),
      cpu_d(single_processes);
  int64_t next_single = 0;  // Request numbers go on across slices: ids stay unique.
  Progress(
      absl::StrFormat("(c0)/(c) single events, %d senders straight to Kafka / %d keep-alive "
                      "HTTP connections, %d slices of %s each",
                      single_clients, single_clients, slices, absl::FormatDuration(single_slice)));
  for (int i = 0; i < slices; ++i) {
    cpu_c0.Begin();
    c0.Add(direct_single.Run(single_clients, single_slice, 0));
    cpu_c0.End();
    const Plan plan{.first = next_single,
                    .max_requests = absl::GetFlag(FLAGS_single_max_requests),
                    .duration = single_slice};
    next_single += plan.max_requests;
    PhaseSource source(plan, 1, single_request("c"), single_meta, &ledger);
    cpu_c.Begin();
    c.Add(RunPhase(single_address, single_clients, source, single_slice + absl::Minutes(1)));
    cpu_c.End();
  }
  const double c0_rate = c0.rate(), single_rps = c.rate();
  Progress(absl::StrFormat("(c0) %.0f events/s, (c) %.0f requests/s", c0_rate, single_rps));
  settle.push_back(WaitForStored(pg, ledger, "(c)"));

  const double rate = std::max(1.0, single_rps / 2);
  Progress(
      absl::StrFormat("(d0)/(d) open loop at %.0f events or requests/s (half of (c)), %d "
                      "slices of %s each, %d HTTP connections",
                      rate, slices, absl::FormatDuration(latency_slice), latency_connections));
  for (int i = 0; i < slices; ++i) {
    cpu_d0.Begin();
    d0.Add(direct_single.Run(0, latency_slice, rate));
    cpu_d0.End();
    const Plan plan{
        .first = next_single,
        .max_requests = static_cast<int64_t>(rate * absl::ToDoubleSeconds(latency_slice)),
        .rate = rate};
    next_single += plan.max_requests;
    PhaseSource source(plan, 1, single_request("d"), single_meta, &ledger);
    cpu_d.Begin();
    d.Add(RunPhase(single_address, latency_connections, source, latency_slice + absl::Minutes(1)));
    cpu_d.End();
  }
  Progress("(d) done; waiting for meterd to count everything");
  settle.push_back(WaitForStored(pg, ledger, "(d)"));
  const Exactness exact = CompareTotals(pg, ledger, factory);

  // Report.
  const double direct = Median(direct_eps), batched = Median(batch_eps), ratio = Median(ratios);
  const Percentiles b_lat = Summarize(b_latencies), c0_lat = c0.latency(), c_lat = c.latency(),
                    d0_lat = d0.latency(), d_lat = d.latency();
  const std::string model = MachineModel();
  const long cores = sysconf(_SC_NPROCESSORS_ONLN);
  auto statuses = [](const std::map<int, int64_t>& by_status) {
    std::string out;
    for (const auto& [status, count] : by_status) {
      absl::StrAppend(&out, out.empty() ? "" : ",", "\"", status, "\":", count);
    }
    return absl::StrCat("{", out, "}");
  };
  auto list = [](const std::vector<double>& v, int decimals) {
    std::string out;
    for (double x : v) {
      absl::StrAppend(&out, out.empty() ? "" : ",", absl::StrFormat("%.*f", decimals, x));
    }
    return out;
  };
  auto met = [](bool ok) { return ok ? "met" : "MISSED"; };
  auto latency_line = [](const Percentiles& p) {
    return absl::StrFormat("p50 %.2f, p90 %.2f, p99 %.2f, p99.9 %.2f, max %.2f ms", p.p50_ms,
                           p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms);
  };
  const CpuShare ca = cpu_a.Cores(), cb = cpu_b.Cores(), cc0 = cpu_c0.Cores(), cc = cpu_c.Cores(),
                 cd0 = cpu_d0.Cores(), cd = cpu_d.Cores();
  std::printf("\nmeterd HTTP ingest benchmark on %s (%ld cores)\n", model.c_str(), cores);
  std::printf(
      "%lld events per round in (a) and (b), %d rounds, %d partitions; %d orgs, one ingest API "
      "key each; producers' linger.ms %d\n",
      static_cast<long long>(events), rounds, partitions, orgs, absl::GetFlag(FLAGS_linger_ms));
  std::printf("(c0) to (d): %s, %d partitions\n\n",
              single_brokers == brokers ? "the same broker and meterd"
                                        : "a fresh broker and a second meterd",
              single_partitions);
  std::printf("%-66s %10s %8s  %s\n", "", "per second", "ratio", "target");
  std::printf("%-66s %10.0f\n", "(a)  direct librdkafka produce (idempotent, acks=all), events",
              direct);
  std::printf(
      "%-66s %10.0f %7.2fx  b/a >= 0.30: %s\n",
      absl::StrFormat("(b)  HTTP batches of %d, %d connections, events", batch, batch_clients)
          .c_str(),
      batched, ratio, met(ratio >= 0.3));
  std::printf("     per round: (a) %s; (b) %s; b/a %s\n", list(direct_eps, 0).c_str(),
              list(batch_eps, 0).c_str(), list(ratios, 2).c_str());
  std::printf(
      "%-66s %10.0f\n",
      absl::StrFormat("(c0) direct single events, %d senders each awaiting its ack", single_clients)
          .c_str(),
      c0_rate);
  std::printf(
      "%-66s %10.0f %7.2fx  c >= 10,000/s: %s\n",
      absl::StrFormat("(c)  HTTP single-event requests, %d connections", single_clients).c_str(),
      single_rps, single_rps / std::max(1.0, c0_rate), met(single_rps >= 10'000));
  std::printf(
      "%-66s %10.0f\n",
      absl::StrFormat("(d0) direct single events, open loop at %.0f/s (half of c)", rate).c_str(),
      d0.rate());
  std::printf("%-66s %10.0f\n",
              absl::StrFormat("(d)  HTTP single-event requests, open loop at %.0f/s, %d conns",
                              rate, latency_connections)
                  .c_str(),
              d.rate());
  std::printf("     (d)  latency, due -> 202: %s  d p99 <= 50 ms: %s\n",
              latency_line(d_lat).c_str(), met(d_lat.p99_ms <= 50));
  std::printf("     (d0) latency, due -> ack: %s\n", latency_line(d0_lat).c_str());
  std::printf(
      "     p99 by slice: (d) %s ms; (d0) %s ms; (d) requests sent > 1 ms late (no free "
      "connection): %lld of %zu\n",
      list(d.p99_by_slice, 1).c_str(), list(d0.p99_by_slice, 1).c_str(),
      static_cast<long long>(d.late), d.latencies_ms.size());
  std::printf("     closed loop p50/p99: (b) %.1f/%.1f ms, (c0) %.2f/%.2f ms, (c) %.2f/%.2f ms\n",
              b_lat.p50_ms, b_lat.p99_ms, c0_lat.p50_ms, c0_lat.p99_ms, c_lat.p50_ms, c_lat.p99_ms);
  std::printf("     HTTP answers by status: (b) %s (c) %s (d) %s; retries %lld/%lld/%lld\n",
              statuses(b_statuses).c_str(), statuses(c.statuses).c_str(),
              statuses(d.statuses).c_str(), static_cast<long long>(b_retries),
              static_cast<long long>(c.retries), static_cast<long long>(d.retries));
  std::printf("     seconds until meterd had counted each phase in Postgres: %s\n",
              list(settle, 1).c_str());
  std::printf(
      "\nCPU in cores during each phase ('rest' is everything else on the machine):\n"
      "%s\n%s\n%s\n%s\n%s\n%s\n",
      CpuLine("(a)", ca).c_str(), CpuLine("(b)", cb).c_str(), CpuLine("(c0)", cc0).c_str(),
      CpuLine("(c)", cc).c_str(), CpuLine("(d0)", cd0).c_str(), CpuLine("(d)", cd).c_str());
  std::printf(
      "\nexact: Postgres totals equal every acknowledged event per (org, meter, industry, "
      "day): %s (%lld keys, %lld events, quantity %lld; %lld mismatched keys, %lld events "
      "in doubt, %lld refused)\n\n",
      exact.exact ? "yes" : "NO", static_cast<long long>(exact.keys),
      static_cast<long long>(ledger.events()), static_cast<long long>(ledger.quantity()),
      static_cast<long long>(exact.mismatched_keys), static_cast<long long>(ledger.in_doubt),
      static_cast<long long>(ledger.refused));

  auto latency_json = [](const Percentiles& p) {
    return absl::StrFormat(R"({"p50":%.2f,"p90":%.2f,"p99":%.2f,"p999":%.2f,"max":%.2f})", p.p50_ms,
                           p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms);
  };
  const std::string json = absl::StrCat(
      absl::StrFormat(
          R"({"machine":{"cpu":"%s","cores":%d},"events_per_round":%d,"rounds":%d,"orgs":%d,)"
          R"("partitions":%d,"single_partitions":%d,"batch":%d,"linger_ms":%d,)",
          model, static_cast<int>(cores), events, rounds, orgs, partitions, single_partitions,
          batch, absl::GetFlag(FLAGS_linger_ms)),
      absl::StrFormat(
          R"("direct_events_per_second":%.0f,"http_batch_events_per_second":%.0f,)"
          R"("ratio_batch_vs_direct":%.3f,"rounds_direct":[%s],"rounds_batch":[%s],)"
          R"("direct_single_events_per_second":%.0f,"single_requests_per_second":%.0f,)"
          R"("latency_rate":%.0f,"direct_open_loop_rate":%.0f,"http_open_loop_rate":%.0f,)",
          direct, batched, ratio, list(direct_eps, 0), list(batch_eps, 0), c0_rate, single_rps,
          rate, d0.rate(), d.rate()),
      absl::StrFormat(R"("latency_ms":{"d":%s,"d0":%s,"b":%s,"c0":%s,"c":%s},)"
                      R"("p99_by_slice_ms":{"d":[%s],"d0":[%s]},"d_sent_late":%d,)",
                      latency_json(d_lat), latency_json(d0_lat), latency_json(b_lat),
                      latency_json(c0_lat), latency_json(c_lat), list(d.p99_by_slice, 1),
                      list(d0.p99_by_slice, 1), d.late),
      absl::StrFormat(
          R"("statuses":{"b":%s,"c":%s,"d":%s},"retries":%d,)"
          R"("targets":{"batch_ratio_0_3":%s,"single_10000":%s,"p99_50ms":%s},)"
          R"("cpu_cores":{"a":%s,"b":%s,"c0":%s,"c":%s,"d0":%s,"d":%s},)"
          R"("settle_seconds":[%s],)"
          R"("totals_exact":%s,"acknowledged_events":%d,"acknowledged_quantity":%d,"keys":%d,)"
          R"("mismatched_keys":%d,"events_in_doubt":%d})",
          statuses(b_statuses), statuses(c.statuses), statuses(d.statuses),
          b_retries + c.retries + d.retries, ratio >= 0.3 ? "true" : "false",
          single_rps >= 10'000 ? "true" : "false", d_lat.p99_ms <= 50 ? "true" : "false",
          CpuJson(ca), CpuJson(cb), CpuJson(cc0), CpuJson(cc), CpuJson(cd0), CpuJson(cd),
          list(settle, 1), exact.exact ? "true" : "false", ledger.events(), ledger.quantity(),
          exact.keys, exact.mismatched_keys, ledger.in_doubt));
  std::printf("%s\n", json.c_str());
  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    std::ofstream(path) << json << "\n";
  }
  return exact.exact ? 0 : 1;
}

int PrintOrgs() {
  for (int i = 0; i < absl::GetFlag(FLAGS_orgs); ++i) {
    std::printf("%s\n", meterd::event::OrgIdToString(
                            meterd::devtools::LoadgenOrgId(absl::GetFlag(FLAGS_seed), i))
                            .c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  const std::string mode = positional.size() > 1 ? positional[1] : "";
  if (mode == "orgs") return PrintOrgs();
  if (mode == "run") return Run();
  Die("mode must be orgs or run");
}
