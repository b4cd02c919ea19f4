#pragma once

#include <atomic>
#include <condition_variable>
#include <mutex>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace meterd {

// Time source for everything that stamps or waits. Injected so tests can drive time; the data
// path asks once per batch.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
  // Waits on `cv` (`lock` held on entry and on return) until notified or this clock reaches
  // `deadline`. May return early (spuriously): callers re-check their condition and Now().
  virtual void WaitUntil(std::condition_variable& cv, std::unique_lock<std::mutex>& lock,
                         absl::Time deadline) const = 0;
  // Sleeps until this clock has moved `duration` on.
  virtual void SleepFor(absl::Duration duration) const = 0;
};

class SystemClock final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
  void WaitUntil(std::condition_variable& cv, std::unique_lock<std::mutex>& lock,
                 absl::Time deadline) const override {
    cv.wait_until(lock, absl::ToChronoTime(deadline));
  }
  void SleepFor(absl::Duration duration) const override { absl::SleepFor(duration); }
  static const Clock& Get() {
    static const SystemClock clock;
    return clock;
  }
};

// Test clock: time moves only when the test says so. Waiters re-check it every millisecond of
// real time, so a test that advances it sees them react at once. Thread-safe.
class ManualClock final : public Clock {
 public:
  explicit ManualClock(absl::Time start) : now_nanos_(absl::ToUnixNanos(start)) {}
  absl::Time Now() const override { return absl::FromUnixNanos(now_nanos_.load()); }
  void Set(absl::Time t) { now_nanos_.store(absl::ToUnixNanos(t)); }
  void Advance(absl::Duration d) { now_nanos_.fetch_add(absl::ToInt64Nanoseconds(d)); }

  void WaitUntil(std::condition_variable& cv, std::unique_lock<std::mutex>& lock,
                 absl::Time deadline) const override {
    if (Now() < deadline) cv.wait_for(lock, std::chrono::milliseconds(1));
  }
  void SleepFor(absl::Duration duration) const override {
    const absl::Time until = Now() + duration;
    while (Now() < until) absl::SleepFor(absl::Milliseconds(1));
  }

 private:
  std::atomic<int64_t> now_nanos_;
};

}  // namespace meterd
