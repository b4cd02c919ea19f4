#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace meterd::store {

// Data protection per organization (migration 0011), run as the connecting login: Postgres
// decides who may (meterd_admin or the schema's owner); anyone else gets PermissionDenied.

// Everything meterd holds about `org` as one JSON document (`shared.export_org`).
absl::StatusOr<std::string> ExportOrg(const std::string& conninfo, const std::string& org);

// Erases `org`'s personal data and moves its financial records to a new pseudonymous id, in
// one transaction (`shared.erase_org`). Returns the JSON summary of what was removed and kept;
// `{"found": false}` when nothing is held under `org` (never known, or erased before).
absl::StatusOr<std::string> EraseOrg(const std::string& conninfo, const std::string& org);

}  // namespace meterd::store
