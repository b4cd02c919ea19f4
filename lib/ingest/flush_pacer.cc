#include "lib/ingest/flush_pacer.h"

#include <algorithm>

namespace meterd::ingest {

FlushPacer::FlushPacer(PacerOptions options) : options_(options), current_(options.interval) {}

absl::Duration FlushPacer::After(absl::Duration took) {
  const absl::Duration budget = current_ * options_.budget_share;
  if (took > budget) {
    current_ =
        std::min(options_.max_interval, std::max(current_ * 2, took / options_.budget_share));
  } else if (took < budget / 4) {
    current_ = std::max(options_.interval, current_ / 2);
  }
  return current_;
}

}  // namespace meterd::ingest
