#pragma once

#include <memory>
#include <string>

#include <pqxx/pqxx>

#include "lib/store/flush_writer.h"

namespace meterd::store {

struct WriterIdentity {
  std::string consumer_group;
  std::string topic;
};

// FlushWriter on one libpq connection, reconnecting after a failure on the next call.
// Rows go in by COPY into a session temp table (ON COMMIT DELETE ROWS), then one prepared
// INSERT … SELECT … ON CONFLICT: measured 2.2x the rows/s of an unnest(arrays) upsert here
// (bench/flush_benchmark).
class PgFlushWriter final : public FlushWriter {
 public:
  static absl::StatusOr<std::unique_ptr<PgFlushWriter>> Create(std::string conninfo,
                                                               WriterIdentity identity,
                                                               const event::MeterRegistry* meters);

  absl::StatusOr<FlushOutcome> Write(const std::vector<aggregate::SealedPartition>& batch) override;
  absl::StatusOr<absl::flat_hash_map<int32_t, int64_t>> LoadOffsets() override;

 private:
  PgFlushWriter(std::string conninfo, WriterIdentity identity, const event::MeterRegistry* meters)
      : conninfo_(std::move(conninfo)), identity_(std::move(identity)), meters_(meters) {}
  absl::Status EnsureConnected();

  std::string conninfo_;
  WriterIdentity identity_;
  const event::MeterRegistry* meters_;
  std::unique_ptr<pqxx::connection> conn_;
};

// Reads shared.meters into a registry.
absl::StatusOr<event::MeterRegistry> LoadMeters(const std::string& conninfo);

}  // namespace meterd::store
