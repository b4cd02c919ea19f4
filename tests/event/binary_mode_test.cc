// CloudEvents Kafka binary content mode: headers + data become the structured event the parser
// reads, with the same validation.
#include "lib/event/binary_mode.h"

#include <gtest/gtest.h>

#include "absl/time/time.h"
#include "lib/event/event_parser.h"

namespace meterd::event {
namespace {

using Headers = std::vector<std::pair<std::string_view, std::string_view>>;

const absl::Time kNow = absl::FromUnixSeconds(DaysFromCivil(2026, 11, 26) * 86400 + 36000);

class BinaryModeTest : public ::testing::Test {
 protected:
  MeterRegistry meters_ = MeterRegistry::Defaults();
  EventParser parser_{&meters_, {}};
  Headers headers_ = {{"ce_specversion", "1.0"},
                      {"ce_id", "evt-1"},
                      {"ce_source", "hs/app"},
                      {"ce_type", "ai_requests"},
                      {"ce_subject", "5f0d2c1e-8a4b-4c3d-9e2f-1a2b3c4d5e6f"},
                      {"ce_time", "2026-11-26T08:00:00Z"},
                      {"content-type", "application/json"}};
};

TEST_F(BinaryModeTest, HeadersAndDataCountLikeTheStructuredEvent) {
  std::string structured;
  ASSERT_TRUE(StructuredFromBinary(headers_, R"({"quantity":3,"industry":"hs"})", &structured));
  const ParsedMessage& parsed = parser_.Parse(structured, kNow);
  ASSERT_EQ(parsed.events.size(), 1u) << structured;
  EXPECT_TRUE(parsed.rejections.empty());
  EXPECT_EQ(parsed.events[0].quantity, 3);
  EXPECT_EQ(parsed.events[0].id, "evt-1");
  EXPECT_EQ(parsed.events[0].source, "hs/app");
  EXPECT_EQ(OrgIdToString(parsed.events[0].org), "5f0d2c1e-8a4b-4c3d-9e2f-1a2b3c4d5e6f");
}

TEST_F(BinaryModeTest, WithoutSpecVersionHeaderItIsNotBinaryMode) {
  std::string structured;
  EXPECT_FALSE(StructuredFromBinary({{"trace-id", "abc"}, {"ce_id", "x"}}, "{}", &structured));
}

TEST_F(BinaryModeTest, HeaderValuesAreEscapedNotInterpreted) {
  headers_[1] = {"ce_id", "a\"b\\c\nd"};
  headers_.push_back({"ce_Bad-Name", "ignored"});
  std::string structured;
  ASSERT_TRUE(StructuredFromBinary(headers_, R"({"industry":"hs"})", &structured));
  const ParsedMessage& parsed = parser_.Parse(structured, kNow);
  ASSERT_EQ(parsed.events.size(), 1u) << structured;
  EXPECT_EQ(structured.find("Bad-Name"), std::string::npos);
}

// A producer sends headers and data: a data value smuggling a second subject does not count.
TEST_F(BinaryModeTest, DataCannotAddAttributes) {
  std::string structured;
  ASSERT_TRUE(StructuredFromBinary(
      headers_, R"({"industry":"hs"},"subject":"00000000-0000-4000-8000-000000000001")",
      &structured));
  const ParsedMessage& parsed = parser_.Parse(structured, kNow);
  EXPECT_TRUE(parsed.events.empty());
  ASSERT_EQ(parsed.rejections.size(), 1u);
}

// The gateway case: trusted headers, a client-supplied value. A value that is more than one
// object cannot supply the attributes the headers left out.
TEST_F(BinaryModeTest, DataCannotSupplyMissingAttributes) {
  headers_.erase(headers_.begin() + 4, headers_.begin() + 6);  // ce_subject, ce_time
  std::string structured;
  ASSERT_TRUE(StructuredFromBinary(
      headers_,
      R"({"quantity":1000000,"industry":"hs"},"subject":"00000000-0000-4000-8000-000000000001",)"
      R"("time":"2026-11-26T07:00:00Z")",
      &structured));
  const ParsedMessage& parsed = parser_.Parse(structured, kNow);
  EXPECT_TRUE(parsed.events.empty()) << structured;
  // Strings and nesting inside data are fine.
  ASSERT_TRUE(StructuredFromBinary(headers_, R"( {"industry":"hs","note":"}{x]"} )", &structured));
  EXPECT_NE(structured.find(R"("data": {"industry":"hs","note":"}{x]"} )"), std::string::npos)
      << structured;
}

// content-type application/cloudevents+json means structured mode even with ce_ headers.
TEST_F(BinaryModeTest, CloudEventsContentTypeMeansStructuredMode) {
  headers_.back() = {"content-type", "application/cloudevents+json; charset=utf-8"};
  std::string structured;
  EXPECT_FALSE(StructuredFromBinary(headers_, "{}", &structured));
}

TEST_F(BinaryModeTest, DataFieldGivenTwiceIsRefused) {
  std::string structured;
  ASSERT_TRUE(StructuredFromBinary(headers_, R"({"quantity":1,"industry":"hs","quantity":900000})",
                                   &structured));
  const ParsedMessage& parsed = parser_.Parse(structured, kNow);
  EXPECT_TRUE(parsed.events.empty());
  ASSERT_EQ(parsed.rejections.size(), 1u);
  EXPECT_EQ(parsed.rejections[0].reason, RejectReason::kWrongType);
}

TEST_F(BinaryModeTest, MissingAttributeIsRefusedWithItsReason) {
  headers_.erase(headers_.begin() + 4);  // ce_subject
  std::string structured;
  ASSERT_TRUE(StructuredFromBinary(headers_, R"({"industry":"hs"})", &structured));
  const ParsedMessage& parsed = parser_.Parse(structured, kNow);
  ASSERT_EQ(parsed.rejections.size(), 1u);
  EXPECT_EQ(parsed.rejections[0].reason, RejectReason::kMissingField);
}

}  // namespace
}  // namespace meterd::event
