#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <pqxx/pqxx>

#include "absl/status/statusor.h"
#include "lib/http/http_server.h"
#include "lib/store/pg_connection.h"

namespace meterd::api {

// The read endpoints, answered from Postgres with the SQL layer's own functions:
//   GET /v1/organizations/{org}/billing-status        shared.get_billing_status
//   GET /v1/organizations/{org}/usage?from=&to=&group_by=day|meter|industry
//   GET /v1/organizations/{org}/invoices              newest first
//   GET /v1/organizations/{org}/invoices/{id}         with its lines
// Each call takes a connection from a small pool (opened on demand, bounded timeouts), runs
// one read-only transaction and gives it back; a broken connection is dropped.
class Reads {
 public:
  Reads(std::string conninfo, store::PgTimeouts timeouts)
      : conninfo_(std::move(conninfo)), timeouts_(timeouts) {}

  // `org` is canonical; `rest` is what follows /v1/organizations/{org} ("/usage", …).
  // 404 for an unknown route or invoice (also another org's: existence is not revealed).
  http::Response Serve(const std::string& org, const std::string& rest,
                       const http::Request& request);

 private:
  absl::StatusOr<std::unique_ptr<pqxx::connection>> Take();
  void Give(std::unique_ptr<pqxx::connection> conn);

  const std::string conninfo_;
  const store::PgTimeouts timeouts_;
  std::mutex mu_;
  std::vector<std::unique_ptr<pqxx::connection>> idle_;  // Guarded by mu_.
};

}  // namespace meterd::api
