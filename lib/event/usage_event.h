#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace meterd::event {

// Organization UUID as its 16 bytes: compared and hashed without string copies.
struct OrgId {
  std::array<uint8_t, 16> bytes{};
  friend bool operator==(const OrgId&, const OrgId&) = default;
  friend auto operator<=>(const OrgId&, const OrgId&) = default;
  template <typename H>
  friend H AbslHashValue(H h, const OrgId& id) {
    return H::combine_contiguous(std::move(h), id.bytes.data(), id.bytes.size());
  }
};

// Parses the canonical 8-4-4-4-12 hex form (either case). nullopt if malformed.
std::optional<OrgId> ParseOrgId(std::string_view text);
// Canonical lowercase form, 36 characters, written to out (which must hold 36).
void FormatOrgId(const OrgId& id, char* out);
std::string OrgIdToString(const OrgId& id);

enum class Industry : uint8_t { kHomeServices, kRestaurant, kAuto, kRetail, kEducation, kPayroll };
inline constexpr int kIndustryCount = 6;
std::optional<Industry> ParseIndustry(std::string_view code);
// The code used in events and SQL: hs, rest, auto, ret, edu, payroll.
std::string_view IndustryCode(Industry industry);

using MeterId = uint16_t;

// Meters known to this process (shared.meters), able to grow while shards read it.
//
// Thread rules: ONE writer (the flusher thread, through FlushWriter::RefreshMeters, or the
// loader before any reader exists) calls Add; any number of readers (the shard threads'
// parsers) call Find, Lookup, Name, MaxQuantity and size concurrently, with no lock and no
// allocation. Slots are append-only in a fixed array: a slot's id and name are written before
// the size that publishes it (release store, read with an acquire load) and never change
// afterwards, so a reader holding a name view or an id keeps a valid one. Only the maximum
// quantity of a published slot may change (an atomic). Copying is for set-up and tests: it is
// not safe while the writer runs.
//
// A handful of meters: a linear scan of short names is faster than hashing the name.
class MeterRegistry {
 public:
  // Meters beyond this are refused by Add (logged by the loader); far above any catalogue.
  static constexpr size_t kCapacity = 256;
  // shared.meters CHECK: ^[a-z][a-z0-9_]{0,62}$.
  static constexpr size_t kMaxNameLength = 63;
  // The most one event may carry (also the ceiling of shared.meters.max_event_quantity): keeps
  // a day's int64 sum from overflowing whatever producers send.
  static constexpr int64_t kMaxEventQuantity = 1'000'000'000;

  enum class AddResult {
    kAdded,      // A new slot was published.
    kUpdated,    // Known meter; its maximum quantity changed.
    kUnchanged,  // Known meter, same maximum.
    kConflict,   // The id is known under another name, or the name under another id: ignored.
    kFull,       // kCapacity meters already: ignored.
    kInvalid,    // Empty or too long a name, or a maximum outside [1, kMaxEventQuantity].
  };

  // What the parser needs from one scan: the id and the current per-event maximum.
  struct Match {
    MeterId id;
    int64_t max_quantity;
  };

  MeterRegistry() = default;
  MeterRegistry(const MeterRegistry& other);
  MeterRegistry& operator=(const MeterRegistry& other);

  // The three meters seeded by the first migration; what the loader starts from.
  static MeterRegistry Defaults();
  // Writer only. Publishes a new meter, or updates a known meter's maximum quantity. A name
  // never changes once published: a rename or an id clash is reported, not applied.
  AddResult Add(MeterId id, std::string_view name, int64_t max_quantity = kMaxEventQuantity);

  std::optional<MeterId> Find(std::string_view name) const;
  std::optional<Match> Lookup(std::string_view name) const;
  // Empty if the id is unknown. The view stays valid for the registry's lifetime.
  std::string_view Name(MeterId id) const;
  // The meter's current per-event maximum; 0 if the id is unknown.
  int64_t MaxQuantity(MeterId id) const;
  size_t size() const { return size_.load(std::memory_order_acquire); }

 private:
  struct Slot {
    MeterId id = 0;
    uint8_t length = 0;
    char name[kMaxNameLength] = {};
    std::atomic<int64_t> max_quantity{kMaxEventQuantity};
  };
  const Slot* FindSlot(std::string_view name) const;
  const Slot* FindSlot(MeterId id) const;

  std::array<Slot, kCapacity> slots_;
  std::atomic<size_t> size_{0};
};

// One billable action, as read from a CloudEvent. String views point into the parser's buffer
// and are valid until the next Parse call.
struct UsageEvent {
  OrgId org;
  MeterId meter = 0;
  Industry industry = Industry::kHomeServices;
  int64_t quantity = 1;
  int64_t time_micros = 0;  // Unix epoch, UTC.
  // As written in the JSON string, escapes not decoded (meterd never interprets them).
  std::string_view id;
  std::string_view source;

  // UTC day number since 1970-01-01: the usage bucket.
  int32_t UsageDay() const;
};

// Why an event was refused. Stable snake_case codes are stored in shared.rejected_events.reason.
enum class RejectReason : uint8_t {
  kNotJson,
  kNotObject,
  kEmptyBatch,
  kMissingField,
  kWrongType,
  kBadSpecVersion,
  kUnknownMeter,
  kBadOrgId,
  kBadIndustry,
  kBadQuantity,
  kBadTime,
  kTimeInFuture,
  kTimeTooOld,
  kQuantityTooLarge,  // Above the meter's shared.meters.max_event_quantity.
  // One row for a batch message with many refused elements (the shard's summary: counts per
  // reason in the detail); never produced by the parser for one event.
  kBatchRejected,
  // Not an event: a range of the partition's log meterd could not read (deleted by retention
  // before it was consumed, or the topic recreated under a stored offset). Offset and detail
  // name the range; written by the shard, never by the parser.
  kOffsetGap,
};
inline constexpr int kRejectReasonCount = static_cast<int>(RejectReason::kOffsetGap) + 1;
std::string_view RejectReasonCode(RejectReason reason);
std::optional<RejectReason> ParseRejectReason(std::string_view code);

// Days since 1970-01-01 for a proleptic Gregorian date (absl::CivilDay; an impossible date
// normalizes, so 2026-02-30 is 2026-03-02). Not on the per-event path: set-up and tests.
int64_t DaysFromCivil(int64_t year, unsigned month, unsigned day);
// Inverse, as "YYYY-MM-DD".
std::string DayToIsoDate(int32_t day);

}  // namespace meterd::event
