#include "lib/event/usage_event.h"

#include <cstdio>

#include "absl/strings/str_format.h"

namespace meterd::event {
namespace {

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

constexpr std::string_view kIndustryCodes[kIndustryCount] = {"hs",  "rest", "auto",
                                                             "ret", "edu",  "payroll"};

constexpr std::string_view kReasonCodes[] = {
    "not_json",      "not_object",  "empty_batch", "missing_field",  "wrong_type",
    "bad_specversion", "unknown_meter", "bad_org_id", "bad_industry", "bad_quantity",
    "bad_time",      "time_in_future", "time_too_old"};

}  // namespace

std::optional<OrgId> ParseOrgId(std::string_view text) {
  if (text.size() != 36) return std::nullopt;
  OrgId id;
  size_t out = 0;
  for (size_t i = 0; i < 36;) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (text[i] != '-') return std::nullopt;
      ++i;
      continue;
    }
    const int hi = HexValue(text[i]);
    const int lo = HexValue(text[i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    id.bytes[out++] = static_cast<uint8_t>(hi << 4 | lo);
    i += 2;
  }
  return id;
}

void FormatOrgId(const OrgId& id, char* out) {
  static constexpr char kHex[] = "0123456789abcdef";
  size_t pos = 0;
  for (size_t i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out[pos++] = '-';
    out[pos++] = kHex[id.bytes[i] >> 4];
    out[pos++] = kHex[id.bytes[i] & 0xf];
  }
}

std::string OrgIdToString(const OrgId& id) {
  std::string text(36, '\0');
  FormatOrgId(id, text.data());
  return text;
}

std::optional<Industry> ParseIndustry(std::string_view code) {
  for (int i = 0; i < kIndustryCount; ++i) {
    if (kIndustryCodes[i] == code) return static_cast<Industry>(i);
  }
  return std::nullopt;
}

std::string_view IndustryCode(Industry industry) {
  return kIndustryCodes[static_cast<int>(industry)];
}

MeterRegistry MeterRegistry::Defaults() {
  MeterRegistry registry;
  registry.Add(1, "api_calls");
  registry.Add(2, "data_exports");
  registry.Add(3, "ai_requests");
  return registry;
}

void MeterRegistry::Add(MeterId id, std::string name) {
  by_name_[name] = id;
  by_id_[id] = std::move(name);
}

std::optional<MeterId> MeterRegistry::Find(std::string_view name) const {
  auto it = by_name_.find(absl::string_view(name.data(), name.size()));
  if (it == by_name_.end()) return std::nullopt;
  return it->second;
}

std::string_view MeterRegistry::Name(MeterId id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? std::string_view() : std::string_view(it->second);
}

int32_t UsageEvent::UsageDay() const {
  constexpr int64_t kMicrosPerDay = 86'400'000'000;
  int64_t day = time_micros / kMicrosPerDay;
  if (time_micros % kMicrosPerDay < 0) --day;
  return static_cast<int32_t>(day);
}

std::string_view RejectReasonCode(RejectReason reason) {
  return kReasonCodes[static_cast<int>(reason)];
}

std::optional<RejectReason> ParseRejectReason(std::string_view code) {
  for (size_t i = 0; i < std::size(kReasonCodes); ++i) {
    if (kReasonCodes[i] == code) return static_cast<RejectReason>(i);
  }
  return std::nullopt;
}

int64_t DaysFromCivil(int64_t year, unsigned month, unsigned day) {
  year -= month <= 2;
  const int64_t era = (year >= 0 ? year : year - 399) / 400;
  const unsigned yoe = static_cast<unsigned>(year - era * 400);
  const unsigned doy = (153 * (month + (month > 2 ? -3 : 9)) + 2) / 5 + day - 1;
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + static_cast<int64_t>(doe) - 719468;
}

std::string DayToIsoDate(int32_t day) {
  int64_t z = static_cast<int64_t>(day) + 719468;
  const int64_t era = (z >= 0 ? z : z - 146096) / 146097;
  const unsigned doe = static_cast<unsigned>(z - era * 146097);
  const unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
  int64_t year = static_cast<int64_t>(yoe) + era * 400;
  const unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
  const unsigned mp = (5 * doy + 2) / 153;
  const unsigned d = doy - (153 * mp + 2) / 5 + 1;
  const unsigned m = mp < 10 ? mp + 3 : mp - 9;
  year += m <= 2;
  return absl::StrFormat("%04d-%02d-%02d", year, m, d);
}

}  // namespace meterd::event
