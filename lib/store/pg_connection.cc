#include "lib/store/pg_connection.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/strip.h"

namespace meterd::store {
namespace {

// libpq's messages span lines ("...refused\n\tIs the server running..."): one line for logs.
std::string OneLine(const char* what) {
  return absl::StrReplaceAll(absl::StripAsciiWhitespace(what), {{"\n\t", " "}, {"\n", " "}});
}

}  // namespace

absl::StatusOr<std::unique_ptr<pqxx::connection>> Connect(const std::string& conninfo) {
  try {
    auto conn = std::make_unique<pqxx::connection>(conninfo);
    return conn;
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot connect to Postgres: ", OneLine(e.what())));
  }
}

absl::Status StatusFromException(const std::exception& e) {
  const std::string what = OneLine(e.what());
  if (dynamic_cast<const pqxx::broken_connection*>(&e) != nullptr ||
      dynamic_cast<const pqxx::in_doubt_error*>(&e) != nullptr) {
    return absl::UnavailableError(absl::StrCat("Postgres connection lost: ", what));
  }
  if (const auto* sql = dynamic_cast<const pqxx::sql_error*>(&e)) {
    // Class 08 is connection exception; 57P01..03 are admin/crash shutdowns: all transient.
    const std::string& state = sql->sqlstate();
    if (state.rfind("08", 0) == 0 || state.rfind("57P", 0) == 0) {
      return absl::UnavailableError(absl::StrCat("Postgres unavailable: ", what));
    }
    return absl::InternalError(absl::StrCat("Postgres error ", state, ": ", what));
  }
  if (dynamic_cast<const pqxx::transaction_rollback*>(&e) != nullptr) {
    return absl::AbortedError(absl::StrCat("Postgres rolled back: ", what));
  }
  return absl::InternalError(absl::StrCat("Postgres: ", what));
}

}  // namespace meterd::store
