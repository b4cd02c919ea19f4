#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/http/http_server.h"

namespace meterd::devtools {

struct FakeStripeOptions {
  std::string listen = "127.0.0.1:0";              // 127.0.0.1 (or localhost) only.
  std::string secret_key = "sk_test_meterd_fake";  // Requests carry "Authorization: Bearer <it>".
  std::string webhook_secret = "whsec_meterd_fake_0123456789";  // Signs the webhooks it sends.
};

struct FakeMeterEvent {
  std::string identifier, event_name, stripe_customer_id, value;  // `value` as sent.
  int64_t timestamp = 0;
  int64_t created = 0;
};

struct FakeAdjustment {
  std::string event_name, type, cancel_identifier;
};

// A local stand-in for the Stripe API, for tests and the demo: the billing meter event and
// meter event adjustment endpoints with Stripe's authentication, form parameters, error
// objects and idempotency keys, a fault script (errors, 429s, late answers), and signed
// webhooks sent to meterd. It listens on 127.0.0.1 only, on its own HttpServer threads, and
// keeps everything in memory (nothing expires: it is meant for runs of minutes).
//
// Control endpoints, without authentication, for scripts: GET /__fake/meter_events (the
// recorded events as a JSON array) and POST /__fake/webhook?to=<url-encoded
// http://127.0.0.1:port/path> (signs the body and sends it, answering
// {"status":<the receiver's status>,"body":"<its body>"}).
//
// Thread-safe: the owner's thread calls the accessors and the fault script while server
// threads answer requests.
class FakeStripe {
 public:
  static absl::StatusOr<std::unique_ptr<FakeStripe>> Start(FakeStripeOptions options = {});
  ~FakeStripe();
  FakeStripe(const FakeStripe&) = delete;
  FakeStripe& operator=(const FakeStripe&) = delete;

  std::string base_url() const;  // "http://127.0.0.1:<port>"

  // The fault script, consumed one entry per API request in arrival order (control endpoints
  // take none). FailNext: the next `n` requests are not processed and get `status`: 429 a
  // Stripe rate_limit error (with "Retry-After: <whole seconds>" when `retry_after` > 0),
  // anything else an api_error. StallNext: the next `n` requests are processed (recorded,
  // idempotency key stored) at once but answered only `delay` later, so a client with a
  // shorter timeout gives up on a request that did reach Stripe.
  void FailNext(int n, int status, absl::Duration retry_after = absl::ZeroDuration());
  void StallNext(int n, absl::Duration delay);

  std::vector<FakeMeterEvent> meter_events() const;  // One per identifier, in arrival order.
  std::vector<FakeAdjustment> adjustments() const;
  int64_t requests() const;               // API requests received, whatever their answer.
  int64_t idempotent_replays() const;     // Answered from the idempotency key store.
  int64_t duplicate_identifiers() const;  // Meter events refused: identifier already recorded.

  // POSTs `event_json` to `url` (http://127.0.0.1:port/path or http://localhost:port/path)
  // with a Stripe-Signature header (t=<now>,v1=<hex HMAC-SHA256 of "<t>.<body>" keyed with
  // the webhook secret>), as Stripe delivers webhooks. Returns the receiver's HTTP status.
  absl::StatusOr<int> SendWebhook(const std::string& url, const std::string& event_json) const;

 private:
  struct Fault {
    int status = 0;  // 0: a stall.
    absl::Duration retry_after;
    absl::Duration delay;
  };
  struct Stored {  // What an idempotency key was first used with, and its answer.
    std::string request;
    http::Response response;
  };
  // An endpoint's answer. Not `stored` under an idempotency key: parameters refused before the
  // endpoint ran (Stripe keeps no result for those; the corrected request may reuse the key).
  struct Outcome {
    http::Response response;
    bool stored = true;
  };
  class Later;  // A thread that runs work at a given time.

  explicit FakeStripe(FakeStripeOptions options);
  void Handle(http::Request request, http::Responder respond);
  http::Response HandleApi(const http::Request& request, absl::Duration* stall);
  Outcome CreateMeterEvent(const std::map<std::string, std::string>& form, absl::Time now);
  Outcome CreateAdjustment(const std::map<std::string, std::string>& form);
  void ForwardWebhook(const http::Request& request, http::Responder respond);

  const FakeStripeOptions options_;
  // std::mutex, not absl::Mutex: Debian's Abseil is not built for TSan, which would then see
  // no synchronization at all. It guards everything below up to stalls_.
  mutable std::mutex mu_;
  std::deque<Fault> faults_;
  std::vector<FakeMeterEvent> events_;
  absl::flat_hash_map<std::string, size_t> event_index_;  // By identifier.
  std::vector<FakeAdjustment> adjustments_;
  absl::flat_hash_map<std::string, Stored> idempotency_;
  int64_t requests_ = 0;
  int64_t replays_ = 0;
  int64_t duplicates_ = 0;
  int64_t generated_ids_ = 0;
  // Stopped before the server goes: their pending responders hold the server's sessions.
  std::unique_ptr<Later> stalls_;    // Late answers.
  std::unique_ptr<Later> webhooks_;  // Webhook deliveries for the control endpoint (blocking).
  std::unique_ptr<http::HttpServer> server_;
};

}  // namespace meterd::devtools
