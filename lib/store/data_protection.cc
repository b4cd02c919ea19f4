#include "lib/store/data_protection.h"

#include <pqxx/pqxx>

#include "absl/strings/str_cat.h"
#include "lib/common/status_macros.h"
#include "lib/event/usage_event.h"
#include "lib/store/pg_connection.h"

namespace meterd::store {
namespace {

// One call of `function(org)` in its own transaction; its jsonb result as text.
absl::StatusOr<std::string> CallOrgFunction(const std::string& conninfo, const std::string& org,
                                            const char* function) {
  if (!event::ParseOrgId(org)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--org must be an organization id (UUID), got '", org, "'"));
  }
  ASSIGN_OR_RETURN(auto conn, Connect(conninfo));
  std::string document;
  RETURN_IF_ERROR(CatchPq([&]() -> absl::Status {
    pqxx::work tx(*conn);
    // Not CheckSchemaCurrent: a login without the right may not read schema_migrations, and
    // must hear that it lacks the role, which the function itself says.
    if (tx.exec_params1("SELECT to_regprocedure($1) IS NULL", absl::StrCat(function, "(uuid)"))[0]
            .as<bool>()) {
      return absl::FailedPreconditionError(absl::StrCat("the database has no ", function,
                                                        " (migration 0011); run `meterd migrate`"));
    }
    document = tx.exec_params1(absl::StrCat("SELECT ", function, "($1::uuid)::text"), org)[0]
                   .as<std::string>();
    tx.commit();
    return absl::OkStatus();
  }));
  return document;
}

}  // namespace

absl::StatusOr<std::string> ExportOrg(const std::string& conninfo, const std::string& org) {
  return CallOrgFunction(conninfo, org, "shared.export_org");
}

absl::StatusOr<std::string> EraseOrg(const std::string& conninfo, const std::string& org) {
  return CallOrgFunction(conninfo, org, "shared.erase_org");
}

}  // namespace meterd::store
