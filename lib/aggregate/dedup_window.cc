#include "lib/aggregate/dedup_window.h"

#include <algorithm>
#include <tuple>
#include <utility>

#include "absl/hash/hash.h"

namespace meterd::aggregate {

uint64_t DedupWindow::Fingerprint(const event::OrgId& org, std::string_view source,
                                  std::string_view id) {
  return absl::Hash<std::tuple<event::OrgId, std::string_view, std::string_view>>{}(
      std::make_tuple(org, source, id));
}

bool DedupWindow::SeenOrRemember(const event::OrgId& org, std::string_view source,
                                 std::string_view id, int64_t sent_micros) {
  if (limits_.max_ids == 0) return false;
  const uint64_t fingerprint = Fingerprint(org, source, id);
  // Look up before inserting: inserting first could grow the set past max_ids for a moment,
  // doubling its memory (measured: no faster either).
  if (seen_.contains(fingerprint)) return true;
  if (sent_micros > newest_micros_) {
    newest_micros_ = sent_micros;
    EvictOlderThan(newest_micros_ - absl::ToInt64Microseconds(limits_.window));
  }
  if (count_ == limits_.max_ids) PopOldest();
  const Entry entry{fingerprint, sent_micros};
  if (ring_.size() < limits_.max_ids) {
    // Still growing: the ring is not wrapped yet, so the next slot is at the end.
    ring_.push_back(entry);
  } else {
    ring_[(head_ + count_) % ring_.size()] = entry;
  }
  ++count_;
  seen_.insert(fingerprint);
  return false;
}

void DedupWindow::EvictOlderThan(int64_t cutoff_micros) {
  // Arrival order is nearly send order: an older entry queued behind newer ones stays until
  // it reaches the front (the window is a lower bound, never shorter).
  while (count_ > 0 && ring_[head_].time_micros < cutoff_micros) PopOldest();
}

void DedupWindow::PopOldest() {
  seen_.erase(ring_[head_].fingerprint);
  head_ = (head_ + 1) % ring_.size();
  --count_;
  if (count_ == 0 && ring_.size() < limits_.max_ids) {
    // Not wrapped: restart at the front so push_back stays the next slot.
    ring_.clear();
    head_ = 0;
  }
}

void DedupWindow::Clear() {
  seen_.clear();
  ring_.clear();
  head_ = 0;
  count_ = 0;
  newest_micros_ = INT64_MIN;
}

size_t DedupWindow::capacity_bytes() const {
  return ring_.capacity() * sizeof(Entry) + seen_.capacity() * (sizeof(uint64_t) + 1);
}

}  // namespace meterd::aggregate
