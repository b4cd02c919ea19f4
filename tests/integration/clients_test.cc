// The emitter helpers of proto/clients/ end to end: each sends usage events to a real meterd
// (its HTTP API, or the embedded Kafka it consumes) and Postgres must end with exactly what
// was sent, per org, meter and industry. Also: the Node.js middleware never slows or fails
// the app's requests when meterd is unreachable or hangs, and its memory stays bounded.
#include <chrono>
#include <map>
#include <tuple>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "proto/clients/cpp/meterd_emitter.h"
#include "tests/support/meterd_fixture.h"

namespace meterd::testing {
namespace {

constexpr char kOrgA[] = "00000000-0000-4000-8000-0000000000c1";
constexpr char kOrgB[] = "00000000-0000-4000-8000-0000000000c2";
constexpr char kOrgC[] = "00000000-0000-4000-8000-0000000000c3";
constexpr char kPython[] = "/usr/bin/python3";  // Debian's: it sees python3-confluent-kafka.

std::string ClientsDir() { return absl::StrCat(METERD_SOURCE_DIR, "/proto/clients"); }

// The integer after `"name":` in a one-line JSON object (Node's and Python's spacing); -1 if
// absent. Enough for the flat counters the client scripts print.
int64_t JsonInt(const std::string& json, const std::string& name, size_t from = 0) {
  size_t at = json.find(absl::StrCat("\"", name, "\":"), from);
  if (at == std::string::npos) return -1;
  at += name.size() + 3;
  while (at < json.size() && json[at] == ' ') ++at;
  size_t end = at;
  while (end < json.size() &&
         (json[end] == '-' || json[end] == '.' || absl::ascii_isdigit(json[end])))
    ++end;
  double value = -1;
  if (!absl::SimpleAtod(json.substr(at, end - at), &value)) return -1;
  return static_cast<int64_t>(value);
}

// (org, meter, industry) -> quantity.
using Totals = std::map<std::tuple<std::string, std::string, std::string>, int64_t>;

class ClientsTest : public MeterdFixture {
 protected:
  // meterd serving HTTP on `port` (a free one if 0); waits until the API takes requests.
  int StartServing(std::vector<std::string> extra = {}, int port = 0) {
    if (port == 0) port = FreeLocalPort();
    extra.insert(extra.end(), {"--http-listen", absl::StrCat("127.0.0.1:", port)});
    meterd_ = StartMeterd("a", "300ms", extra);
    EXPECT_GT(WaitForHttp(port), 0) << ReadFile(meterd_->log_path());
    EXPECT_TRUE(
        Eventually([&] { return HttpCall(port, "POST", "/v1/events", {}, "{}").status != 503; },
                   absl::Seconds(30)));
    return port;
  }

  // Runs a client script to completion: its exit code and the JSON line it printed.
  std::pair<int, std::string> RunClient(const std::vector<std::string>& argv,
                                        const std::string& label, absl::Duration timeout) {
    ChildProcess child(argv, absl::StrCat(dir_, "/", label, ".log"));
    const std::string line = child.ReadLine(timeout);
    const int code = child.Wait(absl::Seconds(20));
    return {code, line};
  }

  Totals StoredByKey() {
    pqxx::connection conn(url_);
    pqxx::read_transaction tx(conn);
    Totals totals;
    for (const auto& row : tx.exec("SELECT org_id::text, meter, industry, sum(quantity) FROM "
                                   "shared.api_usage_meters GROUP BY 1, 2, 3")) {
      totals[{row[0].as<std::string>(), row[1].as<std::string>(), row[2].as<std::string>()}] =
          row[3].as<int64_t>();
    }
    return totals;
  }

  // Waits for the sum, lets a would-be double count show up, then compares key by key.
  void ExpectStored(const Totals& want) {
    int64_t sum = 0;
    for (const auto& [key, quantity] : want) sum += quantity;
    EXPECT_EQ(WaitForSum(url_, sum, absl::Seconds(60)), sum)
        << (meterd_ ? ReadFile(meterd_->log_path()) : "");
    absl::SleepFor(absl::Seconds(1));
    const Totals stored = StoredByKey();
    std::string diff;
    for (const auto& [key, quantity] : want) {
      auto it = stored.find(key);
      const int64_t got = it == stored.end() ? 0 : it->second;
      if (got != quantity) {
        absl::StrAppend(&diff, std::get<0>(key), "/", std::get<1>(key), "/", std::get<2>(key),
                        " expected ", quantity, " stored ", got, "\n");
      }
    }
    for (const auto& [key, quantity] : stored) {
      if (!want.contains(key)) {
        absl::StrAppend(&diff, std::get<0>(key), "/", std::get<1>(key), "/", std::get<2>(key),
                        " unexpected ", quantity, "\n");
      }
    }
    EXPECT_TRUE(diff.empty()) << diff;
    EXPECT_EQ(QueryInt(url_, "SELECT count(*) FROM shared.rejected_events"), 0);
  }

  void StopMeterd() {
    meterd_->Signal(SIGTERM);
    EXPECT_EQ(meterd_->Wait(absl::Seconds(60)), 0) << ReadFile(meterd_->log_path());
  }

  std::unique_ptr<ChildProcess> meterd_;
};

// What serve_and_hit.js sends for `requests` requests over `orgs`: request i is for org
// i % orgs (industry hs, rest, auto by position), a data export of 2 when i % 10 == 0, else an
// API call of 1.
Totals NodeScriptTotals(int requests, const std::vector<std::string>& orgs) {
  static const char* kIndustries[] = {"hs", "rest", "auto"};
  Totals totals;
  for (int i = 0; i < requests; ++i) {
    const size_t org = i % orgs.size();
    const bool export_call = i % 10 == 0;
    totals[{orgs[org], export_call ? "data_exports" : "api_calls", kIndustries[org % 3]}] +=
        export_call ? 2 : 1;
  }
  return totals;
}

// The middleware on a bare http.createServer app: 2,000 requests from 16 concurrent clients
// for 3 orgs, each org with its own org-scoped key; close() sends the rest. Every request is
// metered exactly once, under its org, meter and industry.
TEST_F(ClientsTest, NodeMiddlewareMetersEveryRequestExactlyOnce) {
  const std::vector<std::string> orgs = {kOrgA, kOrgB, kOrgC};
  std::vector<std::string> keys;
  for (const std::string& org : orgs) {
    keys.push_back(absl::StrCat(org, "=", CreateKey({"--org", org, "--scope", "ingest"})));
  }
  const int port = StartServing();
  constexpr int kRequests = 2000;
  auto [code, line] =
      RunClient({METERD_NODE, ClientsDir() + "/node/test/serve_and_hit.js", "--url",
                 absl::StrCat("http://127.0.0.1:", port), "--keys", absl::StrJoin(keys, ","),
                 "--requests", std::to_string(kRequests), "--concurrency", "16"},
                "node", absl::Seconds(60));
  ASSERT_EQ(code, 0) << line << ReadFile(dir_ + "/node.log");
  EXPECT_EQ(JsonInt(line, "ok"), kRequests) << line;
  EXPECT_EQ(JsonInt(line, "emitted"), kRequests) << line;
  EXPECT_EQ(JsonInt(line, "accepted"), kRequests) << line;
  EXPECT_EQ(JsonInt(line, "failed"), 0) << line;
  EXPECT_EQ(JsonInt(line, "dropped"), 0) << line;
  ExpectStored(NodeScriptTotals(kRequests, orgs));
  StopMeterd();
}

// meterd unreachable (nothing listening) or hanging (accepts, never answers): the app's 1,000
// requests all answer 200 without waiting for meterd, the queue stays at its bound of 100
// (the oldest dropped and counted), close() gives up within its 1 s timeout, and the process
// exits by itself (no timer or socket left behind).
TEST_F(ClientsTest, NodeMiddlewareNeverSlowsOrFailsTheAppWhenMeterdIsDown) {
  for (const bool hang : {false, true}) {
    SCOPED_TRACE(hang ? "meterd hangs" : "nothing listening");
    std::vector<std::string> argv = {METERD_NODE,
                                     ClientsDir() + "/node/test/serve_and_hit.js",
                                     "--url",
                                     absl::StrCat("http://127.0.0.1:", FreeLocalPort()),
                                     "--keys",
                                     absl::StrCat(kOrgA, "=mk_unused,", kOrgB, "=mk_unused"),
                                     "--requests",
                                     "1000",
                                     "--concurrency",
                                     "16",
                                     "--max-queue",
                                     "100",
                                     "--close-timeout-ms",
                                     "1000",
                                     "--baseline"};
    if (hang) argv.push_back("--hang-meterd");
    const absl::Time start = absl::Now();
    auto [code, line] = RunClient(argv, hang ? "node-hang" : "node-down", absl::Seconds(30));
    const absl::Duration took = absl::Now() - start;
    ASSERT_EQ(code, 0) << line << ReadFile(dir_ + (hang ? "/node-hang.log" : "/node-down.log"));
    EXPECT_LT(took, absl::Seconds(15)) << line;
    EXPECT_EQ(JsonInt(line, "ok"), 1000) << line;
    // The app's clients never wait on meterd (its request timeout is 15 s); the baseline (the
    // same requests without the middleware) is in `line` for comparison.
    EXPECT_LT(JsonInt(line, "maxMs"), 1000) << line;
    EXPECT_LT(JsonInt(line, "closeMs"), 3000) << line;
    EXPECT_EQ(JsonInt(line, "emitted"), 1000) << line;
    EXPECT_EQ(JsonInt(line, "accepted"), 0) << line;
    EXPECT_GT(JsonInt(line, "dropped"), 0) << line;
    EXPECT_EQ(JsonInt(line, "dropped") + JsonInt(line, "failed"), 1000) << line;
    EXPECT_EQ(JsonInt(line, "queued"), 0) << line;
  }
}

// 5,000 events through the Python HttpEmitter (50 batches) with a rate limit of 20 requests a
// second: some batches get 429 and are retried after Retry-After; each event counts once.
TEST_F(ClientsTest, PythonHttpEmitterRetriesRateLimitsAndCountsExactly) {
  const std::string token = CreateKey({"--org", kOrgA, "--scope", "ingest"});
  const int port = StartServing({"--api-rate", "20", "--api-burst", "10"});
  auto [code, line] =
      RunClient({kPython, ClientsDir() + "/python/meterd_client.py", "http", "--url",
                 absl::StrCat("http://127.0.0.1:", port), "--key", token, "--org", kOrgA, "--count",
                 "5000", "--meter", "api_calls", "--industry", "rest"},
                "python-http", absl::Seconds(60));
  ASSERT_EQ(code, 0) << line << ReadFile(dir_ + "/python-http.log");
  EXPECT_EQ(JsonInt(line, "accepted"), 5000) << line;
  EXPECT_GT(JsonInt(line, "retries"), 0) << line;  // The rate limit was met, and retried.
  EXPECT_EQ(JsonInt(line, "failed"), 0) << line;
  ExpectStored({{{kOrgA, "api_calls", "rest"}, 5000}});
  StopMeterd();
}

// 5,000 events through the Python KafkaEmitter (confluent_kafka, idempotent, keyed by org)
// into the embedded Kafka that meterd consumes. Without python3-confluent-kafka this fails,
// saying so.
TEST_F(ClientsTest, PythonKafkaEmitterCountsExactly) {
  meterd_ = StartMeterd("a");
  auto [code, line] =
      RunClient({kPython, ClientsDir() + "/python/meterd_client.py", "kafka", "--brokers",
                 broker_->bootstrap(), "--topic", kTopic, "--org", kOrgB, "--count", "5000",
                 "--meter", "ai_requests", "--industry", "edu"},
                "python-kafka", absl::Seconds(60));
  ASSERT_NE(code, 3) << "python3-confluent-kafka is not installed (deploy/install-deps.sh "
                        "installs it): "
                     << line;
  ASSERT_EQ(code, 0) << line << ReadFile(dir_ + "/python-kafka.log");
  EXPECT_EQ(JsonInt(line, "accepted"), 5000) << line;
  ExpectStored({{{kOrgB, "ai_requests", "edu"}, 5000}});
  StopMeterd();
}

// The C++ KafkaEmitter: 9,000 events for 3 orgs and 2 meters, quantities 1 to 5.
TEST_F(ClientsTest, CppKafkaEmitterCountsExactly) {
  meterd_ = StartMeterd("a");
  std::string error;
  auto emitter = clients::KafkaEmitter::Create(
      {.brokers = broker_->bootstrap(), .topic = kTopic, .source = "clients-test/cpp-kafka"},
      &error);
  ASSERT_NE(emitter, nullptr) << error;
  Totals want;
  const std::vector<std::string> orgs = {kOrgA, kOrgB, kOrgC};
  for (int i = 0; i < 9000; ++i) {
    const clients::Usage usage{.org = orgs[i % 3],
                               .meter = i % 4 == 0 ? "data_exports" : "api_calls",
                               .quantity = 1 + i % 5,
                               .industry = i % 2 == 0 ? "payroll" : "ret"};
    ASSERT_TRUE(emitter->Emit(usage));
    want[{usage.org, usage.meter, usage.industry}] += usage.quantity;
  }
  ASSERT_TRUE(emitter->Flush(std::chrono::seconds(30)));
  const clients::EmitterStats stats = emitter->Stats();
  EXPECT_EQ(stats.emitted, 9000);
  EXPECT_EQ(stats.accepted, 9000);
  EXPECT_EQ(stats.failed + stats.dropped, 0);
  ExpectStored(want);
  StopMeterd();
}

// The C++ HttpEmitter. Pointed at a port where nothing listens, with a queue of 100: Emit
// never blocks, the oldest are dropped, Close gives up within its timeout. Then events
// emitted before meterd is up: refused connections (and a 503 while meterd starts, if one
// comes) are retried until it takes them, and each event counts once.
TEST_F(ClientsTest, CppHttpEmitterRetriesUntilMeterdIsUpThenCountsExactly) {
  const std::string token = CreateKey({"--org", kOrgC, "--scope", "ingest"});
  const int port = FreeLocalPort();
  {
    std::string error;
    auto down = clients::HttpEmitter::Create(
        {.port = port, .api_key = token, .source = "clients-test/cpp-http", .max_queue = 100},
        &error);
    ASSERT_NE(down, nullptr) << error;
    const absl::Time start = absl::Now();
    for (int i = 0; i < 500; ++i) down->Emit({.org = kOrgC});
    EXPECT_LT(absl::Now() - start, absl::Milliseconds(500));
    const clients::EmitterStats stats = down->Close(std::chrono::milliseconds(300));
    EXPECT_LT(absl::Now() - start, absl::Seconds(3));
    EXPECT_EQ(stats.emitted, 500);
    EXPECT_EQ(stats.accepted, 0);
    EXPECT_GT(stats.dropped, 0);
    EXPECT_EQ(stats.dropped + stats.failed, 500);
  }
  std::string error;
  auto emitter = clients::HttpEmitter::Create({.port = port,
                                               .api_key = token,
                                               .source = "clients-test/cpp-http",
                                               .max_attempts = 100,
                                               .max_backoff = std::chrono::milliseconds(500)},
                                              &error);
  ASSERT_NE(emitter, nullptr) << error;
  Totals want;
  for (int i = 0; i < 3000; ++i) {
    const clients::Usage usage{.org = kOrgC,
                               .meter = i % 3 == 0 ? "ai_requests" : "api_calls",
                               .quantity = 1 + i % 7,
                               .industry = "auto"};
    ASSERT_TRUE(emitter->Emit(usage));
    want[{usage.org, usage.meter, usage.industry}] += usage.quantity;
  }
  absl::SleepFor(absl::Seconds(1));
  EXPECT_EQ(emitter->Stats().accepted, 0);  // Nothing listens yet.
  StartServing({}, port);
  EXPECT_TRUE(emitter->Flush(std::chrono::seconds(40)));
  const clients::EmitterStats stats = emitter->Close(std::chrono::seconds(1));
  EXPECT_EQ(stats.emitted, 3000);
  EXPECT_EQ(stats.accepted, 3000);
  EXPECT_EQ(stats.failed + stats.dropped + stats.rejected, 0);
  EXPECT_GT(stats.retries, 0);
  ExpectStored(want);
  StopMeterd();
}

}  // namespace
}  // namespace meterd::testing
