#include "lib/devtools/loadgen.h"

#include <cstdio>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "lib/common/process.h"
#include "lib/common/status_macros.h"
#include "lib/kafka/producer.h"

namespace meterd::devtools {
namespace {

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

constexpr const char* kMeters[] = {"api_calls", "data_exports", "ai_requests"};

// Malformed kinds loadgen mixes in, each with the reason meterd must give.
enum class Malformed {
  kNotJson,
  kUnknownMeter,
  kBadOrg,
  kBadQuantity,
  kBadIndustry,
  kMissingSubject,
  kFuture,
  kBadTime,
  kCount
};

std::string FormatTime(int64_t micros) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::FromUnixMicros(micros),
                          absl::UTCTimeZone());
}

}  // namespace

event::OrgId LoadgenOrgId(uint64_t seed, int i) {
  uint64_t state = seed * 1'000'003 + static_cast<uint64_t>(i);
  const uint64_t hi = SplitMix64(state), lo = SplitMix64(state);
  event::OrgId id;
  for (int b = 0; b < 8; ++b) {
    id.bytes[b] = static_cast<uint8_t>(hi >> (56 - 8 * b));
    id.bytes[8 + b] = static_cast<uint8_t>(lo >> (56 - 8 * b));
  }
  id.bytes[6] = (id.bytes[6] & 0x0f) | 0x40;
  id.bytes[8] = (id.bytes[8] & 0x3f) | 0x80;
  return id;
}

event::Industry LoadgenIndustry(int i) {
  return static_cast<event::Industry>(i % event::kIndustryCount);
}

absl::StatusOr<LoadgenResult> RunLoadgen(const LoadgenOptions& options) {
  if (options.events < 0) return absl::InvalidArgumentError("--events must be >= 0");
  if (options.orgs < 1) return absl::InvalidArgumentError("--orgs must be at least 1");
  if (options.malformed_share < 0 || options.malformed_share > 1) {
    return absl::InvalidArgumentError("--malformed-share must be between 0 and 1");
  }
  if (options.duplicate_share < 0 || options.duplicate_share > 1) {
    return absl::InvalidArgumentError("--duplicate-share must be between 0 and 1");
  }
  if (options.days < 1) return absl::InvalidArgumentError("--days must be at least 1");
  if (options.rate < 0) return absl::InvalidArgumentError("--rate must be >= 0");

  kafka::Properties properties = {{"bootstrap.servers", options.brokers},
                                  {"linger.ms", "20"},
                                  {"batch.num.messages", "10000"},
                                  {"queue.buffering.max.messages", "500000"},
                                  {"message.timeout.ms", "120000"}};
  properties.insert(properties.end(), options.kafka_properties.begin(),
                    options.kafka_properties.end());
  ASSIGN_OR_RETURN(std::unique_ptr<kafka::Producer> producer, kafka::Producer::Create(properties));

  // Org i always goes to partition i % partitions: one org stays on one partition (as keying by
  // org guarantees), and orgs spread evenly, so no partition outgrows the embedded broker's
  // per-partition retention before the others.
  absl::StatusOr<int> partition_count =
      kafka::PartitionCount(producer->handle(), options.brokers, options.topic, absl::Seconds(15));
  if (!partition_count.ok()) {
    return absl::UnavailableError(absl::StrCat("cannot read partitions of topic '", options.topic,
                                               "': ", partition_count.status().message()));
  }
  const int partitions = *partition_count;

  std::vector<std::string> org_text(options.orgs);
  for (int i = 0; i < options.orgs; ++i) {
    org_text[i] = event::OrgIdToString(LoadgenOrgId(options.seed, i));
  }

  LoadgenResult result;
  uint64_t rng = options.seed;
  const absl::Time start = absl::Now();
  const int64_t now_micros = absl::ToUnixMicros(start);
  // A minute of margin so every event stays inside the consumer's accepted window.
  const int64_t span_micros = options.days * 86'400'000'000LL - 60'000'000;
  absl::Time last_progress = start;
  std::string payload;
  payload.reserve(512);
  int malformed_kind = 0;

  struct Resend {
    int64_t due;  // Sent once this many events have been produced.
    int partition;
    std::string key;
    std::string payload;
  };
  std::vector<Resend> resends;  // Unordered; scanned only when one is due.
  int64_t next_resend_due = INT64_MAX;
  const int64_t max_resend_delay = std::max<int64_t>(1, options.events / 5);
  absl::Status produce_error;
  auto produce = [&](int partition, const std::string& key, const std::string& value) {
    produce_error = producer->Send(options.topic, partition, key, value);
    return produce_error.ok();
  };
  auto send_due_resends = [&](int64_t produced_so_far) {
    if (produced_so_far < next_resend_due) return true;
    next_resend_due = INT64_MAX;
    for (size_t i = 0; i < resends.size();) {
      if (resends[i].due <= produced_so_far) {
        if (!produce(resends[i].partition, resends[i].key, resends[i].payload)) return false;
        ++result.duplicates;
        resends[i] = std::move(resends.back());
        resends.pop_back();
      } else {
        next_resend_due = std::min(next_resend_due, resends[i].due);
        ++i;
      }
    }
    return true;
  };

  for (int64_t n = 0; n < options.events && !StopRequested(); ++n) {
    const int org = static_cast<int>(SplitMix64(rng) % options.orgs);
    const uint64_t r = SplitMix64(rng);
    const int meter = r % 10 < 8 ? 0 : (r % 10 == 8 ? 1 : 2);
    const int64_t quantity = meter == 2 ? 1 + static_cast<int64_t>((r >> 8) % 3) : 1;
    const int64_t micros = now_micros - 60'000'000 -
                           static_cast<int64_t>((r >> 16) % static_cast<uint64_t>(span_micros));
    const std::string& subject = org_text[org];
    const std::string_view industry = event::IndustryCode(LoadgenIndustry(org));
    const bool malformed =
        options.malformed_share > 0 &&
        static_cast<double>(SplitMix64(rng) % 1'000'000) < options.malformed_share * 1e6;
    const uint64_t id_hi = SplitMix64(rng), id_lo = SplitMix64(rng);

    std::string meter_name = kMeters[meter];
    std::string subject_text = subject;
    std::string industry_text(industry);
    std::string quantity_text = absl::StrCat(quantity);
    std::string time_text = FormatTime(micros);
    std::string reason;
    bool omit_subject = false;
    if (malformed) {
      const auto kind =
          static_cast<Malformed>(malformed_kind++ % static_cast<int>(Malformed::kCount));
      switch (kind) {
        case Malformed::kNotJson:
          reason = "not_json";
          break;
        case Malformed::kUnknownMeter:
          meter_name = "teleports";
          reason = "unknown_meter";
          break;
        case Malformed::kBadOrg:
          subject_text = "org-" + subject.substr(0, 8);
          reason = "bad_org_id";
          break;
        case Malformed::kBadQuantity:
          quantity_text = "-5";
          reason = "bad_quantity";
          break;
        case Malformed::kBadIndustry:
          industry_text = "mining";
          reason = "bad_industry";
          break;
        case Malformed::kMissingSubject:
          omit_subject = true;
          reason = "missing_field";
          break;
        case Malformed::kFuture:
          time_text = FormatTime(now_micros + 86'400'000'000LL);
          reason = "time_in_future";
          break;
        case Malformed::kBadTime:
          time_text = "yesterday";
          reason = "bad_time";
          break;
        case Malformed::kCount:
          break;
      }
    }
    payload = absl::StrFormat(
        R"({"specversion":"1.0","id":"%016x%016x","source":"%s/loadgen","type":"%s",%s"time":"%s","datacontenttype":"application/json","data":{"quantity":%s,"industry":"%s"}})",
        id_hi, id_lo, industry, meter_name,
        omit_subject ? std::string() : absl::StrCat("\"subject\":\"", subject_text, "\","),
        time_text, quantity_text, industry_text);
    if (reason == "not_json") payload.resize(payload.size() / 2);

    if (!produce(org % partitions, subject, payload) || !send_due_resends(n)) return produce_error;
    ++result.produced;
    if (malformed) {
      ++result.malformed;
      ++result.malformed_by_reason[reason];
    } else {
      ++result.valid;
      result.quantity_by_meter[kMeters[meter]] += quantity;
      const int32_t day = static_cast<int32_t>(micros / 86'400'000'000LL);
      result.totals[{subject, kMeters[meter], std::string(industry), event::DayToIsoDate(day)}] +=
          quantity;
    }
    if (!malformed && options.duplicate_share > 0 &&
        static_cast<double>(SplitMix64(rng) % 1'000'000) < options.duplicate_share * 1e6) {
      // Half go out right after the original, the rest up to a fifth of the run later.
      const int64_t delay =
          SplitMix64(rng) % 2 == 0 ? 0 : static_cast<int64_t>(SplitMix64(rng) % max_resend_delay);
      resends.push_back({n + delay, org % partitions, subject, payload});
      next_resend_due = std::min(next_resend_due, n + delay);
      if (!send_due_resends(n)) return produce_error;
    }
    if (options.rate > 0 && result.produced % 500 == 0) {
      // Pace to the requested rate: sleep until this many events are due.
      const absl::Time due =
          start + absl::Seconds(static_cast<double>(result.produced) / options.rate);
      if (due > absl::Now()) absl::SleepFor(due - absl::Now());
    }
    if (options.progress && absl::Now() - last_progress >= absl::Seconds(1)) {
      options.progress(result.produced, options.events);
      last_progress = absl::Now();
    }
  }
  // Re-sends still due go out now (unless stopped early).
  if (!StopRequested() && !send_due_resends(INT64_MAX - 1)) return produce_error;
  // Wait for every delivery report, bounded.
  RETURN_IF_ERROR(producer->Flush(absl::Seconds(120)));
  result.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  result.interrupted = StopRequested();
  return result;
}

std::string SummaryJson(const LoadgenResult& result) {
  auto object = [](const std::map<std::string, int64_t>& m) {
    std::string out = "{";
    for (const auto& [k, v] : m)
      absl::StrAppend(&out, out.size() > 1 ? "," : "", "\"", k, "\":", v);
    return out + "}";
  };
  return absl::StrFormat(
      R"({"interrupted":%s,"produced":%d,"valid":%d,"malformed":%d,"duplicates":%d,"distinct_keys":%d,"seconds":%.3f,"events_per_second":%.0f,"quantity_by_meter":%s,"malformed_by_reason":%s})",
      result.interrupted ? "true" : "false", result.produced, result.valid, result.malformed,
      result.duplicates, result.totals.size(), result.seconds,
      result.seconds > 0 ? result.produced / result.seconds : 0.0, object(result.quantity_by_meter),
      object(result.malformed_by_reason));
}

absl::Status WriteExpectedCsv(const LoadgenResult& result, const std::string& path) {
  std::ofstream out(path);
  if (!out) return absl::InvalidArgumentError(absl::StrCat("cannot write ", path));
  out << "org_id,meter,industry,usage_date,quantity\n";
  for (const auto& [key, quantity] : result.totals) {
    const auto& [org, meter, industry, day] = key;
    out << org << ',' << meter << ',' << industry << ',' << day << ',' << quantity << '\n';
  }
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("write failed: ", path));
  return absl::OkStatus();
}

absl::StatusOr<ExpectedTotals> ReadExpectedCsv(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  ExpectedTotals totals;
  std::string line;
  std::getline(in, line);  // Header.
  while (std::getline(in, line)) {
    std::vector<std::string> f = absl::StrSplit(line, ',');
    if (f.size() != 5) return absl::DataLossError(absl::StrCat("bad line in ", path, ": ", line));
    totals[{f[0], f[1], f[2], f[3]}] = std::stoll(f[4]);
  }
  return totals;
}

}  // namespace meterd::devtools
