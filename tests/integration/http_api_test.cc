// The HTTP API end to end: API keys made with `meterd api-key`, events POSTed to meterd's
// HTTP server, acknowledged after Kafka, consumed back and counted exactly; the auth matrix,
// the rate limit and hostile clients.
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "lib/api/stripe_webhook.h"
#include "lib/common/json.h"
#include "tests/support/meterd_fixture.h"

namespace meterd::testing {
namespace {

constexpr char kOrg[] = "00000000-0000-4000-8000-0000000000e1";
constexpr char kOtherOrg[] = "00000000-0000-4000-8000-0000000000e2";

class HttpApiTest : public MeterdFixture {
 protected:
  std::string KeyId(const std::string& token) { return token.substr(3, 12); }
  std::string SecretOf(const std::string& token) { return token.substr(16); }

  int StartServing(std::vector<std::string> extra = {}) {
    const int port = FreeLocalPort();
    extra.insert(extra.end(), {"--http-listen", absl::StrCat("127.0.0.1:", port)});
    meterd_ = StartMeterd("a", "300ms", extra);
    EXPECT_GT(WaitForHttp(port), 0) << ReadFile(meterd_->log_path());
    // The API is up once a request gets past "starting".
    EXPECT_TRUE(Eventually([&] { return Post(port, "", "{}").status != 503; }, absl::Seconds(30)));
    return port;
  }

  HttpResult Post(int port, const std::string& token, const std::string& body,
                  const std::string& type = "application/cloudevents+json",
                  std::vector<std::pair<std::string, std::string>> headers = {}) {
    headers.emplace_back("Content-Type", type);
    if (!token.empty()) headers.emplace_back("Authorization", "Bearer " + token);
    return HttpCall(port, "POST", "/v1/events", headers, body);
  }

  static std::string Batch(const std::vector<std::string>& events) {
    return absl::StrCat("[", absl::StrJoin(events, ","), "]");
  }

  // `command` through sh: its exit status and what it printed.
  static std::pair<int, std::string> Shell(const std::string& command) {
    std::string output;
    FILE* pipe = popen(command.c_str(), "r");
    if (pipe == nullptr) return {-1, "popen failed"};
    char buffer[4096];
    while (fgets(buffer, sizeof(buffer), pipe) != nullptr) output += buffer;
    const int status = pclose(pipe);
    return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
  }

  void StopMeterd() {
    meterd_->Signal(SIGTERM);
    EXPECT_EQ(meterd_->Wait(absl::Seconds(60)), 0) << ReadFile(meterd_->log_path());
  }

  std::unique_ptr<ChildProcess> meterd_;
};

// Single events, a batch, HTTP binary mode and a retried batch: each 202 names the ids Kafka
// took, and Postgres ends with every event counted once.
TEST_F(HttpApiTest, EventsPostedAreAcknowledgedThenCountedExactlyOnce) {
  const std::string token = CreateKey({"--org", kOrg, "--scope", "ingest"});
  const std::string admin = CreateKey({"--admin"});
  const int port = StartServing();
  int64_t want = 0;
  const std::string single = UsageEventJson(kOrg, "api_calls", 3, "hs");
  HttpResult r = Post(port, token, single);
  EXPECT_EQ(r.status, 202) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "\"accepted\":[{\"index\":0,\"id\":\"test-")) << r.body;
  want += 3;
  std::vector<std::string> events;
  for (int i = 0; i < 100; ++i)
    events.push_back(UsageEventJson(kOrg, "api_calls", 1 + i % 5, "hs"));
  for (int i = 0; i < 100; ++i) want += 1 + i % 5;
  r = Post(port, token, Batch(events), "application/cloudevents-batch+json");
  EXPECT_EQ(r.status, 202) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "{\"index\":99,")) << r.body;
  // The client timed out and sends the same batch again: acknowledged again, counted once.
  r = Post(port, token, Batch(events), "application/cloudevents-batch+json");
  EXPECT_EQ(r.status, 202) << r.body;
  const std::string time = absl::FormatTime(absl::RFC3339_full, absl::Now(), absl::UTCTimeZone());
  r = Post(port, token, R"({"quantity":7,"industry":"hs"})", "application/json",
           {{"ce-specversion", "1.0"},
            {"ce-id", "bin-1"},
            {"ce-source", "tests"},
            {"ce-type", "api_calls"},
            {"ce-subject", kOrg},
            {"ce-time", time}});
  EXPECT_EQ(r.status, 202) << r.body;
  want += 7;
  // Mixed: a valid event and a refused one; only the valid one is produced.
  r = Post(port, token,
           Batch({UsageEventJson(kOrg, "ai_requests", 2, "hs"),
                  UsageEventJson(kOrg, "no_such_meter", 2, "hs")}),
           "application/cloudevents-batch+json");
  EXPECT_EQ(r.status, 202) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "\"rejected\":[{\"index\":1,\"reason\":\"unknown_meter\""))
      << r.body;
  want += 2;
  // The same source and id from two orgs (an admin key may send for both): both counted.
  const std::string time_now =
      absl::FormatTime(absl::RFC3339_full, absl::Now(), absl::UTCTimeZone());
  auto fixed = [&](const std::string& org, int quantity) {
    return absl::StrCat(R"({"specversion":"1.0","id":"ord\/77","source":"/billing-app",)",
                        R"("type":"api_calls","subject":")", org, R"(","time":")", time_now,
                        R"(","data":{"quantity":)", quantity, R"(,"industry":"hs"}})");
  };
  r = Post(port, admin, fixed(kOrg, 10));
  EXPECT_EQ(r.status, 202) << r.body;
  // The id is echoed as the event carried it.
  EXPECT_TRUE(absl::StrContains(r.body, R"("id":"ord\/77")")) << r.body;
  EXPECT_EQ(Post(port, admin, fixed(kOtherOrg, 500)).status, 202);
  want += 510;
  // Re-sent inside a batch, then alone again: counted once (the batch keeps its bytes).
  EXPECT_EQ(
      Post(port, admin, Batch({fixed(kOrg, 10)}), "application/cloudevents-batch+json").status,
      202);
  EXPECT_EQ(Post(port, admin, fixed(kOrg, 10)).status, 202);
  EXPECT_EQ(WaitForSum(url_, want, absl::Seconds(60)), want) << ReadFile(meterd_->log_path());
  absl::SleepFor(absl::Seconds(1));
  EXPECT_EQ(QueryInt(url_, "SELECT sum(quantity) FROM shared.api_usage_meters"), want);
  // Nothing the API refused reached Kafka, so nothing was rejected downstream.
  EXPECT_EQ(QueryInt(url_, "SELECT count(*) FROM shared.rejected_events"), 0);
  const auto [status, metrics] = HttpGet(port, "/metrics");
  EXPECT_TRUE(absl::StrContains(metrics, "meterd_http_events_accepted_total 207\n")) << metrics;
  StopMeterd();
}

// No 202 before Kafka has the events: with the broker gone, the request waits for the
// producer's timeout and gets 503 with Retry-After, and none of its events are claimed.
TEST_F(HttpApiTest, NoAcknowledgementWithoutKafka) {
  const std::string token = CreateKey({"--org", kOrg, "--scope", "ingest"});
  const int port = StartServing();
  ASSERT_EQ(Post(port, token, UsageEventJson(kOrg, "api_calls", 1, "hs")).status, 202);
  broker_.reset();  // The embedded Kafka is gone.
  const absl::Time start = absl::Now();
  HttpResult r = Post(port, token, UsageEventJson(kOrg, "api_calls", 1, "hs"));
  EXPECT_EQ(r.status, 503) << r.body;
  EXPECT_TRUE(absl::StrContains(r.headers, "Retry-After: 1")) << r.headers;
  EXPECT_TRUE(absl::StrContains(r.body, "\"accepted\":[],\"failed\":[{\"index\":0")) << r.body;
  EXPECT_GE(absl::Now() - start, absl::Seconds(5));
  // Stopped while a request still waits for Kafka: the request is answered (503), and meterd
  // exits by itself, not by a crash.
  std::thread pending([&] {
    HttpResult late = Post(port, token, UsageEventJson(kOrg, "api_calls", 1, "hs"));
    EXPECT_EQ(late.status, 503) << late.body;
  });
  absl::SleepFor(absl::Seconds(1));
  meterd_->Signal(SIGTERM);
  pending.join();
  const int exit_code = meterd_->Wait(absl::Seconds(90));
  EXPECT_TRUE(exit_code == 0 || exit_code == 1) << exit_code << ReadFile(meterd_->log_path());
}

// Who may post what: no key, a wrong key, a read-only key, another org's key, an admin key,
// and a key revoked while the daemon runs (refused within a second).
TEST_F(HttpApiTest, AuthMatrix) {
  const std::string ingest = CreateKey({"--org", kOrg, "--scope", "ingest"});
  const std::string read_only = CreateKey({"--org", kOrg, "--scope", "read"});
  const std::string other = CreateKey({"--org", kOtherOrg, "--scope", "ingest"});
  const std::string admin = CreateKey({"--admin"});
  const int port = StartServing();
  const std::string event = UsageEventJson(kOrg, "api_calls", 1, "hs");
  HttpResult r = Post(port, "", event);
  EXPECT_EQ(r.status, 401) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "\"code\":\"unauthorized\"")) << r.body;
  std::string wrong = ingest;
  wrong.back() = wrong.back() == 'A' ? 'B' : 'A';
  EXPECT_EQ(Post(port, wrong, event).status, 401);
  EXPECT_EQ(Post(port, "mk_nonsense", event).status, 401);
  r = Post(port, read_only, event);
  EXPECT_EQ(r.status, 403) << r.body;
  r = Post(port, other, event);
  EXPECT_EQ(r.status, 400) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "\"reason\":\"forbidden_subject\"")) << r.body;
  EXPECT_EQ(Post(port, ingest, event).status, 202);
  EXPECT_EQ(Post(port, admin, UsageEventJson(kOtherOrg, "api_calls", 1, "hs")).status, 202);
  // Revoked while running: refused from then on, within a second (plus a margin for this
  // shared machine).
  auto [code, out] =
      RunCommand({"api-key", "revoke", "--pg", url_, "--key-id", KeyId(ingest)}, "revoke");
  ASSERT_EQ(code, 0) << out;
  const absl::Time revoked = absl::Now();
  EXPECT_TRUE(Eventually([&] { return Post(port, ingest, event).status == 401; }, absl::Seconds(5),
                         absl::Milliseconds(50)));
  EXPECT_LE(absl::Now() - revoked, absl::Seconds(3));
  EXPECT_EQ(WaitForSum(url_, 2, absl::Seconds(60)), 2);
  StopMeterd();
}

TEST_F(HttpApiTest, RateLimitAnswers429ThenLetsThrough) {
  const std::string token = CreateKey({"--org", kOrg, "--scope", "ingest"});
  const int port = StartServing({"--api-rate", "1", "--api-burst", "2"});
  // StartServing's probes carried no key, so the bucket is full: two pass, the third waits.
  const std::string event = UsageEventJson(kOrg, "api_calls", 1, "hs");
  EXPECT_EQ(Post(port, token, event).status, 202);
  EXPECT_EQ(Post(port, token, UsageEventJson(kOrg, "api_calls", 1, "hs")).status, 202);
  HttpResult r = Post(port, token, UsageEventJson(kOrg, "api_calls", 1, "hs"));
  EXPECT_EQ(r.status, 429) << r.body;
  EXPECT_TRUE(absl::StrContains(r.headers, "Retry-After: 1")) << r.headers;
  absl::SleepFor(absl::Seconds(1));
  EXPECT_EQ(Post(port, token, UsageEventJson(kOrg, "api_calls", 1, "hs")).status, 202);
  EXPECT_EQ(WaitForSum(url_, 3, absl::Seconds(60)), 3);
  StopMeterd();
}

int OpenFds(pid_t pid) {
  int count = 0;
  for ([[maybe_unused]] const auto& entry :
       std::filesystem::directory_iterator(absl::StrCat("/proc/", pid, "/fd"))) {
    ++count;
  }
  return count;
}

// 10,000 idle connections, a 100 MB body announced, 64 KiB of headers and a client sending a
// byte a second, while Kafka ingestion goes on: the daemon refuses or drops them, its
// descriptors stay bounded, and the totals are exact.
TEST_F(HttpApiTest, HostileClientsCannotExhaustTheDaemon) {
  const int port = StartServing(
      {"--http-max-connections", "500", "--http-read-timeout", "2s", "--http-idle-timeout", "2s"});
  auto loadgen = StartLoadgen(100'000, 200, 0.0, 20'000);
  const int baseline = OpenFds(meterd_->pid());
  std::vector<int> idle;
  for (int i = 0; i < 10'000; ++i) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd >= 0 && connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0) {
      idle.push_back(fd);
    } else if (fd >= 0) {
      close(fd);
    }
  }
  absl::SleepFor(absl::Milliseconds(500));
  EXPECT_LE(OpenFds(meterd_->pid()), baseline + 520) << "idle connections held: " << idle.size();
  // The idle ones time out (2 s), freeing their descriptors.
  absl::SleepFor(absl::Seconds(3));
  for (int fd : idle) close(fd);
  EXPECT_LE(OpenFds(meterd_->pid()), baseline + 20);
  // Without a key, a body is never read: the 401 comes at the headers (no body sent here, so
  // a server waiting for it would answer only at the read timeout).
  const absl::Time asked = absl::Now();
  HttpResult unauthenticated = HttpCall(
      port, "POST", "/v1/events",
      {{"Content-Type", "application/cloudevents+json"}, {"Content-Length", "900000"}}, "");
  EXPECT_EQ(unauthenticated.status, 401) << unauthenticated.body;
  EXPECT_LT(absl::Now() - asked, absl::Seconds(1));
  // A body announced as 100 MB: refused at the headers, before a byte of it is read.
  HttpResult big = HttpCall(
      port, "POST", "/v1/events",
      {{"Content-Type", "application/cloudevents+json"}, {"Content-Length", "104857600"}}, "");
  EXPECT_EQ(big.status, 413) << big.body;
  HttpResult huge_body =
      HttpCall(port, "POST", "/v1/events", {{"Content-Type", "application/cloudevents+json"}},
               std::string(9 * 1024 * 1024, 'x'));
  EXPECT_EQ(huge_body.status, 413) << huge_body.body;
  HttpResult headers = HttpCall(port, "GET", "/healthz", {{"X-Big", std::string(64 * 1024, 'h')}});
  EXPECT_EQ(headers.status, 431) << headers.body;
  // A byte a second: disconnected after the read timeout.
  std::thread slow([&] {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
    const std::string request = "GET /healthz HTTP/1.1\r\nHost: x\r\n";
    int sent = 0;
    for (char c : request) {
      if (send(fd, &c, 1, MSG_NOSIGNAL) != 1) break;
      ++sent;
      absl::SleepFor(absl::Seconds(1));
    }
    EXPECT_LT(sent, static_cast<int>(request.size()));
    close(fd);
  });
  slow.join();
  EXPECT_EQ(HttpGet(port, "/healthz").first, 200);
  ExpectExact(FinishLoadgen(*loadgen));
  StopMeterd();
}

// The read endpoints: usage grouped three ways, billing status, invoices with their lines;
// a read key reaches its org only (another org's resources and invoices are a 404), an
// ingest-only key may not read, an admin key reads any org.
TEST_F(HttpApiTest, ReadsAnswerForTheKeysOrgOnly) {
  const std::string reader = CreateKey({"--org", kOrg, "--scope", "ingest,read"});
  const std::string ingest_only = CreateKey({"--org", kOrg, "--scope", "ingest"});
  const std::string other = CreateKey({"--org", kOtherOrg, "--scope", "read"});
  const std::string admin = CreateKey({"--admin"});
  Exec(url_,
       absl::StrCat("INSERT INTO shared.organizations VALUES ('", kOrg, "', 'E1', 'hs'), ('",
                    kOtherOrg,
                    "', 'E2', 'rest');"
                    "INSERT INTO shared.subscriptions (org_id, plan_id, current_period_start, "
                    "current_period_end) SELECT o, 'basic', now() - interval '1 month 1 hour', "
                    "now() - interval '1 hour' FROM unnest(ARRAY['",
                    kOrg, "', '", kOtherOrg, "']::uuid[]) o"));
  const int port = StartServing();
  ASSERT_EQ(Post(port, reader,
                 Batch({UsageEventJson(kOrg, "api_calls", 5, "hs"),
                        UsageEventJson(kOrg, "api_calls", 6, "auto"),
                        UsageEventJson(kOrg, "ai_requests", 2, "hs")}),
                 "application/cloudevents-batch+json")
                .status,
            202);
  ASSERT_EQ(WaitForSum(url_, 13, absl::Seconds(60)), 13);
  auto close = RunCommand({"close-period", "--pg", url_}, "close");
  ASSERT_EQ(close.first, 0) << close.second;
  auto get = [&](const std::string& token, const std::string& path) {
    return HttpCall(port, "GET", path, {{"Authorization", "Bearer " + token}});
  };
  const std::string base = absl::StrCat("/v1/organizations/", kOrg);
  HttpResult r = get(reader, base + "/usage?group_by=meter");
  EXPECT_EQ(r.status, 200) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body,
                                "{\"key\": \"api_calls\", \"meter\": \"api_calls\", "
                                "\"quantity\": 11}"))
      << r.body;
  r = get(reader, base + "/usage?group_by=industry");
  EXPECT_TRUE(absl::StrContains(r.body,
                                "{\"key\": \"auto\", \"meter\": \"api_calls\", "
                                "\"quantity\": 6}"))
      << r.body;
  r = get(reader, base + "/usage?group_by=week");
  EXPECT_EQ(r.status, 400) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "\"field\":\"group_by\"")) << r.body;
  EXPECT_EQ(get(reader, base + "/usage?from=yesterday").status, 400);
  r = get(reader, "/api/billing/usage?group_by=day");  // The brief's path: the key's org.
  EXPECT_EQ(r.status, 200) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "\"quantity\": 11")) << r.body;
  r = get(reader, base + "/billing-status");
  EXPECT_EQ(r.status, 200) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, kOrg)) << r.body;
  r = get(reader, base + "/invoices");
  EXPECT_EQ(r.status, 200) << r.body;
  const size_t at = r.body.find("\"invoice_id\": ");
  ASSERT_NE(at, std::string::npos) << r.body;
  const std::string invoice = r.body.substr(at + 14, r.body.find_first_of(",}", at) - at - 14);
  r = get(reader, base + "/invoices/" + invoice);
  EXPECT_EQ(r.status, 200) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "\"kind\": \"base_fee\"")) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "\"amount_micros\": 50000000")) << r.body;
  // The other org's key: the same paths are a 404, as is this org's invoice under its own.
  EXPECT_EQ(get(other, base + "/billing-status").status, 404);
  EXPECT_EQ(get(other, base + "/invoices/" + invoice).status, 404);
  EXPECT_EQ(get(other, absl::StrCat("/v1/organizations/", kOtherOrg, "/invoices/", invoice)).status,
            404);
  EXPECT_EQ(get(ingest_only, base + "/usage").status, 403);
  EXPECT_EQ(get(admin, base + "/invoices/" + invoice).status, 200);
  EXPECT_EQ(get(admin, "/v1/organizations/not-an-org/usage").status, 404);
  EXPECT_EQ(get(reader, base + "/nothing").status, 404);
  EXPECT_EQ(HttpCall(port, "GET", base + "/usage").status, 401);
  StopMeterd();
}

// Subscriptions created, upgraded and canceled over HTTP are invoiced by close-period exactly
// as the SQL rules say (plan at close prices the period; canceled now: usage through the
// cancel day; at period end: the whole period, then ended), each change is audited with the
// API key that made it, and what would bill a period twice or reprice a finished one is
// refused.
TEST_F(HttpApiTest, SubscriptionsThroughTheApiAreInvoicedAndAudited) {
  constexpr char kOrgB[] = "00000000-0000-4000-8000-0000000000e3";
  constexpr char kOrgC[] = "00000000-0000-4000-8000-0000000000e4";
  constexpr char kOrgD[] = "00000000-0000-4000-8000-0000000000e5";
  const std::string admin = CreateKey({"--admin"});
  const std::string a_owner = CreateKey({"--org", kOrg, "--scope", "admin"});
  const std::string a_reader = CreateKey({"--org", kOrg, "--scope", "read"});
  const std::string b_owner = CreateKey({"--org", kOrgB, "--scope", "ingest,admin"});
  const std::string c_owner = CreateKey({"--org", kOrgC, "--scope", "admin"});
  const std::string ingest_only = CreateKey({"--org", kOrg, "--scope", "ingest"});
  Exec(url_,
       absl::StrCat("INSERT INTO shared.organizations VALUES ('", kOrgB, "', 'B', 'auto'), ('",
                    kOrgC, "', 'C', 'edu'), ('", kOrgD,
                    "', 'D', 'ret');"
                    "INSERT INTO shared.subscription_plans (plan_id, name, base_price_micros, "
                    "active) VALUES ('legacy_free', 'Legacy', 0, false)"));
  const int port = StartServing();
  auto call = [&](const std::string& method, const std::string& path, const std::string& token,
                  const std::string& body = "") {
    std::vector<std::pair<std::string, std::string>> headers = {
        {"Content-Type", "application/json"}};
    if (!token.empty()) headers.emplace_back("Authorization", "Bearer " + token);
    return HttpCall(port, method, path, headers, body);
  };
  auto text = [&](const std::string& sql) {
    pqxx::connection conn(url_);
    pqxx::nontransaction tx(conn);
    const pqxx::result rows = tx.exec(sql);
    return rows.empty() || rows[0][0].is_null() ? std::string() : rows[0][0].as<std::string>();
  };
  auto days_ago = [&](int days) { return text(absl::StrCat("SELECT current_date - ", days)); };
  auto anchored = [&](const std::string& plan, int days) {
    return absl::StrCat("{\"plan\":\"", plan, "\",\"billing_anchor\":\"", days_ago(days), "\"}");
  };
  const std::string a = absl::StrCat("/v1/organizations/", kOrg, "/subscription");
  const std::string b = absl::StrCat("/v1/organizations/", kOrgB, "/subscription");
  const std::string c = absl::StrCat("/v1/organizations/", kOrgC, "/subscription");
  const std::string d = absl::StrCat("/v1/organizations/", kOrgD, "/subscription");

  // A: created on Basic 10 days ago through the brief's path by the back office (registering
  // the org), then upgraded to Pro by its own key: the close prices the whole period at Pro.
  HttpResult r = call("POST", "/api/billing/create-subscription", admin,
                      absl::StrCat("{\"org_id\":\"", kOrg,
                                   "\",\"plan\":\"basic\",\"billing_"
                                   "anchor\":\"",
                                   days_ago(10), "\",\"name\":\"Org A\",\"industry\":\"hs\"}"));
  ASSERT_EQ(r.status, 201) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "\"plan\": \"basic\"")) << r.body;
  EXPECT_EQ(call("POST", a, a_owner, "{\"plan\":\"pro\"}").status, 409);  // One live per org.
  r = call("PATCH", a, a_owner, "{\"plan\":\"platinum\"}");
  EXPECT_EQ(r.status, 400) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "\"field\":\"plan\"")) << r.body;
  EXPECT_EQ(call("PATCH", a, a_owner, "{\"plan\":\"legacy_free\"}").status, 400);  // Inactive.
  EXPECT_EQ(call("PATCH", a, a_owner, "{\"plan\":\"pro\",\"extra\":1}").status, 400);
  EXPECT_EQ(call("PATCH", a, a_reader, "{\"plan\":\"pro\"}").status, 403);
  EXPECT_EQ(call("PATCH", a, b_owner, "{\"plan\":\"pro\"}").status, 404);
  EXPECT_EQ(call("PATCH", a, "", "{\"plan\":\"pro\"}").status, 401);
  EXPECT_EQ(call("GET", a, ingest_only).status, 403);
  r = call("PATCH", a, a_owner, "{\"plan\":\"pro\"}");
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "\"plan\": \"pro\"")) << r.body;
  r = call("GET", a, a_reader);
  EXPECT_EQ(r.status, 200) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "\"status\": \"active\"")) << r.body;

  // B: Enterprise from 10 days ago, 25,000 calls today, canceled now; 1,000 more recorded for
  // tomorrow are after the cancel day and never billed.
  r = call("POST", b, b_owner, anchored("enterprise", 10));
  ASSERT_EQ(r.status, 201) << r.body;
  ASSERT_EQ(Post(port, b_owner, UsageEventJson(kOrgB, "api_calls", 25000, "auto")).status, 202);
  // A: 1,500 calls inside its period (at Basic they would cost $5 of overage).
  Exec(url_, absl::StrCat("INSERT INTO shared.api_usage_meters (org_id, meter, industry, "
                          "usage_date, quantity) VALUES ('",
                          kOrg, "', 'api_calls', 'hs', current_date - 5, 1500), ('", kOrgB,
                          "', 'api_calls', 'auto', current_date + 1, 1000)"));
  ASSERT_EQ(WaitForSum(url_, 27500, absl::Seconds(60)), 27500);
  r = call("POST", b + "/cancel", b_owner, "{\"at_period_end\":false}");
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "\"status\": \"canceled\"")) << r.body;
  EXPECT_EQ(call("PATCH", b, b_owner, "{\"plan\":\"pro\"}").status, 409);  // Canceled.

  // C: Basic from 10 days ago, canceled at period end: billed whole, then ended.
  ASSERT_EQ(call("POST", c, c_owner, anchored("basic", 10)).status, 201);
  r = call("POST", c + "/cancel", c_owner);
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(call("POST", c, c_owner, "{\"plan\":\"pro\"}").status, 409);  // Not ended yet.

  // D: a period that ended yesterday-ish and is not closed yet may not be repriced or cut.
  ASSERT_EQ(call("POST", d, admin, anchored("basic", 31)).status, 201);
  r = call("PATCH", d, admin, "{\"plan\":\"enterprise\"}");
  EXPECT_EQ(r.status, 409) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "not closed yet")) << r.body;
  EXPECT_EQ(call("POST", d + "/cancel", admin, "{\"at_period_end\":false}").status, 409);

  // Refused: anchors in the future or too far back, an org_id other than the path's, an
  // unregistered org without a name, canceling nothing, an admin key naming no org.
  EXPECT_EQ(call("POST", d, admin, anchored("basic", -3)).status, 400);
  EXPECT_EQ(call("POST", d, admin, anchored("basic", 40)).status, 400);
  EXPECT_EQ(call("POST", a, a_owner, absl::StrCat("{\"plan\":\"pro\",\"org_id\":\"", kOrgB, "\"}"))
                .status,
            400);
  EXPECT_EQ(call("POST", "/api/billing/create-subscription", a_owner,
                 absl::StrCat("{\"plan\":\"pro\",\"org_id\":\"", kOrgB, "\"}"))
                .status,
            404);
  EXPECT_EQ(call("POST", "/api/billing/create-subscription", admin, "{\"plan\":\"pro\"}").status,
            400);
  constexpr char kOrgE[] = "00000000-0000-4000-8000-0000000000e6";
  EXPECT_EQ(
      call("POST", absl::StrCat("/v1/organizations/", kOrgE, "/subscription/cancel"), admin).status,
      404);
  r = call("POST", absl::StrCat("/v1/organizations/", kOrgE, "/subscription"), admin,
           "{\"plan\":\"basic\"}");
  EXPECT_EQ(r.status, 400) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "\"field\":\"name\"")) << r.body;
  EXPECT_EQ(call("POST", absl::StrCat("/v1/organizations/", kOrgE, "/subscription"), admin,
                 "{\"plan\":\"basic\",\"name\":\"E\\u0000x\",\"industry\":\"hs\"}")
                .status,
            400);

  // Close through the period end of A, B and C (all anchored 10 days ago).
  const std::string end =
      text(absl::StrCat("SELECT to_char(current_period_end, 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM "
                        "shared.subscriptions WHERE org_id = '",
                        kOrgB, "'"));
  auto close =
      RunCommand({"close-period", "--pg", url_, "--as-of", end, "--allow-future"}, "close");
  ASSERT_EQ(close.first, 0) << close.second;
  auto invoice = [&](const char* org) {
    return text(
        absl::StrCat("SELECT plan_id || ' ' || total_micros FROM shared.invoices WHERE "
                     "org_id = '",
                     org, "' AND kind = 'period' ORDER BY period_start LIMIT 1"));
  };
  EXPECT_EQ(invoice(kOrg), "pro 150000000");          // Pro base, 1,500 within 5,000.
  EXPECT_EQ(invoice(kOrgB), "enterprise 550000000");  // $500 + 5,000 × $0.01; not tomorrow.
  EXPECT_EQ(invoice(kOrgC), "basic 50000000");
  EXPECT_EQ(invoice(kOrgD), "basic 50000000");  // D's ended period, at its own plan.
  for (const char* org : {kOrgB, kOrgC}) {
    EXPECT_EQ(
        text(absl::StrCat("SELECT status FROM shared.subscriptions WHERE org_id = '", org, "'")),
        "ended");
  }
  // C paid through its period's end: a new subscription may not start before it.
  r = call("POST", c, c_owner, "{\"plan\":\"pro\"}");
  EXPECT_EQ(r.status, 400) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "last invoiced period")) << r.body;

  // The audit trail: one row per change, naming the key that made it.
  auto audited = [&](const char* org) {
    return text(
        absl::StrCat("SELECT string_agg(action || ' ' || actor, ', ' ORDER BY audit_id) "
                     "FROM shared.audit_log WHERE org_id = '",
                     org, "' AND action LIKE 'subscription.%'"));
  };
  EXPECT_EQ(audited(kOrg), absl::StrCat("subscription.created api_key:", KeyId(admin),
                                        ", subscription.plan_changed api_key:", KeyId(a_owner)));
  const std::string closer = text("SELECT 'role:' || current_user");
  EXPECT_EQ(audited(kOrgB), absl::StrCat("subscription.created api_key:", KeyId(b_owner),
                                         ", subscription.canceled api_key:", KeyId(b_owner),
                                         ", subscription.ended ", closer));
  EXPECT_EQ(audited(kOrgC), absl::StrCat("subscription.created api_key:", KeyId(c_owner),
                                         ", subscription.canceled api_key:", KeyId(c_owner),
                                         ", subscription.ended ", closer));
  // Each invoice the close made, with its final total.
  EXPECT_EQ(text(absl::StrCat("SELECT string_agg(after->>'total_micros', ',' ORDER BY org_id) FROM "
                              "shared.audit_log WHERE action = 'period.closed' AND org_id IN ('",
                              kOrg, "', '", kOrgB, "', '", kOrgC, "')")),
            "150000000,550000000,50000000");
  EXPECT_EQ(text(absl::StrCat("SELECT (before->>'plan') || '>' || (after->>'plan') FROM "
                              "shared.audit_log WHERE org_id = '",
                              kOrg, "' AND action = 'subscription.plan_changed'")),
            "basic>pro");
  StopMeterd();
}

// proto/openapi.yaml is what meterd serves, a standard validator accepts it, and a response of
// every operation (and the error answers around them) conforms to it.
TEST_F(HttpApiTest, OpenApiDocumentValidatesAndResponsesConform) {
  const std::string admin = CreateKey({"--admin"});
  const std::string owner = CreateKey({"--org", kOrg, "--scope", "admin"});
  const std::string reader = CreateKey({"--org", kOrg, "--scope", "read"});
  const std::string other = CreateKey({"--org", kOtherOrg, "--scope", "ingest,read"});
  const std::string limited = CreateKey({"--org", kOtherOrg, "--scope", "ingest"});
  constexpr char kStripeSecret[] = "whsec_openapi_0123456789abcdef";
  const int port = StartServing({"--api-max-events", "5", "--api-rate", "2", "--api-burst", "40",
                                 "--stripe-webhook-secret", kStripeSecret});
  std::string samples;
  auto sample = [&](const std::string& method, const std::string& path, const std::string& token,
                    const std::string& body = "", const std::string& type = "application/json") {
    std::vector<std::pair<std::string, std::string>> headers;
    if (!body.empty()) headers.emplace_back("Content-Type", type);
    if (!token.empty()) headers.emplace_back("Authorization", "Bearer " + token);
    HttpResult r = HttpCall(port, method, path, headers, body);
    std::string content_type;
    for (absl::string_view line : absl::StrSplit(r.headers, "\r\n")) {
      if (absl::StartsWithIgnoreCase(line, "content-type:")) {
        content_type = std::string(absl::StripAsciiWhitespace(line.substr(13)));
      }
    }
    std::string item = "{\"method\":";
    AppendJsonString(&item, method);
    absl::StrAppend(&item, ",\"path\":");
    AppendJsonString(&item, path);
    absl::StrAppend(&item, ",\"status\":", r.status, ",\"content_type\":");
    AppendJsonString(&item, content_type);
    absl::StrAppend(&item, ",\"body\":");
    AppendJsonString(&item, r.body);
    absl::StrAppend(&samples, item, "}\n");
    return r;
  };
  const std::string org = absl::StrCat("/v1/organizations/", kOrg);
  const std::string event = UsageEventJson(kOrg, "api_calls", 7, "hs");
  const std::string batch = Batch({UsageEventJson(kOrg, "api_calls", 3, "hs"), "{\"id\":1}"});
  const std::string too_many = Batch(std::vector<std::string>(6, event));
  constexpr char kBatch[] = "application/cloudevents-batch+json";

  HttpResult served = sample("GET", "/v1/openapi.yaml", "");
  EXPECT_EQ(served.status, 200);
  EXPECT_EQ(served.body, ReadFile(absl::StrCat(METERD_SOURCE_DIR, "/proto/openapi.yaml")));
  for (const char* path : {"/healthz", "/readyz", "/metrics", "/metrics.json"}) {
    sample("GET", path, "");
  }
  EXPECT_EQ(sample("POST", "/v1/events", owner, event, "application/cloudevents+json").status, 202);
  EXPECT_EQ(sample("POST", "/v1/events", owner, batch, kBatch).status, 202);
  EXPECT_EQ(sample("POST", "/v1/events", owner, "[{\"id\":1}]", kBatch).status, 400);
  EXPECT_EQ(sample("POST", "/v1/events", owner, "{}", kBatch).status, 400);
  for (const std::string& bad : {std::string("not json"), std::string("\"x\""),
                                 absl::StrCat("[", event, "] trailing"), std::string("[1,")}) {
    const HttpResult r = sample("POST", "/v1/events", owner, bad, kBatch);
    EXPECT_EQ(r.status, 400) << bad;
    EXPECT_TRUE(absl::StrContains(r.body, "not_a_batch")) << bad << " " << r.body;
  }
  EXPECT_EQ(sample("POST", "/v1/events", owner, too_many, kBatch).status, 413);
  EXPECT_EQ(sample("POST", "/v1/events", owner, event, "text/plain").status, 415);
  EXPECT_EQ(sample("POST", "/v1/events", "", event).status, 401);
  EXPECT_EQ(sample("POST", "/v1/events", reader, event).status, 403);
  EXPECT_EQ(sample("GET", "/v1/events", owner).status, 405);
  EXPECT_EQ(sample("POST", "/api/billing/usage", owner, UsageEventJson(kOrg, "api_calls", 7, "hs"),
                   "application/cloudevents+json")
                .status,
            202);
  ASSERT_EQ(WaitForSum(url_, 17, absl::Seconds(60)), 17);
  EXPECT_EQ(sample("POST", "/api/billing/create-subscription", admin,
                   absl::StrCat("{\"org_id\":\"", kOrg,
                                "\",\"plan\":\"basic\",\"name\":\"A\",\"industry\":\"hs\"}"))
                .status,
            201);
  EXPECT_EQ(sample("POST", "/api/billing/create-subscription", owner, "{\"plan\":\"pro\"}").status,
            409);
  EXPECT_EQ(sample("GET", "/api/billing/usage?group_by=meter", reader).status, 200);
  EXPECT_EQ(sample("GET", org + "/usage?group_by=industry", reader).status, 200);
  EXPECT_EQ(sample("GET", org + "/usage?group_by=week", reader).status, 400);
  EXPECT_EQ(sample("GET", org + "/billing-status", reader).status, 200);
  EXPECT_EQ(sample("GET", org + "/billing-status", other).status, 404);
  EXPECT_EQ(sample("GET", org + "/subscription", reader).status, 200);
  EXPECT_EQ(sample("PATCH", org + "/subscription", owner, "{\"plan\":\"pro\"}").status, 200);
  EXPECT_EQ(sample("PATCH", org + "/subscription", owner, "{\"plan\":\"gold\"}").status, 400);
  EXPECT_EQ(sample("PATCH", org + "/subscription", reader, "{\"plan\":\"pro\"}").status, 403);
  EXPECT_EQ(sample("DELETE", org + "/subscription", owner).status, 405);
  EXPECT_EQ(sample("POST", org + "/subscription/cancel", owner, "{\"at_period_end\":true}").status,
            200);
  EXPECT_EQ(sample("POST", absl::StrCat("/v1/organizations/", kOtherOrg, "/subscription"), other,
                   "{\"plan\":\"pro\"}")
                .status,
            403);
  EXPECT_EQ(sample("POST", absl::StrCat("/v1/organizations/", kOtherOrg, "/subscription"), admin,
                   "{\"plan\":\"pro\",\"name\":\"B\",\"industry\":\"rest\"}")
                .status,
            201);
  // An invoice to read: the subscription backdated so its first period is due.
  Exec(url_, absl::StrCat("UPDATE shared.subscriptions SET current_period_start = "
                          "current_period_start - interval '1 month', current_period_end = "
                          "current_period_end - interval '1 month', billing_anchor = "
                          "billing_anchor - interval '1 month' WHERE org_id = '",
                          kOtherOrg, "'"));
  auto close = RunCommand({"close-period", "--pg", url_}, "close");
  ASSERT_EQ(close.first, 0) << close.second;
  const std::string other_org = absl::StrCat("/v1/organizations/", kOtherOrg);
  HttpResult list = sample("GET", other_org + "/invoices", other);
  EXPECT_EQ(list.status, 200);
  const size_t at = list.body.find("\"invoice_id\": ");
  ASSERT_NE(at, std::string::npos) << list.body;
  const std::string invoice =
      list.body.substr(at + 14, list.body.find_first_of(",}", at) - at - 14);
  EXPECT_EQ(sample("GET", other_org + "/invoices/" + invoice, other).status, 200);
  EXPECT_EQ(sample("GET", org + "/invoices/" + invoice, reader).status, 404);
  EXPECT_EQ(sample("GET", org + "/invoices", reader).status, 200);
  const std::string stripe_event =
      absl::StrCat(R"({"id":"evt_openapi_1","object":"event","type":"plan.created","created":)",
                   absl::ToUnixSeconds(absl::Now()), R"(,"data":{"object":{"id":"plan_1"}}})");
  std::vector<std::pair<std::string, std::string>> stripe_headers = {
      {"Content-Type", "application/json"},
      {"Stripe-Signature",
       api::StripeSignatureHeader(stripe_event, kStripeSecret, absl::ToUnixSeconds(absl::Now()))}};
  EXPECT_EQ(sample("POST", "/v1/stripe/webhook", "", stripe_event).status, 400);
  {
    HttpResult r = HttpCall(port, "POST", "/v1/stripe/webhook", stripe_headers, stripe_event);
    EXPECT_EQ(r.status, 200) << r.body;
    absl::StrAppend(&samples,
                    "{\"method\":\"POST\",\"path\":\"/v1/stripe/webhook\",\"status\":", r.status,
                    ",\"content_type\":\"application/json\",\"body\":");
    AppendJsonString(&samples, r.body);
    samples += "}\n";
  }
  // The rate limit: 40 requests of burst, then 429.
  int status = 0;
  for (int i = 0; i < 60 && status != 429; ++i) {
    status = sample("POST", "/v1/events", limited, "[]", kBatch).status;
  }
  EXPECT_EQ(status, 429);

  const std::string file = absl::StrCat(dir_, "/openapi_samples.jsonl");
  std::ofstream(file) << samples;
  const std::string command =
      absl::StrCat("python3 ", METERD_SOURCE_DIR, "/tests/proto/validate_openapi.py ",
                   METERD_SOURCE_DIR, "/proto/openapi.yaml ", file, " 2>&1");
  const auto [code, output] = Shell(command);
  EXPECT_EQ(code, 0) << output;
  EXPECT_TRUE(absl::StrContains(output, "0 failure(s)")) << output;
  StopMeterd();
}

// Personal data sent to meterd (in events' data, in refused events, in an org's name, in a
// wrong key) and the API keys themselves never reach its log or its metrics.
TEST_F(HttpApiTest, LogsAndMetricsCarryNoPersonalDataOrKeys) {
  constexpr char kEmail[] = "planted.person@example.org";
  constexpr char kCard[] = "4242424242424242";
  constexpr char kName[] = "Planted Name Ltd";
  const std::string token = CreateKey({"--org", kOrg, "--scope", "ingest,read,admin"});
  const std::string admin = CreateKey({"--admin"});
  const int port = StartServing();
  auto with_pii = [&](const std::string& meter, int64_t quantity) {
    return absl::StrCat(R"({"specversion":"1.0","id":")", meter, quantity,
                        R"(-pii","source":"/shop","type":")", meter, R"(","subject":")", kOrg,
                        R"(","time":")",
                        absl::FormatTime(absl::RFC3339_full, absl::Now(), absl::UTCTimeZone()),
                        R"(","data":{"quantity":)", quantity, R"(,"industry":"hs","email":")",
                        kEmail, R"(","card":")", kCard, R"("}})");
  };
  // Counted, refused by the parser (unknown meter, a bad quantity), refused for its subject.
  EXPECT_EQ(Post(port, token,
                 Batch({with_pii("api_calls", 5), with_pii("no_such_meter", 1),
                        absl::StrCat(R"({"id":")", kEmail, R"(","data":")", kCard, R"("})")}),
                 "application/cloudevents-batch+json")
                .status,
            202);
  EXPECT_EQ(Post(port, token, absl::StrCat("{\"email\":\"", kEmail, "\"")).status, 400);
  // A wrong key that looks right, and the real one in the wrong header.
  const std::string wrong = token.substr(0, token.size() - 4) + "AAAA";
  EXPECT_EQ(Post(port, wrong, with_pii("api_calls", 1)).status, 401);
  EXPECT_EQ(HttpCall(port, "GET", absl::StrCat("/v1/organizations/", kOrg, "/usage?email=", kEmail),
                     {{"Authorization", "Basic " + token}})
                .status,
            401);
  // Events through Kafka: counted, and refused into shared.rejected_events.
  ProduceOrDie(broker_->bootstrap(), kTopic, kOrg,
               {with_pii("ai_requests", 2), with_pii("teleports", 3),
                absl::StrCat("{\"broken\": \"", kEmail, kCard)});
  // An org registered with a name through the API.
  EXPECT_EQ(HttpCall(port, "POST", "/api/billing/create-subscription",
                     {{"Authorization", "Bearer " + admin}, {"Content-Type", "application/json"}},
                     absl::StrCat("{\"org_id\":\"", kOtherOrg, "\",\"plan\":\"basic\",\"name\":\"",
                                  kName, "\",\"industry\":\"hs\"}"))
                .status,
            201);
  ASSERT_EQ(WaitForSum(url_, 7, absl::Seconds(60)), 7);
  ASSERT_TRUE(
      Eventually([&] { return QueryInt(url_, "SELECT count(*) FROM shared.rejected_events") >= 2; },
                 absl::Seconds(30)));
  const std::string metrics =
      HttpGet(port, "/metrics").second + HttpGet(port, "/metrics.json").second;
  StopMeterd();
  const std::string log = ReadFile(meterd_->log_path());
  ASSERT_TRUE(absl::StrContains(log, "rejected")) << "the log should mention the rejections";
  for (const std::string& planted : {std::string(kEmail), std::string(kCard), std::string(kName),
                                     token, wrong, admin, SecretOf(token), SecretOf(admin)}) {
    EXPECT_FALSE(absl::StrContains(log, planted)) << planted << " in " << meterd_->log_path();
    EXPECT_FALSE(absl::StrContains(metrics, planted)) << planted << " in the metrics";
  }
}

// --tls-cert/--tls-key: the API and the health endpoints over HTTPS (verified against the
// certificate by curl), plain HTTP refused on that port; bad TLS files stop meterd at start
// with a message naming the flag.
TEST_F(HttpApiTest, ServesHttpsWithTheGivenCertificate) {
  const std::string cert = dir_ + "/cert.pem";
  const std::string key = dir_ + "/key.pem";
  const std::string other_key = dir_ + "/other-key.pem";
  auto [made, made_out] = Shell(absl::StrCat(
      "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 "
      "-subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 -keyout ",
      key, " -out ", cert,
      " 2>&1 && openssl genpkey -algorithm EC -pkeyopt "
      "ec_paramgen_curve:prime256v1 -out ",
      other_key, " 2>&1"));
  ASSERT_EQ(made, 0) << made_out;
  const std::string token = CreateKey({"--org", kOrg, "--scope", "ingest,read"});
  const int port = FreeLocalPort();
  meterd_ = StartMeterd(
      "tls", "300ms",
      {"--http-listen", absl::StrCat("127.0.0.1:", port), "--tls-cert", cert, "--tls-key", key});
  const std::string base = absl::StrCat("https://127.0.0.1:", port);
  auto curl = [&](const std::string& args) {
    return Shell(absl::StrCat("curl -sS --noproxy '*' --max-time 10 --cacert ", cert,
                              " -o /dev/null -w '%{http_code}' ", args, " 2>&1"));
  };
  ASSERT_TRUE(Eventually([&] { return curl(base + "/readyz").second == "200"; }, absl::Seconds(60)))
      << ReadFile(meterd_->log_path());
  const std::string event_file = dir_ + "/event.json";
  std::ofstream(event_file) << UsageEventJson(kOrg, "api_calls", 9, "hs");
  auto [code, out] = curl(absl::StrCat("-H 'Authorization: Bearer ", token,
                                       "' -H 'Content-Type: application/cloudevents+json' "
                                       "--data-binary @",
                                       event_file, " ", base, "/v1/events"));
  EXPECT_EQ(out, "202");
  EXPECT_EQ(WaitForSum(url_, 9, absl::Seconds(60)), 9);
  EXPECT_EQ(curl(absl::StrCat("-H 'Authorization: Bearer ", token, "' ", base, "/v1/organizations/",
                              kOrg, "/usage"))
                .second,
            "200");
  // Without trusting the certificate, curl refuses; plain HTTP gets no HTTP answer.
  EXPECT_NE(
      Shell(absl::StrCat("curl -sS --noproxy '*' --max-time 10 ", base, "/healthz 2>&1")).first, 0);
  EXPECT_NE(HttpCall(port, "GET", "/healthz").status, 200);
  StopMeterd();

  for (const auto& [flags, named] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"--tls-cert", cert}, "--tls-key"},
           {{"--tls-cert", cert, "--tls-key", other_key}, "--tls-key"},
           {{"--tls-cert", dir_ + "/missing.pem", "--tls-key", key}, "--tls-cert"}}) {
    std::vector<std::string> args = {"--http-listen", absl::StrCat("127.0.0.1:", FreeLocalPort())};
    args.insert(args.end(), flags.begin(), flags.end());
    std::unique_ptr<ChildProcess> bad = StartMeterd("bad-tls", "300ms", args);
    EXPECT_NE(bad->Wait(absl::Seconds(30)), 0);
    EXPECT_TRUE(absl::StrContains(ReadFile(bad->log_path()), named)) << ReadFile(bad->log_path());
  }
}

// 100,000 events from 8 concurrent clients in batches of 100. Some batches are sent, abandoned
// by the client before the answer (its timeout), then sent again; two keys are revoked half way
// through. Totals equal exactly what was acknowledged, each event once; a revoked key is
// refused from a second after its revocation on.
TEST_F(HttpApiTest, ConcurrentClientsRetriesAndRevocationsCountExactly) {
  constexpr int kClients = 8;
  constexpr int kBatches = 125;  // Per client: 8 × 125 × 100 = 100,000 events.
  constexpr int kRevoked = 2;    // Clients 0 and 1 lose their key after half their batches.
  std::vector<std::string> orgs, tokens;
  for (int c = 0; c < kClients; ++c) {
    orgs.push_back(absl::StrFormat("00000000-0000-4000-8000-%012d", 100 + c));
    tokens.push_back(CreateKey({"--org", orgs.back(), "--scope", "ingest"}));
  }
  const int port = StartServing({"--api-rate", "100000", "--api-burst", "100000"});
  std::vector<int64_t> acknowledged(kClients, 0);  // Quantity of the batches answered 202.
  std::vector<int> retried(kClients, 0), refused_after_revoke(kClients, 0);
  std::vector<int> accepted_after_revoke(kClients, 0);
  std::atomic<int> halfway{0};
  std::vector<std::atomic<int64_t>> revoked_at_ms(kRevoked);
  for (auto& at : revoked_at_ms) at.store(0);
  auto abandon = [&](const std::string& token, const std::string& body) {
    // The whole request, then the client gives up without reading the answer.
    const std::string request = absl::StrCat(
        "POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ", token,
        "\r\nContent-Type: application/cloudevents-batch+json\r\nContent-Length: ", body.size(),
        "\r\n\r\n", body);
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0) {
      size_t sent = 0;
      while (sent < request.size()) {
        const ssize_t n = send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
        if (n <= 0) break;
        sent += static_cast<size_t>(n);
      }
    }
    close(fd);
  };
  std::vector<std::thread> clients;
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&, c] {
      for (int b = 0; b < kBatches; ++b) {
        if (b == kBatches / 2) {
          halfway.fetch_add(1);
          // The revoked clients wait for their revocation, then keep sending.
          if (c < kRevoked) {
            while (revoked_at_ms[c].load() == 0) absl::SleepFor(absl::Milliseconds(5));
          }
        }
        // After it, they pace themselves, so that many of their requests come after the
        // second a revocation may take to reach the daemon.
        if (c < kRevoked && b >= kBatches / 2) absl::SleepFor(absl::Milliseconds(40));
        std::vector<std::string> events;
        int64_t quantity = 0;
        for (int i = 0; i < 100; ++i) {
          const int64_t q = 1 + (b + i) % 5;
          events.push_back(UsageEventJson(orgs[c], "api_calls", q, "hs"));
          quantity += q;
        }
        const std::string body = Batch(events);
        // Every seventh batch of the clients that keep their key: abandoned once, then retried.
        if (c >= kRevoked && b % 7 == 3) {
          abandon(tokens[c], body);
          ++retried[c];
        }
        for (int attempt = 0; attempt < 20; ++attempt) {
          // Measured when the request leaves: one sent a second after the revocation must fail.
          const int64_t since_revoke =
              c < kRevoked && revoked_at_ms[c].load() > 0
                  ? absl::ToUnixMillis(absl::Now()) - revoked_at_ms[c].load()
                  : -1;
          const HttpResult r = Post(port, tokens[c], body, "application/cloudevents-batch+json");
          if (r.status == 202) {
            acknowledged[c] += quantity;
            if (since_revoke > 1000) ++accepted_after_revoke[c];
            break;
          }
          if (r.status == 401) {
            if (since_revoke >= 0) ++refused_after_revoke[c];
            break;
          }
          absl::SleepFor(absl::Milliseconds(100));  // 503 or no answer: retry the same bytes.
        }
      }
    });
  }
  // Half way through, revoke two keys (the CLI, as an operator would).
  ASSERT_TRUE(Eventually([&] { return halfway.load() >= kClients; }, absl::Minutes(3)));
  for (int c = 0; c < kRevoked; ++c) {
    auto [code, out] =
        RunCommand({"api-key", "revoke", "--pg", url_, "--key-id", KeyId(tokens[c])}, "revoke");
    EXPECT_EQ(code, 0) << out;
    revoked_at_ms[c].store(absl::ToUnixMillis(absl::Now()));
  }
  for (std::thread& t : clients) t.join();
  int64_t want = 0;
  for (int c = 0; c < kClients; ++c) want += acknowledged[c];
  EXPECT_EQ(WaitForSum(url_, want, absl::Minutes(2)), want) << ReadFile(meterd_->log_path());
  absl::SleepFor(absl::Seconds(1));
  for (int c = 0; c < kClients; ++c) {
    SCOPED_TRACE(orgs[c]);
    EXPECT_EQ(QueryInt(url_, absl::StrCat("SELECT coalesce(sum(quantity), 0) FROM "
                                          "shared.api_usage_meters WHERE org_id = '",
                                          orgs[c], "'")),
              acknowledged[c]);
    if (c < kRevoked) {
      EXPECT_EQ(accepted_after_revoke[c], 0);
      EXPECT_GE(refused_after_revoke[c], 20);
      EXPECT_LT(acknowledged[c], kBatches * 300);
    } else {
      EXPECT_EQ(acknowledged[c], kBatches * 300);  // Every batch: 100 events of 1..5, sum 300.
      EXPECT_GT(retried[c], 0);
    }
  }
  StopMeterd();
}

// POST /v1/stripe/webhook: no API key, the signature is the authentication. Tampered, wrong
// secret, 301 s old, missing header: 400 and nothing stored; a valid one is stored once and
// applied (a redelivery is 200 and changes nothing); rotation (two v1, one valid) accepted.
TEST_F(HttpApiTest, StripeWebhooksAreVerifiedStoredOnceAndApplied) {
  constexpr char kSecret[] = "whsec_it_9f8e7d6c5b4a39281706";
  Exec(url_, absl::StrCat("INSERT INTO shared.organizations VALUES ('", kOrg, "', 'A', 'hs')"));
  const int port = StartServing({"--stripe-webhook-secret", kSecret});
  const std::string event =
      absl::StrCat(R"({"id":"evt_1PgcWebhookTest01","object":"event","created":)",
                   absl::ToUnixSeconds(absl::Now()),
                   R"(,"type":"customer.created","data":{"object":{"id":"cus_QXg1o8vcGmoR32",)",
                   R"("object":"customer","email":"billing@example.org","metadata":{"org_id":")",
                   kOrg, R"("}}}})");
  auto post = [&](const std::string& body, const std::string& signature) {
    std::vector<std::pair<std::string, std::string>> headers = {
        {"Content-Type", "application/json"}};
    if (!signature.empty()) headers.emplace_back("Stripe-Signature", signature);
    return HttpCall(port, "POST", "/v1/stripe/webhook", headers, body);
  };
  const int64_t now = absl::ToUnixSeconds(absl::Now());
  const std::string good = api::StripeSignatureHeader(event, kSecret, now);
  std::string tampered = event;
  tampered.replace(tampered.find("billing@"), 8, "attacker");
  for (const auto& [body, signature] : std::vector<std::pair<std::string, std::string>>{
           {tampered, good},
           {event, api::StripeSignatureHeader(event, "whsec_wrong_secret_0000000000", now)},
           {event, api::StripeSignatureHeader(event, kSecret, now - 301)},
           {event, ""}}) {
    const HttpResult r = post(body, signature);
    EXPECT_EQ(r.status, 400) << r.body;
    EXPECT_TRUE(absl::StrContains(r.body, "bad_signature")) << r.body;
  }
  EXPECT_EQ(QueryInt(url_, "SELECT count(*) FROM shared.stripe_webhook_events"), 0);
  EXPECT_EQ(QueryInt(url_, "SELECT count(*) FROM shared.stripe_customers"), 0);
  // Rotation: the old secret's signature beside the current one.
  const std::string old_sig = api::StripeSignatureHeader(event, "whsec_old_0000000000000000", now);
  HttpResult r = post(event, absl::StrCat(good, ",v1=", old_sig.substr(old_sig.find("v1=") + 3)));
  EXPECT_EQ(r.status, 200) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "\"result\":\"applied\"")) << r.body;
  r = post(event, good);  // Stripe redelivers.
  EXPECT_EQ(r.status, 200) << r.body;
  EXPECT_TRUE(absl::StrContains(r.body, "\"result\":\"duplicate\"")) << r.body;
  EXPECT_EQ(QueryInt(url_, "SELECT count(*) FROM shared.stripe_webhook_events"), 1);
  EXPECT_EQ(QueryInt(url_, absl::StrCat("SELECT count(*) FROM shared.stripe_customers WHERE "
                                        "org_id = '",
                                        kOrg, "' AND email = 'billing@example.org'")),
            1);
  EXPECT_EQ(QueryInt(url_,
                     "SELECT count(*) FROM shared.audit_log WHERE action = "
                     "'stripe.customer.created' AND actor = 'stripe:webhook'"),
            1);
  // Signed, but not an event.
  const std::string junk = "{\"hello\":1}";
  EXPECT_EQ(post(junk, api::StripeSignatureHeader(junk, kSecret, now)).status, 400);
  const auto [status, metrics] = HttpGet(port, "/metrics");
  EXPECT_TRUE(absl::StrContains(metrics, "meterd_stripe_webhooks_total{outcome=\"refused\"} 5"))
      << metrics;
  EXPECT_FALSE(absl::StrContains(ReadFile(meterd_->log_path()), kSecret));
  StopMeterd();
}

}  // namespace
}  // namespace meterd::testing
