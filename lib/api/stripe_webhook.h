#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "lib/api/pg_pool.h"
#include "lib/http/http_server.h"

namespace meterd::api {

// Checks a `Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>…]` header against the raw
// body, before anything parses it: HMAC-SHA256 of "<t>.<body>" keyed with an endpoint secret,
// hex; any v1 matching any of `secrets` (rotation: several v1, or several secrets) passes;
// compared in constant time; `t` must be within `tolerance` of `now`. InvalidArgument says
// what is wrong (never a secret or a signature).
absl::Status VerifyStripeSignature(std::string_view header, std::string_view body,
                                   const std::vector<std::string>& secrets, absl::Time now,
                                   absl::Duration tolerance = absl::Seconds(300));

// The cheap part of the check, at the headers (before a body is read): a t= within tolerance.
absl::Status StripeSignatureLooksFresh(std::string_view header, absl::Time now,
                                       absl::Duration tolerance = absl::Seconds(300));

// The header value Stripe would send for `body` at `t` with `secret` (tests, the fake Stripe).
std::string StripeSignatureHeader(std::string_view body, std::string_view secret, int64_t t);

inline constexpr char kStripeWebhookPath[] = "/v1/stripe/webhook";

// POST /v1/stripe/webhook, after the signature checked out: `body` (the raw event) is stored
// and applied by shared.apply_stripe_event in one transaction (actor "stripe:webhook"). 200
// {"received":true,"result":"applied|duplicate|stale|pending|stored"}; 400 for an event the
// SQL layer refuses (not retried by Stripe usefully); 503 when Postgres cannot answer
// (Stripe retries for days).
http::Response ApplyStripeEvent(PgPool* pool, const std::string& body);

}  // namespace meterd::api
