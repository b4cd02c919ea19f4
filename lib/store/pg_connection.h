#pragma once

#include <exception>
#include <memory>
#include <string>

#include <pqxx/pqxx>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace meterd::store {

// Opens a connection, converting libpqxx's exception into a Status that names the problem.
absl::StatusOr<std::unique_ptr<pqxx::connection>> Connect(const std::string& conninfo);

// Converts an exception thrown by libpqxx into a Status: broken connections are Unavailable
// (retry later), everything else Internal with the server's message.
absl::Status StatusFromException(const std::exception& e);

// Runs `body`, catching libpqxx exceptions at this library boundary.
template <typename F>
absl::Status CatchPq(F&& body) {
  try {
    return body();
  } catch (const std::exception& e) {
    return StatusFromException(e);
  }
}

}  // namespace meterd::store
