// Hostile input: what a broken or malicious producer can put in a Kafka message. Each case is
// refused with a reason (and counts nothing), never a crash or a stall (the ctest timeout and
// the sanitizer builds watch for those).
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "lib/event/binary_mode.h"
#include "lib/event/event_parser.h"

namespace meterd::event {
namespace {

const absl::Time kNow = absl::FromUnixSeconds(DaysFromCivil(2026, 11, 26) * 86400 + 10 * 3600);
constexpr char kOrg[] = "5f0d2c1e-8a4b-4c3d-9e2f-1a2b3c4d5e6f";

// A valid event with `data` (and optionally other attributes) replaced.
std::string Event(const std::string& data, const std::string& subject = kOrg) {
  return absl::StrCat(
      R"({"specversion":"1.0","id":"r-1","source":"robustness","type":"api_calls","subject":")",
      subject, R"(","time":"2026-11-26T09:59:00Z","data":)", data, "}");
}

class RobustnessTest : public ::testing::Test {
 protected:
  // Parses `bytes` and expects no event and exactly one refusal for `reason`.
  void ExpectRefused(const std::string& bytes, RejectReason reason, const std::string& what) {
    const ParsedMessage& parsed = parser_.Parse(bytes, kNow);
    EXPECT_TRUE(parsed.events.empty()) << what;
    ASSERT_EQ(parsed.rejections.size(), 1u) << what;
    EXPECT_EQ(RejectReasonCode(parsed.rejections[0].reason), RejectReasonCode(reason))
        << what << ": " << parsed.rejections[0].detail;
    EXPECT_FALSE(parsed.rejections[0].detail.empty()) << what;
  }

  MeterRegistry meters_ = MeterRegistry::Defaults();
  EventParser parser_{&meters_, ParseLimits{}};
};

TEST_F(RobustnessTest, TheControlEventIsCounted) {
  const ParsedMessage& parsed = parser_.Parse(Event(R"({"quantity":3,"industry":"hs"})"), kNow);
  ASSERT_EQ(parsed.events.size(), 1u);
  EXPECT_EQ(parsed.events[0].quantity, 3);
}

TEST_F(RobustnessTest, HugeMessagesAreRefusedWhole) {
  ExpectRefused(std::string(16 << 20, 'x'), RejectReason::kNotJson, "16 MiB of garbage");
  ExpectRefused(std::string(16 << 20, '['), RejectReason::kNotJson, "16 MiB of open brackets");
  // A well-formed event whose one string is 8 MiB long: valid JSON, but not a meter name.
  ExpectRefused(absl::StrCat(R"({"specversion":"1.0","id":"r-1","source":"s","type":")",
                             std::string(8 << 20, 'a'), R"(","subject":")", kOrg,
                             R"(","time":"2026-11-26T09:59:00Z","data":{"industry":"hs"}})"),
                RejectReason::kUnknownMeter, "an 8 MiB meter name");
}

TEST_F(RobustnessTest, InvalidUtf8IsRefused) {
  ExpectRefused(Event(R"({"quantity":1,"industry":"hs"})", std::string("\xff\xfe\xfd")),
                RejectReason::kNotJson, "invalid UTF-8 in subject");
  ExpectRefused(Event("{\"quantity\":1,\"industry\":\"h\xc3\"}"), RejectReason::kNotJson,
                "truncated UTF-8 sequence in data");
}

TEST_F(RobustnessTest, DeepNestingIsRefused) {
  const std::string deep = std::string(10'000, '[') + std::string(10'000, ']');
  ExpectRefused(Event(absl::StrCat(R"({"quantity":1,"industry":"hs","x":)", deep, "}")),
                RejectReason::kNotJson, "10,000 nested arrays inside data");
  // As the message: a batch whose element is not an event.
  ExpectRefused(deep, RejectReason::kNotObject, "10,000 nested arrays as the message");
  // Unknown attributes are skipped, but not past the depth limit; shallow ones are fine.
  ExpectRefused(
      absl::StrCat(R"({"extension":)", deep, ",", Event(R"({"industry":"hs"})").substr(1)),
      RejectReason::kNotJson, "10,000 nested arrays in an extension attribute");
  const std::string shallow = std::string(60, '[') + std::string(60, ']');
  const ParsedMessage& parsed = parser_.Parse(
      Event(absl::StrCat(R"({"quantity":1,"industry":"hs","tags":{"a":)", shallow, "}}")), kNow);
  EXPECT_EQ(parsed.events.size(), 1u) << "62 levels are accepted";
}

TEST_F(RobustnessTest, NumbersOutOfRangeAreBadQuantities) {
  for (const std::string quantity : {"1e400", "18446744073709551616", "9223372036854775808", "-1",
                                     "1.5", "1e3", "-0.0", "\"7\"", "null", "true"}) {
    ExpectRefused(Event(absl::StrCat(R"({"quantity":)", quantity, R"(,"industry":"hs"})")),
                  RejectReason::kBadQuantity, "quantity " + quantity);
  }
}

TEST_F(RobustnessTest, DuplicateKeysCannotSmuggleAQuantity) {
  // A later `data` must not replace (or add to) the first: the whole event is refused.
  ExpectRefused(
      Event(R"({"quantity":1,"industry":"hs"},"data":{"quantity":1000000000,"industry":"hs"})"),
      RejectReason::kWrongType, "data given twice");
  ExpectRefused(Event(R"({"quantity":1,"quantity":1000000000,"industry":"hs"})"),
                RejectReason::kWrongType, "quantity given twice");
  ExpectRefused(absl::StrCat(R"({"type":"data_exports",)", Event(R"({"industry":"hs"})").substr(1)),
                RejectReason::kWrongType, "type given twice");
}

TEST_F(RobustnessTest, NulBytesAreRefused) {
  std::string inside = Event(R"({"quantity":1,"industry":"hs"})");
  inside.insert(inside.find("robustness"), 1, '\0');
  ExpectRefused(inside, RejectReason::kNotJson, "a raw NUL inside a string");
  ExpectRefused(Event(R"({"quantity":1,"industry":"hs"})") + std::string(1, '\0'),
                RejectReason::kNotJson, "a NUL after the event");
  ExpectRefused(std::string(64, '\0'), RejectReason::kNotJson, "only NULs");
}

TEST_F(RobustnessTest, EmptyAndBlankMessagesAreRefused) {
  ExpectRefused("", RejectReason::kNotJson, "empty");
  ExpectRefused("   \n\t ", RejectReason::kNotJson, "whitespace only");
  ExpectRefused("[]", RejectReason::kEmptyBatch, "empty batch");
}

TEST_F(RobustnessTest, HostileBinaryModeHeadersAreRefused) {
  const std::string data = R"({"quantity":2,"industry":"hs"})";
  using Headers = std::vector<std::pair<std::string_view, std::string_view>>;
  const std::string huge(1 << 20, 'h');
  const std::string with_nul("r-\0-1", 5);
  const std::vector<std::pair<Headers, RejectReason>> cases = {
      {{{"ce_specversion", "2.0"},
        {"ce_id", "b"},
        {"ce_source", "s"},
        {"ce_type", "api_calls"},
        {"ce_subject", kOrg},
        {"ce_time", "2026-11-26T09:59:00Z"}},
       RejectReason::kBadSpecVersion},
      {{{"ce_specversion", "1.0"},
        {"ce_source", "s"},
        {"ce_type", "api_calls"},
        {"ce_subject", kOrg},
        {"ce_time", "2026-11-26T09:59:00Z"}},
       RejectReason::kMissingField},
      {{{"ce_specversion", "1.0"},
        {"ce_id", "b"},
        {"ce_source", "s"},
        {"ce_type", huge},
        {"ce_subject", kOrg},
        {"ce_time", "2026-11-26T09:59:00Z"}},
       RejectReason::kUnknownMeter},
      {{{"ce_specversion", "1.0"},
        {"ce_id", "b"},
        {"ce_source", "s"},
        {"ce_type", "api_calls"},
        {"ce_subject", "\xff\xfe"},
        {"ce_time", "2026-11-26T09:59:00Z"}},
       RejectReason::kNotJson},
      {{{"ce_specversion", "1.0"},
        {"ce_id", "b"},
        {"ce_source", "s"},
        {"ce_type", "api_calls"},
        {"ce_subject", kOrg},
        {"ce_time", "2026-11-26T09:59:00Z"},
        {"ce_time", "2026-11-26T09:00:00Z"}},
       RejectReason::kWrongType},
  };
  for (const auto& [headers, reason] : cases) {
    std::string structured;
    ASSERT_TRUE(StructuredFromBinary(headers, data, &structured));
    ExpectRefused(structured, reason,
                  absl::StrCat("binary mode, ", std::string(RejectReasonCode(reason))));
  }
  // A value that is not one JSON object cannot add attributes: embedded as a string, refused.
  std::string structured;
  const Headers valid = {{"ce_specversion", "1.0"}, {"ce_id", with_nul},
                         {"ce_source", "s"},        {"ce_type", "api_calls"},
                         {"ce_subject", kOrg},      {"ce_time", "2026-11-26T09:59:00Z"}};
  ASSERT_TRUE(
      StructuredFromBinary(valid, R"({"quantity":1,"industry":"hs"},"type":"x")", &structured));
  ExpectRefused(structured, RejectReason::kWrongType, "binary mode, data not one object");
}

}  // namespace
}  // namespace meterd::event
