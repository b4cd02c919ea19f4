#pragma once

#include <memory>
#include <string_view>
#include <vector>

#include "absl/time/time.h"
#include "lib/event/usage_event.h"

namespace meterd::event {

struct ParseLimits {
  // Events stamped further ahead of the consumer's clock than this are refused.
  absl::Duration max_future_skew = absl::Minutes(5);
  // Events older than this are refused: their billing period is long closed.
  absl::Duration late_window = absl::Hours(24 * 62);
};

struct Rejection {
  RejectReason reason;
  std::string_view detail;    // Static text naming the field or problem.
  std::string_view raw = {};  // The refused bytes (the whole message, or one batch element).
};

// Everything one Kafka message contained. Reused across calls: no allocation in steady state.
struct ParsedMessage {
  std::vector<UsageEvent> events;
  std::vector<Rejection> rejections;
};

// CloudEvents JSON (one object, or a batch array) → UsageEvents or rejections, with simdjson
// On-Demand. Owned by one shard thread; not thread-safe. Views in the result point into this
// parser's buffers and are valid until the next Parse. `meters` may grow and change its
// maxima while the parser runs (another thread writes it; see MeterRegistry): each event
// sees the registry as it is when that event's meter is looked up.
class EventParser {
 public:
  EventParser(const MeterRegistry* meters, ParseLimits limits);
  ~EventParser();
  EventParser(const EventParser&) = delete;
  EventParser& operator=(const EventParser&) = delete;

  // One Kafka message: an event, or a batch when the first non-space byte is '['.
  const ParsedMessage& Parse(std::string_view bytes, absl::Time now);
  // Exactly one event, never a batch: what a batch element is parsed as (an array is
  // not_object). For re-reading a stored rejection's raw bytes when they were one element.
  const ParsedMessage& ParseElement(std::string_view bytes, absl::Time now);

 private:
  struct SimdParsers;  // simdjson's types stay out of this header.
  // Copies `bytes` into the padded buffer simdjson reads and clears the result.
  std::string_view CopyPadded(std::string_view bytes);
  // A message whose first non-space byte is '[': each element is one event.
  void ParseBatch(std::string_view padded_bytes, absl::Time now);

  const MeterRegistry* meters_;
  ParseLimits limits_;
  std::unique_ptr<SimdParsers> parsers_;
  std::unique_ptr<char[]> buffer_;
  size_t buffer_capacity_ = 0;
  ParsedMessage result_;
};

// RFC 3339 date-time ("2026-11-26T08:00:00.123Z", offsets allowed) → Unix micros.
std::optional<int64_t> ParseRfc3339Micros(std::string_view text);

}  // namespace meterd::event
