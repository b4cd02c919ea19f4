// What an SRE sees at the command line: bad flags and unreachable dependencies fail at start
// with one clear line and a non-zero exit.
#include <filesystem>

#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/strings/str_cat.h"
#include "tests/support/harness.h"

namespace meterd::testing {
namespace {

struct Outcome {
  int exit_code;
  std::string stdout_text;
  std::string stderr_text;
};

Outcome RunMeterd(std::vector<std::string> args, absl::Duration timeout = absl::Seconds(30)) {
  const std::string dir = TempDir("meterd-cli");
  const std::string log = dir + "/stderr";
  args.insert(args.begin(), MeterdBinary());
  ChildProcess child(args, log);
  std::string out = child.ReadAll();
  const int code = child.Wait(timeout);
  Outcome outcome{code, out, ReadFile(log)};
  std::filesystem::remove_all(dir);
  return outcome;
}

TEST(CliTest, HelpListsCommandsAndFlags) {
  Outcome top = RunMeterd({"--help"});
  EXPECT_EQ(top.exit_code, 0);
  for (const char* command :
       {"run", "migrate", "dev-broker", "dev-stripe", "loadgen", "replay-rejected", "org export",
        "org erase", "stripe-export", "close-period", "purge-rejected", "archive-usage"}) {
    EXPECT_NE(top.stdout_text.find(command), std::string::npos) << command;
  }
  Outcome run = RunMeterd({"run", "--help"});
  EXPECT_EQ(run.exit_code, 0);
  for (const char* flag : {"--pg", "--brokers", "--flush-interval", "--max-unflushed-keys",
                           "--shards", "--kafka-property", "METERD_PG"}) {
    EXPECT_NE(run.stdout_text.find(flag), std::string::npos) << flag;
  }
  EXPECT_EQ(run.stdout_text.find("--partitions"), std::string::npos);
  Outcome replay = RunMeterd({"replay-rejected", "--help"});
  EXPECT_EQ(replay.exit_code, 0);
  for (const char* flag : {"--pg", "--reason", "--since", "--late-window", "--max-future-skew"}) {
    EXPECT_NE(replay.stdout_text.find(flag), std::string::npos) << flag;
  }
  Outcome erase = RunMeterd({"org", "erase", "--help"});
  EXPECT_EQ(erase.exit_code, 0);
  EXPECT_NE(erase.stdout_text.find("meterd org erase: "), std::string::npos) << erase.stdout_text;
  EXPECT_NE(erase.stdout_text.find("--org"), std::string::npos) << erase.stdout_text;
  EXPECT_EQ(erase.stdout_text.find("--out"), std::string::npos) << erase.stdout_text;
}

// Two-word commands: the first word alone names the choices; a bad id is refused before
// anything connects.
TEST(CliTest, OrgCommandsNeedTheirSecondWordAndAnId) {
  Outcome bare = RunMeterd({"org"});
  EXPECT_EQ(bare.exit_code, 2);
  EXPECT_NE(bare.stderr_text.find("meterd org: needs one of: export, erase"), std::string::npos)
      << bare.stderr_text;
  Outcome unknown = RunMeterd({"org", "delete"});
  EXPECT_EQ(unknown.exit_code, 2);
  EXPECT_NE(unknown.stderr_text.find("needs one of: export, erase"), std::string::npos);
  Outcome missing = RunMeterd({"org", "export", "--pg", "postgresql://127.0.0.1:1/x"});
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_NE(missing.stderr_text.find("--org is required"), std::string::npos)
      << missing.stderr_text;
  Outcome bad_id =
      RunMeterd({"org", "erase", "--pg", "postgresql://127.0.0.1:1/x", "--org", "acme"});
  EXPECT_EQ(bad_id.exit_code, 1);
  EXPECT_NE(bad_id.stderr_text.find("--org must be an organization id (UUID), got 'acme'"),
            std::string::npos)
      << bad_id.stderr_text;
}

TEST(CliTest, BadFlagsFailWithOneClearLine) {
  Outcome unknown = RunMeterd({"run", "--no-such-flag", "1"});
  EXPECT_EQ(unknown.exit_code, 2);
  EXPECT_NE(unknown.stderr_text.find("unknown flag --no-such-flag"), std::string::npos)
      << unknown.stderr_text;
  Outcome wrong_command = RunMeterd({"migrate", "--brokers", "x"});
  EXPECT_EQ(wrong_command.exit_code, 2);
  EXPECT_NE(wrong_command.stderr_text.find("unknown flag --brokers"), std::string::npos);
  Outcome missing = RunMeterd({"run", "--brokers", "127.0.0.1:1"});
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_NE(missing.stderr_text.find("--pg is required"), std::string::npos) << missing.stderr_text;
  // A bare boolean flag needs no value.
  Outcome bare_bool = RunMeterd({"run", "--billing", "--brokers", "127.0.0.1:1"});
  EXPECT_EQ(bare_bool.exit_code, 1);
  EXPECT_NE(bare_bool.stderr_text.find("--pg is required"), std::string::npos)
      << bare_bool.stderr_text;
  Outcome bad_listen =
      RunMeterd({"run", "--pg", "postgresql://postgres@127.0.0.1:1/x?connect_timeout=1",
                 "--brokers", "127.0.0.1:1", "--http-listen", "localhost"});
  EXPECT_EQ(bad_listen.exit_code, 1);
  EXPECT_NE(bad_listen.stderr_text.find("--http-listen expects host:port"), std::string::npos)
      << bad_listen.stderr_text;
  // Adaptive flushing's cap and the compactor's interval are checked before anything connects.
  for (const auto& [flags, message] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"--flush-interval", "2s", "--max-visibility-latency", "1s"},
            "--max-visibility-latency must be at least --flush-interval"},
           {{"--compact-interval", "-1s"}, "--compact-interval must be at least 0"}}) {
    std::vector<std::string> args = {"run", "--pg", "postgresql://postgres@127.0.0.1:1/x",
                                     "--brokers", "127.0.0.1:1"};
    args.insert(args.end(), flags.begin(), flags.end());
    Outcome bad = RunMeterd(args);
    EXPECT_EQ(bad.exit_code, 1) << flags[0];
    EXPECT_NE(bad.stderr_text.find(message), std::string::npos) << bad.stderr_text;
  }
  Outcome bad_duration = RunMeterd({"run", "--flush-interval", "soon"});
  EXPECT_NE(bad_duration.exit_code, 0);
  EXPECT_NE(bad_duration.stderr_text.find("flush_interval"), std::string::npos)
      << bad_duration.stderr_text;
  Outcome bad_property = RunMeterd({"loadgen", "--brokers", "127.0.0.1:1", "--kafka-property",
                                    "no.such.property=1", "--events", "1"});
  EXPECT_EQ(bad_property.exit_code, 1);
  EXPECT_NE(bad_property.stderr_text.find("no.such.property"), std::string::npos);
}

// The Stripe export's configuration is checked before anything connects, and the key is never
// echoed back.
TEST(CliTest, StripeExportConfigErrorsNameTheFlag) {
  const std::string pg = "postgresql://postgres@127.0.0.1:1/x?connect_timeout=1";
  Outcome no_key = RunMeterd({"stripe-export", "--pg", pg});
  EXPECT_EQ(no_key.exit_code, 1);
  EXPECT_NE(no_key.stderr_text.find("--stripe-secret-key"), std::string::npos)
      << no_key.stderr_text;
  Outcome publishable = RunMeterd(
      {"stripe-export", "--pg", pg, "--stripe-secret-key", "pk_live_publishable_0123456789"});
  EXPECT_EQ(publishable.exit_code, 1);
  EXPECT_NE(publishable.stderr_text.find("not a Stripe secret"), std::string::npos)
      << publishable.stderr_text;
  EXPECT_EQ(publishable.stderr_text.find("0123456789"), std::string::npos)
      << publishable.stderr_text;
  Outcome missing_file = RunMeterd(
      {"stripe-export", "--pg", pg, "--stripe-secret-key-file", "/nonexistent/stripe.key"});
  EXPECT_EQ(missing_file.exit_code, 1);
  EXPECT_NE(missing_file.stderr_text.find("--stripe-secret-key-file: cannot read"),
            std::string::npos)
      << missing_file.stderr_text;
  Outcome bad_base = RunMeterd({"stripe-export", "--pg", pg, "--stripe-secret-key",
                                "sk_test_0123456789", "--stripe-api-base", "ftp://stripe"});
  EXPECT_EQ(bad_base.exit_code, 1);
  EXPECT_NE(bad_base.stderr_text.find("--stripe-api-base"), std::string::npos)
      << bad_base.stderr_text;
  Outcome senders = RunMeterd({"stripe-export", "--pg", pg, "--stripe-secret-key",
                               "sk_test_0123456789", "--stripe-export-senders", "0"});
  EXPECT_EQ(senders.exit_code, 1);
  EXPECT_NE(senders.stderr_text.find("--stripe-export-senders"), std::string::npos)
      << senders.stderr_text;
  Outcome help = RunMeterd({"stripe-export", "--help"});
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.stdout_text.find("METERD_STRIPE_SECRET_KEY"), std::string::npos);
}

TEST(CliTest, UnreachablePostgresFailsAtStart) {
  Outcome o = RunMeterd({"run", "--pg", "postgresql://postgres@127.0.0.1:1/x?connect_timeout=2",
                         "--brokers", "127.0.0.1:1"});
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_NE(o.stderr_text.find("meterd run: cannot connect to Postgres"), std::string::npos)
      << o.stderr_text;
}

TEST(CliTest, UnmigratedDatabaseAndUnreachableKafkaFailAtStart) {
  const std::string empty = SharedPostgres().CreateDatabase("cli_empty");
  Outcome unmigrated = RunMeterd({"run", "--pg", empty, "--brokers", "127.0.0.1:1"});
  EXPECT_EQ(unmigrated.exit_code, 1);
  EXPECT_NE(unmigrated.stderr_text.find("meterd migrate"), std::string::npos)
      << unmigrated.stderr_text;

  // Migrate through the environment variable, as a container would.
  setenv("METERD_PG", empty.c_str(), 1);
  Outcome migrate = RunMeterd({"migrate"});
  unsetenv("METERD_PG");
  EXPECT_EQ(migrate.exit_code, 0) << migrate.stderr_text;

  Outcome no_kafka =
      RunMeterd({"run", "--pg", empty, "--brokers", "127.0.0.1:1", "--startup-timeout", "2s"});
  EXPECT_EQ(no_kafka.exit_code, 1);
  EXPECT_NE(no_kafka.stderr_text.find("meterd run: cannot reach Kafka at 127.0.0.1:1"),
            std::string::npos)
      << no_kafka.stderr_text;
}

// `meterd archive-usage` moves the months older than the late window out of the hot table and
// prints what it moved; the totals read through shared.api_usage_meters do not change.
TEST(CliTest, ArchiveUsageMovesClosedMonthsAndPrintsWhatItMoved) {
  const std::string url = SharedPostgres().CreateMigratedDatabase("cli_archive");
  {
    pqxx::connection conn(url);
    pqxx::work tx(conn);
    // Two keys six months ago (closed), one today (open).
    tx.exec0(
        "INSERT INTO shared.api_usage_meters (org_id, meter, industry, usage_date, quantity) "
        "SELECT '0c000000-0000-4000-8000-000000000001', m, 'rest', d, 10 "
        "FROM (VALUES ('api_calls', (now() - interval '6 months')::date), "
        "             ('ai_requests', (now() - interval '6 months')::date), "
        "             ('api_calls', now()::date)) v(m, d)");
    tx.commit();
  }
  const std::string month = std::to_string(QueryInt(
      url, "SELECT to_char(date_trunc('month', now() - interval '6 months'), 'YYYYMM')::int"));
  const std::string first_day = absl::StrCat(month.substr(0, 4), "-", month.substr(4, 2), "-01");

  Outcome refused = RunMeterd({"archive-usage", "--pg", url, "--archive-batch-rows", "0"});
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_NE(refused.stderr_text.find("--archive-batch-rows must be at least 1"), std::string::npos)
      << refused.stderr_text;

  Outcome archived = RunMeterd({"archive-usage", "--pg", url, "--archive-batch-rows", "1"});
  EXPECT_EQ(archived.exit_code, 0) << archived.stderr_text;
  EXPECT_EQ(archived.stdout_text,
            absl::StrCat(R"({"months":[{"month":")", first_day, R"(","rows":2}],"rows":2})", "\n"));
  EXPECT_EQ(QueryInt(url, "SELECT count(*) FROM ONLY shared.api_usage_meters"), 1);
  EXPECT_EQ(QueryInt(url, absl::StrCat("SELECT count(*) FROM shared.api_usage_meters_",
                                       month.substr(0, 4), "_", month.substr(4, 2))),
            2);
  EXPECT_EQ(QueryInt(url, "SELECT sum(quantity) FROM shared.api_usage_meters"), 30);

  Outcome again = RunMeterd({"archive-usage", "--pg", url});
  EXPECT_EQ(again.exit_code, 0) << again.stderr_text;
  EXPECT_EQ(again.stdout_text, "{\"months\":[],\"rows\":0}\n");
}

}  // namespace
}  // namespace meterd::testing
