// Helpers for bench/e2e.sh, each measuring one side of the end-to-end comparison:
//   e2e_bench raw     --brokers B --topic T --events N        plain librdkafka consume + discard
//   e2e_bench naive   --brokers B --topic T --events N --pg U  the seed's approach: parse, then one
//                                                             increment_api_usage call per event
//   e2e_bench latency --brokers B --topic T --pg U --seconds S --rate R
//                     produce at R events/s for S s with probe events; report when each probe
//                     became visible in Postgres (event -> visible latency, p50/p99); the
//                     background events spread over --orgs orgs (10,000)
// Each prints one JSON line on stdout.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include <librdkafka/rdkafka.h>
#include <simdjson.h>
#include <pqxx/pqxx>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "lib/devtools/loadgen.h"
#include "lib/event/usage_event.h"
#include "lib/kafka/client.h"
#include "lib/kafka/producer.h"

ABSL_FLAG(std::string, brokers, "", "Kafka bootstrap servers");
ABSL_FLAG(std::string, topic, "usage-events", "Topic");
ABSL_FLAG(std::string, pg, "", "Postgres URL");
ABSL_FLAG(int64_t, events, 1'000'000, "Events to consume");
ABSL_FLAG(int, seconds, 10, "Latency phase length");
ABSL_FLAG(int, rate, 20'000, "Latency phase background rate, events/s");
ABSL_FLAG(int, orgs, 10'000, "Latency phase: orgs the background events spread over");

namespace {

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "e2e_bench: %s\n", message.c_str());
  std::exit(1);
}

template <typename T>
T OrDie(absl::StatusOr<T> value) {
  if (!value.ok()) Die(std::string(value.status().message()));
  return std::move(value).value();
}

// A consumer assigned every partition of the topic from the beginning (no group join, so the
// measurement is consumption alone).
meterd::kafka::Handle AssignedConsumer() {
  const std::string brokers = absl::GetFlag(FLAGS_brokers), topic = absl::GetFlag(FLAGS_topic);
  meterd::kafka::Handle rk =
      OrDie(meterd::kafka::NewClient(RD_KAFKA_CONSUMER, {{"bootstrap.servers", brokers},
                                                         {"group.id", "e2e-bench-raw"},
                                                         {"enable.auto.commit", "false"},
                                                         {"fetch.max.bytes", "16777216"}}));
  rd_kafka_poll_set_consumer(rk.get());
  const int partitions =
      OrDie(meterd::kafka::PartitionCount(rk.get(), brokers, topic, absl::Seconds(15)));
  rd_kafka_topic_partition_list_t* list = rd_kafka_topic_partition_list_new(partitions);
  for (int p = 0; p < partitions; ++p) {
    rd_kafka_topic_partition_list_add(list, topic.c_str(), p)->offset = RD_KAFKA_OFFSET_BEGINNING;
  }
  rd_kafka_assign(rk.get(), list);
  rd_kafka_topic_partition_list_destroy(list);
  return rk;
}

template <typename OnMessage>
double ConsumeN(rd_kafka_t* rk, int64_t n, OnMessage&& on_message) {
  rd_kafka_queue_t* queue = rd_kafka_queue_get_consumer(rk);
  std::vector<rd_kafka_message_t*> batch(1000);
  int64_t seen = 0;
  absl::Time start, last_progress = absl::Now();
  bool started = false;
  const absl::Time give_up = absl::Now() + absl::Minutes(10);
  while (seen < n && absl::Now() < give_up) {
    const ssize_t got = rd_kafka_consume_batch_queue(queue, 100, batch.data(), batch.size());
    for (ssize_t i = 0; i < got; ++i) {
      if (batch[i]->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
        if (!started) {
          start = absl::Now();
          started = true;
        }
        on_message(*batch[i]);
        ++seen;
      }
      rd_kafka_message_destroy(batch[i]);
    }
    if (absl::Now() - last_progress > absl::Seconds(2)) {
      std::fprintf(stderr, "e2e_bench: %lld/%lld messages\n", static_cast<long long>(seen),
                   static_cast<long long>(n));
      last_progress = absl::Now();
    }
  }
  rd_kafka_queue_destroy(queue);
  if (seen < n) Die(absl::StrCat("only ", seen, " of ", n, " messages arrived"));
  return absl::ToDoubleSeconds(absl::Now() - start);
}

int Raw() {
  meterd::kafka::Handle rk = AssignedConsumer();
  int64_t bytes = 0;
  const double seconds = ConsumeN(rk.get(), absl::GetFlag(FLAGS_events),
                                  [&](const rd_kafka_message_t& m) { bytes += m.len; });
  rd_kafka_consumer_close(rk.get());
  std::printf(R"({"events":%lld,"bytes":%lld,"seconds":%.3f,"events_per_second":%.0f})"
              "\n",
              static_cast<long long>(absl::GetFlag(FLAGS_events)), static_cast<long long>(bytes),
              seconds, absl::GetFlag(FLAGS_events) / seconds);
  return 0;
}

int Naive() {
  pqxx::connection conn(absl::GetFlag(FLAGS_pg));
  conn.prepare("increment", "SELECT shared.increment_api_usage($1::uuid, $2, $3, $4)");
  meterd::kafka::Handle rk = AssignedConsumer();
  simdjson::dom::parser parser;
  int64_t failed = 0;
  const double seconds =
      ConsumeN(rk.get(), absl::GetFlag(FLAGS_events), [&](const rd_kafka_message_t& m) {
        simdjson::dom::element doc;
        if (parser.parse(static_cast<const char*>(m.payload), m.len).get(doc) !=
            simdjson::SUCCESS) {
          ++failed;
          return;
        }
        std::string_view subject, type, industry;
        int64_t quantity = 1;
        if (doc["subject"].get(subject) || doc["type"].get(type) ||
            doc["data"]["industry"].get(industry)) {
          ++failed;
          return;
        }
        if (doc["data"]["quantity"].get(quantity) != simdjson::SUCCESS) quantity = 1;
        try {
          pqxx::nontransaction tx(conn);
          tx.exec_prepared("increment", std::string(subject), std::string(type), quantity,
                           std::string(industry));
        } catch (const std::exception&) {
          ++failed;  // Malformed events the seed would have refused.
        }
      });
  rd_kafka_consumer_close(rk.get());
  std::printf(R"({"events":%lld,"refused":%lld,"seconds":%.3f,"events_per_second":%.1f})"
              "\n",
              static_cast<long long>(absl::GetFlag(FLAGS_events)), static_cast<long long>(failed),
              seconds, absl::GetFlag(FLAGS_events) / seconds);
  return 0;
}

std::string EventJson(const std::string& org, std::string_view industry) {
  return absl::StrCat(R"({"specversion":"1.0","id":"lat-)", absl::ToUnixNanos(absl::Now()),
                      R"(","source":"bench","type":"api_calls","subject":")", org, R"(","time":")",
                      absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone()),
                      R"(","data":{"quantity":1,"industry":")", std::string(industry), R"("}})");
}

// A probe: an event of an org nothing else uses, so its first row in Postgres marks when it
// became visible.
struct Probe {
  std::string org;
  absl::Time sent;
  absl::Duration latency = absl::InfiniteDuration();
};

// Background events at --rate and one probe every 100 ms, for --seconds.
class LatencyLoad {
 public:
  LatencyLoad()
      : producer_(OrDie(meterd::kafka::Producer::Create(
            {{"bootstrap.servers", absl::GetFlag(FLAGS_brokers)}, {"linger.ms", "1"}}))),
        topic_(absl::GetFlag(FLAGS_topic)),
        rate_(absl::GetFlag(FLAGS_rate)) {
    const int orgs = std::max(1, absl::GetFlag(FLAGS_orgs));
    orgs_.reserve(orgs);
    for (int i = 0; i < orgs; ++i) {
      orgs_.push_back(meterd::event::OrgIdToString(meterd::devtools::LoadgenOrgId(1, i)));
    }
  }

  // Produces what is due by `elapsed` since the start.
  void Step(absl::Duration elapsed, std::vector<Probe>& probes) {
    const int64_t due = static_cast<int64_t>(absl::ToDoubleSeconds(elapsed) * rate_);
    for (; sent_ < due; ++sent_) {
      const std::string& org = orgs_[sent_ % orgs_.size()];
      Send(org, EventJson(org, meterd::event::IndustryCode(
                                   meterd::devtools::LoadgenIndustry(sent_ % orgs_.size()))));
    }
    // The first second is background only: the producer fetches metadata and connects, which
    // is not meterd's latency.
    if (elapsed >= next_probe_) {
      const absl::Time now = absl::Now();
      Probe probe{absl::StrFormat("%08x-0000-4000-8000-%012x", probes.size(),
                                  absl::ToUnixMicros(now) & 0xffffffffffff),
                  now};
      Send(probe.org, EventJson(probe.org, "hs"));
      probes.push_back(probe);
      next_probe_ = elapsed + absl::Milliseconds(100);
    }
  }

  void Finish() { (void)producer_->Flush(absl::Seconds(10)); }
  int64_t sent() const { return sent_; }

 private:
  void Send(const std::string& org, const std::string& payload) {
    const absl::Status status =
        producer_->Send(topic_, meterd::kafka::Producer::kAnyPartition, org, payload);
    if (!status.ok()) Die(std::string(status.message()));
  }

  std::unique_ptr<meterd::kafka::Producer> producer_;
  const std::string topic_;
  const int rate_;
  std::vector<std::string> orgs_;
  int64_t sent_ = 0;
  absl::Duration next_probe_ = absl::Seconds(1);
};

// Marks the probes now visible in Postgres; false when none is still pending.
bool CheckVisible(pqxx::connection& conn, std::vector<Probe>& probes) {
  std::string pending = "{";
  for (const Probe& p : probes) {
    if (p.latency == absl::InfiniteDuration()) {
      absl::StrAppend(&pending, pending.size() > 1 ? "," : "", p.org);
    }
  }
  pending += "}";
  if (pending == "{}") return false;
  pqxx::read_transaction tx(conn);
  const absl::Time seen = absl::Now();
  for (const auto& row : tx.exec_params(
           "SELECT org_id::text FROM shared.api_usage_meters WHERE org_id = ANY($1::uuid[])",
           pending)) {
    for (Probe& p : probes) {
      if (p.org == row[0].as<std::string>()) p.latency = seen - p.sent;
    }
  }
  return true;
}

int ReportLatency(const std::vector<Probe>& probes, int64_t background) {
  std::vector<double> ms;
  int64_t lost = 0;
  for (const Probe& p : probes) {
    if (p.latency == absl::InfiniteDuration()) {
      ++lost;
    } else {
      ms.push_back(absl::ToDoubleMilliseconds(p.latency));
    }
  }
  std::sort(ms.begin(), ms.end());
  std::string all;
  for (double v : ms) absl::StrAppend(&all, static_cast<int>(v), " ");
  std::fprintf(stderr, "e2e_bench: probe latencies (ms): %s\n", all.c_str());
  auto pct = [&](double q) {
    return ms.empty() ? -1.0 : ms[std::min(ms.size() - 1, static_cast<size_t>(q * ms.size()))];
  };
  std::printf(
      R"({"probes":%zu,"not_visible":%lld,"background_events":%lld,"p50_ms":%.1f,"p99_ms":%.1f,"max_ms":%.1f})"
      "\n",
      probes.size(), static_cast<long long>(lost), static_cast<long long>(background), pct(0.5),
      pct(0.99), ms.empty() ? -1.0 : ms.back());
  return lost == 0 ? 0 : 1;
}

int Latency() {
  pqxx::connection conn(absl::GetFlag(FLAGS_pg));
  const absl::Duration length = absl::Seconds(absl::GetFlag(FLAGS_seconds));
  LatencyLoad load;
  std::vector<Probe> probes;
  const absl::Time start = absl::Now();
  absl::Time last_check = start;
  // Load for `length`, then up to 10 s more for the last probes to become visible.
  while (absl::Now() - start < length + absl::Seconds(10)) {
    const absl::Time now = absl::Now();
    if (now - start < length) load.Step(now - start, probes);
    if (now - last_check >= absl::Milliseconds(10)) {
      last_check = now;
      if (!CheckVisible(conn, probes) && now - start >= length) break;
    }
    absl::SleepFor(absl::Milliseconds(1));
  }
  load.Finish();
  return ReportLatency(probes, load.sent());
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  const std::string mode = positional.size() > 1 ? positional[1] : "";
  if (absl::GetFlag(FLAGS_brokers).empty()) Die("--brokers is required");
  if (mode == "raw") return Raw();
  if (mode == "naive") return Naive();
  if (mode == "latency") return Latency();
  Die("mode must be raw, naive or latency");
}
