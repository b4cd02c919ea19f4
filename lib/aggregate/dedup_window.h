#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/time/time.h"
#include "lib/event/usage_event.h"

namespace meterd::aggregate {

struct DedupLimits {
  // Ids remembered per partition; the oldest is forgotten first. Bounds memory: about
  // kBytesPerId bytes each (measured in tests/aggregate/dedup_window_test.cc).
  size_t max_ids = 100'000;
  // An id sent this much earlier than the newest message of the partition is forgotten even
  // below max_ids (a re-send that late is a new event). Measured on the Kafka message
  // timestamp, not the event's own time: late data carries old event times, and its re-send
  // a second later must still be caught.
  absl::Duration window = absl::Hours(24);
};

// The (org, source, id) of the events one partition counted recently, so that a producer's
// re-send of the same CloudEvent is counted once. The org (the event's subject) is part of
// the key: CloudEvents makes (source, id) unique per producer, and producers of different
// orgs (HTTP ingest lets each tenant choose both) must not cancel each other's events. Remembers a
// 64-bit fingerprint per event (a false match needs two different ids with the same 64-bit hash
// within the window: about max_ids / 2^64 per event). Owned by the shard that owns the partition;
// touched only on that shard's thread. No allocation per event once the ring has grown to max_ids.
class DedupWindow {
 public:
  static constexpr size_t kBytesPerId = 40;  // Upper bound: ring entry + hash-set slot.

  explicit DedupWindow(DedupLimits limits) : limits_(limits) {}

  // The 64-bit key an event is remembered by. Stable within the process, which is all a
  // window rebuilt on every assignment (or one replay run) needs.
  static uint64_t Fingerprint(const event::OrgId& org, std::string_view source,
                              std::string_view id);

  // True if the pair was counted within the window: a duplicate, not to be counted again.
  // Otherwise remembers it, sent at `sent_micros`, and returns false.
  bool SeenOrRemember(const event::OrgId& org, std::string_view source, std::string_view id,
                      int64_t sent_micros);
  // Forgets everything (the partition's deltas were dropped and will be read again).
  void Clear();
  size_t size() const { return count_; }
  size_t capacity_bytes() const;

 private:
  struct Entry {
    uint64_t fingerprint;
    int64_t time_micros;
  };
  void EvictOlderThan(int64_t cutoff_micros);
  void PopOldest();

  DedupLimits limits_;
  absl::flat_hash_set<uint64_t> seen_;
  std::vector<Entry> ring_;  // Arrival order; grows to max_ids, then wraps.
  size_t head_ = 0;          // Oldest entry.
  size_t count_ = 0;
  int64_t newest_micros_ = INT64_MIN;
};

}  // namespace meterd::aggregate
