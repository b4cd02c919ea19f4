#include "lib/devtools/fake_stripe.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <thread>
#include <utility>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "lib/common/json.h"
#include "lib/common/status_macros.h"
#include "lib/common/string_views.h"
#include "lib/http/http_client.h"

namespace meterd::devtools {
namespace {

constexpr char kMeterEventsPath[] = "/v1/billing/meter_events";
constexpr char kAdjustmentsPath[] = "/v1/billing/meter_event_adjustments";
// Stripe's limits on the fields the fake checks.
constexpr size_t kMaxIdempotencyKey = 255;
constexpr size_t kMaxIdentifier = 100;
constexpr size_t kMaxEventName = 100;
constexpr absl::Duration kMaxPast = absl::Hours(35 * 24);
constexpr absl::Duration kMaxFuture = absl::Minutes(5);
constexpr absl::Duration kWebhookTimeout = absl::Seconds(10);

// application/x-www-form-urlencoded body → field → value (a repeated field: the last one).
std::map<std::string, std::string> ParseForm(std::string_view body) {
  std::map<std::string, std::string> form;
  for (absl::string_view pair : absl::StrSplit(AbslView(body), '&', absl::SkipEmpty())) {
    const size_t eq = pair.find('=');
    form[http::PercentDecode(StdView(pair.substr(0, eq)))] =
        eq == absl::string_view::npos ? "" : http::PercentDecode(StdView(pair.substr(eq + 1)));
  }
  return form;
}

// Stripe's error object: {"error":{"code","doc_url","message","param","type"}}, the optional
// members only when set.
http::Response StripeError(int status, std::string_view type, std::string_view code,
                           std::string_view message, std::string_view param = "") {
  std::string body = "{\"error\":{";
  if (!code.empty()) {
    body += "\"code\":";
    AppendJsonString(&body, code);
    body += ",\"doc_url\":";
    AppendJsonString(&body, absl::StrCat("https://stripe.com/docs/error-codes/",
                                         absl::StrReplaceAll(AbslView(code), {{"_", "-"}})));
    body += ',';
  }
  body += "\"message\":";
  AppendJsonString(&body, message);
  if (!param.empty()) {
    body += ",\"param\":";
    AppendJsonString(&body, param);
  }
  body += ",\"type\":";
  AppendJsonString(&body, type);
  body += "}}\n";
  return {status, "application/json", std::move(body), {}};
}

http::Response InvalidRequest(std::string_view code, std::string_view message,
                              std::string_view param = "") {
  return StripeError(400, "invalid_request_error", code, message, param);
}

http::Response Json(std::string body) {
  body += '\n';
  return {200, "application/json", std::move(body), {}};
}

void AppendMeterEvent(std::string* out, const FakeMeterEvent& event) {
  absl::StrAppend(out, "{\"object\":\"billing.meter_event\",\"created\":", event.created,
                  ",\"event_name\":");
  AppendJsonString(out, event.event_name);
  *out += ",\"identifier\":";
  AppendJsonString(out, event.identifier);
  *out += ",\"livemode\":false,\"payload\":{\"stripe_customer_id\":";
  AppendJsonString(out, event.stripe_customer_id);
  *out += ",\"value\":";
  AppendJsonString(out, event.value);
  absl::StrAppend(out, "},\"timestamp\":", event.timestamp, "}");
}

// A whole number, as Stripe takes payload[value]: optional '-', digits, within int64.
bool IsWholeNumber(const std::string& text) {
  absl::string_view digits = text;
  absl::ConsumePrefix(&digits, "-");
  int64_t ignored = 0;
  return !digits.empty() && std::all_of(digits.begin(), digits.end(), absl::ascii_isdigit) &&
         absl::SimpleAtoi(text, &ignored);
}

// Parameters an endpoint takes: the names given, "expand[…]" and, with `payload`, any
// "payload[…]". The first other one, or empty.
std::string UnknownParameter(const std::map<std::string, std::string>& form,
                             std::initializer_list<std::string_view> known, bool payload) {
  for (const auto& [name, value] : form) {
    if (std::find(known.begin(), known.end(), name) != known.end()) continue;
    if (absl::StartsWith(name, "expand[")) continue;
    if (payload && absl::StartsWith(name, "payload[") && absl::EndsWith(name, "]")) continue;
    return name;
  }
  return "";
}

// What a key looks like in an error message: its prefix and last four characters at most.
std::string RedactKey(std::string_view key) {
  if (key.size() < 12) return "****";
  const size_t prefix = key.find('_', key.find('_') + 1);
  const std::string_view head = prefix != std::string_view::npos && prefix < 8
                                    ? key.substr(0, prefix + 1)
                                    : std::string_view();
  return absl::StrCat(AbslView(head), "****", AbslView(key.substr(key.size() - 4)));
}

// The key from "Bearer <key>", or from "Basic base64(<key>:)" as curl -u sends it.
std::string ApiKey(std::string_view authorization) {
  absl::string_view value = AbslView(authorization);
  if (absl::ConsumePrefix(&value, "Bearer ")) return std::string(absl::StripAsciiWhitespace(value));
  std::string decoded;
  if (absl::ConsumePrefix(&value, "Basic ") && absl::Base64Unescape(value, &decoded)) {
    return decoded.substr(0, decoded.find(':'));
  }
  return "";
}

std::string HexHmacSha256(std::string_view key, std::string_view text) {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
       reinterpret_cast<const unsigned char*>(text.data()), text.size(), mac, &size);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(mac), static_cast<size_t>(size)));
}

// "http://127.0.0.1:port/path" (or localhost) → origin and path; anything else is refused, so
// the fake never sends a request off the machine.
absl::StatusOr<std::pair<std::string, std::string>> LocalUrl(const std::string& url) {
  absl::string_view rest = url;
  if (!absl::ConsumePrefix(&rest, "http://127.0.0.1:") &&
      !absl::ConsumePrefix(&rest, "http://localhost:")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "webhook URL '", url, "' is not http://127.0.0.1:<port>/… or http://localhost:<port>/…"));
  }
  const size_t slash = rest.find('/');
  const std::string origin = url.substr(0, url.size() - rest.size() + std::min(slash, rest.size()));
  return std::make_pair(origin,
                        slash == absl::string_view::npos ? "/" : std::string(rest.substr(slash)));
}

absl::StatusOr<http::ClientResponse> DeliverWebhook(const std::string& url,
                                                    const std::string& event_json,
                                                    const std::string& secret) {
  ASSIGN_OR_RETURN(const auto target, LocalUrl(url));
  ASSIGN_OR_RETURN(std::unique_ptr<http::HttpClient> client,
                   http::HttpClient::Create(target.first, kWebhookTimeout));
  const std::string t = absl::StrCat(absl::ToUnixSeconds(absl::Now()));
  http::ClientRequest request;
  request.target = target.second;
  request.content_type = "application/json; charset=utf-8";
  request.headers = {
      {"User-Agent", "Stripe/1.0 (+https://stripe.com/docs/webhooks)"},
      {"Stripe-Signature",
       absl::StrCat("t=", t, ",v1=", HexHmacSha256(secret, absl::StrCat(t, ".", event_json)))}};
  request.body = event_json;
  return client->Send(request);
}

}  // namespace

// One thread running work at given times, in time order. Work given after Stop() is dropped,
// and so is work still waiting at Stop() (a dropped responder closes its connection).
class FakeStripe::Later {
 public:
  using Clock = std::chrono::steady_clock;

  Later() : thread_([this] { Run(); }) {}
  ~Later() { Stop(); }

  void At(Clock::time_point when, std::function<void()> work) {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    work_.emplace(when, std::move(work));
    wake_.notify_one();
  }

  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
      wake_.notify_one();
    }
    if (thread_.joinable()) thread_.join();
    std::multimap<Clock::time_point, std::function<void()>> dropped;
    std::lock_guard<std::mutex> lock(mu_);
    dropped.swap(work_);
  }

 private:
  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopping_) {
      if (work_.empty()) {
        wake_.wait(lock);
      } else if (const Clock::time_point first = work_.begin()->first; Clock::now() < first) {
        wake_.wait_until(lock, first);
      } else {
        std::function<void()> work = std::move(work_.begin()->second);
        work_.erase(work_.begin());
        lock.unlock();
        work();
        work = nullptr;
        lock.lock();
      }
    }
  }

  std::mutex mu_;
  std::condition_variable wake_;
  std::multimap<Clock::time_point, std::function<void()>> work_;  // Guarded by mu_.
  bool stopping_ = false;                                         // Guarded by mu_.
  std::thread thread_;
};

FakeStripe::FakeStripe(FakeStripeOptions options) : options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<FakeStripe>> FakeStripe::Start(FakeStripeOptions options) {
  absl::string_view port = options.listen;
  if (!absl::ConsumePrefix(&port, "127.0.0.1:") && !absl::ConsumePrefix(&port, "localhost:")) {
    return absl::InvalidArgumentError(
        absl::StrCat("the fake Stripe listens on 127.0.0.1 only: expected 127.0.0.1:<port>, got '",
                     options.listen, "'"));
  }
  if (options.secret_key.empty() || options.webhook_secret.empty()) {
    return absl::InvalidArgumentError("the fake Stripe needs a secret key and a webhook secret");
  }
  const std::string listen = absl::StrCat("127.0.0.1:", port);
  std::unique_ptr<FakeStripe> fake(new FakeStripe(std::move(options)));
  fake->stalls_ = std::make_unique<Later>();
  fake->webhooks_ = std::make_unique<Later>();
  ASSIGN_OR_RETURN(fake->server_,
                   http::HttpServer::Start(
                       listen, [f = fake.get()](http::Request request, http::Responder respond) {
                         f->Handle(std::move(request), std::move(respond));
                       }));
  return fake;
}

FakeStripe::~FakeStripe() {
  // Pending late answers hold server sessions: dropped while the server still exists.
  if (stalls_ != nullptr) stalls_->Stop();
  if (webhooks_ != nullptr) webhooks_->Stop();
  server_.reset();
}

std::string FakeStripe::base_url() const {
  return absl::StrCat("http://127.0.0.1:", server_->port());
}

void FakeStripe::FailNext(int n, int status, absl::Duration retry_after) {
  std::lock_guard<std::mutex> lock(mu_);
  for (int i = 0; i < n; ++i) faults_.push_back({status, retry_after, absl::ZeroDuration()});
}

void FakeStripe::StallNext(int n, absl::Duration delay) {
  std::lock_guard<std::mutex> lock(mu_);
  for (int i = 0; i < n; ++i) faults_.push_back({0, absl::ZeroDuration(), delay});
}

std::vector<FakeMeterEvent> FakeStripe::meter_events() const {
  std::lock_guard<std::mutex> lock(mu_);
  return events_;
}

std::vector<FakeAdjustment> FakeStripe::adjustments() const {
  std::lock_guard<std::mutex> lock(mu_);
  return adjustments_;
}

int64_t FakeStripe::requests() const {
  std::lock_guard<std::mutex> lock(mu_);
  return requests_;
}

int64_t FakeStripe::idempotent_replays() const {
  std::lock_guard<std::mutex> lock(mu_);
  return replays_;
}

int64_t FakeStripe::duplicate_identifiers() const {
  std::lock_guard<std::mutex> lock(mu_);
  return duplicates_;
}

absl::StatusOr<int> FakeStripe::SendWebhook(const std::string& url,
                                            const std::string& event_json) const {
  ASSIGN_OR_RETURN(const http::ClientResponse response,
                   DeliverWebhook(url, event_json, options_.webhook_secret));
  return response.status;
}

void FakeStripe::Handle(http::Request request, http::Responder respond) {
  if (absl::StartsWith(request.path, "/__fake/")) {
    if (request.method == "GET" && request.path == "/__fake/meter_events") {
      std::string body = "[";
      for (const FakeMeterEvent& event : meter_events()) {
        if (body.size() > 1) body += ',';
        AppendMeterEvent(&body, event);
      }
      body += ']';
      return respond(Json(std::move(body)));
    }
    if (request.method == "POST" && request.path == "/__fake/webhook") {
      return ForwardWebhook(request, std::move(respond));
    }
    return respond(StripeError(
        404, "invalid_request_error", "resource_missing",
        absl::StrCat("Unrecognized fake control URL (", request.method, ": ", request.path, ")")));
  }
  absl::Duration stall = absl::ZeroDuration();
  http::Response response = HandleApi(request, &stall);
  if (stall > absl::ZeroDuration()) {
    // Never a server thread held: the answer leaves from the stall thread.
    stalls_->At(Later::Clock::now() + absl::ToChronoNanoseconds(stall),
                [respond = std::move(respond), response = std::move(response)]() mutable {
                  respond(std::move(response));
                });
    return;
  }
  respond(std::move(response));
}

http::Response FakeStripe::HandleApi(const http::Request& request, absl::Duration* stall) {
  std::lock_guard<std::mutex> lock(mu_);
  ++requests_;
  const std::string request_id = absl::StrCat("req_fake_", requests_);
  const auto answer = [&request_id](http::Response response) {
    response.headers.emplace_back("Request-Id", request_id);
    return response;
  };

  if (!faults_.empty()) {
    const Fault fault = faults_.front();
    faults_.pop_front();
    if (fault.status == 429) {
      http::Response response =
          StripeError(429, "invalid_request_error", "rate_limit",
                      "Too many requests hit the API too quickly (injected by the fake Stripe).");
      if (fault.retry_after > absl::ZeroDuration()) {
        response.headers.emplace_back(
            "Retry-After",
            absl::StrCat(absl::ToInt64Seconds(absl::Ceil(fault.retry_after, absl::Seconds(1)))));
      }
      return answer(std::move(response));
    }
    if (fault.status != 0) {
      return answer(StripeError(fault.status,
                                fault.status >= 500 ? "api_error" : "invalid_request_error", "",
                                "An error occurred with our connection to Stripe (injected by the "
                                "fake Stripe)."));
    }
    *stall = fault.delay;
  }

  const std::string authorization(request.Header("Authorization"));
  if (authorization.empty()) {
    return answer(StripeError(
        401, "invalid_request_error", "",
        "You did not provide an API key. You need to provide your API key in the Authorization "
        "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY')."));
  }
  if (const std::string key = ApiKey(authorization); key != options_.secret_key) {
    return answer(StripeError(401, "invalid_request_error", "",
                              absl::StrCat("Invalid API Key provided: ", RedactKey(key))));
  }
  if (request.method != "POST" ||
      (request.path != kMeterEventsPath && request.path != kAdjustmentsPath)) {
    return answer(StripeError(
        404, "invalid_request_error", "resource_missing",
        absl::StrCat("Unrecognized request URL (", request.method, ": ", request.path, ").")));
  }

  const std::string key(request.Header("Idempotency-Key"));
  if (key.size() > kMaxIdempotencyKey) {
    return answer(StripeError(400, "idempotency_error", "",
                              "Idempotency keys are limited to 255 characters."));
  }
  // What a replay must repeat to be one: the endpoint and the parameters (in any order).
  const std::map<std::string, std::string> form = ParseForm(request.body);
  std::string fingerprint = absl::StrCat(request.method, " ", request.path);
  for (const auto& [name, value] : form) {
    absl::StrAppend(&fingerprint, "\n", name.size(), ":", name, "=", value);
  }
  if (!key.empty()) {
    if (const auto stored = idempotency_.find(key); stored != idempotency_.end()) {
      if (stored->second.request != fingerprint) {
        return answer(StripeError(
            400, "idempotency_error", "",
            absl::StrCat("Keys for idempotent requests can only be used with the same parameters "
                         "they were first used with. Try using a key other than '",
                         key, "' if you meant to execute a different request.")));
      }
      ++replays_;
      http::Response replay = stored->second.response;
      replay.headers.emplace_back("Idempotent-Replayed", "true");
      return replay;
    }
  }
  Outcome outcome = request.path == kMeterEventsPath ? CreateMeterEvent(form, absl::Now())
                                                     : CreateAdjustment(form);
  http::Response response = answer(std::move(outcome.response));
  if (!key.empty()) {
    response.headers.emplace_back("Idempotency-Key", key);
    if (outcome.stored) idempotency_.emplace(key, Stored{fingerprint, response});
  }
  return response;
}

FakeStripe::Outcome FakeStripe::CreateMeterEvent(const std::map<std::string, std::string>& form,
                                                 absl::Time now) {
  if (const std::string unknown =
          UnknownParameter(form, {"event_name", "identifier", "timestamp"}, /*payload=*/true);
      !unknown.empty()) {
    return {InvalidRequest("parameter_unknown",
                           absl::StrCat("Received unknown parameter: ", unknown), unknown),
            /*stored=*/false};
  }
  const auto field = [&form](const std::string& name) -> std::string {
    const auto it = form.find(name);
    return it == form.end() ? "" : it->second;
  };
  for (const char* required : {"event_name", "payload[stripe_customer_id]", "payload[value]"}) {
    if (field(required).empty()) {
      return {InvalidRequest("parameter_missing",
                             absl::StrCat("Missing required param: ", required, "."), required),
              /*stored=*/false};
    }
  }
  FakeMeterEvent event;
  event.event_name = field("event_name");
  event.stripe_customer_id = field("payload[stripe_customer_id]");
  event.value = field("payload[value]");
  event.identifier = field("identifier");
  event.created = absl::ToUnixSeconds(now);
  if (event.event_name.size() > kMaxEventName) {
    return {InvalidRequest("parameter_invalid", "event_name is limited to 100 characters.",
                           "event_name"),
            /*stored=*/false};
  }
  if (event.identifier.size() > kMaxIdentifier) {
    return {InvalidRequest("parameter_invalid", "identifier is limited to 100 characters.",
                           "identifier"),
            /*stored=*/false};
  }
  if (!IsWholeNumber(event.value)) {
    return {InvalidRequest(
                "parameter_invalid",
                absl::StrCat("Invalid payload[value]: '", event.value, "' is not a whole number."),
                "payload[value]"),
            /*stored=*/false};
  }
  if (const std::string timestamp = field("timestamp"); timestamp.empty()) {
    event.timestamp = event.created;
  } else if (!absl::SimpleAtoi(timestamp, &event.timestamp) ||
             absl::FromUnixSeconds(event.timestamp) < now - kMaxPast ||
             absl::FromUnixSeconds(event.timestamp) > now + kMaxFuture) {
    return {InvalidRequest("parameter_invalid",
                           absl::StrCat("Invalid timestamp: ", timestamp,
                                        " must be a Unix time within the past 35 days and at most "
                                        "5 minutes in the future."),
                           "timestamp"),
            /*stored=*/false};
  }
  if (event.identifier.empty()) {
    event.identifier = absl::StrCat("fake_mev_", ++generated_ids_);
  }
  if (event_index_.contains(event.identifier)) {
    ++duplicates_;
    return {InvalidRequest(
        "duplicate_meter_event",
        absl::StrCat("A meter event with identifier '", event.identifier, "' already exists."),
        "identifier")};
  }
  event_index_.emplace(event.identifier, events_.size());
  events_.push_back(event);
  std::string body;
  AppendMeterEvent(&body, event);
  return {Json(std::move(body))};
}

FakeStripe::Outcome FakeStripe::CreateAdjustment(const std::map<std::string, std::string>& form) {
  if (const std::string unknown =
          UnknownParameter(form, {"event_name", "type", "cancel[identifier]"}, /*payload=*/false);
      !unknown.empty()) {
    return {InvalidRequest("parameter_unknown",
                           absl::StrCat("Received unknown parameter: ", unknown), unknown),
            /*stored=*/false};
  }
  FakeAdjustment adjustment;
  for (auto [name, value] :
       {std::pair{"event_name", &adjustment.event_name}, std::pair{"type", &adjustment.type},
        std::pair{"cancel[identifier]", &adjustment.cancel_identifier}}) {
    const auto it = form.find(name);
    if (it == form.end() || it->second.empty()) {
      return {InvalidRequest("parameter_missing",
                             absl::StrCat("Missing required param: ", name, "."), name),
              /*stored=*/false};
    }
    *value = it->second;
  }
  if (adjustment.type != "cancel") {
    return {InvalidRequest(
                "parameter_invalid",
                absl::StrCat("Invalid type: must be one of cancel, got '", adjustment.type, "'."),
                "type"),
            /*stored=*/false};
  }
  const auto recorded = event_index_.find(adjustment.cancel_identifier);
  if (recorded == event_index_.end() ||
      events_[recorded->second].event_name != adjustment.event_name) {
    return {InvalidRequest("resource_missing",
                           absl::StrCat("No such meter event: '", adjustment.cancel_identifier,
                                        "' for event_name '", adjustment.event_name, "'."),
                           "cancel[identifier]")};
  }
  adjustments_.push_back(adjustment);
  std::string body = "{\"object\":\"billing.meter_event_adjustment\",\"cancel\":{\"identifier\":";
  AppendJsonString(&body, adjustment.cancel_identifier);
  body += "},\"event_name\":";
  AppendJsonString(&body, adjustment.event_name);
  body += ",\"livemode\":false,\"status\":\"pending\",\"type\":\"cancel\"}";
  return {Json(std::move(body))};
}

void FakeStripe::ForwardWebhook(const http::Request& request, http::Responder respond) {
  const std::string to = request.Param("to");
  if (absl::Status local = LocalUrl(to).status(); !local.ok()) {
    return respond(InvalidRequest("parameter_invalid", std::string(local.message()), "to"));
  }
  // Sending blocks until the receiver answers: on the webhook thread, never a server thread.
  webhooks_->At(Later::Clock::now(), [to, body = request.body, secret = options_.webhook_secret,
                                      respond = std::move(respond)] {
    const absl::StatusOr<http::ClientResponse> delivered = DeliverWebhook(to, body, secret);
    if (!delivered.ok()) {
      return respond(
          StripeError(502, "api_error", "",
                      absl::StrCat("webhook delivery failed: ", delivered.status().message())));
    }
    std::string answer = absl::StrCat("{\"status\":", delivered->status, ",\"body\":");
    AppendJsonString(&answer, delivered->body);
    answer += '}';
    respond(Json(std::move(answer)));
  });
}

}  // namespace meterd::devtools
