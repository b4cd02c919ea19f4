#pragma once

#include <atomic>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace meterd {

// Time source. Injected so tests can drive time; the data path asks once per batch.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
};

class SystemClock final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
  static const Clock& Get() {
    static const SystemClock clock;
    return clock;
  }
};

// Test clock: time moves only when the test says so. Thread-safe.
class ManualClock final : public Clock {
 public:
  explicit ManualClock(absl::Time start) : now_nanos_(absl::ToUnixNanos(start)) {}
  absl::Time Now() const override { return absl::FromUnixNanos(now_nanos_.load()); }
  void Set(absl::Time t) { now_nanos_.store(absl::ToUnixNanos(t)); }

 private:
  std::atomic<int64_t> now_nanos_;
};

}  // namespace meterd
