// The fake Stripe API (lib/devtools/fake_stripe) through the real HTTP client
// (lib/http/http_client) and server, on 127.0.0.1: Stripe's parameters, errors, idempotency
// keys and fault script; the client's timeout, keep-alive and TLS verification; webhooks
// signed so that meterd's own verifier (lib/api/stripe_webhook) accepts them.
#include "lib/devtools/fake_stripe.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <string>
#include <thread>

#include <gtest/gtest.h>
#include <simdjson.h>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "lib/api/stripe_webhook.h"
#include "lib/http/http_client.h"
#include "lib/http/http_server.h"

namespace meterd::devtools {
namespace {

using http::ClientRequest;
using http::ClientResponse;
using http::HttpClient;

constexpr char kKey[] = "sk_test_meterd_fake";

std::string Now() { return absl::StrCat(absl::ToUnixSeconds(absl::Now())); }

// The member at JSON pointer `pointer` of `json`, as text (strings unquoted); "<missing>" if
// absent or not JSON.
std::string At(const std::string& json, std::string_view pointer) {
  simdjson::dom::parser parser;
  simdjson::dom::element doc;
  if (parser.parse(json).get(doc) != simdjson::SUCCESS) return "<not json>";
  simdjson::dom::element value;
  if (doc.at_pointer(pointer).get(value) != simdjson::SUCCESS) return "<missing>";
  if (value.is_string()) return std::string(value.get_string().value());
  return simdjson::to_string(value);
}

class FakeStripeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto fake = FakeStripe::Start();
    ASSERT_TRUE(fake.ok()) << fake.status();
    fake_ = std::move(*fake);
    client_ = Client(absl::Seconds(5));
  }

  std::unique_ptr<HttpClient> Client(absl::Duration timeout) {
    auto client = HttpClient::Create(fake_->base_url(), timeout);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? std::move(*client) : nullptr;
  }

  static ClientRequest MeterEvent(const std::vector<std::pair<std::string, std::string>>& fields,
                                  std::string idempotency_key = "", std::string key = kKey) {
    ClientRequest request;
    request.target = "/v1/billing/meter_events";
    request.content_type = "application/x-www-form-urlencoded";
    request.body = http::FormEncode(fields);
    if (!key.empty()) request.headers.emplace_back("Authorization", "Bearer " + key);
    if (!idempotency_key.empty()) request.headers.emplace_back("Idempotency-Key", idempotency_key);
    return request;
  }

  static std::vector<std::pair<std::string, std::string>> Fields(const std::string& identifier,
                                                                 const std::string& value = "25") {
    return {{"event_name", "api_requests"},
            {"payload[stripe_customer_id]", "cus_123"},
            {"payload[value]", value},
            {"identifier", identifier},
            {"timestamp", Now()}};
  }

  ClientResponse Send(const ClientRequest& request, HttpClient* client = nullptr) {
    absl::StatusOr<ClientResponse> response = (client ? client : client_.get())->Send(request);
    EXPECT_TRUE(response.ok()) << response.status();
    return response.ok() ? *response : ClientResponse{};
  }

  std::unique_ptr<FakeStripe> fake_;
  std::unique_ptr<HttpClient> client_;
};

TEST(FormEncodeTest, KeepsUnreservedCharactersAndEscapesEverythingElse) {
  EXPECT_EQ(http::FormEncode({{"payload[value]", "25"}, {"event_name", "a-b.c_d~e"}}),
            "payload%5Bvalue%5D=25&event_name=a-b.c_d~e");
  EXPECT_EQ(http::FormEncode({{"k", "a b&c=d+e%f/?#\xc3\xa9"}}),
            "k=a%20b%26c%3Dd%2Be%25f%2F%3F%23%C3%A9");
  EXPECT_EQ(http::FormEncode({}), "");
}

// Reserved characters survive the client's encoding and the fake's decoding byte for byte.
TEST_F(FakeStripeTest, FormEncodingRoundTripsReservedCharacters) {
  const std::string customer = "cus_ a&b=c+d%25/?#[]\xc3\xa9";
  const std::string identifier = "id with spaces & = + %";
  auto fields = Fields(identifier);
  fields[1].second = customer;
  const ClientResponse response = Send(MeterEvent(fields));
  ASSERT_EQ(response.status, 200) << response.body;
  ASSERT_EQ(fake_->meter_events().size(), 1u);
  EXPECT_EQ(fake_->meter_events()[0].stripe_customer_id, customer);
  EXPECT_EQ(fake_->meter_events()[0].identifier, identifier);
  EXPECT_EQ(At(response.body, "/payload/stripe_customer_id"), customer);
}

TEST_F(FakeStripeTest, AcceptsAndRecordsAMeterEvent) {
  const std::string timestamp = absl::StrCat(absl::ToUnixSeconds(absl::Now()) - 3600);
  const ClientResponse response = Send(MeterEvent({{"event_name", "api_requests"},
                                                   {"payload[stripe_customer_id]", "cus_42"},
                                                   {"payload[value]", "-7"},
                                                   {"identifier", "evt-1"},
                                                   {"timestamp", timestamp}}));
  ASSERT_EQ(response.status, 200) << response.body;
  EXPECT_EQ(response.Header("content-type"), "application/json");
  EXPECT_EQ(At(response.body, "/object"), "billing.meter_event");
  EXPECT_EQ(At(response.body, "/identifier"), "evt-1");
  EXPECT_EQ(At(response.body, "/event_name"), "api_requests");
  EXPECT_EQ(At(response.body, "/livemode"), "false");
  EXPECT_EQ(At(response.body, "/payload/value"), "-7");  // A string, as Stripe echoes it.
  EXPECT_EQ(At(response.body, "/timestamp"), timestamp);
  const std::vector<FakeMeterEvent> events = fake_->meter_events();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].identifier, "evt-1");
  EXPECT_EQ(events[0].event_name, "api_requests");
  EXPECT_EQ(events[0].stripe_customer_id, "cus_42");
  EXPECT_EQ(events[0].value, "-7");
  EXPECT_EQ(absl::StrCat(events[0].timestamp), timestamp);
  EXPECT_NEAR(events[0].created, absl::ToUnixSeconds(absl::Now()), 5);
  EXPECT_EQ(fake_->requests(), 1);

  // Without an identifier one is generated; the control endpoint lists both.
  auto fields = Fields("");
  fields.erase(fields.begin() + 3);
  const ClientResponse generated = Send(MeterEvent(fields));
  ASSERT_EQ(generated.status, 200) << generated.body;
  EXPECT_FALSE(At(generated.body, "/identifier").empty());
  ClientRequest list;
  list.method = "GET";
  list.target = "/__fake/meter_events";
  const ClientResponse listed = Send(list);
  ASSERT_EQ(listed.status, 200);
  EXPECT_EQ(At(listed.body, "/0/identifier"), "evt-1");
  EXPECT_EQ(At(listed.body, "/1/identifier"), At(generated.body, "/identifier"));
  EXPECT_EQ(fake_->requests(), 2);  // Control requests are not API requests.
}

TEST_F(FakeStripeTest, RefusesMissingAndInvalidParametersStripeShaped) {
  auto fields = Fields("evt-missing");
  fields.erase(fields.begin() + 2);  // payload[value]
  const ClientResponse missing = Send(MeterEvent(fields));
  EXPECT_EQ(missing.status, 400);
  EXPECT_EQ(missing.Header("Content-Type"), "application/json");
  EXPECT_EQ(At(missing.body, "/error/type"), "invalid_request_error") << missing.body;
  EXPECT_EQ(At(missing.body, "/error/code"), "parameter_missing");
  EXPECT_EQ(At(missing.body, "/error/param"), "payload[value]");
  EXPECT_NE(At(missing.body, "/error/message"), "<missing>");

  const ClientResponse fraction = Send(MeterEvent(Fields("evt-fraction", "2.5")));
  EXPECT_EQ(fraction.status, 400);
  EXPECT_EQ(At(fraction.body, "/error/code"), "parameter_invalid");
  EXPECT_EQ(At(fraction.body, "/error/param"), "payload[value]");

  for (const int64_t offset : {-36 * 86400, 600}) {  // 36 days old; 10 minutes ahead.
    auto stale = Fields("evt-time");
    stale[4].second = absl::StrCat(absl::ToUnixSeconds(absl::Now()) + offset);
    const ClientResponse response = Send(MeterEvent(stale));
    EXPECT_EQ(response.status, 400) << offset;
    EXPECT_EQ(At(response.body, "/error/code"), "parameter_invalid");
    EXPECT_EQ(At(response.body, "/error/param"), "timestamp");
  }
  auto unknown = Fields("evt-unknown");
  unknown.emplace_back("customer", "cus_123");
  EXPECT_EQ(At(Send(MeterEvent(unknown)).body, "/error/code"), "parameter_unknown");
  EXPECT_TRUE(fake_->meter_events().empty());

  ClientRequest elsewhere = MeterEvent(Fields("evt-x"));
  elsewhere.target = "/v1/customers";
  const ClientResponse not_found = Send(elsewhere);
  EXPECT_EQ(not_found.status, 404);
  EXPECT_EQ(At(not_found.body, "/error/code"), "resource_missing");
}

TEST_F(FakeStripeTest, RefusesAWrongOrMissingKeyWithoutEchoingIt) {
  const std::string wrong = "sk_test_not_the_right_key_98765";
  const ClientResponse response = Send(MeterEvent(Fields("evt-auth"), "", wrong));
  EXPECT_EQ(response.status, 401);
  EXPECT_EQ(At(response.body, "/error/type"), "invalid_request_error");
  EXPECT_EQ(response.body.find(wrong), std::string::npos) << response.body;
  EXPECT_NE(At(response.body, "/error/message").find("Invalid API Key provided"),
            std::string::npos);
  EXPECT_EQ(Send(MeterEvent(Fields("evt-auth"), "", "")).status, 401);
  EXPECT_TRUE(fake_->meter_events().empty());
  // curl -u sk_…: (HTTP Basic, the key as user name) is Stripe's other way in.
  ClientRequest basic = MeterEvent(Fields("evt-auth"), "", "");
  basic.headers.emplace_back("Authorization",
                             "Basic " + absl::Base64Escape(absl::StrCat(kKey, ":")));
  EXPECT_EQ(Send(basic).status, 200);
}

TEST_F(FakeStripeTest, InjectedServerErrorsThenSuccess) {
  fake_->FailNext(2, 503);
  const ClientRequest request = MeterEvent(Fields("evt-503"), "key-503");
  for (int i = 0; i < 2; ++i) {
    const ClientResponse failed = Send(request);
    EXPECT_EQ(failed.status, 503);
    EXPECT_EQ(At(failed.body, "/error/type"), "api_error");
    EXPECT_TRUE(fake_->meter_events().empty());
  }
  // Faults are not stored under the idempotency key: the third try runs.
  const ClientResponse ok = Send(request);
  EXPECT_EQ(ok.status, 200) << ok.body;
  EXPECT_EQ(ok.Header("Idempotent-Replayed"), "");
  EXPECT_EQ(fake_->meter_events().size(), 1u);
  EXPECT_EQ(fake_->requests(), 3);
  EXPECT_EQ(fake_->idempotent_replays(), 0);
}

TEST_F(FakeStripeTest, RateLimitAnswersCarryRetryAfter) {
  fake_->FailNext(1, 429, absl::Milliseconds(6500));
  const ClientResponse limited = Send(MeterEvent(Fields("evt-429")));
  EXPECT_EQ(limited.status, 429);
  EXPECT_EQ(limited.Header("Retry-After"), "7");  // Whole seconds, rounded up.
  EXPECT_EQ(At(limited.body, "/error/type"), "invalid_request_error");
  EXPECT_EQ(At(limited.body, "/error/code"), "rate_limit");
  fake_->FailNext(1, 429);
  EXPECT_EQ(Send(MeterEvent(Fields("evt-429"))).Header("Retry-After"), "");
  EXPECT_EQ(Send(MeterEvent(Fields("evt-429"))).status, 200);
}

// The case an exporter must get right: Stripe recorded the event, the answer never came.
TEST_F(FakeStripeTest, StalledRequestIsRecordedAndItsKeyReplaysIt) {
  fake_->StallNext(1, absl::Seconds(2));
  std::unique_ptr<HttpClient> impatient = Client(absl::Milliseconds(300));
  const ClientRequest request = MeterEvent(Fields("evt-stall"), "key-stall");
  const auto start = std::chrono::steady_clock::now();
  const absl::StatusOr<ClientResponse> gave_up = impatient->Send(request);
  EXPECT_TRUE(absl::IsDeadlineExceeded(gave_up.status())) << gave_up.status();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(600));
  ASSERT_EQ(fake_->meter_events().size(), 1u);

  // Same key, same body, on the same client (a new connection): the stored answer.
  const absl::StatusOr<ClientResponse> replayed = impatient->Send(request);
  ASSERT_TRUE(replayed.ok()) << replayed.status();
  EXPECT_EQ(replayed->status, 200) << replayed->body;
  EXPECT_EQ(replayed->Header("Idempotent-Replayed"), "true");
  EXPECT_EQ(At(replayed->body, "/identifier"), "evt-stall");
  EXPECT_EQ(fake_->idempotent_replays(), 1);

  // The same identifier without the key is a second event: refused as a duplicate.
  const ClientResponse duplicate = Send(MeterEvent(Fields("evt-stall")));
  EXPECT_EQ(duplicate.status, 400);
  EXPECT_EQ(At(duplicate.body, "/error/code"), "duplicate_meter_event");
  EXPECT_EQ(fake_->duplicate_identifiers(), 1);
  EXPECT_EQ(fake_->meter_events().size(), 1u);

  // The key with another body is misuse, not a replay.
  const ClientResponse misuse = Send(MeterEvent(Fields("evt-stall", "26"), "key-stall"));
  EXPECT_EQ(misuse.status, 400);
  EXPECT_EQ(At(misuse.body, "/error/type"), "idempotency_error");
  EXPECT_EQ(fake_->idempotent_replays(), 1);
}

TEST_F(FakeStripeTest, CancelsARecordedEvent) {
  ASSERT_EQ(Send(MeterEvent(Fields("evt-cancel"))).status, 200);
  const auto adjustment = [](const std::string& identifier) {
    ClientRequest request;
    request.target = "/v1/billing/meter_event_adjustments";
    request.content_type = "application/x-www-form-urlencoded";
    request.headers = {{"Authorization", absl::StrCat("Bearer ", kKey)}};
    request.body = http::FormEncode(
        {{"event_name", "api_requests"}, {"type", "cancel"}, {"cancel[identifier]", identifier}});
    return request;
  };
  const ClientResponse done = Send(adjustment("evt-cancel"));
  ASSERT_EQ(done.status, 200) << done.body;
  EXPECT_EQ(At(done.body, "/object"), "billing.meter_event_adjustment");
  EXPECT_EQ(At(done.body, "/cancel/identifier"), "evt-cancel");
  EXPECT_EQ(At(done.body, "/type"), "cancel");
  ASSERT_EQ(fake_->adjustments().size(), 1u);
  EXPECT_EQ(fake_->adjustments()[0].cancel_identifier, "evt-cancel");
  EXPECT_EQ(fake_->adjustments()[0].type, "cancel");

  const ClientResponse unknown = Send(adjustment("evt-never-sent"));
  EXPECT_EQ(unknown.status, 400);
  EXPECT_EQ(At(unknown.body, "/error/code"), "resource_missing");
  EXPECT_EQ(fake_->adjustments().size(), 1u);
}

// Signed as Stripe signs, checked by meterd's own verifier; also through the control endpoint.
TEST_F(FakeStripeTest, WebhooksCarryASignatureMeterdAccepts) {
  std::mutex mu;
  std::string signature, body, path;
  auto receiver =
      http::HttpServer::Start("127.0.0.1:0", [&](http::Request request, http::Responder respond) {
        {
          std::lock_guard<std::mutex> lock(mu);
          signature = std::string(request.Header("Stripe-Signature"));
          body = request.body;
          path = request.path;
        }
        respond({200, "application/json", "{\"received\":true}", {}});
      });
  ASSERT_TRUE(receiver.ok()) << receiver.status();
  const std::string url =
      absl::StrCat("http://127.0.0.1:", (*receiver)->port(), "/v1/stripe/webhook");
  const std::string event =
      R"({"id":"evt_1","object":"event","type":"customer.subscription.updated","data":{"object":{}}})";
  const absl::StatusOr<int> status = fake_->SendWebhook(url, event);
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ(*status, 200);
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_EQ(path, "/v1/stripe/webhook");
    EXPECT_EQ(body, event);
    EXPECT_TRUE(
        api::VerifyStripeSignature(signature, body, {"whsec_meterd_fake_0123456789"}, absl::Now())
            .ok())
        << signature;
    EXPECT_FALSE(
        api::VerifyStripeSignature(signature, body, {"whsec_another_secret_00000000"}, absl::Now())
            .ok());
    signature.clear();
  }

  ClientRequest control;
  control.target = "/__fake/webhook?to=" + absl::StrReplaceAll(url, {{":", "%3A"}, {"/", "%2F"}});
  control.content_type = "application/json";
  control.body = event;
  const ClientResponse forwarded = Send(control);
  ASSERT_EQ(forwarded.status, 200) << forwarded.body;
  EXPECT_EQ(At(forwarded.body, "/status"), "200");
  EXPECT_EQ(At(forwarded.body, "/body"), "{\"received\":true}");
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_TRUE(
        api::VerifyStripeSignature(signature, event, {"whsec_meterd_fake_0123456789"}, absl::Now())
            .ok());
  }
  // Never off the machine.
  control.target = "/__fake/webhook?to=http%3A%2F%2Fexample.com%2Fhook";
  EXPECT_EQ(Send(control).status, 400);
  EXPECT_FALSE(fake_->SendWebhook("http://10.0.0.1:80/hook", event).ok());
}

TEST(HttpClientTest, RefusesWhatIsNotAnOrigin) {
  for (const char* url :
       {"ftp://x", "x", "http://", "http://host/path", "http://host:99999",
        "http://host:", "http://user@host:80", "https://host:443/v1", "http://[::1"}) {
    const auto client = HttpClient::Create(url, absl::Seconds(1));
    EXPECT_TRUE(absl::IsInvalidArgument(client.status())) << url;
    EXPECT_NE(client.status().message().find(url), absl::string_view::npos) << client.status();
  }
  for (const char* url : {"http://127.0.0.1:8080", "http://localhost:1/", "https://api.stripe.com",
                          "https://api.stripe.com:443/", "http://[::1]:8080"}) {
    const auto client = HttpClient::Create(url, absl::Seconds(1));
    ASSERT_TRUE(client.ok()) << url << ": " << client.status();
    EXPECT_EQ((*client)->base_url(), url);
  }
}

// A server that accepts the connection (the kernel does) and never answers: the timeout ends
// the exchange, not the operating system's.
TEST(HttpClientTest, TimeoutIsReal) {
  const int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(listener, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  ASSERT_EQ(::listen(listener, 4), 0);
  socklen_t size = sizeof(address);
  ASSERT_EQ(::getsockname(listener, reinterpret_cast<sockaddr*>(&address), &size), 0);
  auto client = HttpClient::Create(absl::StrCat("http://127.0.0.1:", ntohs(address.sin_port)),
                                   absl::Milliseconds(400));
  ASSERT_TRUE(client.ok()) << client.status();
  for (int i = 0; i < 2; ++i) {  // And again on a new connection.
    const auto start = std::chrono::steady_clock::now();
    ClientRequest request;
    request.body = "x";
    const absl::StatusOr<ClientResponse> response = (*client)->Send(request);
    const auto elapsed = std::chrono::steady_clock::now() - start;
    EXPECT_TRUE(absl::IsDeadlineExceeded(response.status())) << response.status();
    EXPECT_NE(response.status().message().find("read from"), absl::string_view::npos)
        << response.status();
    EXPECT_GE(elapsed, std::chrono::milliseconds(390));
    EXPECT_LT(elapsed, std::chrono::milliseconds(800));
  }
  ::close(listener);
}

TEST(HttpClientTest, ConnectionRefusedIsUnavailable) {
  const int probe = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(probe, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  socklen_t size = sizeof(address);
  ASSERT_EQ(::getsockname(probe, reinterpret_cast<sockaddr*>(&address), &size), 0);
  ::close(probe);  // A port nobody listens on.
  auto client = HttpClient::Create(absl::StrCat("http://127.0.0.1:", ntohs(address.sin_port)),
                                   absl::Seconds(2));
  ASSERT_TRUE(client.ok());
  const absl::StatusOr<ClientResponse> response = (*client)->Send({});
  EXPECT_TRUE(absl::IsUnavailable(response.status())) << response.status();
  EXPECT_NE(response.status().message().find("connect to"), absl::string_view::npos);
}

// One connection carries several requests; one the server closed (idle timeout) is replaced.
TEST(HttpClientTest, KeepsTheConnectionAndReconnectsWhenTheServerClosedIt) {
  http::Limits limits;
  limits.idle_timeout = absl::Milliseconds(200);
  auto server = http::HttpServer::Start(
      "127.0.0.1:0",
      [](http::Request request, http::Responder respond) {
        respond({200, "text/plain", request.method + " " + request.path, {}});
      },
      limits);
  ASSERT_TRUE(server.ok()) << server.status();
  auto client =
      HttpClient::Create(absl::StrCat("http://127.0.0.1:", (*server)->port()), absl::Seconds(2));
  ASSERT_TRUE(client.ok());
  ClientRequest request;
  request.method = "GET";
  request.target = "/a";
  for (int i = 0; i < 3; ++i) {
    const absl::StatusOr<ClientResponse> response = (*client)->Send(request);
    ASSERT_TRUE(response.ok()) << response.status();
    EXPECT_EQ(response->body, "GET /a");
  }
  EXPECT_EQ((*server)->open_connections(), 1);
  absl::SleepFor(absl::Milliseconds(500));  // The server closes the idle connection.
  request.method = "POST";                  // Not replayable: must not need a retry.
  const absl::StatusOr<ClientResponse> after = (*client)->Send(request);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->body, "POST /a");
}

// A raw HTTP server following a script: for each connection accepted in turn, a list of what
// to do with the requests that come on it.
class ScriptedServer {
 public:
  enum Action {
    kAnswer,          // 200, keep-alive.
    kAnswerAndClose,  // 200 with "Connection: close", then close.
    kDrop,            // Read the request, close without an answer.
  };
  explicit ScriptedServer(std::vector<std::vector<Action>> script) {
    listener_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t size = sizeof(address);
    if (::bind(listener_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
        ::listen(listener_, 8) != 0 ||
        ::getsockname(listener_, reinterpret_cast<sockaddr*>(&address), &size) != 0) {
      ADD_FAILURE() << "cannot listen";
      return;
    }
    port_ = ntohs(address.sin_port);
    thread_ = std::thread([this, script = std::move(script)] { Run(script); });
  }
  ~ScriptedServer() {
    ::shutdown(listener_, SHUT_RDWR);  // Wakes a pending accept.
    if (thread_.joinable()) thread_.join();
    for (const int fd : kept_) ::close(fd);
    ::close(listener_);
  }
  int port() const { return port_; }
  std::vector<std::string> requests() {
    std::lock_guard<std::mutex> lock(mu_);
    return requests_;
  }

 private:
  void Run(const std::vector<std::vector<Action>>& script) {
    for (const std::vector<Action>& actions : script) {
      const int fd = ::accept(listener_, nullptr, nullptr);
      if (fd < 0) return;
      bool open = true;
      for (const Action action : actions) {
        if (!ReadRequest(fd)) break;
        if (action == kDrop) {
          ::close(fd);
          open = false;
          break;
        }
        const std::string answer =
            absl::StrCat("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
                         action == kAnswerAndClose ? "Connection: close\r\n" : "", "\r\nok");
        if (::write(fd, answer.data(), answer.size()) != static_cast<ssize_t>(answer.size())) break;
        if (action == kAnswerAndClose) {
          ::close(fd);
          open = false;
          break;
        }
      }
      if (open) kept_.push_back(fd);
    }
  }
  // Headers, then Content-Length bytes of body; records the request line.
  bool ReadRequest(int fd) {
    std::string data;
    char chunk[4096];
    size_t end = std::string::npos;
    while ((end = data.find("\r\n\r\n")) == std::string::npos) {
      const ssize_t n = ::read(fd, chunk, sizeof(chunk));
      if (n <= 0) return false;
      data.append(chunk, static_cast<size_t>(n));
    }
    size_t length = 0;
    const size_t header = data.find("Content-Length: ");
    if (header != std::string::npos && header < end) {
      length = std::stoul(data.substr(header + 16));
    }
    while (data.size() < end + 4 + length) {
      const ssize_t n = ::read(fd, chunk, sizeof(chunk));
      if (n <= 0) return false;
      data.append(chunk, static_cast<size_t>(n));
    }
    std::lock_guard<std::mutex> lock(mu_);
    requests_.push_back(data.substr(0, data.find("\r\n")));
    return true;
  }

  int listener_ = -1;
  int port_ = 0;
  std::vector<int> kept_;  // Touched by the thread, then by the destructor after joining it.
  std::mutex mu_;
  std::vector<std::string> requests_;
  std::thread thread_;
};

// A kept connection that drops a request without answering (the server's idle close racing
// it): written again on a new connection only when that is harmless (an Idempotency-Key, or
// GET); "Connection: close" is honoured.
TEST(HttpClientTest, RetriesOnlyReplayableRequestsOnADroppedKeptConnection) {
  using Action = ScriptedServer::Action;
  ScriptedServer server({{Action::kAnswer, Action::kDrop},
                         {Action::kAnswer, Action::kDrop},
                         {Action::kAnswerAndClose},
                         {Action::kAnswer}});
  auto client =
      HttpClient::Create(absl::StrCat("http://127.0.0.1:", server.port()), absl::Seconds(2));
  ASSERT_TRUE(client.ok()) << client.status();
  const auto send = [&](const std::string& target, bool idempotency_key) {
    ClientRequest request;
    request.target = target;
    request.body = "{}";
    if (idempotency_key) request.headers.emplace_back("Idempotency-Key", "k" + target);
    return (*client)->Send(request);
  };
  EXPECT_TRUE(send("/1", false).ok());
  const auto retried = send("/2", true);  // Dropped on connection 1, answered on 2.
  ASSERT_TRUE(retried.ok()) << retried.status();
  EXPECT_EQ(retried->body, "ok");
  const auto dropped = send("/3", false);  // Dropped on connection 2: not sent twice.
  EXPECT_TRUE(absl::IsUnavailable(dropped.status())) << dropped.status();
  EXPECT_TRUE(send("/4", false).ok());  // Connection 3, closed after its answer.
  EXPECT_TRUE(send("/5", false).ok());  // Connection 4.
  EXPECT_EQ(server.requests(),
            (std::vector<std::string>{"POST /1 HTTP/1.1", "POST /2 HTTP/1.1", "POST /2 HTTP/1.1",
                                      "POST /3 HTTP/1.1", "POST /4 HTTP/1.1", "POST /5 HTTP/1.1"}));
}

// HTTPS: a certificate the system does not trust, or one naming another host, fails the
// handshake; trusted (SSL_CERT_FILE, which OpenSSL's default paths read) and naming the host,
// it works.
TEST(HttpClientTest, VerifiesTheServerCertificateAndName) {
  char dir_template[] = "/tmp/meterd_http_client_XXXXXX";
  const char* dir = ::mkdtemp(dir_template);
  ASSERT_NE(dir, nullptr);
  const auto make_cert = [&](const std::string& name, const std::string& san) {
    const std::string command = absl::StrCat(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 "
        "-subj /CN=meterd-test -addext subjectAltName=",
        san, " -keyout ", dir, "/", name, ".key -out ", dir, "/", name, ".pem >/dev/null 2>&1");
    return std::system(command.c_str()) == 0;
  };
  ASSERT_TRUE(make_cert("good", "IP:127.0.0.1"));
  ASSERT_TRUE(make_cert("other", "DNS:other.example"));

  const auto send = [&](const std::string& name, bool trust) -> absl::StatusOr<ClientResponse> {
    auto server = http::HttpServer::Start(
        "127.0.0.1:0",
        [](http::Request, http::Responder respond) {
          respond({200, "text/plain", "tls ok", {}});
        },
        {}, {}, {absl::StrCat(dir, "/", name, ".pem"), absl::StrCat(dir, "/", name, ".key")});
    if (!server.ok()) return server.status();
    if (trust) ::setenv("SSL_CERT_FILE", absl::StrCat(dir, "/", name, ".pem").c_str(), 1);
    auto client =
        HttpClient::Create(absl::StrCat("https://127.0.0.1:", (*server)->port()), absl::Seconds(2));
    ::unsetenv("SSL_CERT_FILE");
    if (!client.ok()) return client.status();
    ClientRequest request;
    request.method = "GET";
    return (*client)->Send(request);
  };
  const auto untrusted = send("good", /*trust=*/false);
  EXPECT_TRUE(absl::IsUnavailable(untrusted.status())) << untrusted.status();
  EXPECT_NE(untrusted.status().message().find("handshake"), absl::string_view::npos)
      << untrusted.status();
  const auto wrong_name = send("other", /*trust=*/true);
  EXPECT_TRUE(absl::IsUnavailable(wrong_name.status())) << wrong_name.status();
  EXPECT_NE(wrong_name.status().message().find("IP address mismatch"), absl::string_view::npos)
      << wrong_name.status();
  const auto trusted = send("good", /*trust=*/true);
  ASSERT_TRUE(trusted.ok()) << trusted.status();
  EXPECT_EQ(trusted->body, "tls ok");
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace meterd::devtools
