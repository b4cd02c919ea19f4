#include "lib/store/pg_flush_writer.h"

#include <limits>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "lib/common/logging.h"
#include "lib/common/status_macros.h"
#include "lib/store/pg_connection.h"

#include <pqxx/tablewriter>

namespace meterd::store {
namespace {

using aggregate::SealedPartition;

constexpr char kClaimOffsets[] = "meterd_claim_offsets";
constexpr char kLoadOffsets[] = "meterd_load_offsets";
constexpr char kLoadMeters[] = "meterd_load_meters";
constexpr char kLockMeters[] = "meterd_lock_meters";

constexpr char kSelectMeters[] =
    "SELECT meter_id, name, max_event_quantity FROM shared.meters ORDER BY meter_id";

// COPY text format into the delta log, many rows per write. Every value is a UUID, an
// identifier-safe meter name (CHECK in shared.meters), an industry code, a date or an integer:
// none needs escaping. pqxx::stream_to escapes and allocates per field (measured ~2x slower
// here); tablewriter sends pre-formatted lines, and is only deprecated in favour of stream_to.
// Returns the rows written.
size_t CopyDeltas(pqxx::work& tx, const std::vector<SealedPartition>& batch,
                  const event::MeterRegistry& meters) {
  static const std::vector<std::string> kColumns = {"org_id", "meter", "industry", "usage_date",
                                                    "quantity"};
  constexpr size_t kChunkBytes = 256 * 1024;
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  pqxx::tablewriter copy(tx, "shared.api_usage_deltas", kColumns.begin(), kColumns.end());
#pragma GCC diagnostic pop
  std::string chunk;
  chunk.reserve(kChunkBytes + 256);
  char org[36];
  int32_t dated_day = std::numeric_limits<int32_t>::min();
  std::string date;
  size_t written = 0;
  // Rows straight from the partitions' compacted deltas, no flush-wide copy, merged into key
  // order, one row per key: the log's org_id index took 100k rows as 64 interleaved sorted
  // runs at 392k/s, in one order at 499k/s (bench/flush_benchmark).
  aggregate::ForEachDeltaInKeyOrder(batch, [&](const aggregate::CounterKey& key, int64_t quantity) {
    ++written;
    if (!chunk.empty()) chunk += '\n';
    event::FormatOrgId(key.org, org);
    chunk.append(org, 36);
    chunk += '\t';
    chunk += meters.Name(key.meter);
    chunk += '\t';
    chunk += event::IndustryCode(key.industry);
    chunk += '\t';
    if (key.day != dated_day) {  // Sorted by key (org, day, …): a date repeats in runs.
      dated_day = key.day;
      date = event::DayToIsoDate(key.day);
    }
    chunk += date;
    absl::StrAppend(&chunk, "\t", quantity);
    if (chunk.size() >= kChunkBytes) {
      copy.write_raw_line(chunk);
      chunk.clear();
    }
  });
  if (!chunk.empty()) copy.write_raw_line(chunk);
  copy.complete();
  return written;
}

// The log has no foreign key on meter (a lookup per row): the flush takes what it would have
// taken, a KEY SHARE lock on each meter its rows name, so a rename or delete of one waits for
// this commit (and then meets the deltas: the trigger of migration 0025 refuses it). A meter
// already gone (renamed while this meterd runs, which keeps the name it loaded) fails the
// flush, retried and never dropped, as the foreign key made it fail before.
absl::Status LockMeters(pqxx::work& tx, const std::vector<SealedPartition>& batch,
                        const event::MeterRegistry& meters) {
  absl::flat_hash_set<event::MeterId> ids;
  for (const SealedPartition& p : batch) {
    p.ForEachDelta([&](const aggregate::CounterKey& key, int64_t) { ids.insert(key.meter); });
  }
  std::string names = "{";
  for (event::MeterId id : ids) {
    if (names.size() > 1) names += ',';
    names += meters.Name(id);
  }
  names += '}';
  if (tx.exec_prepared(kLockMeters, names).size() == ids.size()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "a meter of this flush (", names,
      ") is no longer in shared.meters (renamed or deleted while meterd runs); restart meterd "
      "to load the meters again, nothing is dropped meanwhile"));
}

// Applies shared.meters rows to `registry` (its one writer). New meters and changed maxima
// are logged when `log_changes`; a row the registry refuses is logged once per distinct row
// (`refused` remembers them), since a refresh sees it again every tick.
void ApplyMeterRows(const pqxx::result& rows, event::MeterRegistry& registry, bool log_changes,
                    absl::flat_hash_set<std::string>& refused) {
  using Result = event::MeterRegistry::AddResult;
  for (const auto& row : rows) {
    const auto id = row[0].as<int>();
    const std::string name = row[1].as<std::string>();
    const auto max_quantity = row[2].as<int64_t>();
    const Result result = id < 0 || id > std::numeric_limits<event::MeterId>::max()
                              ? Result::kInvalid
                              : registry.Add(static_cast<event::MeterId>(id), name, max_quantity);
    switch (result) {
      case Result::kAdded:
        if (log_changes) {
          LOG_INFO("meters: loaded new meter {} (id {}, max quantity {})", name, id, max_quantity);
        }
        break;
      case Result::kUpdated:
        if (log_changes) LOG_INFO("meters: {} (id {}) max quantity now {}", name, id, max_quantity);
        break;
      case Result::kUnchanged:
        break;
      case Result::kConflict:
      case Result::kFull:
      case Result::kInvalid:
        if (refused.insert(absl::StrCat(id, ":", name)).second) {
          LOG_WARN(
              "meters: shared.meters row (id {}, name {}) ignored: {}; a loaded meter's name and "
              "id never change while meterd runs (restart to apply a rename)",
              id, name,
              result == Result::kConflict ? "its id or name belongs to another loaded meter"
              : result == Result::kFull   ? "the registry is full"
                                          : "invalid id, name or max quantity");
        }
        break;
    }
  }
}

std::string Hex(std::string_view bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) {
    out += kHex[c >> 4];
    out += kHex[c & 0xf];
  }
  return out;
}

// COPY text format: backslash, and the characters COPY would read as delimiters, escaped.
void AppendCopyText(std::string* out, std::string_view text) {
  for (char c : text) {
    const char* escaped = c == '\\'   ? "\\\\"
                          : c == '\t' ? "\\t"
                          : c == '\n' ? "\\n"
                          : c == '\r' ? "\\r"
                                      : nullptr;
    if (escaped != nullptr) {
      out->append(escaped);
    } else {
      out->push_back(c);
    }
  }
}

// Every rejected event of the batch, by COPY straight into shared.rejected_events (one
// statement for the flush, not one INSERT per row). Returns the rows written.
size_t CopyRejected(pqxx::work& tx, const std::string& topic,
                    const std::vector<aggregate::SealedPartition>& batch) {
  size_t rows = 0;
  for (const aggregate::SealedPartition& p : batch) rows += p.deltas.rejected.size();
  if (rows == 0) return 0;
  static const std::vector<std::string> kColumns = {"topic",  "partition", "kafka_offset", "reason",
                                                    "detail", "raw",       "raw_truncated"};
  constexpr size_t kChunkBytes = 256 * 1024;
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  pqxx::tablewriter copy(tx, "shared.rejected_events", kColumns.begin(), kColumns.end());
#pragma GCC diagnostic pop
  std::string chunk;
  for (const aggregate::SealedPartition& p : batch) {
    for (const aggregate::RejectedEvent& r : p.deltas.rejected) {
      if (!chunk.empty()) chunk += '\n';
      AppendCopyText(&chunk, topic);
      absl::StrAppend(&chunk, "\t", p.partition, "\t", r.offset, "\t",
                      std::string(event::RejectReasonCode(r.reason)), "\t");
      AppendCopyText(&chunk, r.detail);
      // bytea in hex form; COPY's own escape doubles the backslash.
      absl::StrAppend(&chunk, "\t\\\\x", Hex(r.raw), "\t", r.truncated ? "t" : "f");
      if (chunk.size() >= kChunkBytes) {
        copy.write_raw_line(chunk);
        chunk.clear();
      }
    }
  }
  if (!chunk.empty()) copy.write_raw_line(chunk);
  copy.complete();
  return rows;
}

}  // namespace

absl::StatusOr<std::unique_ptr<PgFlushWriter>> PgFlushWriter::Create(std::string conninfo,
                                                                     WriterIdentity identity,
                                                                     event::MeterRegistry* meters,
                                                                     PgTimeouts timeouts) {
  std::unique_ptr<PgFlushWriter> writer(
      new PgFlushWriter(std::move(conninfo), std::move(identity), meters, timeouts));
  RETURN_IF_ERROR(writer->EnsureConnected());
  return writer;
}

absl::Status PgFlushWriter::Guarded(const char* what, const std::function<absl::Status()>& body) {
  watchdog_.Arm(conn_->sock(), timeouts_.statement);
  absl::Status status = CatchPq(body);
  if (watchdog_.Disarm()) {
    status = absl::UnavailableError(
        absl::StrCat(what, " did not finish within ", absl::FormatDuration(timeouts_.statement),
                     " (--pg-statement-timeout); connection abandoned, retrying"));
  }
  if (absl::IsUnavailable(status)) conn_.reset();
  return status;
}

absl::Status PgFlushWriter::EnsureConnected() {
  if (conn_ && conn_->is_open()) return absl::OkStatus();
  conn_.reset();
  ASSIGN_OR_RETURN(auto conn, Connect(conninfo_, timeouts_));
  RETURN_IF_ERROR(CatchPq([&]() -> absl::Status {
    // Every partition's compare-and-set in one round trip: advance rows still at the expected
    // offset, create rows expected to be absent; the partitions returned are the ones claimed.
    conn->prepare(kClaimOffsets,
                  "WITH input AS (SELECT * FROM unnest($3::int[], $4::bigint[], $5::bigint[]) "
                  "  AS t(partition, expected, next)), "
                  "advanced AS (UPDATE shared.ingest_offsets o SET next_offset = i.next, "
                  "  updated_at = now() FROM input i WHERE o.consumer_group = $1 "
                  "  AND o.topic = $2 AND o.partition = i.partition AND i.expected >= 0 "
                  "  AND o.next_offset = i.expected RETURNING o.partition), "
                  "created AS (INSERT INTO shared.ingest_offsets (consumer_group, topic, "
                  "  partition, next_offset) SELECT $1, $2, i.partition, i.next FROM input i "
                  "  WHERE i.expected < 0 ON CONFLICT DO NOTHING RETURNING partition) "
                  "SELECT partition FROM advanced UNION ALL SELECT partition FROM created");
    conn->prepare(kLoadMeters, kSelectMeters);
    conn->prepare(kLockMeters,
                  "SELECT name FROM shared.meters WHERE name = ANY($1::text[]) FOR KEY SHARE");
    conn->prepare(kLoadOffsets,
                  "SELECT partition, next_offset FROM shared.ingest_offsets "
                  "WHERE consumer_group = $1 AND topic = $2");
    return absl::OkStatus();
  }));
  conn_ = std::move(conn);
  return absl::OkStatus();
}

absl::StatusOr<FlushOutcome> PgFlushWriter::Write(const std::vector<SealedPartition>& batch) {
  RETURN_IF_ERROR(EnsureConnected());
  FlushOutcome outcome;
  absl::Status status = Guarded("flush", [&]() -> absl::Status {
    pqxx::work tx(*conn_);
    // Fence first: a stale writer learns it before doing any heavy work.
    std::string partitions = "{", expected = "{", next = "{";
    for (const SealedPartition& p : batch) {
      const char* sep = partitions.size() > 1 ? "," : "";
      absl::StrAppend(&partitions, sep, p.partition);
      absl::StrAppend(&expected, sep, p.expected_offset);
      absl::StrAppend(&next, sep, p.next_offset);
    }
    partitions += '}', expected += '}', next += '}';
    absl::flat_hash_set<int32_t> claimed;
    for (const auto& row : tx.exec_prepared(kClaimOffsets, identity_.consumer_group,
                                            identity_.topic, partitions, expected, next)) {
      claimed.insert(row[0].as<int32_t>());
    }
    for (const SealedPartition& p : batch) {
      if (!claimed.contains(p.partition)) {
        outcome.fenced.push_back({p.partition, SealedPartition::kNoStoredOffset});
      }
    }
    if (!outcome.fenced.empty()) {
      tx.abort();
      return absl::OkStatus();
    }

    // The deltas go to the log (migration 0025): no per-key upsert in this transaction.
    size_t keys = 0;
    for (const SealedPartition& p : batch) keys += p.keys();
    if (keys > 0) {
      RETURN_IF_ERROR(LockMeters(tx, batch, *meters_));
      outcome.rows_written = CopyDeltas(tx, batch, *meters_);
    }

    CopyRejected(tx, identity_.topic, batch);
    tx.commit();
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  if (!outcome.fenced.empty()) {
    ASSIGN_OR_RETURN(auto stored, LoadOffsets());
    for (FencedPartition& f : outcome.fenced) {
      auto it = stored.find(f.partition);
      if (it != stored.end()) f.stored_offset = it->second;
    }
  }
  return outcome;
}

absl::StatusOr<absl::flat_hash_map<int32_t, int64_t>> PgFlushWriter::LoadOffsets() {
  RETURN_IF_ERROR(EnsureConnected());
  absl::flat_hash_map<int32_t, int64_t> offsets;
  RETURN_IF_ERROR(Guarded("loading offsets", [&]() -> absl::Status {
    pqxx::read_transaction tx(*conn_);
    for (const auto& row :
         tx.exec_prepared(kLoadOffsets, identity_.consumer_group, identity_.topic)) {
      offsets[row[0].as<int32_t>()] = row[1].as<int64_t>();
    }
    return absl::OkStatus();
  }));
  return offsets;
}

absl::Status PgFlushWriter::RefreshMeters() {
  RETURN_IF_ERROR(EnsureConnected());
  return Guarded("reloading meters", [&]() -> absl::Status {
    // One autocommit statement on the writer's connection, never inside a flush transaction.
    pqxx::nontransaction tx(*conn_);
    ApplyMeterRows(tx.exec_prepared(kLoadMeters), *meters_, /*log_changes=*/true, refused_meters_);
    return absl::OkStatus();
  });
}

absl::StatusOr<event::MeterRegistry> LoadMeters(const std::string& conninfo) {
  ASSIGN_OR_RETURN(auto conn, Connect(conninfo));
  event::MeterRegistry registry;
  absl::flat_hash_set<std::string> refused;
  RETURN_IF_ERROR(CatchPq([&]() -> absl::Status {
    pqxx::read_transaction tx(*conn);
    ApplyMeterRows(tx.exec(kSelectMeters), registry, /*log_changes=*/false, refused);
    return absl::OkStatus();
  }));
  return registry;
}

}  // namespace meterd::store
