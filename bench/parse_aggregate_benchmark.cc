// Hot-path micro-benchmarks: parse, aggregate, parse+aggregate on one core, seal+merge.
// Each is paired with a naive baseline run in the same process; the ratios print at the end.
#include <string>
#include <unordered_map>
#include <vector>

#include <benchmark/benchmark.h>
#include <simdjson.h>

#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "bench/ratio_reporter.h"
#include "lib/aggregate/counters.h"
#include "lib/aggregate/dedup_window.h"
#include "lib/devtools/loadgen.h"
#include "lib/event/event_parser.h"

namespace meterd::bench {
namespace {

using aggregate::CounterKey;
using aggregate::CounterMap;
using aggregate::PartitionCounters;

const absl::Time kNow = absl::FromUnixSeconds(event::DaysFromCivil(2026, 11, 26) * 86400 + 36000);

// Events shaped like loadgen's (and like real producers'): ~330 bytes each.
const std::vector<std::string>& Corpus(int orgs) {
  static std::map<int, std::vector<std::string>> corpora;
  auto& corpus = corpora[orgs];
  if (!corpus.empty()) return corpus;
  constexpr const char* kMeters[] = {"api_calls", "data_exports", "ai_requests"};
  for (int i = 0; i < 20'000; ++i) {
    const int org = (i * 7919) % orgs;
    const std::string org_text = event::OrgIdToString(devtools::LoadgenOrgId(1, org));
    const std::string_view industry = event::IndustryCode(devtools::LoadgenIndustry(org));
    corpus.push_back(absl::StrFormat(
        R"({"specversion":"1.0","id":"%016x%016x","source":"%s/loadgen","type":"%s","subject":"%s","time":"2026-11-2%dT0%d:12:34.567Z","datacontenttype":"application/json","data":{"quantity":%d,"industry":"%s"}})",
        i * 31337ULL, i * 7ULL, std::string(industry), kMeters[i % 10 < 8 ? 0 : 1 + i % 2],
        org_text, 4 + i % 3, i % 10, 1 + i % 3, std::string(industry)));
  }
  return corpus;
}

int64_t TotalBytes(const std::vector<std::string>& corpus) {
  int64_t bytes = 0;
  for (const auto& s : corpus) bytes += static_cast<int64_t>(s.size());
  return bytes;
}

// ---- parse ----

void BM_Parse(benchmark::State& state) {
  const auto& corpus = Corpus(10'000);
  const auto meters = event::MeterRegistry::Defaults();
  event::EventParser parser(&meters, {});
  int64_t events = 0;
  for (auto _ : state) {
    for (const std::string& bytes : corpus) {
      benchmark::DoNotOptimize(parser.Parse(bytes, kNow).events.data());
    }
    events += static_cast<int64_t>(corpus.size());
  }
  state.SetItemsProcessed(events);
  state.SetBytesProcessed(events / static_cast<int64_t>(corpus.size()) * TotalBytes(corpus));
}
BENCHMARK(BM_Parse);

// Baseline: simdjson's DOM API, reading the same fields into strings (the obvious approach).
void BM_ParseBaselineDom(benchmark::State& state) {
  const auto& corpus = Corpus(10'000);
  simdjson::dom::parser parser;
  int64_t events = 0;
  for (auto _ : state) {
    for (const std::string& bytes : corpus) {
      simdjson::dom::element doc = parser.parse(bytes);
      std::string subject{std::string_view(doc["subject"])};
      std::string type{std::string_view(doc["type"])};
      std::string time{std::string_view(doc["time"])};
      std::string industry{std::string_view(doc["data"]["industry"])};
      int64_t quantity = doc["data"]["quantity"];
      benchmark::DoNotOptimize(subject.data());
      benchmark::DoNotOptimize(type.data());
      benchmark::DoNotOptimize(time.data());
      benchmark::DoNotOptimize(industry.data());
      benchmark::DoNotOptimize(quantity);
    }
    events += static_cast<int64_t>(corpus.size());
  }
  state.SetItemsProcessed(events);
}
BENCHMARK(BM_ParseBaselineDom);

// ---- aggregate ----

std::vector<event::UsageEvent> EventsOverKeys(int64_t keys) {
  std::vector<event::UsageEvent> events(1 << 20);
  for (size_t i = 0; i < events.size(); ++i) {
    const int64_t k = static_cast<int64_t>((i * 2654435761ULL) % static_cast<uint64_t>(keys));
    events[i].org = devtools::LoadgenOrgId(1, static_cast<int>(k / 3));
    events[i].meter = static_cast<event::MeterId>(1 + k % 3);
    events[i].industry = devtools::LoadgenIndustry(static_cast<int>(k / 3));
    events[i].time_micros = event::DaysFromCivil(2026, 11, 26) * 86'400'000'000LL;
    events[i].quantity = 1;
  }
  return events;
}

void BM_Aggregate(benchmark::State& state) {
  const auto events = EventsOverKeys(state.range(0));
  PartitionCounters counters;
  for (const auto& e : events) counters.Add(e);  // Warm: the keys are live, as in steady state.
  for (auto _ : state) {
    for (const auto& e : events) counters.Add(e);
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(events.size()));
  const size_t bytes =
      counters.counters.capacity() * (sizeof(std::pair<const CounterKey, int64_t>) + 1);
  state.counters["live_keys"] = static_cast<double>(counters.counters.size());
  state.counters["bytes_per_key"] =
      static_cast<double>(bytes) / static_cast<double>(counters.counters.size());
}
BENCHMARK(BM_Aggregate)->Arg(100)->Arg(10'000)->Arg(1'000'000);

// One flush interval of one partition, from the empty map a seal leaves: every key of the
// interval inserted once more (its events arrive again). Arg 1: 0 = the map starts empty and
// grows (what a shard does), 1 = reserved to the interval's size first (what the shard did
// until the reservation's memory cost was measured: bench/README.md, "Memory per live key").
void BM_AggregateInterval(benchmark::State& state) {
  const auto all = EventsOverKeys(state.range(0));
  // The first `keys` events: one per key (a catch-up interval, the most growth per event).
  const std::vector<event::UsageEvent> events(all.begin(), all.begin() + state.range(0));
  const bool reserved = state.range(1) != 0;
  for (auto _ : state) {
    PartitionCounters counters;
    if (reserved) counters.counters.reserve(static_cast<size_t>(state.range(0)));
    for (const auto& e : events) counters.Add(e);
    benchmark::DoNotOptimize(counters.counters.size());
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(events.size()));
}
BENCHMARK(BM_AggregateInterval)->Args({15'000, 1})->Args({15'000, 0});

// Baseline: std::unordered_map keyed by the text "org|meter|industry|day".
void BM_AggregateBaselineStringMap(benchmark::State& state) {
  const auto events = EventsOverKeys(state.range(0));
  std::unordered_map<std::string, int64_t> counters;
  auto key_of = [](const event::UsageEvent& e) {
    std::string key = event::OrgIdToString(e.org);
    key += '|';
    key += std::to_string(e.meter);
    key += '|';
    key += event::IndustryCode(e.industry);
    key += '|';
    key += std::to_string(e.UsageDay());
    return key;
  };
  for (const auto& e : events) counters[key_of(e)] += e.quantity;
  for (auto _ : state) {
    for (const auto& e : events) counters[key_of(e)] += e.quantity;
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(events.size()));
}
BENCHMARK(BM_AggregateBaselineStringMap)->Arg(100)->Arg(10'000)->Arg(1'000'000);

// ---- parse + aggregate, one core ----

void BM_ParseAggregate(benchmark::State& state) {
  const auto& corpus = Corpus(static_cast<int>(state.range(0)));
  const auto meters = event::MeterRegistry::Defaults();
  event::EventParser parser(&meters, {});
  PartitionCounters counters;
  aggregate::PrefetchingAdder adder;  // As the shard does.
  int64_t events = 0;
  for (auto _ : state) {
    for (const std::string& bytes : corpus) {
      const auto& parsed = parser.Parse(bytes, kNow);
      adder.Apply();
      for (const auto& e : parsed.events) adder.Stage(&counters, e);
    }
    events += static_cast<int64_t>(corpus.size());
  }
  adder.Apply();
  state.SetItemsProcessed(events);
  state.SetBytesProcessed(events / static_cast<int64_t>(corpus.size()) * TotalBytes(corpus));
}
BENCHMARK(BM_ParseAggregate)->Arg(10'000);

// As the shard does since event-id dedup: each event's (source, id) goes through the
// partition's window first. The window holds 10,000 ids and the corpus has 20,000 distinct
// ones, so every lookup misses, evicts the oldest and inserts: the steady state of a full
// window (compare with BM_ParseAggregate/10000, same corpus). A 100,000-id window is ~4 MB and
// misses cache more often than this one.
void BM_ParseDedupAggregate(benchmark::State& state) {
  const auto& corpus = Corpus(static_cast<int>(state.range(0)));
  const auto meters = event::MeterRegistry::Defaults();
  event::EventParser parser(&meters, {});
  PartitionCounters counters;
  aggregate::PrefetchingAdder adder;
  aggregate::DedupWindow window({.max_ids = 10'000, .window = absl::Hours(24)});
  const int64_t sent = absl::ToUnixMicros(kNow);
  int64_t events = 0, duplicates = 0;
  for (auto _ : state) {
    for (const std::string& bytes : corpus) {
      const auto& parsed = parser.Parse(bytes, kNow);
      adder.Apply();
      for (const auto& e : parsed.events) {
        if (window.SeenOrRemember(e.org, e.source, e.id, sent)) {
          ++duplicates;
          continue;
        }
        adder.Stage(&counters, e);
      }
    }
    events += static_cast<int64_t>(corpus.size());
  }
  adder.Apply();
  if (duplicates > 0) state.SkipWithError("corpus ids repeat within the window");
  state.SetItemsProcessed(events);
}
BENCHMARK(BM_ParseDedupAggregate)->Arg(10'000);

// Before the prefetching adder: each event added as soon as it is parsed.
void BM_ParseAggregateNoPrefetch(benchmark::State& state) {
  const auto& corpus = Corpus(static_cast<int>(state.range(0)));
  const auto meters = event::MeterRegistry::Defaults();
  event::EventParser parser(&meters, {});
  PartitionCounters counters;
  int64_t events = 0;
  for (auto _ : state) {
    for (const std::string& bytes : corpus) {
      for (const auto& e : parser.Parse(bytes, kNow).events) counters.Add(e);
    }
    events += static_cast<int64_t>(corpus.size());
  }
  state.SetItemsProcessed(events);
}
BENCHMARK(BM_ParseAggregateNoPrefetch)->Arg(10'000);

void BM_ParseAggregateBaseline(benchmark::State& state) {
  const auto& corpus = Corpus(static_cast<int>(state.range(0)));
  simdjson::dom::parser parser;
  std::unordered_map<std::string, int64_t> counters;
  int64_t events = 0;
  for (auto _ : state) {
    for (const std::string& bytes : corpus) {
      simdjson::dom::element doc = parser.parse(bytes);
      std::string key{std::string_view(doc["subject"])};
      key += '|';
      key += std::string_view(doc["type"]);
      key += '|';
      key += std::string_view(doc["data"]["industry"]);
      key += '|';
      key += std::string_view(doc["time"]).substr(0, 10);
      counters[key] += int64_t(doc["data"]["quantity"]);
    }
    events += static_cast<int64_t>(corpus.size());
  }
  state.SetItemsProcessed(events);
}
BENCHMARK(BM_ParseAggregateBaseline)->Arg(10'000);

// ---- seal + merge: what one flush does with 30,000 live keys ----

// Two seals of one partition merged (Postgres was down for a tick), then visited in key order as
// the writer does.
void BM_SealMerge(benchmark::State& state) {
  const auto events = EventsOverKeys(state.range(0));
  int64_t keys = 0;
  for (auto _ : state) {
    state.PauseTiming();
    aggregate::SealedPartition first, second;
    for (size_t i = 0; i < events.size() / 2; ++i) first.deltas.Add(events[i]);
    for (size_t i = events.size() / 2; i < events.size(); ++i) second.deltas.Add(events[i]);
    state.ResumeTiming();
    aggregate::MergeInto(first, std::move(second));
    std::vector<aggregate::SealedPartition> batch;
    batch.push_back(std::move(first));
    int64_t visited = 0;
    aggregate::ForEachDeltaInKeyOrder(batch, [&](const CounterKey&, int64_t) { ++visited; });
    keys += visited;
  }
  state.SetItemsProcessed(keys);
}
BENCHMARK(BM_SealMerge)->Arg(30'000)->Unit(benchmark::kMillisecond);

// ---- memory per live key: maps, compacted seals, a flush's peak ----

size_t MapBytes(const CounterMap& map) {
  return map.capacity() * (sizeof(std::pair<const CounterKey, int64_t>) + 1);
}

// state.range(0) keys over state.range(1) partitions, as the shards hold them at a seal; timed:
// the flusher's Compact of every partition. Counters (bytes per key): `maps` what the shards'
// maps hold, `sealed` what the compacted seal holds while it waits for Postgres, `flush_peak`
// the compacted seal plus the next interval's maps refilled with the same keys (a long flush of
// a steady stream); `flush_peak_before` the same peak as it was before compaction (the sealed
// maps plus the flush's sorted copy, 32 bytes per key, plus the next maps).
void BM_CompactSeal(benchmark::State& state) {
  const auto events = EventsOverKeys(state.range(0));
  const auto partitions = static_cast<size_t>(state.range(1));
  const auto fill = [&] {
    std::vector<aggregate::SealedPartition> batch(partitions);
    for (const auto& e : events) {
      batch[absl::Hash<event::OrgId>{}(e.org) % partitions].deltas.Add(e);
    }
    return batch;
  };
  size_t keys = 0, map_bytes = 0, row_bytes = 0;
  for (auto _ : state) {
    state.PauseTiming();
    auto batch = fill();
    keys = map_bytes = row_bytes = 0;
    for (const auto& p : batch) {
      keys += p.keys();
      map_bytes += MapBytes(p.deltas.counters);
    }
    state.ResumeTiming();
    for (auto& p : batch) aggregate::Compact(p);
    state.PauseTiming();
    for (const auto& p : batch) row_bytes += p.rows.capacity() * sizeof(aggregate::CounterRow);
    state.ResumeTiming();
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(keys));
  const auto per_key = [&](size_t bytes) {
    return static_cast<double>(bytes) / static_cast<double>(keys);
  };
  state.counters["keys"] = static_cast<double>(keys);
  state.counters["maps"] = per_key(map_bytes);
  state.counters["sealed"] = per_key(row_bytes);
  state.counters["flush_peak"] = per_key(row_bytes + map_bytes);
  state.counters["flush_peak_before"] =
      per_key(map_bytes + keys * sizeof(aggregate::CounterRow) + map_bytes);
}
BENCHMARK(BM_CompactSeal)->Args({1'000'000, 64})->Unit(benchmark::kMillisecond);

// Baseline: what the flusher did with the same seal before compaction, one sorted copy of every
// partition's map (DistinctRows), the maps kept until the flush ended.
void BM_CompactSealBaselineSortedCopy(benchmark::State& state) {
  const auto events = EventsOverKeys(state.range(0));
  const auto partitions = static_cast<size_t>(state.range(1));
  std::vector<aggregate::SealedPartition> batch(partitions);
  for (const auto& e : events) batch[absl::Hash<event::OrgId>{}(e.org) % partitions].deltas.Add(e);
  int64_t keys = 0;
  for (auto _ : state) {
    auto rows = aggregate::DistinctRows(batch);
    keys += static_cast<int64_t>(rows.size());
    benchmark::DoNotOptimize(rows.data());
  }
  state.SetItemsProcessed(keys);
}
BENCHMARK(BM_CompactSealBaselineSortedCopy)->Args({1'000'000, 64})->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace meterd::bench

int main(int argc, char** argv) {
  return meterd::bench::RunWithRatios(
      argc, argv,
      {{"BM_Parse", "BM_ParseBaselineDom"},
       {"BM_Aggregate/100", "BM_AggregateBaselineStringMap/100"},
       {"BM_Aggregate/10000", "BM_AggregateBaselineStringMap/10000"},
       {"BM_Aggregate/1000000", "BM_AggregateBaselineStringMap/1000000"},
       {"BM_ParseAggregate/10000", "BM_ParseAggregateBaseline/10000"},
       {"BM_ParseAggregate/10000", "BM_ParseAggregateNoPrefetch/10000"},
       {"BM_CompactSeal/1000000/64", "BM_CompactSealBaselineSortedCopy/1000000/64"}});
}
