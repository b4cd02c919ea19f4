#include "lib/api/reads.h"

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "lib/api/api.h"

namespace meterd::api {
namespace {

constexpr char kJson[] = "application/json";

// A YYYY-MM-DD parameter; `fallback` when absent; nullopt when malformed.
std::optional<std::string> DateParam(const http::Request& request, const char* name,
                                     const std::string& fallback) {
  const std::string text = request.Param(name);
  if (text.empty()) return fallback;
  absl::CivilDay day;
  if (!absl::ParseCivilTime(text, &day) || day.year() < 1970 || day.year() > 9999) {
    return std::nullopt;
  }
  return absl::FormatCivilTime(day);
}

}  // namespace

http::Response Reads::Serve(const std::string& org, const std::string& rest,
                            const http::Request& request) {
  std::string sql;
  std::vector<std::optional<std::string>> params = {org};
  if (rest == "/billing-status") {
    sql = "SELECT shared.get_billing_status($1::uuid)::text";
  } else if (rest == "/usage") {
    const std::string today =
        absl::FormatCivilTime(absl::ToCivilDay(absl::Now(), absl::UTCTimeZone()));
    const auto from = DateParam(request, "from", today.substr(0, 8) + "01");
    const auto to = DateParam(request, "to", today);
    if (!from || !to) {
      return ErrorResponse(400, "bad_date", "from and to are dates: YYYY-MM-DD",
                           !from ? "from" : "to");
    }
    std::string group = request.Param("group_by");
    if (group.empty()) group = "day";
    std::string key;
    if (group == "day") {
      key = "to_char(usage_date, 'YYYY-MM-DD')";
    } else if (group == "meter") {
      key = "meter";
    } else if (group == "industry") {
      key = "industry";
    } else {
      return ErrorResponse(400, "bad_group_by", "group_by is day, meter or industry", "group_by");
    }
    // One row per group and meter (quantities of different meters never add up).
    sql = absl::StrCat(
        "SELECT jsonb_build_object('org_id', $1::uuid, 'from', $2::date, 'to', $3::date, "
        "'group_by', $4::text, 'usage', coalesce(jsonb_agg(jsonb_build_object('key', k, "
        "'meter', meter, 'quantity', q) ORDER BY k, meter), '[]'))::text FROM ("
        "SELECT ",
        key,
        " AS k, meter, sum(quantity)::bigint AS q FROM shared.api_usage_meters "
        "WHERE org_id = $1::uuid AND usage_date BETWEEN $2::date AND $3::date "
        "GROUP BY 1, 2) g");
    params = {org, *from, *to, group};
  } else if (rest == "/invoices") {
    sql =
        "SELECT coalesce(jsonb_agg(to_jsonb(i) ORDER BY i.period_start DESC, i.invoice_id DESC), "
        "'[]')::text FROM shared.invoices i WHERE i.org_id = $1::uuid";
  } else if (absl::StartsWith(rest, "/invoices/")) {
    int64_t id = 0;
    if (!absl::SimpleAtoi(rest.substr(10), &id)) {
      return ErrorResponse(404, "not_found", "no such invoice");
    }
    sql =
        "SELECT (to_jsonb(i) || jsonb_build_object('lines', (SELECT coalesce(jsonb_agg("
        "to_jsonb(l) ORDER BY l.line_id), '[]') FROM shared.invoice_lines l "
        "WHERE l.invoice_id = i.invoice_id)))::text FROM shared.invoices i "
        "WHERE i.org_id = $1::uuid AND i.invoice_id = $2::bigint";
    params = {org, std::to_string(id)};
  } else {
    return ErrorResponse(404, "not_found", "no such endpoint");
  }
  PgAnswer answer = PgCall(pool_, absl::StrCat("read of ", rest), "", sql, params);
  if (answer.instead) return std::move(*answer.instead);
  const std::optional<std::string>& body = answer.value;
  if (!body) return ErrorResponse(404, "not_found", "no such invoice");
  return {200, kJson, *body + "\n", {}};
}

}  // namespace meterd::api
