// A new meter is a row, not a release: the `meterd` binary as a child process, a real Postgres
// and the embedded Kafka. A meter inserted while meterd runs is counted within one flush
// interval, the events refused before it existed are counted by `meterd replay-rejected`
// exactly once, and one meter's per-event maximum refuses an outlier that a raised maximum
// lets the replay count.
#include <signal.h>

#include <filesystem>

#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/support/harness.h"

namespace meterd::testing {
namespace {

constexpr char kTopic[] = "usage-events";
constexpr char kOrg[] = "00000000-0000-4000-8000-00000000a001";
const absl::Duration kFlushInterval = absl::Milliseconds(500);

struct Outcome {
  int exit_code;
  std::string stdout_text;
  std::string stderr_text;
};

class MetersTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    dir_ = TempDir("meterd-meters");
    url_ = SharedPostgres().CreateMigratedDatabase("mt_" + absl::AsciiStrToLower(name));
    broker_ = std::make_unique<DevBrokerProcess>(kTopic, 4, dir_);
  }

  void TearDown() override {
    broker_.reset();
    if (!HasFailure()) std::filesystem::remove_all(dir_);
  }

  std::unique_ptr<ChildProcess> StartMeterd() {
    return std::make_unique<ChildProcess>(
        std::vector<std::string>{MeterdBinary(), "run", "--pg", url_, "--brokers",
                                 broker_->bootstrap(), "--topic", kTopic, "--group", "mt",
                                 "--shards", "2", "--flush-interval",
                                 absl::FormatDuration(kFlushInterval), "--stats-interval", "5s",
                                 "--kafka-property", "session.timeout.ms=6000"},
        dir_ + "/meterd.log");
  }

  Outcome Replay(const std::string& reason) {
    const std::string log = absl::StrCat(dir_, "/replay-", replays_++, ".log");
    ChildProcess child({MeterdBinary(), "replay-rejected", "--pg", url_, "--reason", reason}, log);
    std::string out = child.ReadAll();
    const int code = child.Wait(absl::Seconds(60));
    return {code, out, ReadFile(log)};
  }

  void Exec(const std::string& sql) {
    pqxx::connection conn(url_);
    pqxx::work tx(conn);
    tx.exec0(sql);
    tx.commit();
  }

  int64_t Query(const std::string& sql) { return QueryInt(url_, sql); }

  // Polls until `sql` returns `want` (bounded); returns the last value seen.
  int64_t WaitFor(const std::string& sql, int64_t want,
                  absl::Duration timeout = absl::Seconds(60)) {
    const absl::Time deadline = absl::Now() + timeout;
    int64_t got = Query(sql);
    while (got != want && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(100));
      got = Query(sql);
    }
    return got;
  }

  int64_t MeterTotal(const std::string& meter) {
    return Query("SELECT coalesce(sum(quantity), 0) FROM shared.api_usage_meters WHERE meter = '" +
                 meter + "'");
  }

  std::string MeterTotalSql(const std::string& meter) {
    return "SELECT coalesce(sum(quantity), 0) FROM shared.api_usage_meters WHERE meter = '" +
           meter + "'";
  }

  std::string RejectedSql(const std::string& reason, bool replayed) {
    return absl::StrCat("SELECT count(*) FROM shared.rejected_events WHERE reason = '", reason,
                        "' AND replayed_at IS ", replayed ? "NOT NULL" : "NULL");
  }

  void Produce(const std::string& meter, int64_t quantity, int count) {
    std::vector<std::string> events;
    for (int i = 0; i < count; ++i) events.push_back(UsageEventJson(kOrg, meter, quantity, "hs"));
    ProduceOrDie(broker_->bootstrap(), kTopic, kOrg, events);
  }

  // Waits until meterd consumed and flushed everything produced so far (a marker api_calls
  // event counted), so a following assertion sees the state after those events.
  void WaitForMarker() {
    const int64_t before = MeterTotal("api_calls");
    Produce("api_calls", 1, 1);
    ASSERT_EQ(WaitFor(MeterTotalSql("api_calls"), before + 1), before + 1)
        << ReadFile(dir_ + "/meterd.log");
  }

  std::string dir_;
  std::string url_;
  int replays_ = 0;
  std::unique_ptr<DevBrokerProcess> broker_;
};

// The JSON summary's integer field `name`, or -1 when absent.
int64_t Field(const std::string& json, const std::string& name) {
  const std::string key = absl::StrCat("\"", name, "\":");
  const size_t at = json.find(key);
  return at == std::string::npos ? -1 : std::stoll(json.substr(at + key.size()));
}

TEST_F(MetersTest, MeterInsertedWhileRunningIsCountedAndItsRejectsReplayOnce) {
  constexpr int64_t kQuantity = 7;
  auto meterd = StartMeterd();
  WaitForMarker();

  // Not yet a meter: refused with its reason, nothing counted.
  Produce("gpu_seconds", kQuantity, 50);
  ASSERT_EQ(WaitFor(RejectedSql("unknown_meter", false), 50), 50) << ReadFile(meterd->log_path());
  EXPECT_EQ(MeterTotal("gpu_seconds"), 0);

  Exec("INSERT INTO shared.meters (meter_id, name, unit) VALUES (10, 'gpu_seconds', 'second')");
  absl::SleepFor(2 * kFlushInterval);
  Produce("gpu_seconds", kQuantity, 50);
  EXPECT_EQ(WaitFor(MeterTotalSql("gpu_seconds"), 50 * kQuantity), 50 * kQuantity)
      << ReadFile(meterd->log_path());
  WaitForMarker();
  EXPECT_EQ(MeterTotal("gpu_seconds"), 50 * kQuantity);
  EXPECT_EQ(Query(RejectedSql("unknown_meter", false)), 50);
  EXPECT_NE(ReadFile(meterd->log_path())
                .find("meters: loaded new meter gpu_seconds (id 10, max quantity 1000000000)"),
            std::string::npos)
      << ReadFile(meterd->log_path());

  const Outcome first = Replay("unknown_meter");
  ASSERT_EQ(first.exit_code, 0) << first.stderr_text;
  EXPECT_EQ(Field(first.stdout_text, "rows_examined"), 50) << first.stdout_text;
  EXPECT_EQ(Field(first.stdout_text, "rows_replayed"), 50) << first.stdout_text;
  EXPECT_EQ(Field(first.stdout_text, "events_counted"), 50) << first.stdout_text;
  EXPECT_EQ(Field(first.stdout_text, "quantity_counted"), 50 * kQuantity) << first.stdout_text;
  EXPECT_EQ(MeterTotal("gpu_seconds"), 100 * kQuantity);
  EXPECT_EQ(Query(RejectedSql("unknown_meter", true)), 50);

  const Outcome second = Replay("unknown_meter");
  ASSERT_EQ(second.exit_code, 0) << second.stderr_text;
  EXPECT_EQ(Field(second.stdout_text, "rows_examined"), 0) << second.stdout_text;
  EXPECT_EQ(Field(second.stdout_text, "events_counted"), 0) << second.stdout_text;
  EXPECT_EQ(MeterTotal("gpu_seconds"), 100 * kQuantity);

  // The daemon, still running, counted nothing twice meanwhile.
  WaitForMarker();
  EXPECT_EQ(MeterTotal("gpu_seconds"), 100 * kQuantity);
  meterd->Signal(SIGTERM);
  EXPECT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());
}

TEST_F(MetersTest, QuantityAboveTheMeterMaximumIsRefusedThenReplayedOnceRaised) {
  Exec("UPDATE shared.meters SET max_event_quantity = 100 WHERE name = 'ai_requests'");
  auto meterd = StartMeterd();
  WaitForMarker();

  // At the maximum: counted. Above it, alone or as a batch element: refused.
  Produce("ai_requests", 100, 3);
  Produce("ai_requests", 101, 1);
  ProduceOrDie(broker_->bootstrap(), kTopic, kOrg,
               {absl::StrCat("[", UsageEventJson(kOrg, "ai_requests", 40, "hs"), ",",
                             UsageEventJson(kOrg, "ai_requests", 250, "hs"), "]")});
  ASSERT_EQ(WaitFor(RejectedSql("quantity_too_large", false), 2), 2)
      << ReadFile(meterd->log_path());
  WaitForMarker();
  EXPECT_EQ(MeterTotal("ai_requests"), 3 * 100 + 40);

  // Raised while running: the daemon counts the next outlier-sized event.
  Exec("UPDATE shared.meters SET max_event_quantity = 1000 WHERE name = 'ai_requests'");
  absl::SleepFor(2 * kFlushInterval);
  Produce("ai_requests", 500, 1);
  EXPECT_EQ(WaitFor(MeterTotalSql("ai_requests"), 3 * 100 + 40 + 500), 3 * 100 + 40 + 500)
      << ReadFile(meterd->log_path());

  const Outcome first = Replay("quantity_too_large");
  ASSERT_EQ(first.exit_code, 0) << first.stderr_text;
  EXPECT_EQ(Field(first.stdout_text, "rows_replayed"), 2) << first.stdout_text;
  EXPECT_EQ(Field(first.stdout_text, "quantity_counted"), 101 + 250) << first.stdout_text;
  EXPECT_EQ(MeterTotal("ai_requests"), 3 * 100 + 40 + 500 + 101 + 250);

  const Outcome second = Replay("quantity_too_large");
  ASSERT_EQ(second.exit_code, 0) << second.stderr_text;
  EXPECT_EQ(Field(second.stdout_text, "events_counted"), 0) << second.stdout_text;
  EXPECT_EQ(MeterTotal("ai_requests"), 3 * 100 + 40 + 500 + 101 + 250);

  // Refused at start, with one line: no reason, or a reason meterd never gives.
  const Outcome missing = Replay("");
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_NE(missing.stderr_text.find("--reason is required"), std::string::npos)
      << missing.stderr_text;
  const Outcome unknown = Replay("no_such_reason");
  EXPECT_EQ(unknown.exit_code, 1);
  EXPECT_NE(unknown.stderr_text.find("unknown reason 'no_such_reason'"), std::string::npos)
      << unknown.stderr_text;

  meterd->Signal(SIGTERM);
  EXPECT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());
}

}  // namespace
}  // namespace meterd::testing
