#include "lib/aggregate/counters.h"

#include <gtest/gtest.h>

namespace meterd::aggregate {
namespace {

event::UsageEvent Event(uint8_t org, int64_t quantity, int64_t day = 20'000) {
  event::UsageEvent e;
  e.org.bytes[0] = org;
  e.meter = 1;
  e.quantity = quantity;
  e.time_micros = day * 86'400'000'000LL + 5;
  return e;
}

TEST(CountersTest, AddSumsPerKey) {
  PartitionCounters c;
  c.Add(Event(1, 2));
  c.Add(Event(1, 3));
  c.Add(Event(2, 1));
  c.Add(Event(1, 1, 20'001));
  EXPECT_EQ(c.counters.size(), 3u);
  EXPECT_EQ(c.counters[CounterKey::Of(Event(1, 0))], 5);
  EXPECT_EQ(c.events, 4);
}

TEST(CountersTest, PrefetchingAdderAddsOnApplyToEachTarget) {
  PartitionCounters p0, p1;
  PrefetchingAdder adder;
  adder.Stage(&p0, Event(1, 2));
  adder.Stage(&p1, Event(1, 5));
  adder.Stage(&p0, Event(1, 3));
  EXPECT_TRUE(p0.counters.empty());  // Staged, not yet added.
  adder.Apply();
  EXPECT_EQ(p0.counters[CounterKey::Of(Event(1, 0))], 5);
  EXPECT_EQ(p0.events, 2);
  EXPECT_EQ(p1.counters[CounterKey::Of(Event(1, 0))], 5);
  adder.Apply();  // Nothing staged: no change.
  EXPECT_EQ(p0.counters[CounterKey::Of(Event(1, 0))], 5);
}

TEST(CountersTest, RejectCapsRawBytes) {
  PartitionCounters c;
  c.Reject(7, event::RejectReason::kNotJson, "x", std::string(5000, 'a'));
  ASSERT_EQ(c.rejected.size(), 1u);
  EXPECT_EQ(c.rejected[0].raw.size(), RejectedEvent::kMaxRawBytes);
  EXPECT_TRUE(c.rejected[0].truncated);
  EXPECT_EQ(c.rejected[0].offset, 7);
  // A refusal is not a counted event.
  EXPECT_EQ(c.events, 0);
  EXPECT_EQ(c.refused, 1);
  EXPECT_FALSE(c.empty());
}

TEST(CountersTest, MergeKeepsEarlierFenceAndLaterEnd) {
  SealedPartition earlier{.partition = 3, .expected_offset = 10, .next_offset = 20, .deltas = {}};
  earlier.deltas.Add(Event(1, 2));
  SealedPartition later{.partition = 3, .expected_offset = 20, .next_offset = 35, .deltas = {}};
  later.deltas.Add(Event(1, 4));
  later.deltas.Add(Event(9, 1));
  MergeInto(earlier, std::move(later));
  EXPECT_EQ(earlier.expected_offset, 10);
  EXPECT_EQ(earlier.next_offset, 35);
  EXPECT_EQ(earlier.deltas.counters[CounterKey::Of(Event(1, 0))], 6);
  EXPECT_EQ(earlier.deltas.counters.size(), 2u);
  EXPECT_EQ(earlier.deltas.events, 3);
}

TEST(CountersTest, DistinctRowsMergesAcrossPartitionsAndSorts) {
  std::vector<SealedPartition> batch(2);
  batch[0].deltas.Add(Event(5, 1));
  batch[0].deltas.Add(Event(1, 1));
  batch[1].deltas.Add(Event(5, 2));
  const auto rows = DistinctRows(batch);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].first.org.bytes[0], 1);
  EXPECT_EQ(rows[1].first.org.bytes[0], 5);
  EXPECT_EQ(rows[1].second, 3);
}

}  // namespace
}  // namespace meterd::aggregate
