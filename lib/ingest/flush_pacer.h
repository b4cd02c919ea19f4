#pragma once

#include "absl/time/time.h"

namespace meterd::ingest {

struct PacerOptions {
  absl::Duration interval = absl::Seconds(1);      // --flush-interval: the shortest one.
  absl::Duration max_interval = absl::Seconds(1);  // --max-visibility-latency: the longest.
  // A flush may take this share of the interval before the interval grows.
  double budget_share = 0.5;
};

// Adaptive flushing: how long until the next flush, from how long the last one took. A flush
// costs Postgres about a fixed amount per distinct key, and the keys of a longer interval
// overlap (the same org, meter and day again), so flushing less often under load makes the
// work per event fall. When a flush takes more than budget_share of the interval, the interval
// doubles (at least to took / budget_share), up to max_interval; when one takes less than a
// quarter of that budget, it halves, down to `interval`. In between it stays (hysteresis, so
// it does not flap). Not thread-safe: the flusher's thread only.
class FlushPacer {
 public:
  explicit FlushPacer(PacerOptions options);
  // After a committed flush that took `took` (seal, write, commit): the interval to use now.
  absl::Duration After(absl::Duration took);
  absl::Duration current() const { return current_; }

 private:
  const PacerOptions options_;
  absl::Duration current_;
};

}  // namespace meterd::ingest
