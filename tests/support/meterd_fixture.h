#pragma once

// The fixture of the end-to-end tests: a migrated database of its own, the embedded Kafka
// (`meterd dev-broker`, 64 partitions) and helpers that run meterd and loadgen as child
// processes and compare what Postgres holds with what loadgen produced.
#include <signal.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <pqxx/pqxx>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "lib/devtools/loadgen.h"
#include "tests/support/harness.h"

namespace meterd::testing {

inline constexpr char kTopic[] = "usage-events";

class MeterdFixture : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    dir_ = TempDir("meterd-it");
    url_ = SharedPostgres().CreateMigratedDatabase("it_" + absl::AsciiStrToLower(name));
    // The embedded broker keeps ~5 MiB per partition: enough partitions that nothing is dropped.
    broker_ = std::make_unique<DevBrokerProcess>(kTopic, 64, dir_);
  }

  void TearDown() override {
    // Logs stay for a failed test (its assertions print the path); a passing one leaves nothing.
    broker_.reset();
    if (!HasFailure()) std::filesystem::remove_all(dir_);
  }

  // `meterd api-key create …`: the token it prints once.
  std::string CreateKey(std::vector<std::string> args) {
    args.insert(args.begin(), {"api-key", "create", "--pg", url_});
    auto [code, out] = RunCommand(args, "api-key");
    EXPECT_EQ(code, 0) << out;
    const size_t at = out.find("\"token\":\"");
    if (at == std::string::npos) {
      ADD_FAILURE() << out;
      return "";
    }
    return out.substr(at + 9, out.find('"', at + 9) - at - 9);
  }

  // With `test_group_timing`, a short session timeout so rebalances in these tests are quick;
  // without, meterd's own defaults (what an SRE runs).
  std::unique_ptr<ChildProcess> StartMeterd(const std::string& label,
                                            const std::string& flush_interval = "300ms",
                                            std::vector<std::string> extra = {},
                                            bool test_group_timing = true) {
    std::vector<std::string> args = {MeterdBinary(),
                                     "run",
                                     "--pg",
                                     url_,
                                     "--brokers",
                                     broker_->bootstrap(),
                                     "--topic",
                                     kTopic,
                                     "--group",
                                     "it",
                                     "--shards",
                                     "2",
                                     "--flush-interval",
                                     flush_interval,
                                     "--stats-interval",
                                     "2s"};
    if (test_group_timing) {
      for (const char* property : {"session.timeout.ms=6000", "heartbeat.interval.ms=500"}) {
        args.push_back("--kafka-property");
        args.push_back(property);
      }
    }
    // A fixed interval unless a test asks for adaptive flushing: tests that wait a few flush
    // intervals for something (a meter reload) must not see the interval grow on a busy box.
    if (std::find(extra.begin(), extra.end(), "--max-visibility-latency") == extra.end()) {
      args.push_back("--max-visibility-latency");
      args.push_back(flush_interval);
    }
    args.insert(args.end(), extra.begin(), extra.end());
    return std::make_unique<ChildProcess>(args, absl::StrCat(dir_, "/meterd-", label, ".log"));
  }

  std::unique_ptr<ChildProcess> StartLoadgen(int64_t events, int orgs, double malformed,
                                             int64_t rate, double duplicates = 0) {
    return std::make_unique<ChildProcess>(
        std::vector<std::string>{
            MeterdBinary(), "loadgen", "--brokers", broker_->bootstrap(), "--topic", kTopic,
            "--events", std::to_string(events), "--orgs", std::to_string(orgs), "--malformed-share",
            std::to_string(malformed), "--rate", std::to_string(rate), "--duplicate-share",
            std::to_string(duplicates), "--expected-out", dir_ + "/expected.csv"},
        dir_ + "/loadgen.log");
  }

  // Waits for loadgen to finish and returns what it says Postgres must hold.
  devtools::ExpectedTotals FinishLoadgen(ChildProcess& loadgen) {
    summary_ = loadgen.ReadAll();
    EXPECT_EQ(loadgen.Wait(absl::Minutes(3)), 0) << ReadFile(loadgen.log_path());
    auto expected = devtools::ReadExpectedCsv(dir_ + "/expected.csv");
    EXPECT_TRUE(expected.ok()) << expected.status();
    return expected.ok() ? *expected : devtools::ExpectedTotals{};
  }

  // Waits (up to 30 s) until meterd answers /healthz on `port`; the port, or -1.
  int WaitForHttp(int port) {
    const bool up = Eventually([&] { return HttpGet(port, "/healthz").first == 200; },
                               absl::Seconds(30), absl::Milliseconds(50));
    return up ? port : -1;
  }

  // Waits until the group gave `joiner` partitions, lets it work 3 s, then stops it
  // (SIGTERM): a rebalance to it and back.
  void JoinBrieflyThenLeave(ChildProcess& joiner) {
    ASSERT_TRUE(Eventually(
        [&] { return ReadFile(joiner.log_path()).find("assigned partition") != std::string::npos; },
        absl::Seconds(60), absl::Milliseconds(200)))
        << ReadFile(joiner.log_path());
    absl::SleepFor(absl::Seconds(3));
    joiner.Signal(SIGTERM);
    EXPECT_EQ(joiner.Wait(absl::Seconds(60)), 0) << ReadFile(joiner.log_path());
  }

  // Runs `meterd args...` to completion: its exit code and stdout + stderr.
  std::pair<int, std::string> RunCommand(std::vector<std::string> args, const std::string& label) {
    args.insert(args.begin(), MeterdBinary());
    const std::string log = absl::StrCat(dir_, "/", label, ".log");
    ChildProcess child(args, log);
    std::string out = child.ReadAll();
    const int code = child.Wait(absl::Seconds(60));
    return {code, out + ReadFile(log)};
  }

  static void Exec(const std::string& url, const std::string& sql) {
    pqxx::connection conn(url);
    pqxx::work tx(conn);
    tx.exec(sql);
    tx.commit();
  }

  int64_t StoredOffsetSum() {
    return QueryInt(url_, "SELECT coalesce(sum(next_offset), 0) FROM shared.ingest_offsets");
  }

  // Waits until some flush advanced the stored offsets beyond `than`.
  bool WaitForProgress(int64_t than, absl::Duration timeout) {
    return Eventually([&] { return StoredOffsetSum() > than; }, timeout);
  }

  void ExpectExact(const devtools::ExpectedTotals& expected) {
    const int64_t want = SumOf(expected);
    const int64_t got = WaitForSum(url_, want, absl::Minutes(2));
    EXPECT_EQ(got, want);
    // Give a would-be double count time to show up before comparing key by key.
    absl::SleepFor(absl::Seconds(1));
    const std::string diff = DiffTotals(expected, StoredTotals(url_));
    EXPECT_TRUE(diff.empty()) << diff;
  }

  std::string dir_;
  std::string url_;
  std::string summary_;
  std::unique_ptr<DevBrokerProcess> broker_;
};

}  // namespace meterd::testing
