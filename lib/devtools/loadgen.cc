#include "lib/devtools/loadgen.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
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

absl::Status ValidateOptions(const LoadgenOptions& options) {
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
  return absl::OkStatus();
}

// One generated event: what it counts for and the bytes that go out.
struct SyntheticEvent {
  int org;                   // Index: LoadgenOrgId(seed, org).
  std::string_view subject;  // The org id's text: the Kafka key, whatever the payload says.
  std::string_view industry;
  const char* meter;
  int64_t quantity;
  int64_t micros;
  std::string_view reason;  // Why meterd must reject it; empty for a valid event.
  std::string payload;
  std::optional<int64_t> resend_delay;  // Re-sent byte for byte this many events later.
};

// The text fields of an event's CloudEvent, before a malformed kind spoils one of them.
struct CloudEventText {
  std::string meter, subject, industry, quantity, time;
  bool omit_subject = false;
};

// Spoils `text` as `kind` says; returns the reason meterd must give.
std::string_view Spoil(Malformed kind, int64_t now_micros, CloudEventText* text) {
  switch (kind) {
    case Malformed::kNotJson:
      return "not_json";  // The caller cuts the formatted payload in half.
    case Malformed::kUnknownMeter:
      text->meter = "teleports";
      return "unknown_meter";
    case Malformed::kBadOrg:
      text->subject = "org-" + text->subject.substr(0, 8);
      return "bad_org_id";
    case Malformed::kBadQuantity:
      text->quantity = "-5";
      return "bad_quantity";
    case Malformed::kBadIndustry:
      text->industry = "mining";
      return "bad_industry";
    case Malformed::kMissingSubject:
      text->omit_subject = true;
      return "missing_field";
    case Malformed::kFuture:
      text->time = FormatTime(now_micros + 86'400'000'000LL);
      return "time_in_future";
    case Malformed::kBadTime:
      text->time = "yesterday";
      return "bad_time";
    case Malformed::kCount:
      break;
  }
  return {};
}

// Draws each event from one SplitMix64 stream seeded by --seed; the order of the draws is what
// makes a seed reproduce the same events, ids and re-send schedule, so keep it. Used only on
// the loadgen thread.
class EventSynthesizer {
 public:
  // `org_text[i]` is LoadgenOrgId(seed, i) as text; event times fall in the --days before
  // `now_micros`.
  EventSynthesizer(const LoadgenOptions& options, std::vector<std::string> org_text,
                   int64_t now_micros)
      : options_(options),
        rng_(options.seed),
        now_micros_(now_micros),
        // A minute of margin so every event stays inside the consumer's accepted window.
        span_micros_(options.days * 86'400'000'000LL - 60'000'000),
        max_resend_delay_(std::max<int64_t>(1, options.events / 5)),
        org_text_(std::move(org_text)) {}

  SyntheticEvent Next() {
    SyntheticEvent e;
    e.org = static_cast<int>(SplitMix64(rng_) % options_.orgs);
    const uint64_t r = SplitMix64(rng_);
    const int meter = r % 10 < 8 ? 0 : (r % 10 == 8 ? 1 : 2);
    e.meter = kMeters[meter];
    e.quantity = meter == 2 ? 1 + static_cast<int64_t>((r >> 8) % 3) : 1;
    e.micros = now_micros_ - 60'000'000 -
               static_cast<int64_t>((r >> 16) % static_cast<uint64_t>(span_micros_));
    e.subject = org_text_[e.org];
    e.industry = event::IndustryCode(LoadgenIndustry(e.org));
    const bool malformed =
        options_.malformed_share > 0 &&
        static_cast<double>(SplitMix64(rng_) % 1'000'000) < options_.malformed_share * 1e6;
    const uint64_t id_hi = SplitMix64(rng_), id_lo = SplitMix64(rng_);

    CloudEventText text{e.meter, std::string(e.subject), std::string(e.industry),
                        absl::StrCat(e.quantity), FormatTime(e.micros)};
    Malformed kind = Malformed::kCount;
    if (malformed) {
      kind = static_cast<Malformed>(malformed_kind_++ % static_cast<int>(Malformed::kCount));
      e.reason = Spoil(kind, now_micros_, &text);
    }
    e.payload = absl::StrFormat(
        R"({"specversion":"1.0","id":"%016x%016x","source":"%s/loadgen","type":"%s",%s"time":"%s","datacontenttype":"application/json","data":{"quantity":%s,"industry":"%s"}})",
        id_hi, id_lo, e.industry, text.meter,
        text.omit_subject ? std::string() : absl::StrCat("\"subject\":\"", text.subject, "\","),
        text.time, text.quantity, text.industry);
    if (kind == Malformed::kNotJson) e.payload.resize(e.payload.size() / 2);

    if (!malformed && options_.duplicate_share > 0 &&
        static_cast<double>(SplitMix64(rng_) % 1'000'000) < options_.duplicate_share * 1e6) {
      // Half go out right after the original, the rest up to a fifth of the run later.
      e.resend_delay = SplitMix64(rng_) % 2 == 0
                           ? 0
                           : static_cast<int64_t>(SplitMix64(rng_) % max_resend_delay_);
    }
    return e;
  }

 private:
  const LoadgenOptions& options_;
  uint64_t rng_;
  const int64_t now_micros_;
  const int64_t span_micros_;
  const int64_t max_resend_delay_;
  std::vector<std::string> org_text_;
  int malformed_kind_ = 0;  // Kinds come in turn, one of each.
};

// Sends events through one kafka::Producer and re-sends the duplicates when due. Used only on
// the loadgen thread.
class EventSender {
 public:
  static absl::StatusOr<std::unique_ptr<EventSender>> Create(const LoadgenOptions& options) {
    kafka::Properties properties = {{"bootstrap.servers", options.brokers},
                                    {"linger.ms", "20"},
                                    {"batch.num.messages", "10000"},
                                    {"queue.buffering.max.messages", "500000"},
                                    {"message.timeout.ms", "120000"}};
    properties.insert(properties.end(), options.kafka_properties.begin(),
                      options.kafka_properties.end());
    ASSIGN_OR_RETURN(std::unique_ptr<kafka::Producer> producer,
                     kafka::Producer::Create(properties));
    absl::StatusOr<int> partitions = kafka::PartitionCount(producer->handle(), options.brokers,
                                                           options.topic, absl::Seconds(15));
    if (!partitions.ok()) {
      return absl::UnavailableError(absl::StrCat("cannot read partitions of topic '", options.topic,
                                                 "': ", partitions.status().message()));
    }
    return std::unique_ptr<EventSender>(
        new EventSender(std::move(producer), options.topic, *partitions));
  }

  // Sends event number `n`, then the re-sends due by then (its own, if due at once).
  absl::Status Send(int64_t n, const SyntheticEvent& event) {
    // Org i always goes to partition i % partitions: one org stays on one partition (as keying
    // by org guarantees), and orgs spread evenly, so no partition outgrows the embedded
    // broker's per-partition retention before the others.
    const int partition = event.org % partitions_;
    RETURN_IF_ERROR(producer_->Send(topic_, partition, event.subject, event.payload));
    RETURN_IF_ERROR(SendDueResends(n));
    if (!event.resend_delay) return absl::OkStatus();
    const int64_t due = n + *event.resend_delay;
    resends_.push_back({due, partition, std::string(event.subject), event.payload});
    next_resend_due_ = std::min(next_resend_due_, due);
    return SendDueResends(n);
  }

  // Sends the re-sends still waiting (unless `stopped` early), then waits, bounded, for every
  // delivery report.
  absl::Status Finish(bool stopped) {
    if (!stopped) RETURN_IF_ERROR(SendDueResends(INT64_MAX - 1));
    return producer_->Flush(absl::Seconds(120));
  }

  int64_t resent() const { return resent_; }

 private:
  struct Resend {
    int64_t due;  // Sent once this many events have been produced.
    int partition;
    std::string key;
    std::string payload;
  };

  EventSender(std::unique_ptr<kafka::Producer> producer, std::string topic, int partitions)
      : producer_(std::move(producer)), topic_(std::move(topic)), partitions_(partitions) {}

  absl::Status SendDueResends(int64_t produced_so_far) {
    if (produced_so_far < next_resend_due_) return absl::OkStatus();
    next_resend_due_ = INT64_MAX;
    for (size_t i = 0; i < resends_.size();) {
      if (resends_[i].due <= produced_so_far) {
        RETURN_IF_ERROR(
            producer_->Send(topic_, resends_[i].partition, resends_[i].key, resends_[i].payload));
        ++resent_;
        resends_[i] = std::move(resends_.back());
        resends_.pop_back();
      } else {
        next_resend_due_ = std::min(next_resend_due_, resends_[i].due);
        ++i;
      }
    }
    return absl::OkStatus();
  }

  std::unique_ptr<kafka::Producer> producer_;
  std::string topic_;
  int partitions_;
  std::vector<Resend> resends_;  // Unordered; scanned only when one is due.
  int64_t next_resend_due_ = INT64_MAX;
  int64_t resent_ = 0;
};

// Paces to --rate and reports progress about once a second. Used only on the loadgen thread.
class Pacer {
 public:
  Pacer(const LoadgenOptions& options, absl::Time start)
      : options_(options), start_(start), last_progress_(start) {}

  void AfterEvent(int64_t produced) {
    if (options_.rate > 0 && produced % 500 == 0) {
      // Sleep until this many events are due.
      const absl::Time due = start_ + absl::Seconds(static_cast<double>(produced) / options_.rate);
      if (due > absl::Now()) absl::SleepFor(due - absl::Now());
    }
    if (options_.progress && absl::Now() - last_progress_ >= absl::Seconds(1)) {
      options_.progress(produced, options_.events);
      last_progress_ = absl::Now();
    }
  }

 private:
  const LoadgenOptions& options_;
  const absl::Time start_;
  absl::Time last_progress_;
};

// Counts a produced event; a valid one adds to the expected totals.
void Record(const SyntheticEvent& event, LoadgenResult* result) {
  ++result->produced;
  if (!event.reason.empty()) {
    ++result->malformed;
    ++result->malformed_by_reason[std::string(event.reason)];
    return;
  }
  ++result->valid;
  result->quantity_by_meter[event.meter] += event.quantity;
  const int32_t day = static_cast<int32_t>(event.micros / 86'400'000'000LL);
  result->totals[{std::string(event.subject), event.meter, std::string(event.industry),
                  event::DayToIsoDate(day)}] += event.quantity;
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
  RETURN_IF_ERROR(ValidateOptions(options));
  ASSIGN_OR_RETURN(std::unique_ptr<EventSender> sender, EventSender::Create(options));
  std::vector<std::string> org_text(options.orgs);
  for (int i = 0; i < options.orgs; ++i) {
    org_text[i] = event::OrgIdToString(LoadgenOrgId(options.seed, i));
  }
  const absl::Time start = absl::Now();
  EventSynthesizer synthesizer(options, std::move(org_text), absl::ToUnixMicros(start));
  Pacer pacer(options, start);
  LoadgenResult result;
  for (int64_t n = 0; n < options.events && !StopRequested(); ++n) {
    const SyntheticEvent event = synthesizer.Next();
    RETURN_IF_ERROR(sender->Send(n, event));
    Record(event, &result);
    pacer.AfterEvent(result.produced);
  }
  RETURN_IF_ERROR(sender->Finish(/*stopped=*/StopRequested()));
  result.duplicates = sender->resent();
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
