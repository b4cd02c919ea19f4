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

namespace {

bool KeyLess(const CounterRow& a, const CounterRow& b) { return a.first < b.first; }

// Sorts `rows` by key and sums the rows of a repeated key into one.
void SortAndSum(std::vector<CounterRow>& rows) {
  std::sort(rows.begin(), rows.end(), KeyLess);
  size_t out = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (out > 0 && rows[out - 1].first == rows[i].first) {
      rows[out - 1].second += rows[i].second;
    } else {
      rows[out++] = rows[i];
    }
  }
  rows.resize(out);
}

// Two sorted, distinct row sets as one (sized exactly: a first pass counts the shared keys).
std::vector<CounterRow> MergeRows(const std::vector<CounterRow>& a,
                                  const std::vector<CounterRow>& b) {
  size_t shared = 0;
  for (size_t i = 0, j = 0; i < a.size() && j < b.size();) {
    if (a[i].first < b[j].first) {
      ++i;
    } else if (b[j].first < a[i].first) {
      ++j;
    } else {
      ++shared, ++i, ++j;
    }
  }
  std::vector<CounterRow> merged;
  merged.reserve(a.size() + b.size() - shared);
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (a[i].first < b[j].first) {
      merged.push_back(a[i++]);
    } else if (b[j].first < a[i].first) {
      merged.push_back(b[j++]);
    } else {
      merged.emplace_back(a[i].first, a[i].second + b[j].second);
      ++i, ++j;
    }
  }
  merged.insert(merged.end(), a.begin() + static_cast<ptrdiff_t>(i), a.end());
  merged.insert(merged.end(), b.begin() + static_cast<ptrdiff_t>(j), b.end());
  return merged;
}

// Adds the sorted, distinct rows `more` to the sorted, distinct `rows`.
void MergeRowsInto(std::vector<CounterRow>& rows, std::vector<CounterRow>&& more) {
  if (rows.empty()) {
    rows = std::move(more);
  } else if (!more.empty()) {
    rows = MergeRows(rows, more);
  }
}

}  // namespace

void Compact(SealedPartition& p) {
  if (p.deltas.counters.capacity() == 0) return;
  // An empty map may still hold slots (it grew, then its keys were erased): freed too.
  std::vector<CounterRow> fresh(p.deltas.counters.begin(), p.deltas.counters.end());
  CounterMap().swap(p.deltas.counters);  // Frees the map's slots now, not at the flush's end.
  std::sort(fresh.begin(), fresh.end(), KeyLess);  // Keys of a map are distinct.
  MergeRowsInto(p.rows, std::move(fresh));
}

void MergeInto(SealedPartition& earlier, SealedPartition&& later) {
  earlier.next_offset = later.next_offset;
  Compact(earlier);
  Compact(later);
  MergeRowsInto(earlier.rows, std::move(later.rows));
  for (auto& r : later.deltas.rejected) earlier.deltas.rejected.push_back(std::move(r));
  earlier.deltas.rejected_bytes += later.deltas.rejected_bytes;
  earlier.deltas.events += later.deltas.events;
  earlier.deltas.refused += later.deltas.refused;
  if (earlier.oldest_timestamp_ms < 0 ||
      (later.oldest_timestamp_ms >= 0 && later.oldest_timestamp_ms < earlier.oldest_timestamp_ms)) {
    earlier.oldest_timestamp_ms = later.oldest_timestamp_ms;
  }
}

void ForEachDeltaInKeyOrder(const std::vector<SealedPartition>& batch,
                            absl::FunctionRef<void(const CounterKey&, int64_t)> f) {
  using Cursor = std::pair<const CounterRow*, const CounterRow*>;  // Next row, end.
  const auto later = [](const Cursor& a, const Cursor& b) {
    return b.first->first < a.first->first;
  };
  std::vector<Cursor> heap;
  for (const SealedPartition& p : batch) {
    if (!p.rows.empty()) heap.emplace_back(p.rows.data(), p.rows.data() + p.rows.size());
  }
  // Takes the smallest row off the heap, returning its key and quantity.
  const auto pop = [&]() -> CounterRow {
    std::pop_heap(heap.begin(), heap.end(), later);
    Cursor& c = heap.back();
    const CounterRow row = *c.first;
    if (++c.first == c.second) {
      heap.pop_back();
    } else {
      std::push_heap(heap.begin(), heap.end(), later);
    }
    return row;
  };
  std::make_heap(heap.begin(), heap.end(), later);
  while (!heap.empty()) {
    CounterRow row = pop();
    // A key on several partitions (producers not keying by org) comes out once per partition,
    // consecutively: summed into one visit.
    while (!heap.empty() && heap.front().first->first == row.first) row.second += pop().second;
    f(row.first, row.second);
  }
  for (const SealedPartition& p : batch) {
    for (const auto& [key, quantity] : p.deltas.counters) f(key, quantity);
  }
}

std::vector<CounterRow> DistinctRows(const std::vector<SealedPartition>& batch) {
  std::vector<CounterRow> rows;
  size_t total = 0;
  for (const auto& p : batch) total += p.keys();
  rows.reserve(total);
  for (const auto& p : batch) {
    p.ForEachDelta(
        [&](const CounterKey& key, int64_t quantity) { rows.emplace_back(key, quantity); });
  }
  // Keys of one org normally live on one partition; the rare duplicates across partitions sum.
  SortAndSum(rows);
  return rows;
}

}  // namespace meterd::aggregate
