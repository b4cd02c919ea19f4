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
  // Merged compacted: one sorted row per key, the map gone.
  EXPECT_TRUE(earlier.deltas.counters.empty());
  ASSERT_EQ(earlier.rows.size(), 2u);
  EXPECT_EQ(earlier.rows[0], CounterRow(CounterKey::Of(Event(1, 0)), 6));
  EXPECT_EQ(earlier.rows[1], CounterRow(CounterKey::Of(Event(9, 0)), 1));
  EXPECT_EQ(earlier.keys(), 2u);
  EXPECT_EQ(earlier.deltas.events, 3);
}

TEST(CountersTest, CompactSortsFreesTheMapAndMergesWithEarlierRows) {
  SealedPartition p;
  for (int org : {7, 3, 5}) p.deltas.Add(Event(static_cast<uint8_t>(org), org));
  Compact(p);
  EXPECT_TRUE(p.deltas.counters.empty());
  EXPECT_EQ(p.deltas.counters.capacity(), 0u);  // Freed, not only cleared.
  ASSERT_EQ(p.rows.size(), 3u);
  EXPECT_EQ(p.rows[0].first.org.bytes[0], 3);
  EXPECT_EQ(p.rows[1].first.org.bytes[0], 5);
  EXPECT_EQ(p.rows[2].first.org.bytes[0], 7);
  EXPECT_EQ(p.deltas.events, 3);  // Compacting counts nothing again.

  // Counted again after a compaction (a later seal merged in): summed with the rows.
  p.deltas.Add(Event(5, 10));
  p.deltas.Add(Event(1, 1));
  int64_t visited = 0;
  p.ForEachDelta([&](const CounterKey&, int64_t quantity) { visited += quantity; });
  EXPECT_EQ(visited, 3 + 5 + 7 + 10 + 1);
  Compact(p);
  ASSERT_EQ(p.rows.size(), 4u);
  EXPECT_EQ(p.rows[0], CounterRow(CounterKey::Of(Event(1, 0)), 1));
  EXPECT_EQ(p.rows[2], CounterRow(CounterKey::Of(Event(5, 0)), 15));
  EXPECT_EQ(p.keys(), 4u);
}

// A partition that counted nothing in its interval (only refusals) seals a map that is empty
// but still holds the room the shard reserved: compacting frees it too.
TEST(CountersTest, CompactFreesAnEmptyButReservedMap) {
  SealedPartition p;
  p.deltas.counters.reserve(10'000);
  p.deltas.Reject(4, event::RejectReason::kNotJson, "x", "y");
  ASSERT_GT(p.deltas.counters.capacity(), 0u);
  Compact(p);
  EXPECT_EQ(p.deltas.counters.capacity(), 0u);
  EXPECT_TRUE(p.rows.empty());
  EXPECT_EQ(p.deltas.rejected.size(), 1u);
}

TEST(CountersTest, ForEachDeltaInKeyOrderMergesCompactedPartitions) {
  std::vector<SealedPartition> batch(4);
  for (int org : {9, 2, 6}) batch[0].deltas.Add(Event(static_cast<uint8_t>(org), org));
  for (int org : {4, 6, 1}) batch[1].deltas.Add(Event(static_cast<uint8_t>(org), 10 * org));
  batch[3].deltas.Add(Event(3, 3));
  Compact(batch[0]);
  Compact(batch[1]);
  Compact(batch[3]);  // batch[2] stays empty.
  std::vector<std::pair<int, int64_t>> seen;
  ForEachDeltaInKeyOrder(batch, [&](const CounterKey& key, int64_t quantity) {
    seen.emplace_back(key.org.bytes[0], quantity);
  });
  // Org 6 is on two partitions: one visit, its quantities summed.
  const std::vector<std::pair<int, int64_t>> want = {{1, 10}, {2, 2},  {3, 3},
                                                     {4, 40}, {6, 66}, {9, 9}};
  EXPECT_EQ(seen, want);

  // A partition not compacted is still visited (after the merged rows).
  batch[2].deltas.Add(Event(0, 100));
  int64_t total = 0;
  size_t visits = 0;
  ForEachDeltaInKeyOrder(batch, [&](const CounterKey&, int64_t quantity) {
    total += quantity;
    ++visits;
  });
  EXPECT_EQ(visits, 7u);
  EXPECT_EQ(total, 1 * 10 + 2 + 3 + 40 + 6 + 60 + 9 + 100);
}

TEST(CountersTest, DistinctRowsMergesAcrossPartitionsAndSorts) {
  std::vector<SealedPartition> batch(3);
  batch[0].deltas.Add(Event(5, 1));
  batch[0].deltas.Add(Event(1, 1));
  batch[1].deltas.Add(Event(5, 2));
  batch[2].deltas.Add(Event(5, 4));
  batch[2].deltas.Add(Event(0, 8));
  Compact(batch[2]);  // Compacted or not, every delta counts.
  const auto rows = DistinctRows(batch);
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0].first.org.bytes[0], 0);
  EXPECT_EQ(rows[1].first.org.bytes[0], 1);
  EXPECT_EQ(rows[2].first.org.bytes[0], 5);
  EXPECT_EQ(rows[2].second, 7);
}

}  // namespace
}  // namespace meterd::aggregate
