#pragma once

#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "lib/common/clock.h"

namespace meterd::api {

// A token bucket per API key: `rate` requests a second on average, bursts of up to `burst`.
// Thread-safe.
class RateLimiter {
 public:
  RateLimiter(double rate, double burst, const Clock* clock)
      : rate_(rate), burst_(burst), clock_(clock) {}

  // Zero if `key` may go ahead now (a token is taken); otherwise how long until it may.
  absl::Duration Acquire(const std::string& key) {
    const absl::Time now = clock_->Steady();
    absl::MutexLock lock(&mu_);
    Bucket& b = buckets_.try_emplace(key, Bucket{burst_, now}).first->second;
    b.tokens = std::min(burst_, b.tokens + absl::ToDoubleSeconds(now - b.refilled) * rate_);
    b.refilled = now;
    if (b.tokens >= 1) {
      b.tokens -= 1;
      return absl::ZeroDuration();
    }
    return absl::Seconds((1 - b.tokens) / rate_);
  }

 private:
  struct Bucket {
    double tokens;
    absl::Time refilled;
  };
  const double rate_;
  const double burst_;
  const Clock* clock_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, Bucket> buckets_ ABSL_GUARDED_BY(mu_);
};

}  // namespace meterd::api
