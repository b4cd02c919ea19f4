#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "lib/event/usage_event.h"

namespace meterd::event {
namespace {

using AddResult = MeterRegistry::AddResult;

TEST(MeterRegistryTest, AddsUpdatesAndNeverRenames) {
  MeterRegistry meters = MeterRegistry::Defaults();
  ASSERT_EQ(meters.size(), 3u);
  EXPECT_EQ(meters.MaxQuantity(1), MeterRegistry::kMaxEventQuantity);

  EXPECT_EQ(meters.Add(10, "gpu_seconds", 500), AddResult::kAdded);
  EXPECT_EQ(meters.Find("gpu_seconds"), MeterId{10});
  EXPECT_EQ(meters.Name(10), "gpu_seconds");
  EXPECT_EQ(meters.MaxQuantity(10), 500);
  EXPECT_EQ(meters.Add(10, "gpu_seconds", 500), AddResult::kUnchanged);
  EXPECT_EQ(meters.Add(10, "gpu_seconds", 700), AddResult::kUpdated);
  EXPECT_EQ(meters.MaxQuantity(10), 700);
  const auto match = meters.Lookup("gpu_seconds");
  ASSERT_TRUE(match.has_value());
  EXPECT_EQ(match->id, 10);
  EXPECT_EQ(match->max_quantity, 700);

  // A rename (same id, new name) and an id clash (same name, new id) change nothing.
  EXPECT_EQ(meters.Add(10, "gpu_minutes"), AddResult::kConflict);
  EXPECT_EQ(meters.Add(11, "gpu_seconds"), AddResult::kConflict);
  EXPECT_EQ(meters.Name(10), "gpu_seconds");
  EXPECT_FALSE(meters.Find("gpu_minutes").has_value());
  EXPECT_EQ(meters.size(), 4u);

  // Outside what shared.meters' CHECKs allow.
  EXPECT_EQ(meters.Add(12, ""), AddResult::kInvalid);
  EXPECT_EQ(meters.Add(12, std::string(64, 'a')), AddResult::kInvalid);
  EXPECT_EQ(meters.Add(12, "zero", 0), AddResult::kInvalid);
  EXPECT_EQ(meters.Add(12, "huge", MeterRegistry::kMaxEventQuantity + 1), AddResult::kInvalid);
  EXPECT_EQ(meters.Add(12, std::string(63, 'a')), AddResult::kAdded);
  EXPECT_EQ(meters.Name(12), std::string(63, 'a'));
  EXPECT_EQ(meters.Name(99), "");
  EXPECT_EQ(meters.MaxQuantity(99), 0);
  // A prefix of a known name is not that name.
  EXPECT_FALSE(meters.Find("api_call").has_value());
  EXPECT_FALSE(meters.Find("api_callsx").has_value());
}

TEST(MeterRegistryTest, FullRegistryRefusesMore) {
  MeterRegistry meters;
  for (size_t i = 0; i < MeterRegistry::kCapacity; ++i) {
    ASSERT_EQ(meters.Add(static_cast<MeterId>(i), absl::StrCat("m", i)), AddResult::kAdded);
  }
  EXPECT_EQ(meters.Add(1000, "one_too_many"), AddResult::kFull);
  EXPECT_EQ(meters.size(), MeterRegistry::kCapacity);
  EXPECT_EQ(meters.Find("m255"), MeterId{255});
}

TEST(MeterRegistryTest, CopiesAreIndependent) {
  MeterRegistry original = MeterRegistry::Defaults();
  original.Add(10, "gpu_seconds", 5);
  MeterRegistry copy = original;
  copy.Add(11, "storage_bytes");
  copy.Add(10, "gpu_seconds", 6);
  EXPECT_EQ(original.size(), 4u);
  EXPECT_EQ(copy.size(), 5u);
  EXPECT_EQ(original.MaxQuantity(10), 5);
  EXPECT_EQ(copy.MaxQuantity(10), 6);
  original = copy;
  EXPECT_EQ(original.Find("storage_bytes"), MeterId{11});
}

// The writer publishes meters one by one while two readers look every name up: a reader sees
// each meter either not yet or whole (its id, full name and a valid maximum), never torn, and
// once seen a meter stays. Run under the TSan preset too (-DMETERD_TSAN=ON).
TEST(MeterRegistryTest, GrowsWhileReadersLookUp) {
  MeterRegistry meters = MeterRegistry::Defaults();
  constexpr int kAdded = static_cast<int>(MeterRegistry::kCapacity) - 3;
  std::vector<std::string> names;
  for (int i = 0; i < kAdded; ++i) names.push_back(absl::StrCat("meter_number_", i));
  std::atomic<bool> done{false};
  std::atomic<int64_t> torn{0}, lookups{0}, found_total{0};

  auto reader = [&] {
    std::vector<bool> seen(kAdded, false);
    int64_t local_lookups = 0, local_torn = 0;
    while (true) {
      const bool last_round = done.load(std::memory_order_acquire);
      for (int i = 0; i < kAdded; ++i) {
        ++local_lookups;
        const auto match = meters.Lookup(names[i]);
        if (!match) {
          if (seen[i]) ++local_torn;  // Published meters never disappear.
          continue;
        }
        seen[i] = true;
        if (match->id != 100 + i || meters.Name(match->id) != names[i] || match->max_quantity < 1 ||
            match->max_quantity > MeterRegistry::kMaxEventQuantity) {
          ++local_torn;
        }
      }
      // api_calls keeps answering whatever is being added.
      if (meters.Find("api_calls") != MeterId{1}) ++local_torn;
      if (last_round) break;
    }
    int found = 0;
    for (bool s : seen) found += s;
    found_total += found;
    torn += local_torn;
    lookups += local_lookups;
  };
  std::thread first(reader), second(reader);
  for (int i = 0; i < kAdded; ++i) {
    ASSERT_EQ(meters.Add(static_cast<MeterId>(100 + i), names[i], 1 + i), AddResult::kAdded);
    // Maxima change under the readers too.
    meters.Add(static_cast<MeterId>(100 + i / 2), names[i / 2], 1'000 + i);
    if (i % 16 == 0) std::this_thread::yield();
  }
  done.store(true, std::memory_order_release);
  first.join();
  second.join();
  EXPECT_EQ(torn.load(), 0);
  // After `done`, each reader's last round saw every meter.
  EXPECT_EQ(found_total.load(), 2 * kAdded);
  EXPECT_GT(lookups.load(), 2 * kAdded);
  EXPECT_EQ(meters.size(), MeterRegistry::kCapacity);
}

}  // namespace
}  // namespace meterd::event
