#include "lib/common/backoff.h"

#include <gtest/gtest.h>

namespace meterd {
namespace {

TEST(BackoffTest, GrowsByTheMultiplierUpToMax) {
  Backoff backoff({.initial = absl::Milliseconds(100), .max = absl::Seconds(1)});
  EXPECT_EQ(backoff.current(), absl::Milliseconds(100));
  EXPECT_EQ(backoff.Next(), absl::Milliseconds(100));
  EXPECT_EQ(backoff.Next(), absl::Milliseconds(200));
  EXPECT_EQ(backoff.Next(), absl::Milliseconds(400));
  EXPECT_EQ(backoff.Next(), absl::Milliseconds(800));
  EXPECT_EQ(backoff.Next(), absl::Seconds(1));  // 1.6 s capped.
  EXPECT_EQ(backoff.Next(), absl::Seconds(1));
  EXPECT_EQ(backoff.current(), absl::Seconds(1));
}

TEST(BackoffTest, ResetStartsAgainFromInitial) {
  Backoff backoff({.initial = absl::Seconds(1), .max = absl::Seconds(30), .multiplier = 3});
  backoff.Next();
  backoff.Next();
  EXPECT_EQ(backoff.current(), absl::Seconds(9));
  backoff.Reset();
  EXPECT_EQ(backoff.Next(), absl::Seconds(1));
  EXPECT_EQ(backoff.Next(), absl::Seconds(3));
}

TEST(BackoffTest, ScheduleNeverShrinksNorStaysAtZero) {
  // Zero initial would spin; a multiplier below 1 would shrink; max below initial would cap
  // below the first delay. Each is clamped instead.
  Backoff zero({.initial = absl::ZeroDuration(), .max = absl::Seconds(1)});
  EXPECT_GT(zero.Next(), absl::ZeroDuration());
  Backoff shrinking({.initial = absl::Seconds(2), .max = absl::Seconds(1), .multiplier = 0.5});
  EXPECT_EQ(shrinking.Next(), absl::Seconds(2));
  EXPECT_EQ(shrinking.Next(), absl::Seconds(2));
}

TEST(BackoffTest, HugeMaxSaturatesInsteadOfOverflowing) {
  Backoff backoff({.initial = absl::Hours(1), .max = absl::InfiniteDuration(), .multiplier = 1e6});
  for (int i = 0; i < 10; ++i) EXPECT_GT(backoff.Next(), absl::ZeroDuration());
}

}  // namespace
}  // namespace meterd
