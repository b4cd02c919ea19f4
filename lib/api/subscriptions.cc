#include "lib/api/subscriptions.h"

#include <map>
#include <optional>
#include <set>

#include <simdjson.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/civil_time.h"
#include "lib/api/api.h"
#include "lib/event/usage_event.h"

namespace meterd::api {
namespace {

constexpr char kJson[] = "application/json";

// A request body's fields: strings and booleans only, each named in `allowed`.
struct Fields {
  std::map<std::string, std::string> text;
  std::map<std::string, bool> flags;
  std::optional<http::Response> error;
};

Fields ParseFields(const std::string& body, const std::set<std::string>& strings,
                   const std::set<std::string>& booleans) {
  Fields out;
  if (body.find_first_not_of(" \t\r\n") == std::string::npos) return out;  // No body: {}.
  simdjson::dom::parser parser;
  simdjson::dom::object object;
  if (parser.parse(body).get(object) != simdjson::SUCCESS) {
    out.error = ErrorResponse(400, "bad_json", "the body must be a JSON object");
    return out;
  }
  for (const auto field : object) {
    const std::string name(field.key);
    if (strings.count(name) > 0 && field.value.is_string()) {
      const std::string_view value = field.value.get_string().value();
      for (const char c : value) {
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
          out.error = ErrorResponse(400, "invalid_value",
                                    absl::StrCat(name, " may not hold control characters"), name);
          return out;
        }
      }
      out.text[name] = std::string(value);
    } else if (booleans.count(name) > 0 && field.value.is_bool()) {
      out.flags[name] = field.value.get_bool().value();
    } else if (strings.count(name) > 0 || booleans.count(name) > 0) {
      out.error = ErrorResponse(
          400, "bad_field",
          absl::StrCat(name, " must be a ", strings.count(name) > 0 ? "string" : "boolean"), name);
      return out;
    } else {
      out.error = ErrorResponse(400, "unknown_field", absl::StrCat("unknown field ", name), name);
      return out;
    }
  }
  return out;
}

// The first line of a Postgres error, without its "ERROR:  " prefix.
std::string PrimaryMessage(const pqxx::sql_error& e) {
  absl::string_view text = e.what();
  text = text.substr(0, text.find('\n'));
  absl::ConsumePrefix(&text, "ERROR:");
  while (!text.empty() && text.front() == ' ') text.remove_prefix(1);
  return std::string(text);
}

// A SQL layer refusal as the API's error: 22023 "<field>: <what>" 400, P0002 404, 55000 409.
std::optional<http::Response> Refusal(const pqxx::sql_error& e) {
  const std::string& state = e.sqlstate();
  std::string message = PrimaryMessage(e);
  if (state == "22023") {
    const size_t colon = message.find(": ");
    std::string field;
    if (colon != std::string::npos) {
      const std::string prefix = message.substr(0, colon);
      if (prefix == "plan" || prefix == "billing_anchor" || prefix == "name" ||
          prefix == "industry") {
        field = prefix;
        message = message.substr(colon + 2);
      }
    }
    return ErrorResponse(400, "invalid_value", message, field);
  }
  if (state == "P0002") return ErrorResponse(404, "no_subscription", message);
  if (state == "55000") return ErrorResponse(409, "conflict", message);
  // Other data errors (a value Postgres refuses) and integrity conflicts are the request's:
  // retrying the same request cannot help.
  if (absl::StartsWith(state, "22")) return ErrorResponse(400, "invalid_value", message);
  if (absl::StartsWith(state, "23")) return ErrorResponse(409, "conflict", message);
  return std::nullopt;
}

}  // namespace

http::Response Subscriptions::Serve(const std::string& org, const std::string& rest,
                                    const http::Request& request, const std::string& actor) {
  std::string sql;
  std::vector<std::optional<std::string>> params = {org};
  int ok_status = 200;
  if (rest == "/subscription" && request.method == "GET") {
    sql = "SELECT shared.get_subscription($1::uuid)::text";
  } else if (rest == "/subscription" && request.method == "POST") {
    Fields f =
        ParseFields(request.body, {"plan", "billing_anchor", "name", "industry", "org_id"}, {});
    if (f.error) return std::move(*f.error);
    if (f.text["plan"].empty())
      return ErrorResponse(400, "missing_field", "plan is required", "plan");
    if (f.text.count("org_id") > 0) {
      const std::optional<event::OrgId> named = event::ParseOrgId(f.text["org_id"]);
      char text[36];
      if (named) event::FormatOrgId(*named, text);
      if (!named || std::string_view(text, sizeof(text)) != org) {
        return ErrorResponse(400, "invalid_value", "org_id differs from the org in the path",
                             "org_id");
      }
    }
    std::optional<std::string> anchor;
    if (f.text.count("billing_anchor") > 0) {
      absl::CivilDay day;
      if (!absl::ParseCivilTime(f.text["billing_anchor"], &day) || day.year() < 1970 ||
          day.year() > 9999) {
        return ErrorResponse(400, "invalid_value", "billing_anchor is a date: YYYY-MM-DD",
                             "billing_anchor");
      }
      anchor = absl::FormatCivilTime(day);
    }
    auto optional = [&](const char* name) -> std::optional<std::string> {
      if (f.text.count(name) == 0) return std::nullopt;
      return f.text[name];
    };
    sql =
        "SELECT shared.create_subscription($1::uuid, $2::text, $3::date, $4::text, "
        "$5::text)::text";
    params = {org, f.text["plan"], anchor, optional("name"), optional("industry")};
    ok_status = 201;
  } else if (rest == "/subscription" && request.method == "PATCH") {
    Fields f = ParseFields(request.body, {"plan"}, {});
    if (f.error) return std::move(*f.error);
    if (f.text["plan"].empty())
      return ErrorResponse(400, "missing_field", "plan is required", "plan");
    sql = "SELECT shared.change_subscription_plan($1::uuid, $2::text)::text";
    params = {org, f.text["plan"]};
  } else if (rest == "/subscription/cancel" && request.method == "POST") {
    Fields f = ParseFields(request.body, {}, {"at_period_end"});
    if (f.error) return std::move(*f.error);
    const bool at_period_end = f.flags.count("at_period_end") == 0 || f.flags["at_period_end"];
    sql = "SELECT shared.cancel_subscription($1::uuid, $2::boolean)::text";
    params = {org, at_period_end ? "true" : "false"};
  } else {
    return ErrorResponse(404, "not_found", "no such endpoint");
  }
  PgAnswer answer = PgCall(pool_, "subscription call", actor, sql, params, Refusal);
  if (answer.instead) return std::move(*answer.instead);
  const std::optional<std::string>& body = answer.value;
  if (!body) return ErrorResponse(404, "no_subscription", "the org has no subscription");
  return {ok_status, kJson, *body + "\n", {}};
}

}  // namespace meterd::api
