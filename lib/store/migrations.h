#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace meterd::store {

struct Migration {
  int version;
  const char* name;
  const char* sql;
};

// lib/store/sql/*.sql in version order, embedded at build time.
const std::vector<Migration>& EmbeddedMigrations();

// Applies every embedded migration not yet recorded in shared.schema_migrations, each in its
// own transaction under an advisory lock, so concurrent `meterd migrate` runs are safe.
// Returns how many were applied.
absl::StatusOr<int> ApplyMigrations(const std::string& conninfo);

// OK when the database has every embedded migration; otherwise FailedPrecondition naming the
// first missing one (the daemon refuses to start on an old schema).
absl::Status CheckSchemaCurrent(const std::string& conninfo);

}  // namespace meterd::store
