#include "lib/event/event_parser.h"

#include <cctype>
#include <filesystem>
#include <string>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/civil_time.h"
#include "absl/time/time.h"
#include "tests/support/harness.h"

namespace meterd::event {
namespace {

namespace fs = std::filesystem;

// The clock proto/examples/README.md promises.
const absl::Time kNow = absl::FromUnixSeconds(DaysFromCivil(2026, 11, 26) * 86400 + 10 * 3600);

class EventParserTest : public ::testing::Test {
 protected:
  MeterRegistry meters_ = MeterRegistry::Defaults();
  EventParser parser_{&meters_, ParseLimits{}};
};

fs::path Examples() { return fs::path(METERD_SOURCE_DIR) / "proto" / "examples"; }

TEST_F(EventParserTest, EveryValidExampleIsAccepted) {
  int files = 0;
  for (const auto& entry : fs::directory_iterator(Examples() / "valid")) {
    const std::string bytes = testing::ReadFile(entry.path());
    const ParsedMessage& parsed = parser_.Parse(bytes, kNow);
    EXPECT_TRUE(parsed.rejections.empty())
        << entry.path() << ": " << RejectReasonCode(parsed.rejections[0].reason) << " "
        << parsed.rejections[0].detail;
    const size_t expected = bytes[0] == '[' ? 2 : 1;
    EXPECT_EQ(parsed.events.size(), expected) << entry.path();
    ++files;
  }
  EXPECT_GE(files, 5);
}

TEST_F(EventParserTest, EveryInvalidExampleGetsItsLabelledReason) {
  int files = 0;
  for (const auto& reason_dir : fs::directory_iterator(Examples() / "invalid")) {
    const std::string label = reason_dir.path().filename();
    ASSERT_TRUE(ParseRejectReason(label).has_value()) << "unknown reason directory " << label;
    for (const auto& entry : fs::directory_iterator(reason_dir.path())) {
      const std::string bytes = testing::ReadFile(entry.path());
      const ParsedMessage& parsed = parser_.Parse(bytes, kNow);
      EXPECT_TRUE(parsed.events.empty()) << entry.path();
      ASSERT_EQ(parsed.rejections.size(), 1u) << entry.path();
      EXPECT_EQ(RejectReasonCode(parsed.rejections[0].reason), label)
          << entry.path() << ": " << parsed.rejections[0].detail;
      EXPECT_EQ(parsed.rejections[0].raw, bytes) << entry.path();
      ++files;
    }
  }
  EXPECT_GE(files, 20);
}

TEST_F(EventParserTest, ReadsEveryField) {
  const std::string bytes =
      R"({"specversion":"1.0","id":"e1","source":"hs/work-orders","type":"ai_requests",)"
      R"("subject":"5F0D2C1E-8A4B-4C3D-9E2F-1A2B3C4D5E6F","time":"2026-11-26T09:30:00.5+01:00",)"
      R"("data":{"quantity":3,"industry":"payroll"}})";
  const ParsedMessage& parsed = parser_.Parse(bytes, kNow);
  ASSERT_EQ(parsed.events.size(), 1u);
  const UsageEvent& e = parsed.events[0];
  EXPECT_EQ(OrgIdToString(e.org), "5f0d2c1e-8a4b-4c3d-9e2f-1a2b3c4d5e6f");
  EXPECT_EQ(e.meter, 3);
  EXPECT_EQ(e.industry, Industry::kPayroll);
  EXPECT_EQ(e.quantity, 3);
  EXPECT_EQ(e.id, "e1");
  EXPECT_EQ(e.source, "hs/work-orders");
  EXPECT_EQ(e.time_micros,
            (DaysFromCivil(2026, 11, 26) * 86400 + 8 * 3600 + 30 * 60) * 1'000'000 + 500'000);
  EXPECT_EQ(DayToIsoDate(e.UsageDay()), "2026-11-26");
}

TEST_F(EventParserTest, BatchRejectsOnlyTheBadElement) {
  const std::string good =
      R"({"specversion":"1.0","id":"a","source":"s","type":"api_calls",)"
      R"("subject":"5f0d2c1e-8a4b-4c3d-9e2f-1a2b3c4d5e6f","time":"2026-11-26T08:00:00Z",)"
      R"("data":{"industry":"hs"}})";
  const std::string bad = R"({"specversion":"1.0","id":"b","source":"s","type":"nope",)"
                          R"("subject":"5f0d2c1e-8a4b-4c3d-9e2f-1a2b3c4d5e6f",)"
                          R"("time":"2026-11-26T08:00:00Z","data":{"industry":"hs"}})";
  const std::string batch = "[" + good + ", " + bad + ", 42, " + good + "]";
  const ParsedMessage& parsed = parser_.Parse(batch, kNow);
  EXPECT_EQ(parsed.events.size(), 2u);
  ASSERT_EQ(parsed.rejections.size(), 2u);
  EXPECT_EQ(parsed.rejections[0].reason, RejectReason::kUnknownMeter);
  EXPECT_EQ(parsed.rejections[0].raw, bad);
  EXPECT_EQ(parsed.rejections[1].reason, RejectReason::kNotObject);
}

TEST_F(EventParserTest, BrokenBatchIsRejectedWhole) {
  const ParsedMessage& parsed = parser_.Parse(R"([{"specversion":"1.0"} {"a":1}])", kNow);
  EXPECT_TRUE(parsed.events.empty());
  ASSERT_EQ(parsed.rejections.size(), 1u);
  EXPECT_EQ(parsed.rejections[0].reason, RejectReason::kNotJson);
}

TEST_F(EventParserTest, EscapedValuesAreDecoded) {
  // Legal JSON escapes in every value meterd interprets: the slow pass decodes them.
  const std::string bytes =
      R"({"specversion":"1\u002e0","id":"e\"1","source":"s","type":"api\u005fcalls",)"
      R"("subject":"5f0d2c1e\u002d8a4b-4c3d-9e2f-1a2b3c4d5e6f","time":"2026-11-26T08:00:00\u005a",)"
      R"("data":{"industry":"h\u0073"}})";
  const ParsedMessage& parsed = parser_.Parse(bytes, kNow);
  ASSERT_EQ(parsed.events.size(), 1u) << RejectReasonCode(parsed.rejections.at(0).reason);
  EXPECT_EQ(OrgIdToString(parsed.events[0].org), "5f0d2c1e-8a4b-4c3d-9e2f-1a2b3c4d5e6f");
  EXPECT_EQ(parsed.events[0].meter, 1);
  EXPECT_EQ(parsed.events[0].industry, Industry::kHomeServices);
  // A value that is wrong even decoded is refused once, with its reason.
  const std::string bad = R"({"specversion":"1.0","id":"e","source":"s","type":"api\u005fcall",)"
                          R"("subject":"5f0d2c1e-8a4b-4c3d-9e2f-1a2b3c4d5e6f",)"
                          R"("time":"2026-11-26T08:00:00Z","data":{"industry":"hs"}})";
  const ParsedMessage& refused = parser_.Parse(bad, kNow);
  EXPECT_TRUE(refused.events.empty());
  ASSERT_EQ(refused.rejections.size(), 1u);
  EXPECT_EQ(refused.rejections[0].reason, RejectReason::kUnknownMeter);
}

TEST_F(EventParserTest, EmptyAndBlankMessagesAreNotJson) {
  for (const std::string bytes : {"", "   \n", "{}x", "[1,"}) {
    const ParsedMessage& parsed = parser_.Parse(bytes, kNow);
    EXPECT_TRUE(parsed.events.empty()) << "'" << bytes << "'";
    ASSERT_EQ(parsed.rejections.size(), 1u) << "'" << bytes << "'";
    EXPECT_EQ(parsed.rejections[0].reason, RejectReason::kNotJson) << "'" << bytes << "'";
  }
}

TEST_F(EventParserTest, LateWindowAndSkewFollowTheClock) {
  const std::string bytes =
      R"({"specversion":"1.0","id":"a","source":"s","type":"api_calls",)"
      R"("subject":"5f0d2c1e-8a4b-4c3d-9e2f-1a2b3c4d5e6f","time":"2026-11-26T10:04:00Z",)"
      R"("data":{"industry":"hs"}})";
  EXPECT_EQ(parser_.Parse(bytes, kNow).events.size(), 1u);
  EXPECT_EQ(parser_.Parse(bytes, kNow - absl::Minutes(5)).rejections.at(0).reason,
            RejectReason::kTimeInFuture);
  EXPECT_EQ(parser_.Parse(bytes, kNow + absl::Hours(24 * 63)).rejections.at(0).reason,
            RejectReason::kTimeTooOld);
}

std::string EventWith(const std::string& meter, const std::string& quantity) {
  return absl::StrCat(R"({"specversion":"1.0","id":"q","source":"s","type":")", meter,
                      R"(","subject":"5f0d2c1e-8a4b-4c3d-9e2f-1a2b3c4d5e6f",)",
                      R"("time":"2026-11-26T08:00:00Z","data":{"quantity":)", quantity,
                      R"(,"industry":"hs"}})");
}

RejectReason ReasonOf(const ParsedMessage& parsed) {
  return parsed.rejections.empty() ? RejectReason::kNotJson : parsed.rejections.at(0).reason;
}

TEST_F(EventParserTest, QuantityAboveTheMeterMaximumIsRefused) {
  ASSERT_EQ(meters_.Add(3, "ai_requests", 100), MeterRegistry::AddResult::kUpdated);
  const ParsedMessage& at_max = parser_.Parse(EventWith("ai_requests", "100"), kNow);
  ASSERT_EQ(at_max.events.size(), 1u);
  EXPECT_EQ(at_max.events[0].quantity, 100);
  const ParsedMessage& above = parser_.Parse(EventWith("ai_requests", "101"), kNow);
  EXPECT_TRUE(above.events.empty());
  EXPECT_EQ(ReasonOf(above), RejectReason::kQuantityTooLarge);
  // The maximum is the meter's: another meter takes the same quantity.
  EXPECT_EQ(parser_.Parse(EventWith("api_calls", "101"), kNow).events.size(), 1u);
  EXPECT_EQ(ReasonOf(parser_.Parse(EventWith("api_calls", "1000000001"), kNow)),
            RejectReason::kQuantityTooLarge);
  EXPECT_EQ(parser_.Parse(EventWith("api_calls", "1000000000"), kNow).events.size(), 1u);
  // Not a usable integer at all stays bad_quantity, whatever the meter allows.
  for (const char* bad : {"-1", "1.5", "100000000000000000000", "\"7\""}) {
    const RejectReason reason = ReasonOf(parser_.Parse(EventWith("ai_requests", bad), kNow));
    EXPECT_TRUE(reason == RejectReason::kBadQuantity || reason == RejectReason::kWrongType)
        << bad << ": " << RejectReasonCode(reason);
    EXPECT_NE(reason, RejectReason::kQuantityTooLarge) << bad;
  }
  // In a batch only the outlier element is refused, with its own bytes.
  const std::string outlier = EventWith("ai_requests", "250");
  const ParsedMessage& batch =
      parser_.Parse(absl::StrCat("[", EventWith("ai_requests", "40"), ",", outlier, "]"), kNow);
  ASSERT_EQ(batch.events.size(), 1u);
  ASSERT_EQ(batch.rejections.size(), 1u);
  EXPECT_EQ(batch.rejections[0].reason, RejectReason::kQuantityTooLarge);
  EXPECT_EQ(batch.rejections[0].raw, outlier);
  // Raised while the parser lives: the next event sees it.
  meters_.Add(3, "ai_requests", 250);
  EXPECT_EQ(parser_.Parse(outlier, kNow).events.size(), 1u);
}

TEST_F(EventParserTest, MeterAddedAfterTheParserWasBuiltIsCounted) {
  const std::string bytes = EventWith("gpu_seconds", "3");
  EXPECT_EQ(ReasonOf(parser_.Parse(bytes, kNow)), RejectReason::kUnknownMeter);
  meters_.Add(10, "gpu_seconds");
  const ParsedMessage& parsed = parser_.Parse(bytes, kNow);
  ASSERT_EQ(parsed.events.size(), 1u);
  EXPECT_EQ(parsed.events[0].meter, 10);
}

TEST_F(EventParserTest, ParseElementNeverReadsABatch) {
  const std::string event = EventWith("api_calls", "2");
  EXPECT_EQ(parser_.ParseElement(event, kNow).events.size(), 1u);
  const std::string nested = absl::StrCat("[", event, "]");
  EXPECT_EQ(parser_.Parse(nested, kNow).events.size(), 1u);
  const ParsedMessage& element = parser_.ParseElement(nested, kNow);
  EXPECT_TRUE(element.events.empty());
  EXPECT_EQ(ReasonOf(element), RejectReason::kNotObject);
  EXPECT_EQ(ReasonOf(parser_.ParseElement("42", kNow)), RejectReason::kNotObject);
}

TEST(RejectReasonTest, EveryCodeRoundTrips) {
  for (int i = 0; i < kRejectReasonCount; ++i) {
    const auto reason = static_cast<RejectReason>(i);
    EXPECT_EQ(ParseRejectReason(RejectReasonCode(reason)), reason) << i;
  }
  EXPECT_EQ(RejectReasonCode(RejectReason::kQuantityTooLarge), "quantity_too_large");
  EXPECT_FALSE(ParseRejectReason("no_such_reason").has_value());
}

TEST(OrgIdTest, RoundTripsAndRefusesMalformed) {
  auto id = ParseOrgId("00112233-4455-6677-8899-aabbccddeeff");
  ASSERT_TRUE(id.has_value());
  EXPECT_EQ(id->bytes[0], 0x00);
  EXPECT_EQ(id->bytes[15], 0xff);
  EXPECT_EQ(OrgIdToString(*id), "00112233-4455-6677-8899-aabbccddeeff");
  EXPECT_FALSE(ParseOrgId("00112233-4455-6677-8899-aabbccddeef").has_value());
  EXPECT_FALSE(ParseOrgId("00112233-4455-6677-8899_aabbccddeeff").has_value());
  EXPECT_FALSE(ParseOrgId("0011223g-4455-6677-8899-aabbccddeeff").has_value());
}

TEST(OrgIdTest, AcceptsExactlyTheHexDigitsOfEitherCase) {
  const std::string lower = "0123abcd-ef45-6789-abcd-ef0123456789";
  std::string upper = lower;
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  ASSERT_EQ(ParseOrgId(upper), ParseOrgId(lower));
  EXPECT_EQ(OrgIdToString(*ParseOrgId(upper)), lower);
  for (int c = 0; c < 256; ++c) {
    const bool hex = std::isxdigit(c) != 0;
    for (size_t at : {0, 1, 7, 9, 12, 14, 17, 19, 22, 24, 27, 28, 35}) {
      std::string text = lower;
      text[at] = static_cast<char>(c);
      const auto id = ParseOrgId(text);
      ASSERT_EQ(id.has_value(), hex) << c << " at " << at;
      if (!hex) continue;
      text[at] = static_cast<char>(std::tolower(c));
      EXPECT_EQ(OrgIdToString(*id), text);
    }
  }
}

TEST(Rfc3339Test, ParsesZonesAndFractions) {
  EXPECT_EQ(ParseRfc3339Micros("1970-01-01T00:00:00Z"), 0);
  EXPECT_EQ(ParseRfc3339Micros("1970-01-01T01:00:00+01:00"), 0);
  EXPECT_EQ(ParseRfc3339Micros("1970-01-01T00:00:00.000001Z"), 1);
  EXPECT_EQ(ParseRfc3339Micros("1969-12-31T23:59:59Z"), -1'000'000);
  EXPECT_EQ(ParseRfc3339Micros("2024-02-29T00:00:00Z"),
            DaysFromCivil(2024, 2, 29) * 86400 * 1'000'000);
  EXPECT_FALSE(ParseRfc3339Micros("2023-02-29T00:00:00Z").has_value());
  EXPECT_FALSE(ParseRfc3339Micros("2026-11-26T08:00:00").has_value());
  EXPECT_FALSE(ParseRfc3339Micros("2026-11-26T08:00:00Zjunk").has_value());
  EXPECT_EQ(DayToIsoDate(static_cast<int32_t>(DaysFromCivil(2026, 11, 26))), "2026-11-26");
}

// ParseRfc3339Micros checks and counts dates by hand; absl::CivilDay is the reference.
TEST(Rfc3339Test, AgreesWithCivilDayOnEveryDateAndRefusesImpossibleOnes) {
  std::vector<int> years = {0, 1, 2, 3, 4, 100, 400, 9996, 9997, 9998, 9999};
  for (int year = 1600; year <= 2500; ++year) years.push_back(year);
  int valid = 0;
  for (int year : years) {
    for (int month = 0; month <= 13; ++month) {
      for (int day = 0; day <= 32; ++day) {
        const std::string text =
            absl::StrFormat("%04d-%02d-%02dT23:59:60.5+01:00", year, month, day);
        const absl::CivilDay civil(year, month, day);
        const bool exists = civil.year() == year && civil.month() == month && civil.day() == day;
        const auto micros = ParseRfc3339Micros(text);
        ASSERT_EQ(micros.has_value(), exists) << text;
        if (!exists) continue;
        ++valid;
        const int64_t seconds = (civil - absl::CivilDay(1970, 1, 1)) * 86400 + 22 * 3600 + 3599;
        ASSERT_EQ(*micros, seconds * 1'000'000 + 500'000) << text;
      }
    }
  }
  EXPECT_EQ(valid, 365 * static_cast<int>(years.size()) + 223);  // 223 leap years among them.
}

}  // namespace
}  // namespace meterd::event
