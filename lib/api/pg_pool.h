#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <pqxx/pqxx>

#include "absl/status/statusor.h"
#include "lib/http/http_server.h"
#include "lib/store/pg_connection.h"

namespace meterd::api {

// A few Postgres connections for the API's reads and subscription calls: opened on demand
// (bounded timeouts), given back after one transaction, at most kMaxIdle kept; a broken one
// is dropped.
class PgPool {
 public:
  PgPool(std::string conninfo, store::PgTimeouts timeouts)
      : conninfo_(std::move(conninfo)), timeouts_(timeouts) {}

  absl::StatusOr<std::unique_ptr<pqxx::connection>> Take() {
    {
      std::lock_guard lock(mu_);
      if (!idle_.empty()) {
        auto conn = std::move(idle_.back());
        idle_.pop_back();
        return conn;
      }
    }
    return store::Connect(conninfo_, timeouts_);
  }

  void Give(std::unique_ptr<pqxx::connection> conn) {
    if (!conn->is_open()) return;
    std::lock_guard lock(mu_);
    if (idle_.size() < kMaxIdle) idle_.push_back(std::move(conn));
  }

 private:
  static constexpr size_t kMaxIdle = 8;
  const std::string conninfo_;
  const store::PgTimeouts timeouts_;
  std::mutex mu_;
  std::vector<std::unique_ptr<pqxx::connection>> idle_;  // Guarded by mu_.
};

// The first column of the first row of `sql`, with `params` as $1, $2, … (nullopt: NULL), as
// text; nullopt when there is no row or it is NULL.
inline std::optional<std::string> QueryText(pqxx::transaction_base& tx, const std::string& sql,
                                            const std::vector<std::optional<std::string>>& params) {
  const pqxx::result rows = tx.exec_params(sql, pqxx::prepare::make_dynamic_params(params));
  if (rows.empty() || rows[0][0].is_null()) return std::nullopt;
  return rows[0][0].as<std::string>();
}

// What a PgCall gives back: the first column of the first row as text (nullopt: no row, or
// NULL), or the response to send instead (a refusal, or a 503 to retry).
struct PgAnswer {
  std::optional<std::string> value;
  std::optional<http::Response> instead;
};

// One transaction on a connection of `pool` running `sql` with `params`: read-only when
// `actor` is empty, else read-write with app.actor = `actor` (the audit rows' actor). A
// pqxx::sql_error that `refuse` maps to a response becomes `instead`; any other failure is a
// 503 with Retry-After, logged as `what` (the first line only: Postgres's DETAIL can name
// data).
PgAnswer PgCall(
    PgPool* pool, std::string_view what, const std::string& actor, const std::string& sql,
    const std::vector<std::optional<std::string>>& params,
    const std::function<std::optional<http::Response>(const pqxx::sql_error&)>& refuse = {});

}  // namespace meterd::api
