// The per-partition dedup window: what it remembers, what it forgets, and its memory bound.
#include "lib/aggregate/dedup_window.h"

#include <string>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"

namespace meterd::aggregate {
namespace {

constexpr int64_t kHour = 3'600'000'000;
const event::OrgId kOrg = *event::ParseOrgId("00000000-0000-4000-8000-000000000001");
const event::OrgId kOtherOrg = *event::ParseOrgId("00000000-0000-4000-8000-000000000002");

// Two orgs' producers may pick the same source and id (HTTP ingest lets each tenant choose
// both): neither cancels the other's event.
TEST(DedupWindowTest, TheSameSourceAndIdOfAnotherOrgIsNotADuplicate) {
  DedupWindow window({.max_ids = 10, .window = absl::Hours(24)});
  EXPECT_FALSE(window.SeenOrRemember(kOrg, "/billing-app", "inv-42", 0));
  EXPECT_FALSE(window.SeenOrRemember(kOtherOrg, "/billing-app", "inv-42", 0));
  EXPECT_TRUE(window.SeenOrRemember(kOtherOrg, "/billing-app", "inv-42", 0));
  EXPECT_TRUE(window.SeenOrRemember(kOrg, "/billing-app", "inv-42", 0));
}

TEST(DedupWindowTest, SecondSightingOfTheSameSourceAndIdIsADuplicate) {
  DedupWindow window({.max_ids = 10, .window = absl::Hours(24)});
  EXPECT_FALSE(window.SeenOrRemember(kOrg, "hs/app", "id-1", 0));
  EXPECT_TRUE(window.SeenOrRemember(kOrg, "hs/app", "id-1", 0));
  EXPECT_TRUE(window.SeenOrRemember(kOrg, "hs/app", "id-1", kHour));  // Time does not matter.
  // Same id from another source, or another id: new events.
  EXPECT_FALSE(window.SeenOrRemember(kOrg, "rest/app", "id-1", 0));
  EXPECT_FALSE(window.SeenOrRemember(kOrg, "hs/app", "id-2", 0));
  // The pair is one key, not a concatenation.
  EXPECT_FALSE(window.SeenOrRemember(kOrg, "hs/ap", "pid-1", 0));
  EXPECT_EQ(window.size(), 4u);
}

TEST(DedupWindowTest, ForgetsTheOldestBeyondMaxIds) {
  DedupWindow window({.max_ids = 3, .window = absl::Hours(24)});
  for (int i = 0; i < 5; ++i) EXPECT_FALSE(window.SeenOrRemember(kOrg, "s", absl::StrCat(i), 0));
  EXPECT_EQ(window.size(), 3u);
  // 0 and 1 were forgotten; 2, 3, 4 are remembered.
  EXPECT_TRUE(window.SeenOrRemember(kOrg, "s", "4", 0));
  EXPECT_TRUE(window.SeenOrRemember(kOrg, "s", "2", 0));
  EXPECT_FALSE(window.SeenOrRemember(kOrg, "s", "0", 0));  // Now remembered again, 2 evicted.
  EXPECT_FALSE(window.SeenOrRemember(kOrg, "s", "2", 0));
}

TEST(DedupWindowTest, ForgetsIdsOlderThanTheWindowBehindTheNewestEvent) {
  DedupWindow window({.max_ids = 100, .window = absl::Hours(24)});
  EXPECT_FALSE(window.SeenOrRemember(kOrg, "s", "old", 0));
  EXPECT_FALSE(window.SeenOrRemember(kOrg, "s", "mid", 12 * kHour));
  EXPECT_TRUE(window.SeenOrRemember(kOrg, "s", "old", 20 * kHour));
  EXPECT_FALSE(window.SeenOrRemember(kOrg, "s", "new", 25 * kHour));  // "old" is now 25 h behind.
  EXPECT_FALSE(window.SeenOrRemember(kOrg, "s", "old", 25 * kHour));
  EXPECT_TRUE(window.SeenOrRemember(kOrg, "s", "mid", 25 * kHour));
}

TEST(DedupWindowTest, ClearForgetsEverything) {
  DedupWindow window({.max_ids = 10, .window = absl::Hours(1)});
  EXPECT_FALSE(window.SeenOrRemember(kOrg, "s", "a", 0));
  window.Clear();
  EXPECT_EQ(window.size(), 0u);
  EXPECT_FALSE(window.SeenOrRemember(kOrg, "s", "a", 0));
}

TEST(DedupWindowTest, DisabledRemembersNothing) {
  DedupWindow window({.max_ids = 0, .window = absl::Hours(1)});
  EXPECT_FALSE(window.SeenOrRemember(kOrg, "s", "a", 0));
  EXPECT_FALSE(window.SeenOrRemember(kOrg, "s", "a", 0));
}

// The documented bound: at most kBytesPerId per remembered id once full, and the ring wraps
// without growing (steady state allocates nothing).
TEST(DedupWindowTest, MemoryStaysWithinTheStatedBound) {
  constexpr size_t kMax = 100'000;
  DedupWindow window({.max_ids = kMax, .window = absl::Hours(24)});
  for (size_t i = 0; i < 3 * kMax; ++i) {
    const std::string id = absl::StrCat("event-", i);
    ASSERT_FALSE(window.SeenOrRemember(kOrg, "hs/loadgen", id, static_cast<int64_t>(i)));
  }
  EXPECT_EQ(window.size(), kMax);
  EXPECT_LE(window.capacity_bytes(), kMax * DedupWindow::kBytesPerId)
      << window.capacity_bytes() / kMax << " bytes per id";
  // The last kMax are all remembered, the ones before are not.
  EXPECT_TRUE(window.SeenOrRemember(kOrg, "hs/loadgen", absl::StrCat("event-", 3 * kMax - 1), 0));
  EXPECT_TRUE(window.SeenOrRemember(kOrg, "hs/loadgen", absl::StrCat("event-", 2 * kMax), 0));
  EXPECT_FALSE(window.SeenOrRemember(kOrg, "hs/loadgen", absl::StrCat("event-", 2 * kMax - 1), 0));
}

}  // namespace
}  // namespace meterd::aggregate
