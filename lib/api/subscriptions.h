#pragma once

#include <string>

#include "lib/api/pg_pool.h"
#include "lib/http/http_server.h"

namespace meterd::api {

// The subscription endpoints, through the SQL layer's functions (migration 0014), each call
// one transaction that names the API key in app.actor, so the audit row says who:
//   GET   /v1/organizations/{org}/subscription         shared.get_subscription
//   POST  /v1/organizations/{org}/subscription         shared.create_subscription     201
//   PATCH /v1/organizations/{org}/subscription         shared.change_subscription_plan
//   POST  /v1/organizations/{org}/subscription/cancel  shared.cancel_subscription
// Bodies are JSON objects: {"plan", "billing_anchor" (YYYY-MM-DD), "name", "industry"} to
// create, {"plan"} to change, {"at_period_end": true|false} to cancel (default true); an
// unknown or mistyped field is a 400 naming it. SQL errors map to 400 (bad value, with its
// field), 404 (no live subscription), 409 (one exists already, or it is canceled).
class Subscriptions {
 public:
  explicit Subscriptions(PgPool* pool) : pool_(pool) {}

  // `org` is canonical; `rest` is "/subscription" or "/subscription/cancel"; `actor` goes to
  // the audit trail ("api_key:<id>").
  http::Response Serve(const std::string& org, const std::string& rest,
                       const http::Request& request, const std::string& actor);

 private:
  PgPool* pool_;
};

}  // namespace meterd::api
