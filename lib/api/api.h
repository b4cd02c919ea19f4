#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/thread_pool.hpp>

#include "lib/api/api_keys.h"
#include "lib/api/pg_pool.h"
#include "lib/api/rate_limiter.h"
#include "lib/api/reads.h"
#include "lib/api/stripe_webhook.h"
#include "lib/api/subscriptions.h"
#include "lib/common/clock.h"
#include "lib/common/metrics.h"
#include "lib/event/event_parser.h"
#include "lib/http/http_server.h"
#include "lib/kafka/acked_producer.h"

namespace meterd::api {

struct ApiOptions {
  std::string topic;                // Where accepted events are produced.
  event::ParseLimits parse_limits;  // The same limits as the Kafka path.
  int64_t max_events_per_request = 1000;
  double rate_per_key = 1000;   // Requests a second per key (token bucket)…
  double burst_per_key = 2000;  // …with bursts up to this.
  const Clock* clock = &SystemClock::Get();
  MetricsRegistry* metrics = nullptr;  // Request counters by route and status.
  std::string pg;                      // For the read endpoints.
  store::PgTimeouts pg_timeouts;
  // Stripe webhook endpoint secrets (whsec_…); empty: POST /v1/stripe/webhook answers 404.
  std::vector<std::string> stripe_webhook_secrets;
};

// The /v1 API on the daemon's HTTP server. POST /v1/events (alias POST /api/billing/usage):
// CloudEvents (structured, batch or HTTP binary mode), validated by the Kafka path's parser,
// each event's subject checked against the key's org, produced keyed by org through an
// idempotent producer, and answered 202 only once Kafka acknowledged every accepted event of
// the request, with per-event results. GET /v1/organizations/{org}/… (alias GET
// /api/billing/usage): see Reads. Every route needs an API key with the route's scope; an org
// key reaches only its org (another org's resources are a 404).
class Api {
 public:
  Api(ApiOptions options, const KeyStore* keys, kafka::AckedProducer* producer,
      const event::MeterRegistry* meters);
  ~Api();

  // True for the paths this API answers.
  static bool Owns(const std::string& path);
  // Before the body is read: 401/403 for a request no key allows (so nobody unauthenticated
  // makes the server buffer a body), nullopt otherwise.
  std::optional<http::Response> Precheck(const http::Request& head) const;
  void Handle(http::Request request, http::Responder respond);
  // Stops taking requests (503 from now on) and waits until none is inside Handle: after it,
  // no new event reaches the producer.
  void Drain();

 private:
  struct Counters;
  void Ingest(const ApiKey& key, http::Request request, http::Responder respond);
  // POST /v1/stripe/webhook: the signature is the authentication (no API key).
  void StripeWebhook(http::Request request, http::Responder respond);
  // Runs `work` on the read pool (at most kMaxQueuedReads waiting, else 503).
  void OnReadPool(http::Responder respond, std::function<http::Response()> work);
  // An EventParser for this call (they are not thread-safe), back to the pool after.
  std::unique_ptr<event::EventParser> TakeParser();
  void ReturnParser(std::unique_ptr<event::EventParser> parser);

  const ApiOptions options_;
  const KeyStore* keys_;
  kafka::AckedProducer* producer_;
  const event::MeterRegistry* meters_;
  RateLimiter limiter_;
  PgPool pool_;
  Reads reads_;
  Subscriptions subscriptions_;
  std::unique_ptr<Counters> counters_;
  std::mutex parsers_mu_;
  std::vector<std::unique_ptr<event::EventParser>> parsers_;
  std::atomic<bool> draining_{false};
  std::atomic<int> active_{0};  // Calls inside Handle.
  // Reads run here, never on a server thread (a slow or frozen Postgres must not stall
  // ingest or health checks); at most kMaxQueuedReads wait, beyond that 503.
  static constexpr int kMaxQueuedReads = 64;
  std::atomic<int> queued_reads_{0};
  std::unique_ptr<boost::asio::thread_pool> read_pool_;
};

// {"error":{"code":…,"message":…[,"field":…]}} with `status`.
http::Response ErrorResponse(int status, std::string_view code, std::string_view message,
                             std::string_view field = {});
// proto/openapi.yaml, embedded at build time: served at GET /v1/openapi.yaml without a key.
std::string_view OpenApiDocument();
inline constexpr char kOpenApiPath[] = "/v1/openapi.yaml";

// A 503 with Retry-After: 1 (the client should come back shortly).
http::Response RetryLater(std::string_view code, std::string_view message);

}  // namespace meterd::api
