#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/hash/hash.h"
#include "lib/event/event_parser.h"
#include "lib/event/usage_event.h"

namespace meterd::aggregate {

// One usage bucket: (org, meter, industry, UTC day). 24 bytes, hashed as raw bytes.
struct CounterKey {
  event::OrgId org;
  int32_t day = 0;
  event::MeterId meter = 0;
  event::Industry industry = event::Industry::kHomeServices;
  uint8_t padding = 0;  // Always zero so byte-wise hashing and equality are sound.

  static CounterKey Of(const event::UsageEvent& e) {
    return CounterKey{e.org, e.UsageDay(), e.meter, e.industry, 0};
  }
  friend bool operator==(const CounterKey& a, const CounterKey& b) {
    return std::memcmp(&a, &b, sizeof(CounterKey)) == 0;
  }
  friend bool operator<(const CounterKey& a, const CounterKey& b) {
    return std::memcmp(&a, &b, sizeof(CounterKey)) < 0;
  }
  template <typename H>
  friend H AbslHashValue(H h, const CounterKey& key) {
    uint64_t words[3];
    std::memcpy(words, &key, sizeof(words));
    return H::combine(std::move(h), words[0], words[1], words[2]);
  }
};
static_assert(sizeof(CounterKey) == 24);

// A key with its hash already computed: PrefetchingAdder hashes each event's key once, for
// both the prefetch and the add.
struct PrehashedCounterKey {
  const CounterKey* key;
  size_t hash;
};

// CounterMap's hash and equality, transparent so the map accepts a PrehashedCounterKey.
struct CounterKeyHash {
  using is_transparent = void;
  size_t operator()(const CounterKey& key) const { return absl::Hash<CounterKey>{}(key); }
  size_t operator()(const PrehashedCounterKey& key) const { return key.hash; }
};
struct CounterKeyEq {
  using is_transparent = void;
  bool operator()(const CounterKey& a, const CounterKey& b) const { return a == b; }
  bool operator()(const CounterKey& a, const PrehashedCounterKey& b) const { return a == *b.key; }
  bool operator()(const PrehashedCounterKey& a, const CounterKey& b) const { return *a.key == b; }
};

using CounterMap = absl::flat_hash_map<CounterKey, int64_t, CounterKeyHash, CounterKeyEq>;

// A refused event kept for shared.rejected_events. Raw bytes are capped at kMaxRawBytes.
struct RejectedEvent {
  static constexpr size_t kMaxRawBytes = 4096;
  int64_t offset = 0;
  event::RejectReason reason = event::RejectReason::kNotJson;
  std::string detail;
  std::string raw;
  bool truncated = false;
};

// Unflushed state of one partition: the deltas since the last seal and the offsets they cover.
// Owned by the shard that owns the partition; touched only on that shard's thread.
struct PartitionCounters {
  CounterMap counters;
  std::vector<RejectedEvent> rejected;
  int64_t events = 0;   // Events counted (added to `counters`).
  int64_t refused = 0;  // Events refused (in `rejected`; a batch_rejected row holds many).

  void Add(const event::UsageEvent& e) { Add(CounterKey::Of(e), e.quantity); }
  void Add(const CounterKey& key, int64_t quantity) {
    counters[key] += quantity;
    ++events;
  }
  void Reject(int64_t offset, event::RejectReason reason, std::string_view detail,
              std::string_view raw);
  // A message whose batch had more than kMaxRejectionsPerMessage refused elements: ONE row
  // (reason batch_rejected, the counts per reason in its detail, the message's first bytes),
  // so a poison message costs one row and bounded memory, not one row per element.
  static constexpr size_t kMaxRejectionsPerMessage = 100;
  void RejectMessage(int64_t offset, const std::vector<event::Rejection>& rejections,
                     size_t elements, std::string_view raw);
  // Raw bytes held by `rejected`: counted toward the shard's memory bound.
  size_t rejected_bytes = 0;
  bool empty() const { return counters.empty() && rejected.empty() && events == 0 && refused == 0; }
};

// Adds events one message late, after prefetching their counter slots, so the cache miss on
// a big map overlaps the parsing of the next message (parse+aggregate at 90k live keys:
// median of 7 repetitions 2.84M vs 2.74M events/s, bench/parse_aggregate_benchmark). Owned by one
// shard thread. Apply() before anything reads or moves the counters (the shard applies at the end
// of every batch).
class PrefetchingAdder {
 public:
  void Stage(PartitionCounters* target, const event::UsageEvent& e) {
    Staged& s = staged_.emplace_back();
    s.target = target;
    s.key = CounterKey::Of(e);
    s.hash = CounterKeyHash{}(s.key);
    s.quantity = e.quantity;
    target->counters.prefetch(PrehashedCounterKey{&s.key, s.hash});
  }
  void Apply() {
    for (const Staged& s : staged_) {
      CounterMap& counters = s.target->counters;
      if (auto it = counters.find(PrehashedCounterKey{&s.key, s.hash}); it != counters.end()) {
        it->second += s.quantity;
        ++s.target->events;
      } else {
        s.target->Add(s.key, s.quantity);  // A new key: hashed again, once per key and seal.
      }
    }
    staged_.clear();
  }

 private:
  struct Staged {
    PartitionCounters* target;
    CounterKey key;
    size_t hash;
    int64_t quantity;
  };
  std::vector<Staged> staged_;
};

// One key's delta as a compacted sealed partition holds it: 32 bytes.
using CounterRow = std::pair<CounterKey, int64_t>;

// Sealed deltas of one partition, handed from a shard to the flusher. The flusher commits them
// only if Postgres still says the partition's next offset is `expected_offset` (the CAS fence).
struct SealedPartition {
  static constexpr int64_t kNoStoredOffset = -1;  // No row in shared.ingest_offsets yet.

  int32_t partition = 0;
  int64_t expected_offset = kNoStoredOffset;
  int64_t next_offset = 0;
  int64_t oldest_timestamp_ms = -1;  // Kafka timestamp of the oldest message counted (-1: none).
  PartitionCounters deltas;
  // The counters once Compact() has moved them out of `deltas.counters`: sorted by key, one
  // row per key, exactly 32 bytes per key where the map holds 38-75 (its load factor).
  std::vector<CounterRow> rows = {};

  size_t keys() const { return rows.size() + deltas.counters.size(); }
  // Calls f(key, quantity) for every delta, compacted or not; a key is visited once per form
  // that holds it.
  template <typename F>
  void ForEachDelta(F&& f) const {
    for (const auto& [key, quantity] : rows) f(key, quantity);
    for (const auto& [key, quantity] : deltas.counters) f(key, quantity);
  }
};

// Moves p's counter map into p.rows (merged with rows already there) and frees the map: what
// the flusher does to every sealed partition, so deltas waiting for Postgres (a long flush, an
// outage) cost 32 bytes per key while the shards fill the next interval's maps.
void Compact(SealedPartition& p);

// Folds `later` (sealed after `earlier`, same partition) into `earlier`: the deltas add up
// (compacted), the fence stays at the earlier expected offset and the end moves to the later
// next offset.
void MergeInto(SealedPartition& earlier, SealedPartition&& later);

// Calls f(key, quantity) for every delta of `batch`: the compacted partitions' rows merged
// into one key order (a heap over the partitions' sorted rows, no copy), each key once with its
// quantities summed across partitions; then any counters not compacted, in map order.
void ForEachDeltaInKeyOrder(const std::vector<SealedPartition>& batch,
                            absl::FunctionRef<void(const CounterKey&, int64_t)> f);

// Sums deltas per key over every partition in `batch`, compacted or not: distinct rows sorted by
// key, so writers that upsert them lock rows in the same order (the replay of rejected events).
std::vector<CounterRow> DistinctRows(const std::vector<SealedPartition>& batch);

}  // namespace meterd::aggregate
