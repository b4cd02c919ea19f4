#include "lib/store/pg_flush_writer.h"

#include "absl/strings/str_cat.h"
#include "lib/common/status_macros.h"
#include "lib/store/pg_connection.h"

namespace meterd::store {
namespace {

using aggregate::SealedPartition;

constexpr char kAdvanceOffset[] = "meterd_advance_offset";
constexpr char kCreateOffset[] = "meterd_create_offset";
constexpr char kUpsertCounters[] = "meterd_upsert_counters";
constexpr char kInsertRejected[] = "meterd_insert_rejected";
constexpr char kLoadOffsets[] = "meterd_load_offsets";

// Rows per upsert statement: bounds the statement's size whatever the batch holds.
constexpr size_t kRowsPerStatement = 50'000;

// Postgres array literals for the unnest upsert. Every element is a UUID, an identifier-safe
// meter name (CHECK in shared.meters), an industry code or an integer: none needs quoting.
struct CounterArrays {
  std::string orgs{"{"}, meters{"{"}, industries{"{"}, days{"{"}, quantities{"{"};

  void Append(const aggregate::CounterKey& key, int64_t quantity, std::string_view meter) {
    if (orgs.size() > 1) {
      orgs += ',', meters += ',', industries += ',', days += ',', quantities += ',';
    }
    char uuid[36];
    event::FormatOrgId(key.org, uuid);
    orgs.append(uuid, 36);
    meters += meter;
    industries += event::IndustryCode(key.industry);
    absl::StrAppend(&days, key.day);
    absl::StrAppend(&quantities, quantity);
  }
  void Close() { orgs += '}', meters += '}', industries += '}', days += '}', quantities += '}'; }
};

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

}  // namespace

absl::StatusOr<std::unique_ptr<PgFlushWriter>> PgFlushWriter::Create(
    std::string conninfo, WriterIdentity identity, const event::MeterRegistry* meters) {
  std::unique_ptr<PgFlushWriter> writer(
      new PgFlushWriter(std::move(conninfo), std::move(identity), meters));
  RETURN_IF_ERROR(writer->EnsureConnected());
  return writer;
}

absl::Status PgFlushWriter::EnsureConnected() {
  if (conn_ && conn_->is_open()) return absl::OkStatus();
  conn_.reset();
  ASSIGN_OR_RETURN(auto conn, Connect(conninfo_));
  RETURN_IF_ERROR(CatchPq([&]() -> absl::Status {
    conn->prepare(kAdvanceOffset,
                  "UPDATE shared.ingest_offsets SET next_offset = $4, updated_at = now() "
                  "WHERE consumer_group = $1 AND topic = $2 AND partition = $3 "
                  "AND next_offset = $5");
    conn->prepare(kCreateOffset,
                  "INSERT INTO shared.ingest_offsets (consumer_group, topic, partition, "
                  "next_offset) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING");
    conn->prepare(kUpsertCounters,
                  "INSERT INTO shared.api_usage_meters AS m "
                  "(org_id, meter, industry, usage_date, quantity) "
                  "SELECT o, mt, i, DATE '1970-01-01' + d, q "
                  "FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::bigint[]) "
                  "AS u(o, mt, i, d, q) "
                  "ON CONFLICT (org_id, meter, industry, usage_date) DO UPDATE "
                  "SET quantity = m.quantity + EXCLUDED.quantity, updated_at = now()");
    conn->prepare(kInsertRejected,
                  "INSERT INTO shared.rejected_events (topic, partition, kafka_offset, reason, "
                  "detail, raw, raw_truncated) VALUES ($1, $2, $3, $4, $5, decode($6, 'hex'), $7)");
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
  absl::Status status = CatchPq([&]() -> absl::Status {
    pqxx::work tx(*conn_);
    // Fence first: a stale writer learns it before doing any heavy work.
    for (const SealedPartition& p : batch) {
      const bool claimed =
          p.expected_offset == SealedPartition::kNoStoredOffset
              ? tx.exec_prepared(kCreateOffset, identity_.consumer_group, identity_.topic,
                                 p.partition, p.next_offset)
                        .affected_rows() == 1
              : tx.exec_prepared(kAdvanceOffset, identity_.consumer_group, identity_.topic,
                                 p.partition, p.next_offset, p.expected_offset)
                        .affected_rows() == 1;
      if (!claimed) outcome.fenced.push_back({p.partition, SealedPartition::kNoStoredOffset});
    }
    if (!outcome.fenced.empty()) {
      tx.abort();
      return absl::OkStatus();
    }

    const auto rows = aggregate::DistinctRows(batch);
    for (size_t start = 0; start < rows.size(); start += kRowsPerStatement) {
      CounterArrays arrays;
      const size_t end = std::min(rows.size(), start + kRowsPerStatement);
      for (size_t i = start; i < end; ++i) {
        arrays.Append(rows[i].first, rows[i].second, meters_->Name(rows[i].first.meter));
      }
      arrays.Close();
      tx.exec_prepared0(kUpsertCounters, arrays.orgs, arrays.meters, arrays.industries,
                        arrays.days, arrays.quantities);
    }
    outcome.rows_upserted = rows.size();

    for (const SealedPartition& p : batch) {
      for (const aggregate::RejectedEvent& r : p.deltas.rejected) {
        tx.exec_prepared0(kInsertRejected, identity_.topic, p.partition, r.offset,
                          std::string(event::RejectReasonCode(r.reason)), r.detail, Hex(r.raw),
                          r.truncated);
        ++outcome.rejected_inserted;
      }
    }
    tx.commit();
    return absl::OkStatus();
  });
  if (!status.ok()) {
    if (absl::IsUnavailable(status)) conn_.reset();
    return status;
  }
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
  absl::Status status = CatchPq([&]() -> absl::Status {
    pqxx::read_transaction tx(*conn_);
    for (const auto& row :
         tx.exec_prepared(kLoadOffsets, identity_.consumer_group, identity_.topic)) {
      offsets[row[0].as<int32_t>()] = row[1].as<int64_t>();
    }
    return absl::OkStatus();
  });
  if (!status.ok()) {
    if (absl::IsUnavailable(status)) conn_.reset();
    return status;
  }
  return offsets;
}

absl::StatusOr<event::MeterRegistry> LoadMeters(const std::string& conninfo) {
  ASSIGN_OR_RETURN(auto conn, Connect(conninfo));
  event::MeterRegistry registry;
  RETURN_IF_ERROR(CatchPq([&]() -> absl::Status {
    pqxx::read_transaction tx(*conn);
    for (const auto& row : tx.exec("SELECT meter_id, name FROM shared.meters ORDER BY meter_id")) {
      registry.Add(row[0].as<event::MeterId>(), row[1].as<std::string>());
    }
    return absl::OkStatus();
  }));
  return registry;
}

}  // namespace meterd::store
