#pragma once

#include <cstdint>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "lib/aggregate/counters.h"
#include "lib/event/usage_event.h"

namespace meterd::store {

struct FencedPartition {
  int32_t partition;
  int64_t stored_offset;  // What Postgres holds; SealedPartition::kNoStoredOffset if no row.
};

struct FlushOutcome {
  // Non-empty means the transaction was rolled back: these partitions failed the offset CAS.
  std::vector<FencedPartition> fenced;
  size_t rows_written = 0;  // Delta rows appended to shared.api_usage_deltas.
};

// The seam between the flusher and Postgres; tests substitute it to inject faults.
// One writer is used by one thread at a time (the flusher holds its lock).
class FlushWriter {
 public:
  virtual ~FlushWriter() = default;

  // Writes a batch in ONE transaction: CAS-advance every partition's next offset, append the
  // distinct counter rows to the usage delta log, insert rejected events. If any CAS misses,
  // nothing is written and the fenced partitions are returned. Unavailable means retry later
  // (nothing is known committed only if the error came before COMMIT; an ambiguous commit is
  // resolved by the CAS on the retry).
  virtual absl::StatusOr<FlushOutcome> Write(
      const std::vector<aggregate::SealedPartition>& batch) = 0;

  // Stored next offsets of the writer's (group, topic), by partition.
  virtual absl::StatusOr<absl::flat_hash_map<int32_t, int64_t>> LoadOffsets() = 0;

  // Brings the writer's MeterRegistry (the one the shards' parsers read) up to shared.meters:
  // new meters are published, changed max_event_quantity values applied. Called by the flusher
  // every tick, outside any flush transaction; the registry has one writer, this caller.
  virtual absl::Status RefreshMeters() = 0;
};

}  // namespace meterd::store
