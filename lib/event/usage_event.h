#pragma once

#include <array>
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

// Meter names known to this process (from shared.meters). Immutable after load; shared by shards.
// A handful of meters: a linear scan of short strings is faster than hashing the name.
class MeterRegistry {
 public:
  // The three meters seeded by the first migration; what the loader starts from.
  static MeterRegistry Defaults();
  void Add(MeterId id, std::string name);
  std::optional<MeterId> Find(std::string_view name) const;
  std::string_view Name(MeterId id) const;
  size_t size() const { return meters_.size(); }

 private:
  std::vector<std::pair<std::string, MeterId>> meters_;
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
};
std::string_view RejectReasonCode(RejectReason reason);
std::optional<RejectReason> ParseRejectReason(std::string_view code);

// Days since epoch for a proleptic Gregorian date (Howard Hinnant's algorithm).
int64_t DaysFromCivil(int64_t year, unsigned month, unsigned day);
// Inverse, as "YYYY-MM-DD".
std::string DayToIsoDate(int32_t day);

}  // namespace meterd::event
