#pragma once

#include <string>

#include "lib/api/pg_pool.h"
#include "lib/http/http_server.h"

namespace meterd::api {

// The read endpoints, answered from Postgres with the SQL layer's own functions:
//   GET /v1/organizations/{org}/billing-status        shared.get_billing_status
//   GET /v1/organizations/{org}/usage?from=&to=&group_by=day|meter|industry
//   GET /v1/organizations/{org}/invoices              newest first
//   GET /v1/organizations/{org}/invoices/{id}         with its lines
// Each call takes a connection from the pool and runs one read-only transaction.
class Reads {
 public:
  explicit Reads(PgPool* pool) : pool_(pool) {}

  // `org` is canonical; `rest` is what follows /v1/organizations/{org} ("/usage", …).
  // 404 for an unknown route or invoice (also another org's: existence is not revealed).
  http::Response Serve(const std::string& org, const std::string& rest,
                       const http::Request& request);

 private:
  PgPool* pool_;
};

}  // namespace meterd::api
