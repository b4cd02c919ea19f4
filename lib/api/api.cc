#include "lib/api/api.h"

#include <array>
#include <cmath>
#include <mutex>

#include <simdjson.h>
#include <boost/asio/post.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "lib/common/json.h"
#include "lib/common/logging.h"
#include "lib/common/string_views.h"
#include "lib/event/binary_mode.h"

namespace meterd::api {
namespace {

constexpr char kJson[] = "application/json";

// An id as the event's JSON carried it (escapes kept): valid inside a JSON string as is, but
// for control bytes, which are escaped.
std::string RawJsonString(std::string_view raw) {
  std::string out;
  out.reserve(raw.size());
  for (const char c : raw) {
    if (static_cast<unsigned char>(c) < 0x20) {
      absl::StrAppend(&out, "\\u00", absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2));
    } else {
      out += c;
    }
  }
  return out;
}

// Largest event accepted: Kafka's default message limit is about 1 MB; far above any real
// usage event.
constexpr size_t kMaxEventBytes = 256 * 1024;

// The token of "Authorization: Bearer <token>" or "X-Api-Key: <token>"; empty if neither.
std::string TokenOf(const http::Request& request) {
  absl::string_view auth = AbslView(request.Header("authorization"));
  if (absl::StartsWithIgnoreCase(auth, "bearer ")) {
    auth.remove_prefix(7);
    return std::string(absl::StripAsciiWhitespace(auth));
  }
  return std::string(absl::StripAsciiWhitespace(AbslView(request.Header("x-api-key"))));
}

// The request's events, one JSON text each (views into the request's body), or an error
// response.
struct Elements {
  std::vector<std::string_view> texts;
  std::optional<http::Response> error;
};

// Binary mode replaces the request's body with the structured event it converts to.
Elements SplitEvents(http::Request& request, int64_t max_events) {
  Elements out;
  const std::string_view header = request.Header("content-type");
  const std::string type(absl::StripAsciiWhitespace(AbslView(header.substr(0, header.find(';')))));
  if (!request.Header("ce-specversion").empty()) {
    // HTTP binary mode: ce-* headers carry the attributes, the body is `data`. Converted to
    // structured mode as the Kafka binding's binary mode is, by the same function.
    std::vector<std::pair<std::string, std::string>> names;
    for (const auto& [name, value] : request.headers) {
      const std::string lower = absl::AsciiStrToLower(name);
      if (absl::StartsWith(lower, "ce-")) names.emplace_back("ce_" + lower.substr(3), value);
    }
    std::vector<std::pair<std::string_view, std::string_view>> headers;
    for (const auto& [name, value] : names) headers.emplace_back(name, value);
    std::string structured;
    if (!event::StructuredFromBinary(headers, request.body, &structured)) {
      out.error = ErrorResponse(400, "bad_binary_event",
                                "ce-* headers do not form a CloudEvent (ce-specversion, ce-id, "
                                "ce-source, ce-type, ce-subject, ce-time)");
      return out;
    }
    request.body = std::move(structured);
    out.texts.push_back(request.body);
    return out;
  }
  if (type == "application/cloudevents-batch+json") {
    // Each element's own bytes, as sent: the consumer parses exactly these, and the ids in
    // them stay byte for byte what a retry of the same event as a single event carries.
    simdjson::ondemand::parser parser;
    const simdjson::padded_string padded(request.body);
    simdjson::ondemand::document doc;
    simdjson::ondemand::array array;
    auto not_a_batch = [] {
      return Elements{
          {},
          ErrorResponse(400, "not_a_batch",
                        "a cloudevents-batch+json body must be a JSON array of events")};
    };
    // Never iterate an array that did not parse (simdjson's iterator would be null).
    if (parser.iterate(padded).get(doc) != simdjson::SUCCESS ||
        doc.get_array().get(array) != simdjson::SUCCESS) {
      return not_a_batch();
    }
    const char* last_end = padded.data();  // Just past the last element's bytes.
    for (auto element : array) {
      bool ok = true;
      simdjson::ondemand::value value;
      simdjson::ondemand::json_type kind;
      if (element.get(value) != simdjson::SUCCESS || value.type().get(kind) != simdjson::SUCCESS) {
        return not_a_batch();
      }
      std::string_view raw;
      if (kind == simdjson::ondemand::json_type::object) {
        simdjson::ondemand::object object;
        ok = value.get_object().get(object) == simdjson::SUCCESS &&
             object.raw_json().get(raw) == simdjson::SUCCESS;
      } else if (kind == simdjson::ondemand::json_type::array) {
        simdjson::ondemand::array inner;
        ok = value.get_array().get(inner) == simdjson::SUCCESS &&
             inner.raw_json().get(raw) == simdjson::SUCCESS;
      } else {
        raw = value.raw_json_token();
      }
      if (!ok) return not_a_batch();
      if (static_cast<int64_t>(out.texts.size()) >= max_events) {
        out.error = ErrorResponse(413, "batch_too_large",
                                  absl::StrCat("at most ", max_events, " events per request"));
        return out;
      }
      // The same bytes in the request's body (the padded copy goes when this returns).
      const absl::string_view trimmed = absl::StripAsciiWhitespace(AbslView(raw));
      out.texts.push_back(
          std::string_view(request.body).substr(trimmed.data() - padded.data(), trimmed.size()));
      last_end = raw.data() + raw.size();
    }
    // Nothing but white space may follow the array's closing bracket.
    if (!out.texts.empty()) {
      absl::string_view rest(last_end, padded.data() + padded.size() - last_end);
      rest = absl::StripLeadingAsciiWhitespace(rest);
      if (!absl::ConsumePrefix(&rest, "]") || !absl::StripAsciiWhitespace(rest).empty()) {
        return not_a_batch();
      }
    }
    if (out.texts.empty()) out.error = ErrorResponse(400, "empty_batch", "the batch is empty");
    return out;
  }
  if (type == "application/cloudevents+json" || type == "application/json") {
    out.texts.push_back(request.body);
    return out;
  }
  out.error = ErrorResponse(415, "unsupported_media_type",
                            "send application/cloudevents+json, application/cloudevents-batch+json "
                            "or an HTTP binary-mode event (ce-* headers)",
                            "content-type");
  return out;
}

}  // namespace

http::Response ErrorResponse(int status, std::string_view code, std::string_view message,
                             std::string_view field) {
  std::string body = absl::StrCat("{\"error\":{\"code\":\"", AbslView(code), "\",\"message\":");
  AppendJsonString(&body, message);
  if (!field.empty()) {
    body += ",\"field\":";
    AppendJsonString(&body, field);
  }
  body += "}}\n";
  return {status, kJson, std::move(body), {}};
}

http::Response RetryLater(std::string_view code, std::string_view message) {
  http::Response r = ErrorResponse(503, code, message);
  r.headers.emplace_back("Retry-After", "1");
  return r;
}

namespace {

// 401 for a request without a key (`token` empty) or with one no key matches.
http::Response Unauthorized(std::string_view token) {
  http::Response r =
      ErrorResponse(401, "unauthorized",
                    token.empty() ? "an API key is required (Authorization: Bearer <key>)"
                                  : "the API key is not valid");
  r.headers.emplace_back("WWW-Authenticate", "Bearer");
  return r;
}

// What a request asks for: its kind, the scope it needs, and for the org routes the org (as
// written in the path; empty for the aliases) and what follows it.
struct Route {
  enum Kind { kNone, kWrongMethod, kIngest, kRead, kSubscription, kStripeWebhook } kind = kNone;
  uint8_t scope = 0;
  std::string org;
  std::string rest;
  std::string allow;  // For kWrongMethod: the methods the path takes.
};

Route RouteOf(const http::Request& request) {
  Route r;
  const std::string& path = request.path;
  const std::string& method = request.method;
  auto wrong = [&](const char* allow) {
    r.kind = Route::kWrongMethod;
    r.allow = allow;
    return r;
  };
  if (path == "/v1/events") {
    if (method != "POST") return wrong("POST");
    r.kind = Route::kIngest;
    r.scope = kScopeIngest;
    return r;
  }
  if (path == "/api/billing/usage") {
    if (method == "POST") {
      r.kind = Route::kIngest;
      r.scope = kScopeIngest;
    } else if (method == "GET") {
      r.kind = Route::kRead;
      r.scope = kScopeRead;
      r.rest = "/usage";
    } else {
      return wrong("GET, POST");
    }
    return r;
  }
  if (path == kStripeWebhookPath) {
    if (method != "POST") return wrong("POST");
    r.kind = Route::kStripeWebhook;
    return r;
  }
  if (path == "/api/billing/create-subscription") {
    if (method != "POST") return wrong("POST");
    r.kind = Route::kSubscription;
    r.scope = kScopeAdmin;
    r.rest = "/subscription";
    return r;
  }
  if (!absl::StartsWith(path, "/v1/organizations/")) return r;
  const std::string tail = path.substr(18);
  const size_t slash = tail.find('/');
  r.org = tail.substr(0, slash);
  r.rest = slash == std::string::npos ? "" : tail.substr(slash);
  if (r.rest == "/subscription") {
    if (method == "GET") {
      r.kind = Route::kSubscription;
      r.scope = kScopeRead;
    } else if (method == "POST" || method == "PATCH") {
      r.kind = Route::kSubscription;
      r.scope = kScopeAdmin;
    } else {
      return wrong("GET, POST, PATCH");
    }
    return r;
  }
  if (r.rest == "/subscription/cancel") {
    if (method != "POST") return wrong("POST");
    r.kind = Route::kSubscription;
    r.scope = kScopeAdmin;
    return r;
  }
  if (method != "GET") return wrong("GET");
  r.kind = Route::kRead;
  r.scope = kScopeRead;
  return r;
}

// The "org_id" string of a JSON object body; empty if there is none.
std::string OrgIdInBody(const std::string& body) {
  simdjson::dom::parser parser;
  simdjson::dom::object object;
  std::string_view org;
  if (parser.parse(body).get(object) != simdjson::SUCCESS ||
      object["org_id"].get(org) != simdjson::SUCCESS) {
    return "";
  }
  return std::string(org);
}

}  // namespace

struct Api::Counters {
  Counter* requests_ok;
  Counter* requests_rejected;
  Counter* events_accepted;
  Counter* events_rejected;
  Counter* unauthorized;
  Counter* rate_limited;
  Counter* kafka_failures;
  Counter* stripe_received;
  Counter* stripe_refused;
};

Api::Api(ApiOptions options, const KeyStore* keys, kafka::AckedProducer* producer,
         const event::MeterRegistry* meters)
    : options_(std::move(options)),
      keys_(keys),
      producer_(producer),
      meters_(meters),
      limiter_(options_.rate_per_key, options_.burst_per_key, options_.clock),
      pool_(options_.pg, options_.pg_timeouts),
      reads_(&pool_),
      subscriptions_(&pool_),
      counters_(std::make_unique<Counters>()),
      read_pool_(std::make_unique<boost::asio::thread_pool>(2)) {
  MetricsRegistry& r = *options_.metrics;
  const std::string requests = "meterd_http_ingest_requests_total";
  const std::string help = "POST /v1/events requests by outcome";
  counters_->requests_ok = r.AddCounter(requests, help, {{"outcome", "accepted"}});
  counters_->requests_rejected = r.AddCounter(requests, help, {{"outcome", "refused"}});
  counters_->unauthorized = r.AddCounter(requests, help, {{"outcome", "unauthorized"}});
  counters_->rate_limited = r.AddCounter(requests, help, {{"outcome", "rate_limited"}});
  counters_->kafka_failures = r.AddCounter(requests, help, {{"outcome", "kafka_unavailable"}});
  counters_->events_accepted = r.AddCounter("meterd_http_events_accepted_total",
                                            "Events acknowledged by Kafka for HTTP clients");
  counters_->stripe_received = r.AddCounter("meterd_stripe_webhooks_total",
                                            "Stripe webhook deliveries", {{"outcome", "stored"}});
  counters_->stripe_refused = r.AddCounter("meterd_stripe_webhooks_total",
                                           "Stripe webhook deliveries", {{"outcome", "refused"}});
  counters_->events_rejected = r.AddCounter(
      "meterd_http_events_rejected_total", "Events refused to HTTP clients (answered, not stored)");
}

Api::~Api() { Drain(); }

bool Api::Owns(const std::string& path) {
  return (absl::StartsWith(path, "/v1/") || absl::StartsWith(path, "/api/")) &&
         path != kOpenApiPath;
}

std::optional<http::Response> Api::Precheck(const http::Request& head) const {
  if (!Owns(head.path)) return std::nullopt;
  if (head.path == kStripeWebhookPath) {
    // No key here: at least a fresh signature header before anyone makes us read a body.
    if (options_.stripe_webhook_secrets.empty()) return std::nullopt;  // Handle says 404.
    const absl::Status fresh =
        StripeSignatureLooksFresh(head.Header("stripe-signature"), options_.clock->Now());
    if (fresh.ok()) return std::nullopt;
    counters_->stripe_refused->Add();
    return ErrorResponse(400, "bad_signature", std::string(fresh.message()));
  }
  const std::string token = TokenOf(head);
  if (token.empty() || !keys_->Authenticate(token)) return Unauthorized(token);
  return std::nullopt;
}

void Api::Drain() {
  draining_.store(true);
  while (active_.load() > 0) absl::SleepFor(absl::Milliseconds(1));
  if (read_pool_ != nullptr) read_pool_->join();
}

void Api::Handle(http::Request request, http::Responder respond) {
  active_.fetch_add(1);
  struct Leave {
    std::atomic<int>* active;
    ~Leave() { active->fetch_sub(1); }
  } leave{&active_};
  if (draining_.load()) {
    respond(RetryLater("stopping", "meterd is stopping; retry elsewhere"));
    return;
  }
  const Route route = RouteOf(request);
  if (route.kind == Route::kStripeWebhook) {
    StripeWebhook(std::move(request), std::move(respond));
    return;
  }
  // Keys that could not be refreshed for a while may include revoked ones: refuse rather than
  // trust them (a revocation must hold within seconds).
  if (options_.clock->Now() - keys_->last_refresh() > absl::Seconds(5)) {
    respond(RetryLater("keys_unavailable", "API keys cannot be checked right now; retry shortly"));
    return;
  }
  if (route.kind == Route::kNone) {
    respond(ErrorResponse(404, "not_found", "no such endpoint"));
    return;
  }
  if (route.kind == Route::kWrongMethod) {
    http::Response r = ErrorResponse(405, "method_not_allowed", absl::StrCat("use ", route.allow));
    r.headers.emplace_back("Allow", route.allow);
    respond(std::move(r));
    return;
  }
  std::string org_text = route.org;
  std::string rest = route.rest;
  const std::string token = TokenOf(request);
  const std::optional<ApiKey> key = token.empty() ? std::nullopt : keys_->Authenticate(token);
  if (!key) {
    counters_->unauthorized->Add();
    respond(Unauthorized(token));
    return;
  }
  if (!key->Allows(route.scope)) {
    counters_->requests_rejected->Add();
    respond(ErrorResponse(403, "forbidden",
                          route.scope == kScopeIngest ? "this API key may not send events"
                          : route.scope == kScopeRead ? "this API key may not read"
                                                      : "this API key may not manage billing"));
    return;
  }
  if (const absl::Duration wait = limiter_.Acquire(key->key_id); wait > absl::ZeroDuration()) {
    counters_->rate_limited->Add();
    http::Response r = ErrorResponse(429, "rate_limited", "too many requests for this API key");
    r.headers.emplace_back(
        "Retry-After", absl::StrCat(std::max<int64_t>(1, std::ceil(absl::ToDoubleSeconds(wait)))));
    respond(std::move(r));
    return;
  }
  if (route.kind == Route::kIngest) {
    Ingest(*key, std::move(request), std::move(respond));
    return;
  }
  // The aliases act for the key's own org (an admin key names one: ?org_id= to read, "org_id"
  // in the body to create a subscription).
  // A body's org_id that names another org than the key's is a 404 like any other org's.
  if (org_text.empty()) {
    org_text = route.kind == Route::kSubscription ? OrgIdInBody(request.body)
                                                  : (key->org ? "" : request.Param("org_id"));
    if (org_text.empty() && key->org) {
      char text[36];
      event::FormatOrgId(*key->org, text);
      org_text.assign(text, sizeof(text));
    }
    if (org_text.empty()) {
      respond(ErrorResponse(400, "missing_field", "an admin key names the org: org_id", "org_id"));
      return;
    }
  }
  const std::optional<event::OrgId> org = event::ParseOrgId(org_text);
  // Another org's resources, or no such org: the same 404 (existence is not revealed).
  if (!org || !key->MayActFor(*org)) {
    respond(ErrorResponse(404, "not_found", "no such organization"));
    return;
  }
  char canonical[36];
  event::FormatOrgId(*org, canonical);
  OnReadPool(std::move(respond),
             [this, org = std::string(canonical, sizeof(canonical)), rest = std::move(rest),
              request = std::move(request), subscription = route.kind == Route::kSubscription,
              actor = absl::StrCat("api_key:", key->key_id)] {
               return subscription ? subscriptions_.Serve(org, rest, request, actor)
                                   : reads_.Serve(org, rest, request);
             });
}

void Api::OnReadPool(http::Responder respond, std::function<http::Response()> work) {
  if (queued_reads_.fetch_add(1) >= kMaxQueuedReads) {
    queued_reads_.fetch_sub(1);
    respond(RetryLater("busy", "too many requests waiting for Postgres; retry shortly"));
    return;
  }
  boost::asio::post(*read_pool_, [this, respond = std::move(respond), work = std::move(work)] {
    respond(work());
    queued_reads_.fetch_sub(1);
  });
}

void Api::StripeWebhook(http::Request request, http::Responder respond) {
  if (options_.stripe_webhook_secrets.empty()) {
    respond(ErrorResponse(404, "not_found",
                          "Stripe webhooks are not configured (--stripe-webhook-secret)"));
    return;
  }
  const absl::Status verified =
      VerifyStripeSignature(request.Header("stripe-signature"), request.body,
                            options_.stripe_webhook_secrets, options_.clock->Now());
  if (!verified.ok()) {
    counters_->stripe_refused->Add();
    respond(ErrorResponse(400, "bad_signature", std::string(verified.message())));
    return;
  }
  simdjson::dom::parser parser;
  simdjson::dom::object event;
  std::string_view id, type;
  if (parser.parse(request.body).get(event) != simdjson::SUCCESS ||
      event["id"].get(id) != simdjson::SUCCESS || event["type"].get(type) != simdjson::SUCCESS) {
    counters_->stripe_refused->Add();
    respond(ErrorResponse(400, "bad_event", "the body is not a Stripe event (id, type)"));
    return;
  }
  OnReadPool(std::move(respond), [this, body = std::move(request.body)] {
    http::Response r = ApplyStripeEvent(&pool_, body);
    if (r.status == 200) counters_->stripe_received->Add();
    return r;
  });
}

std::unique_ptr<event::EventParser> Api::TakeParser() {
  {
    std::lock_guard lock(parsers_mu_);
    if (!parsers_.empty()) {
      auto parser = std::move(parsers_.back());
      parsers_.pop_back();
      return parser;
    }
  }
  return std::make_unique<event::EventParser>(meters_, options_.parse_limits);
}

void Api::ReturnParser(std::unique_ptr<event::EventParser> parser) {
  std::lock_guard lock(parsers_mu_);
  parsers_.push_back(std::move(parser));
}

void Api::Ingest(const ApiKey& key, http::Request request, http::Responder respond) {
  Elements elements = SplitEvents(request, options_.max_events_per_request);
  if (elements.error) {
    counters_->requests_rejected->Add();
    respond(std::move(*elements.error));
    return;
  }
  // The accepted events: where each is in the request, its org (the message key), and its id
  // in one shared buffer (no allocation per event).
  struct Accepted {
    size_t index;
    size_t id_at;
    size_t id_size;
    std::array<char, 36> org;
  };
  std::vector<Accepted> accepted;
  accepted.reserve(elements.texts.size());
  std::string ids;
  std::string rejected;  // JSON objects, comma-separated.
  int64_t rejected_count = 0;
  auto reject = [&](size_t index, std::string_view id, std::string_view reason,
                    std::string_view detail) {
    absl::StrAppend(&rejected, rejected.empty() ? "" : ",", "{\"index\":", index);
    if (!id.empty()) absl::StrAppend(&rejected, ",\"id\":\"", RawJsonString(id), "\"");
    absl::StrAppend(&rejected, ",\"reason\":\"", AbslView(reason), "\",\"detail\":");
    AppendJsonString(&rejected, detail);
    rejected += "}";
    ++rejected_count;
  };
  std::unique_ptr<event::EventParser> parser = TakeParser();
  const absl::Time now = options_.clock->Now();
  for (size_t i = 0; i < elements.texts.size(); ++i) {
    if (elements.texts[i].size() > kMaxEventBytes) {
      reject(i, {}, "event_too_large", "an event is at most 256 KiB");
      continue;
    }
    const event::ParsedMessage& parsed = parser->ParseElement(elements.texts[i], now);
    if (!parsed.rejections.empty() || parsed.events.size() != 1) {
      const event::Rejection& r = parsed.rejections.front();
      reject(i, {}, event::RejectReasonCode(r.reason), r.detail);
      continue;
    }
    const event::UsageEvent& e = parsed.events.front();
    if (!key.MayActFor(e.org)) {
      reject(i, e.id, "forbidden_subject", "the event's subject is not this API key's org");
      continue;
    }
    Accepted& a = accepted.emplace_back(Accepted{i, ids.size(), e.id.size(), {}});
    ids.append(e.id);
    event::FormatOrgId(e.org, a.org.data());
  }
  ReturnParser(std::move(parser));
  counters_->events_rejected->Add(rejected_count);
  if (accepted.empty()) {
    counters_->requests_rejected->Add();
    respond({400,
             kJson,
             absl::StrCat("{\"error\":{\"code\":\"no_valid_events\",\"message\":\"every event "
                          "was refused\"},\"accepted\":[],\"rejected\":[",
                          rejected, "]}\n"),
             {}});
    return;
  }
  std::vector<kafka::AckedProducer::Message> messages;
  messages.reserve(accepted.size());
  for (const Accepted& a : accepted) {
    messages.push_back({std::string_view(a.org.data(), a.org.size()), elements.texts[a.index]});
  }
  // Answered when the last acknowledgement (or failure) arrives, on the producer's thread.
  producer_->SendAll(
      options_.topic, messages,
      [accepted = std::move(accepted), ids = std::move(ids), rejected = std::move(rejected),
       respond = std::move(respond), counters = counters_.get()](std::vector<bool> ok) {
        std::string ok_list, failed_list;
        int64_t acked = 0;
        for (size_t i = 0; i < accepted.size(); ++i) {
          std::string& list = ok[i] ? ok_list : failed_list;
          absl::StrAppend(
              &list, list.empty() ? "" : ",", "{\"index\":", accepted[i].index, ",\"id\":\"",
              RawJsonString(std::string_view(ids).substr(accepted[i].id_at, accepted[i].id_size)),
              "\"}");
          acked += ok[i] ? 1 : 0;
        }
        counters->events_accepted->Add(acked);
        if (failed_list.empty()) {
          counters->requests_ok->Add();
          respond({202,
                   kJson,
                   absl::StrCat("{\"accepted\":[", ok_list, "],\"rejected\":[", rejected, "]}\n"),
                   {}});
          return;
        }
        counters->kafka_failures->Add();
        // Nothing is lost by retrying the whole request: the events already taken are counted
        // once (event-id dedup).
        respond({503,
                 kJson,
                 absl::StrCat("{\"error\":{\"code\":\"kafka_unavailable\",\"message\":\"Kafka did "
                              "not acknowledge every event; retry the request (safe: events are "
                              "deduplicated by source and id)\"},\"accepted\":[",
                              ok_list, "],\"failed\":[", failed_list, "],\"rejected\":[", rejected,
                              "]}\n"),
                 {{"Retry-After", "1"}}});
      });
}

}  // namespace meterd::api
