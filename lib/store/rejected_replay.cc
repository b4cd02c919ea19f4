#include "lib/store/rejected_replay.h"

#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "lib/aggregate/counters.h"
#include "lib/aggregate/dedup_window.h"
#include "lib/common/logging.h"
#include "lib/common/status_macros.h"
#include "lib/store/migrations.h"
#include "lib/store/pg_connection.h"
#include "lib/store/pg_flush_writer.h"

namespace meterd::store {
namespace {

using aggregate::CounterKey;
using event::RejectReason;

// Oldest first, resuming after the last row seen: a row left unreplayed (it still fails) is
// not examined twice in one run. A row another replay is counting is waited for, then
// re-checked: once it has replayed_at it no longer matches and is skipped.
constexpr char kLockChunk[] = R"sql(
  SELECT id, rejected_at::text, raw, raw_truncated
  FROM shared.rejected_events
  WHERE reason = $1 AND replayed_at IS NULL
    AND (rejected_at, id) > ($2::timestamptz, $3::bigint)
  ORDER BY rejected_at, id
  LIMIT $4
  FOR UPDATE)sql";

// One row per distinct key, added to what is stored (as the usage fold adds); and one
// audit row per org with what the replay counted for it, by meter ($6: the reason replayed).
constexpr char kUpsertCounters[] = R"sql(
  WITH t AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::bigint[])
      AS t(org_id, meter, industry, day, quantity)
  ), upserted AS (
    INSERT INTO shared.api_usage_meters AS m (org_id, meter, industry, usage_date, quantity)
    SELECT org_id, meter, industry, DATE '1970-01-01' + day, quantity FROM t
    ORDER BY org_id, meter, industry, day
    ON CONFLICT (org_id, meter, industry, usage_date) DO UPDATE
    SET quantity = m.quantity + EXCLUDED.quantity, updated_at = now()
  )
  SELECT shared.audit('usage.replayed', org_id, NULL,
                      jsonb_build_object('reason', $6::text,
                                         'quantity_by_meter', jsonb_object_agg(meter, quantity)))
  FROM (SELECT org_id, meter, sum(quantity)::bigint AS quantity FROM t GROUP BY 1, 2) per_meter
  GROUP BY org_id)sql";

constexpr char kMarkReplayed[] = R"sql(
  UPDATE shared.rejected_events SET replayed_at = now()
  WHERE id = ANY($1::bigint[]) AND replayed_at IS NULL)sql";

// A Postgres array literal of values holding no quote or backslash (UUIDs, meter names, industry
// codes, integers). Each is quoted, so a meter named "null" stays a name.
class ArrayLiteral {
 public:
  void Add(std::string_view value) {
    text_ += text_.size() > 1 ? ",\"" : "\"";
    text_ += value;
    text_ += '"';
  }
  std::string Take() { return std::move(text_) + "}"; }

 private:
  std::string text_ = "{";
};

// How the shard parsed these bytes when it refused them. Only not_json and empty_batch are
// given to a whole message that may be a batch (ParseBatch's reject_all, or a single message
// that is not JSON); every other reason is given to one event: a whole single message or one
// batch element, and an element that was itself an array must stay not_object.
bool WasWholeMessage(RejectReason reason) {
  return reason == RejectReason::kNotJson || reason == RejectReason::kEmptyBatch;
}

struct Chunk {
  int64_t rows = 0;
  std::string last_rejected_at;
  int64_t last_id = 0;
};

}  // namespace

absl::StatusOr<ReplaySummary> ReplayRejected(const std::string& conninfo,
                                             const ReplayOptions& options, absl::Time now) {
  const std::optional<RejectReason> reason = event::ParseRejectReason(options.reason);
  if (!reason) {
    std::vector<std::string> codes;
    for (int i = 0; i < event::kRejectReasonCount; ++i) {
      codes.emplace_back(event::RejectReasonCode(static_cast<RejectReason>(i)));
    }
    return absl::InvalidArgumentError(absl::StrCat("unknown reason '", options.reason,
                                                   "'; one of: ", absl::StrJoin(codes, ", ")));
  }
  if (*reason == RejectReason::kOffsetGap) {
    return absl::InvalidArgumentError(
        "offset_gap rows record log ranges that could not be read; there is nothing to replay");
  }
  if (*reason == RejectReason::kBatchRejected) {
    // The row summarises a batch whose valid elements were counted when it arrived: replaying
    // the message would count them again.
    return absl::InvalidArgumentError(
        "batch_rejected rows cannot be replayed: their batch's valid elements were already "
        "counted; re-send the fixed elements instead");
  }
  if (options.chunk_rows < 1) return absl::InvalidArgumentError("chunk_rows must be positive");
  RETURN_IF_ERROR(CheckSchemaCurrent(conninfo));

  // The meters as the database holds them now; the upsert's foreign key re-checks each one.
  ASSIGN_OR_RETURN(const event::MeterRegistry meters, LoadMeters(conninfo));
  ASSIGN_OR_RETURN(auto conn, Connect(conninfo));
  event::EventParser parser(&meters, options.limits);
  const bool whole_message = WasWholeMessage(*reason);

  ReplaySummary summary;
  // (source, id) fingerprints counted by this replay: a producer's re-send that was rejected
  // too is one event, counted once (the duplicate row is marked replayed, counting nothing).
  absl::flat_hash_set<uint64_t> counted_ids;
  std::string cursor_at =
      options.since == absl::InfinitePast()
          ? "-infinity"
          : absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", options.since, absl::UTCTimeZone());
  // Row ids are positive, so (since, 0) < every row rejected at `since` itself.
  int64_t cursor_id = 0;
  while (true) {
    ReplaySummary chunk_summary;
    Chunk chunk;
    absl::flat_hash_set<event::OrgId> orgs;
    RETURN_IF_ERROR(CatchPq([&]() -> absl::Status {
      pqxx::work tx(*conn);
      const pqxx::result rows =
          tx.exec_params(kLockChunk, options.reason, cursor_at, cursor_id, options.chunk_rows);
      aggregate::SealedPartition counted;
      ArrayLiteral replayed_ids;
      for (const auto& row : rows) {
        ++chunk.rows;
        chunk.last_id = row[0].as<int64_t>();
        chunk.last_rejected_at = row[1].as<std::string>();
        ++chunk_summary.rows_examined;
        if (row[3].as<bool>()) {
          ++chunk_summary.truncated;
          continue;
        }
        const pqxx::binarystring bytes(row[2]);
        const std::string_view raw(reinterpret_cast<const char*>(bytes.data()), bytes.size());
        const event::ParsedMessage& parsed =
            whole_message ? parser.Parse(raw, now) : parser.ParseElement(raw, now);
        // All or nothing: a row that is a whole batch counts only if every element does, so a
        // later replay can never count part of it a second time.
        if (!parsed.rejections.empty() || parsed.events.empty()) {
          const RejectReason still =
              parsed.rejections.empty() ? RejectReason::kEmptyBatch : parsed.rejections[0].reason;
          ++chunk_summary.still_rejected[std::string(event::RejectReasonCode(still))];
          continue;
        }
        for (const event::UsageEvent& e : parsed.events) {
          const uint64_t fingerprint = aggregate::DedupWindow::Fingerprint(e.org, e.source, e.id);
          if (!counted_ids.insert(fingerprint).second) {
            ++chunk_summary.duplicates;
            continue;
          }
          counted.deltas.Add(e);
          chunk_summary.quantity_counted += e.quantity;
          ++chunk_summary.events_counted;
          orgs.insert(e.org);
        }
        ++chunk_summary.rows_replayed;
        replayed_ids.Add(absl::StrCat(chunk.last_id));
      }
      if (chunk_summary.rows_replayed > 0) {
        ArrayLiteral org_ids, meter_names, industries, days, quantities;
        char org[36];
        // One row per key (the upsert above locks them in the fold's order, so this and a
        // concurrent fold of the usage delta log cannot deadlock).
        std::vector<aggregate::SealedPartition> batch;
        batch.push_back(std::move(counted));
        for (const auto& [key, quantity] : aggregate::DistinctRows(batch)) {
          event::FormatOrgId(key.org, org);
          org_ids.Add(std::string_view(org, sizeof(org)));
          meter_names.Add(meters.Name(key.meter));
          industries.Add(event::IndustryCode(key.industry));
          days.Add(absl::StrCat(key.day));
          quantities.Add(absl::StrCat(quantity));
        }
        tx.exec_params(kUpsertCounters, org_ids.Take(), meter_names.Take(), industries.Take(),
                       days.Take(), quantities.Take(), options.reason);
        const pqxx::result marked = tx.exec_params(kMarkReplayed, replayed_ids.Take());
        // The rows are locked by this transaction; anything else is a bug, and the rollback
        // keeps it from counting.
        if (marked.affected_rows() != static_cast<size_t>(chunk_summary.rows_replayed)) {
          return absl::InternalError(absl::StrCat("marked ", marked.affected_rows(),
                                                  " rows replayed, counted ",
                                                  chunk_summary.rows_replayed));
        }
      }
      tx.commit();
      return absl::OkStatus();
    }));
    if (chunk.rows == 0) break;
    cursor_at = chunk.last_rejected_at;
    cursor_id = chunk.last_id;
    summary.rows_examined += chunk_summary.rows_examined;
    summary.rows_replayed += chunk_summary.rows_replayed;
    summary.events_counted += chunk_summary.events_counted;
    summary.quantity_counted += chunk_summary.quantity_counted;
    summary.duplicates += chunk_summary.duplicates;
    summary.truncated += chunk_summary.truncated;
    for (const auto& [code, rows] : chunk_summary.still_rejected) {
      summary.still_rejected[code] += rows;
    }
    LOG_INFO("replay-rejected: {} rows examined, {} replayed ({} events) in this chunk",
             chunk_summary.rows_examined, chunk_summary.rows_replayed,
             chunk_summary.events_counted);
    if (!orgs.empty()) {
      // Charges are recomputed from usage, never accumulated: refreshing them after the commit
      // is safe to repeat, and a failure here leaves them to the next refresh of those orgs.
      ArrayLiteral org_ids;
      char org[36];
      for (const event::OrgId& id : orgs) {
        event::FormatOrgId(id, org);
        org_ids.Add(std::string_view(org, sizeof(org)));
      }
      const absl::Status refreshed = CatchPq([&]() -> absl::Status {
        pqxx::work tx(*conn);
        tx.exec_params("SELECT shared.refresh_usage_charges($1::uuid[])", org_ids.Take());
        tx.commit();
        return absl::OkStatus();
      });
      if (!refreshed.ok()) {
        LOG_WARN("replay-rejected: usage counted, but refreshing usage charges failed: {}",
                 refreshed.message());
      }
    }
  }
  return summary;
}

absl::StatusOr<int64_t> PurgeRejected(const std::string& conninfo, absl::Duration older_than) {
  ASSIGN_OR_RETURN(auto conn, Connect(conninfo));
  int64_t purged = 0;
  absl::Status status = CatchPq([&]() -> absl::Status {
    pqxx::work tx(*conn);
    purged = tx.exec_params1("SELECT shared.purge_rejected_events(make_interval(secs => $1))",
                             absl::ToDoubleSeconds(older_than))[0]
                 .as<int64_t>();
    tx.commit();
    return absl::OkStatus();
  });
  // The function refuses a window a replay could still bill (22023): the caller's mistake.
  if (!status.ok() && absl::StrContains(status.message(), "22023")) {
    return absl::InvalidArgumentError(absl::StrCat("--older-than: ", status.message()));
  }
  RETURN_IF_ERROR(status);
  return purged;
}

std::string ReplaySummaryJson(const ReplaySummary& summary) {
  std::string still;
  for (const auto& [code, rows] : summary.still_rejected) {
    // Codes are snake_case: nothing to escape.
    absl::StrAppend(&still, still.empty() ? "" : ",", "\"", code, "\":", rows);
  }
  return absl::StrFormat(
      R"({"rows_examined":%d,"rows_replayed":%d,"events_counted":%d,"quantity_counted":%d,)"
      R"("duplicates":%d,"still_rejected":{%s},"truncated":%d})",
      summary.rows_examined, summary.rows_replayed, summary.events_counted,
      summary.quantity_counted, summary.duplicates, still, summary.truncated);
}

}  // namespace meterd::store
