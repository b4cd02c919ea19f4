#include "lib/store/usage_archive.h"

#include <pqxx/pqxx>

#include "absl/strings/str_cat.h"
#include "lib/common/logging.h"
#include "lib/common/status_macros.h"
#include "lib/store/pg_connection.h"

namespace meterd::store {

absl::StatusOr<std::vector<ArchivedMonth>> ArchiveUsage(const std::string& conninfo, absl::Time now,
                                                        int batch_rows) {
  if (batch_rows < 1) return absl::InvalidArgumentError("--archive-batch-rows must be at least 1");
  ASSIGN_OR_RETURN(auto conn, Connect(conninfo));
  const std::string ref = absl::FormatTime(absl::RFC3339_full, now, absl::UTCTimeZone());
  std::vector<ArchivedMonth> archived;
  const absl::Status status = CatchPq([&]() -> absl::Status {
    std::vector<std::string> months;
    {
      pqxx::read_transaction tx(*conn);
      for (const auto& row :
           tx.exec_params("SELECT shared.usage_months_to_archive($1::timestamptz)::text", ref)) {
        months.push_back(row[0].as<std::string>());
      }
    }
    for (const std::string& month : months) {
      {
        // The month's table is created and committed before any row moves into it.
        pqxx::work tx(*conn);
        tx.exec_params("SELECT shared.create_usage_month_table($1::date, $2::timestamptz)", month,
                       ref);
        tx.commit();
      }
      ArchivedMonth& done = archived.emplace_back();
      done.month = month;
      for (;;) {
        pqxx::work tx(*conn);
        const int64_t moved =
            tx.exec_params1("SELECT shared.archive_usage_month($1::date, $2, $3::timestamptz)",
                            month, batch_rows, ref)[0]
                .as<int64_t>();
        tx.commit();
        done.rows += moved;
        if (moved == 0) break;
      }
      LOG_INFO("archive-usage: {} rows of {} moved to shared.api_usage_meters_{}", done.rows, month,
               month.substr(0, 4) + "_" + month.substr(5, 2));
    }
    return absl::OkStatus();
  });
  if (!status.ok()) {
    // Committed batches stay moved (readers' totals are unchanged either way); say how far it got.
    return absl::Status(status.code(),
                        absl::StrCat(status.message(), " (moved before the failure, committed: ",
                                     ArchiveSummaryJson(archived), ")"));
  }
  return archived;
}

std::string ArchiveSummaryJson(const std::vector<ArchivedMonth>& months) {
  std::string out = "{\"months\":[";
  int64_t total = 0;
  for (size_t i = 0; i < months.size(); ++i) {
    absl::StrAppend(&out, i ? "," : "", "{\"month\":\"", months[i].month,
                    "\",\"rows\":", months[i].rows, "}");
    total += months[i].rows;
  }
  absl::StrAppend(&out, "],\"rows\":", total, "}");
  return out;
}

}  // namespace meterd::store
