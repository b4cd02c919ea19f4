// libFuzzer target for what Kafka hands meterd: the event parser on any bytes, and CloudEvents
// binary content mode (headers + value) turned into a structured event and parsed.
// Built by deploy/fuzz.sh with clang (-fsanitize=fuzzer,address,undefined); besides the
// sanitizers it checks what the shard relies on:
//   - every input is either counted or refused: at least one event or one rejection;
//   - a rejection's `raw` is bytes of the input (the shard stores it as the refused event);
//   - a counted event has a known meter, a quantity within the meter's maximum, a time inside
//     the accepted window, a non-empty id and source.
// The first input byte picks the mode: even = structured, odd = binary, where the rest is
// "name\0value\0name\0value\0...\0\0data".
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/time/time.h"
#include "lib/event/binary_mode.h"
#include "lib/event/event_parser.h"

namespace {

using meterd::event::EventParser;
using meterd::event::MeterRegistry;

// The clock proto/examples assume.
const absl::Time kNow = absl::FromUnixSeconds(1'795'687'200);  // 2026-11-26T10:00:00Z

[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "event_parser_fuzz: invariant broken: %s\n", what);
  std::abort();
}

void Check(std::string_view input, const meterd::event::ParsedMessage& parsed,
           const MeterRegistry& meters) {
  if (parsed.events.empty() && parsed.rejections.empty()) Fail("input neither counted nor refused");
  size_t checked = 0;
  for (const auto& r : parsed.rejections) {
    // It may point into the parser's padded copy: compare bytes (the first few, bounded cost).
    if (checked++ < 16 && input.find(r.raw) == std::string_view::npos) {
      Fail("rejection raw bytes are not bytes of the input");
    }
    if (r.detail.empty()) Fail("rejection without a detail");
  }
  const int64_t now_micros = absl::ToUnixMicros(kNow);
  for (const auto& e : parsed.events) {
    if (meters.Name(e.meter).empty()) Fail("event with an unknown meter");
    if (e.quantity < 0 || e.quantity > meters.MaxQuantity(e.meter)) Fail("quantity out of range");
    if (e.time_micros > now_micros + absl::ToInt64Microseconds(absl::Minutes(5))) {
      Fail("event time in the future accepted");
    }
    if (e.time_micros < now_micros - absl::ToInt64Microseconds(absl::Hours(24 * 62))) {
      Fail("event time older than the late window accepted");
    }
    if (e.id.empty() || e.source.empty()) Fail("event without id or source");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const MeterRegistry meters = MeterRegistry::Defaults();
  static EventParser parser(&meters, {});
  if (size == 0) return 0;
  const std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] % 2 == 0) {
    Check(rest, parser.Parse(rest, kNow), meters);
    return 0;
  }
  // Binary mode: headers up to an empty name, then the value.
  std::vector<std::pair<std::string_view, std::string_view>> headers;
  size_t at = 0;
  while (at < rest.size()) {
    const size_t name_end = rest.find('\0', at);
    if (name_end == std::string_view::npos || name_end == at) {
      at = name_end == std::string_view::npos ? rest.size() : name_end + 1;
      break;
    }
    const size_t value_end = rest.find('\0', name_end + 1);
    const size_t stop = value_end == std::string_view::npos ? rest.size() : value_end;
    headers.emplace_back(rest.substr(at, name_end - at),
                         rest.substr(name_end + 1, stop - name_end - 1));
    at = stop + 1;
  }
  const std::string_view value = at < rest.size() ? rest.substr(at) : std::string_view();
  std::string structured;
  if (meterd::event::StructuredFromBinary(headers, value, &structured)) {
    Check(structured, parser.Parse(structured, kNow), meters);
  }
  return 0;
}
