#include "lib/store/migrations.h"

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "lib/common/logging.h"
#include "lib/common/status_macros.h"
#include "lib/store/pg_connection.h"

namespace meterd::store {
namespace {

constexpr char kCreateLedger[] = R"sql(
  CREATE SCHEMA IF NOT EXISTS shared;
  CREATE TABLE IF NOT EXISTS shared.schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
  );
)sql";

// Arbitrary constant identifying meterd's migration lock.
constexpr int64_t kMigrationLockKey = 0x6d65746572640001;

}  // namespace

absl::StatusOr<int> ApplyMigrations(const std::string& conninfo) {
  ASSIGN_OR_RETURN(auto conn, Connect(conninfo));
  int applied = 0;
  RETURN_IF_ERROR(CatchPq([&]() -> absl::Status {
    for (const Migration& m : EmbeddedMigrations()) {
      pqxx::work tx(*conn);
      tx.exec1(absl::StrCat("SELECT pg_advisory_xact_lock(", kMigrationLockKey, ")"));
      tx.exec0(kCreateLedger);
      auto done =
          tx.exec_params("SELECT 1 FROM shared.schema_migrations WHERE version = $1", m.version);
      if (!done.empty()) continue;
      LOG_INFO("migrate: applying {}", m.name);
      tx.exec0(m.sql);
      tx.exec_params0("INSERT INTO shared.schema_migrations (version, name) VALUES ($1, $2)",
                      m.version, std::string(m.name));
      tx.commit();
      ++applied;
    }
    return absl::OkStatus();
  }));
  return applied;
}

absl::Status CheckSchemaCurrent(const std::string& conninfo) {
  ASSIGN_OR_RETURN(auto conn, Connect(conninfo));
  return CatchPq([&]() -> absl::Status {
    pqxx::read_transaction tx(*conn);
    auto ledger = tx.exec1("SELECT to_regclass('shared.schema_migrations') IS NOT NULL");
    // Every version, not the newest: migrations written in parallel may land out of order
    // (0006 applied before 0005 exists), and a gap below the newest is still missing.
    absl::flat_hash_set<int> applied;
    if (ledger[0].as<bool>()) {
      for (const auto& row : tx.exec("SELECT version FROM shared.schema_migrations")) {
        applied.insert(row[0].as<int>());
      }
    }
    for (const Migration& m : EmbeddedMigrations()) {
      if (!applied.contains(m.version)) {
        return absl::FailedPreconditionError(absl::StrCat(
            "database schema is missing migration ", m.name, "; run `meterd migrate --pg ...`"));
      }
    }
    return absl::OkStatus();
  });
}

}  // namespace meterd::store
