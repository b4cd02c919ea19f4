#include "lib/aggregate/counters.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace meterd::aggregate {

void PartitionCounters::Reject(int64_t offset, event::RejectReason reason, std::string_view detail,
                               std::string_view raw) {
  RejectedEvent& r = rejected.emplace_back();
  r.offset = offset;
  r.reason = reason;
  r.detail = std::string(detail);
  r.truncated = raw.size() > RejectedEvent::kMaxRawBytes;
  r.raw = std::string(raw.substr(0, RejectedEvent::kMaxRawBytes));
  rejected_bytes += r.raw.size() + r.detail.size();
  ++refused;
}

void PartitionCounters::RejectMessage(int64_t offset,
                                      const std::vector<event::Rejection>& rejections,
                                      size_t elements, std::string_view raw) {
  int64_t by_reason[event::kRejectReasonCount] = {};
  for (const event::Rejection& r : rejections) ++by_reason[static_cast<int>(r.reason)];
  std::string detail =
      absl::StrCat(rejections.size(), " of ", elements, " batch elements refused:");
  for (int i = 0; i < event::kRejectReasonCount; ++i) {
    if (by_reason[i] == 0) continue;
    absl::StrAppend(&detail, " ",
                    std::string(event::RejectReasonCode(static_cast<event::RejectReason>(i))), "=",
                    by_reason[i]);
  }
  absl::StrAppend(&detail,
                  "; first: ", std::string(event::RejectReasonCode(rejections.front().reason)),
                  " (", std::string(rejections.front().detail), ")");
  Reject(offset, event::RejectReason::kBatchRejected, detail, raw);
  // Reject counted one refusal; the refused elements are many.
  refused += static_cast<int64_t>(rejections.size()) - 1;
}

void MergeInto(SealedPartition& earlier, SealedPartition&& later) {
  earlier.next_offset = later.next_offset;
  if (earlier.deltas.counters.empty()) {
    earlier.deltas.counters = std::move(later.deltas.counters);
  } else {
    for (const auto& [key, quantity] : later.deltas.counters)
      earlier.deltas.counters[key] += quantity;
  }
  for (auto& r : later.deltas.rejected) earlier.deltas.rejected.push_back(std::move(r));
  earlier.deltas.rejected_bytes += later.deltas.rejected_bytes;
  earlier.deltas.events += later.deltas.events;
  earlier.deltas.refused += later.deltas.refused;
  if (earlier.oldest_timestamp_ms < 0 ||
      (later.oldest_timestamp_ms >= 0 && later.oldest_timestamp_ms < earlier.oldest_timestamp_ms)) {
    earlier.oldest_timestamp_ms = later.oldest_timestamp_ms;
  }
}

std::vector<std::pair<CounterKey, int64_t>> DistinctRows(
    const std::vector<SealedPartition>& batch) {
  std::vector<std::pair<CounterKey, int64_t>> rows;
  size_t total = 0;
  for (const auto& p : batch) total += p.deltas.counters.size();
  rows.reserve(total);
  for (const auto& p : batch) {
    rows.insert(rows.end(), p.deltas.counters.begin(), p.deltas.counters.end());
  }
  std::sort(rows.begin(), rows.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  // Keys of one org normally live on one partition; merge the rare duplicates across partitions.
  size_t out = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (out > 0 && rows[out - 1].first == rows[i].first) {
      rows[out - 1].second += rows[i].second;
    } else {
      rows[out++] = rows[i];
    }
  }
  rows.resize(out);
  return rows;
}

}  // namespace meterd::aggregate
