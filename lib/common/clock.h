#pragma once

#include <atomic>
#include <chrono>
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
  // Wall time: what stamps and event-time checks use. May jump (NTP, a resumed VM).
  virtual absl::Time Now() const = 0;
  // A steady timeline that never jumps (only differences mean anything): what schedules,
  // deadlines and durations use, so a wall-clock step cannot stall or hurry a flush.
  virtual absl::Time Steady() const = 0;
  // Waits on `cv` (`lock` held on entry and on return) until notified or Steady() reaches
  // `deadline`. May return early (spuriously): callers re-check their condition and Steady().
  virtual void WaitUntil(std::condition_variable& cv, std::unique_lock<std::mutex>& lock,
                         absl::Time deadline) const = 0;
  // Sleeps until this clock has moved `duration` on.
  virtual void SleepFor(absl::Duration duration) const = 0;
};

class SystemClock final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
  absl::Time Steady() const override {
    return absl::FromUnixNanos(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
  }
  void WaitUntil(std::condition_variable& cv, std::unique_lock<std::mutex>& lock,
                 absl::Time deadline) const override {
    cv.wait_until(lock, std::chrono::steady_clock::time_point(
                            std::chrono::nanoseconds(absl::ToUnixNanos(deadline))));
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
  absl::Time Steady() const override { return Now(); }  // One timeline: the test's.
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
