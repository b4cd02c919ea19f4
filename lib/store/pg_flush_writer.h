#pragma once

#include <functional>
#include <memory>
#include <string>

#include <pqxx/pqxx>

#include "absl/container/flat_hash_set.h"
#include "lib/store/flush_writer.h"
#include "lib/store/pg_connection.h"

namespace meterd::store {

struct WriterIdentity {
  std::string consumer_group;
  std::string topic;
};

// FlushWriter on one libpq connection, reconnecting after a failure on the next call.
// A flush's distinct keys go by one COPY into the delta log shared.api_usage_deltas (no
// upsert, no foreign key, one index: migrations 0025, 0026), in the transaction that advances the
// offsets; the UsageCompactor folds them into shared.api_usage_meters later. bench/flush_benchmark
// compares it with the former COPY + INSERT … ON CONFLICT per key. `meters` (not owned) names the
// rows and is the registry RefreshMeters grows: the writer is its one writing thread.
class PgFlushWriter final : public FlushWriter {
 public:
  // `timeouts.statement` also bounds each Write and LoadOffsets on the client (the watchdog):
  // past it the connection is cut and the call returns Unavailable, to be retried.
  static absl::StatusOr<std::unique_ptr<PgFlushWriter>> Create(std::string conninfo,
                                                               WriterIdentity identity,
                                                               event::MeterRegistry* meters,
                                                               PgTimeouts timeouts = {});

  absl::StatusOr<FlushOutcome> Write(const std::vector<aggregate::SealedPartition>& batch) override;
  absl::StatusOr<absl::flat_hash_map<int32_t, int64_t>> LoadOffsets() override;
  absl::Status RefreshMeters() override;

 private:
  PgFlushWriter(std::string conninfo, WriterIdentity identity, event::MeterRegistry* meters,
                PgTimeouts timeouts)
      : conninfo_(std::move(conninfo)),
        identity_(std::move(identity)),
        meters_(meters),
        timeouts_(timeouts) {}
  absl::Status EnsureConnected();
  // Runs `body` on the connection under the watchdog; a cut connection is Unavailable.
  absl::Status Guarded(const char* what, const std::function<absl::Status()>& body);

  std::string conninfo_;
  WriterIdentity identity_;
  event::MeterRegistry* meters_;
  const PgTimeouts timeouts_;
  std::unique_ptr<pqxx::connection> conn_;
  SocketWatchdog watchdog_;
  // shared.meters rows already reported as refused (rename, id clash, full): logged once each.
  absl::flat_hash_set<std::string> refused_meters_;
};

// Reads shared.meters into a new registry (at start, before any parser reads it).
absl::StatusOr<event::MeterRegistry> LoadMeters(const std::string& conninfo);

}  // namespace meterd::store
