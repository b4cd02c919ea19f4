#pragma once

#include <algorithm>

#include "absl/time/time.h"

namespace meterd {

// Delay schedule of one retry loop: initial, initial*multiplier, ... capped at max. Owned by the
// loop that retries; not thread-safe (one thread only).
//
//   Backoff backoff({.initial = absl::Milliseconds(100), .max = absl::Seconds(5)});
//   while (!(status = Attempt()).ok()) absl::SleepFor(backoff.Next());
class Backoff {
 public:
  struct Options {
    absl::Duration initial;
    absl::Duration max;
    double multiplier = 2;
  };

  // initial > 0, max >= initial and multiplier >= 1 keep the schedule non-decreasing; other
  // values are clamped to that.
  explicit Backoff(Options options)
      : initial_(std::max(options.initial, absl::Nanoseconds(1))),
        max_(std::max(options.max, initial_)),
        multiplier_(std::max(options.multiplier, 1.0)),
        current_(initial_) {}

  // The delay to wait now; the next call returns a longer one, up to max.
  absl::Duration Next() {
    const absl::Duration delay = current_;
    current_ = std::min(current_ * multiplier_, max_);
    return delay;
  }

  // After a success: the next failure starts again from initial.
  void Reset() { current_ = initial_; }

  // What Next() will return.
  absl::Duration current() const { return current_; }

 private:
  const absl::Duration initial_;
  const absl::Duration max_;
  const double multiplier_;
  absl::Duration current_;
};

}  // namespace meterd
