// Postgres flush: rows/s for the ways one flush can write its distinct keys, against a private
// PostgreSQL started in this run, and the compactor's fold of the delta log. Baselines: the
// former COPY + upsert path, one statement per row in one transaction, and one autocommitted
// statement per event (the seed's increment-per-event approach).
#include <string>
#include <vector>

#include <benchmark/benchmark.h>
#include <pqxx/pqxx>
#include <pqxx/tablewriter>

#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "bench/ratio_reporter.h"
#include "lib/devtools/loadgen.h"
#include "lib/store/pg_flush_writer.h"
#include "lib/store/usage_compactor.h"
#include "tests/support/harness.h"

namespace meterd::bench {
namespace {

using aggregate::SealedPartition;

const std::string& Url() {
  static const std::string url = testing::SharedPostgres().CreateMigratedDatabase("flush_bench");
  return url;
}

// Mutable: the writer's RefreshMeters grows it (the benchmarks never call it).
event::MeterRegistry& Meters() {
  static auto meters = event::MeterRegistry::Defaults();
  return meters;
}

// `rows` distinct keys, the shape of a flush at 10,000 orgs (3 meters).
SealedPartition Batch(int rows, int64_t expected, int64_t next) {
  SealedPartition s;
  s.partition = 0;
  s.expected_offset = expected;
  s.next_offset = next;
  for (int i = 0; i < rows; ++i) {
    event::UsageEvent e;
    e.org = devtools::LoadgenOrgId(7, i / 3);
    e.meter = static_cast<event::MeterId>(1 + i % 3);
    e.industry = devtools::LoadgenIndustry(i / 3);
    e.time_micros = event::DaysFromCivil(2026, 11, 26) * 86'400'000'000LL;
    e.quantity = 1 + i % 5;
    s.deltas.Add(e);
  }
  return s;
}

// The same `rows` keys as the flusher hands them to the writer: spread over `partitions`
// partitions by org, each compacted into sorted rows.
std::vector<SealedPartition> Partitioned(int rows, int partitions, int64_t expected, int64_t next) {
  std::vector<SealedPartition> batch(static_cast<size_t>(partitions));
  for (int p = 0; p < partitions; ++p) {
    batch[p].partition = p;
    batch[p].expected_offset = expected;
    batch[p].next_offset = next;
  }
  SealedPartition all = Batch(rows, expected, next);
  for (const auto& [key, quantity] : all.deltas.counters) {
    batch[absl::Hash<event::OrgId>{}(key.org) % static_cast<size_t>(partitions)].deltas.Add(
        key, quantity);
  }
  for (SealedPartition& p : batch) aggregate::Compact(p);
  return batch;
}

// meterd's writer: offset CAS + COPY of pre-formatted rows into the delta log, the batch
// compacted and spread over state.range(1) partitions as the flusher gives it.
void BM_FlushWriter(benchmark::State& state) {
  static int run = 0;  // Google Benchmark calls this more than once: a fresh partition each time.
  auto writer =
      store::PgFlushWriter::Create(Url(), {"bench", absl::StrCat("writer", run++)}, &Meters());
  auto compactor = store::UsageCompactor::Create(Url(), {});
  if (!writer.ok() || !compactor.ok()) return state.SkipWithError("cannot connect");
  int64_t offset = SealedPartition::kNoStoredOffset;
  int64_t rows = 0;
  for (auto _ : state) {
    state.PauseTiming();
    // As under `meterd run`, where the compactor keeps the log to a few flushes: fold (untimed)
    // what the previous iteration appended.
    if (!(*compactor)->FoldOnce().ok()) return state.SkipWithError("fold failed");
    const int64_t next = offset < 0 ? 1000 : offset + 1000;
    std::vector<SealedPartition> batch = Partitioned(
        static_cast<int>(state.range(0)), static_cast<int>(state.range(1)), offset, next);
    state.ResumeTiming();
    auto outcome = (*writer)->Write(batch);
    if (!outcome.ok() || !outcome->fenced.empty()) return state.SkipWithError("write failed");
    offset = next;
    rows += static_cast<int64_t>(outcome->rows_written);
  }
  state.SetItemsProcessed(rows);
}
BENCHMARK(BM_FlushWriter)
    ->Args({30'000, 1})
    ->Args({100'000, 1})
    ->Args({100'000, 64})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// The former flush's upsert of a temp table's rows (org_id, meter, industry, day, quantity).
std::string UpsertFrom(const std::string& table) {
  return "INSERT INTO shared.api_usage_meters AS m (org_id, meter, industry, usage_date, "
         "quantity) SELECT org_id, meter, industry, DATE '1970-01-01' + day, quantity FROM " +
         table +
         " ON CONFLICT (org_id, meter, industry, usage_date) DO UPDATE "
         "SET quantity = m.quantity + EXCLUDED.quantity, updated_at = now()";
}

// The former write path (before the delta log): COPY of the same pre-formatted rows into a
// session temp table, then one INSERT … SELECT … ON CONFLICT DO UPDATE per key, in the flush's
// transaction. Same keys every iteration: every row after the first is an update.
void BM_FlushUpsert(benchmark::State& state) {
  pqxx::connection conn(Url());
  const auto rows_in = aggregate::DistinctRows({Batch(static_cast<int>(state.range(0)), 0, 0)});
  std::string text;
  for (const auto& [key, quantity] : rows_in) {
    absl::StrAppend(&text, text.empty() ? "" : "\n", event::OrgIdToString(key.org), "\t",
                    std::string(Meters().Name(key.meter)), "\t",
                    std::string(event::IndustryCode(key.industry)), "\t", key.day, "\t", quantity);
  }
  pqxx::nontransaction(conn).exec0(
      "CREATE TEMP TABLE upsert_rows (org_id uuid, meter text, industry text, day integer, "
      "quantity bigint) ON COMMIT DELETE ROWS");
  int64_t rows = 0;
  for (auto _ : state) {
    pqxx::work tx(conn);
    {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
      pqxx::tablewriter copy(tx, "upsert_rows");
#pragma GCC diagnostic pop
      copy.write_raw_line(text);
      copy.complete();
    }
    tx.exec0(UpsertFrom("upsert_rows"));
    tx.commit();
    rows += static_cast<int64_t>(rows_in.size());
  }
  state.SetItemsProcessed(rows);
}
BENCHMARK(BM_FlushUpsert)->Arg(30'000)->Arg(100'000)->Unit(benchmark::kMillisecond)->UseRealTime();

// The compactor's fold, off the flush's path: state.range(1) flushes of the same
// state.range(0) keys are written (not timed), then one fold sums them into the table.
// Items: delta rows folded.
void BM_FoldDeltas(benchmark::State& state) {
  static int run = 0;
  auto writer =
      store::PgFlushWriter::Create(Url(), {"bench", absl::StrCat("fold", run++)}, &Meters());
  auto compactor = store::UsageCompactor::Create(Url(), {});
  if (!writer.ok() || !compactor.ok()) return state.SkipWithError("cannot connect");
  int64_t offset = SealedPartition::kNoStoredOffset;
  int64_t rows = 0;
  for (auto _ : state) {
    state.PauseTiming();
    for (int64_t f = 0; f < state.range(1); ++f) {
      const int64_t next = offset < 0 ? 1000 : offset + 1000;
      auto outcome = (*writer)->Write({Batch(static_cast<int>(state.range(0)), offset, next)});
      if (!outcome.ok() || !outcome->fenced.empty()) return state.SkipWithError("write failed");
      offset = next;
    }
    state.ResumeTiming();
    auto folded = (*compactor)->FoldOnce();
    if (!folded.ok()) return state.SkipWithError(std::string(folded.status().message()).c_str());
    rows += folded->delta_rows;
  }
  state.SetItemsProcessed(rows);
}
BENCHMARK(BM_FoldDeltas)
    ->Args({30'000, 1})
    ->Args({30'000, 4})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Alternative: the rows as Postgres array literals through one INSERT … SELECT FROM unnest(…).
void BM_FlushUnnest(benchmark::State& state) {
  pqxx::connection conn(Url());
  const auto rows_in = aggregate::DistinctRows({Batch(static_cast<int>(state.range(0)), 0, 0)});
  int64_t rows = 0;
  for (auto _ : state) {
    std::string orgs = "{", meters = "{", industries = "{", days = "{", quantities = "{";
    for (const auto& [key, quantity] : rows_in) {
      const char* sep = orgs.size() > 1 ? "," : "";
      absl::StrAppend(&orgs, sep, event::OrgIdToString(key.org));
      absl::StrAppend(&meters, sep, std::string(Meters().Name(key.meter)));
      absl::StrAppend(&industries, sep, std::string(event::IndustryCode(key.industry)));
      absl::StrAppend(&days, sep, key.day);
      absl::StrAppend(&quantities, sep, quantity);
    }
    orgs += '}', meters += '}', industries += '}', days += '}', quantities += '}';
    pqxx::work tx(conn);
    tx.exec_params0(
        "INSERT INTO shared.api_usage_meters AS m (org_id, meter, industry, usage_date, quantity) "
        "SELECT o, mt, i, DATE '1970-01-01' + d, q FROM unnest($1::uuid[], $2::text[], "
        "$3::text[], $4::int[], $5::bigint[]) AS u(o, mt, i, d, q) ON CONFLICT (org_id, meter, "
        "industry, usage_date) DO UPDATE SET quantity = m.quantity + EXCLUDED.quantity, "
        "updated_at = now()",
        orgs, meters, industries, days, quantities);
    tx.commit();
    rows += static_cast<int64_t>(rows_in.size());
  }
  state.SetItemsProcessed(rows);
}
BENCHMARK(BM_FlushUnnest)->Arg(30'000)->Unit(benchmark::kMillisecond)->UseRealTime();

// Alternative: pqxx::stream_to (escapes every field) into a temp table, then the upsert.
void BM_FlushCopy(benchmark::State& state) {
  pqxx::connection conn(Url());
  const auto rows_in = aggregate::DistinctRows({Batch(static_cast<int>(state.range(0)), 0, 0)});
  int64_t rows = 0;
  for (auto _ : state) {
    pqxx::work tx(conn);
    tx.exec0(
        "CREATE TEMP TABLE flush_rows (org_id uuid, meter text, industry text, day int, "
        "quantity bigint) ON COMMIT DROP");
    {
      pqxx::stream_to stream(tx, "flush_rows");
      for (const auto& [key, quantity] : rows_in) {
        stream << std::make_tuple(
            event::OrgIdToString(key.org), std::string(Meters().Name(key.meter)),
            std::string(event::IndustryCode(key.industry)), key.day, quantity);
      }
      stream.complete();
    }
    tx.exec0(UpsertFrom("flush_rows"));
    tx.commit();
    rows += static_cast<int64_t>(rows_in.size());
  }
  state.SetItemsProcessed(rows);
}
BENCHMARK(BM_FlushCopy)->Arg(30'000)->Unit(benchmark::kMillisecond)->UseRealTime();

constexpr char kUpsertOne[] =
    "INSERT INTO shared.api_usage_meters AS m (org_id, meter, industry, usage_date, quantity) "
    "VALUES ($1, $2, $3, DATE '1970-01-01' + $4::int, $5) ON CONFLICT (org_id, meter, industry, "
    "usage_date) DO UPDATE SET quantity = m.quantity + EXCLUDED.quantity, updated_at = now()";

void BM_FlushPerRowOneTransaction(benchmark::State& state) {
  pqxx::connection conn(Url());
  conn.prepare("upsert_one", kUpsertOne);
  const auto rows_in = aggregate::DistinctRows({Batch(static_cast<int>(state.range(0)), 0, 0)});
  int64_t rows = 0;
  for (auto _ : state) {
    pqxx::work tx(conn);
    for (const auto& [key, quantity] : rows_in) {
      tx.exec_prepared0("upsert_one", event::OrgIdToString(key.org),
                        std::string(Meters().Name(key.meter)),
                        std::string(event::IndustryCode(key.industry)), key.day, quantity);
    }
    tx.commit();
    rows += static_cast<int64_t>(rows_in.size());
  }
  state.SetItemsProcessed(rows);
}
BENCHMARK(BM_FlushPerRowOneTransaction)->Arg(3'000)->Unit(benchmark::kMillisecond)->UseRealTime();

// The seed's approach: every event is its own autocommitted statement.
void BM_PerEventAutocommit(benchmark::State& state) {
  pqxx::connection conn(Url());
  conn.prepare("upsert_one", kUpsertOne);
  const auto rows_in = aggregate::DistinctRows({Batch(static_cast<int>(state.range(0)), 0, 0)});
  int64_t rows = 0;
  for (auto _ : state) {
    for (const auto& [key, quantity] : rows_in) {
      pqxx::nontransaction tx(conn);
      tx.exec_prepared0("upsert_one", event::OrgIdToString(key.org),
                        std::string(Meters().Name(key.meter)),
                        std::string(event::IndustryCode(key.industry)), key.day, quantity);
    }
    rows += static_cast<int64_t>(rows_in.size());
  }
  state.SetItemsProcessed(rows);
}
BENCHMARK(BM_PerEventAutocommit)->Arg(1'000)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
}  // namespace meterd::bench

int main(int argc, char** argv) {
  return meterd::bench::RunWithRatios(
      argc, argv,
      {{"BM_FlushWriter/30000/1/real_time", "BM_FlushUpsert/30000/real_time"},
       {"BM_FlushWriter/100000/1/real_time", "BM_FlushUpsert/100000/real_time"},
       {"BM_FlushWriter/100000/64/real_time", "BM_FlushUpsert/100000/real_time"},
       {"BM_FoldDeltas/30000/4/real_time", "BM_FlushUpsert/30000/real_time"},
       {"BM_FlushWriter/30000/1/real_time", "BM_FlushPerRowOneTransaction/3000/real_time"},
       {"BM_FlushWriter/30000/1/real_time", "BM_PerEventAutocommit/1000/real_time"},
       {"BM_FlushWriter/30000/1/real_time", "BM_FlushUnnest/30000/real_time"},
       {"BM_FlushWriter/30000/1/real_time", "BM_FlushCopy/30000/real_time"}});
}
