#include "lib/api/pg_pool.h"

#include "lib/api/api.h"
#include "lib/common/logging.h"

namespace meterd::api {

PgAnswer PgCall(
    PgPool* pool, std::string_view what, const std::string& actor, const std::string& sql,
    const std::vector<std::optional<std::string>>& params,
    const std::function<std::optional<http::Response>(const pqxx::sql_error&)>& refuse) {
  PgAnswer answer;
  absl::StatusOr<std::unique_ptr<pqxx::connection>> conn = pool->Take();
  if (!conn.ok()) {
    LOG_WARN("http: {} failed, Postgres unreachable: {}", what, conn.status().message());
    answer.instead = RetryLater("unavailable", "the database is not reachable");
    return answer;
  }
  const absl::Status status = store::CatchPq([&]() -> absl::Status {
    try {
      if (actor.empty()) {
        pqxx::read_transaction tx(**conn);
        answer.value = QueryText(tx, sql, params);
      } else {
        pqxx::work tx(**conn);
        tx.exec_params("SELECT set_config('app.actor', $1, true)", actor);
        answer.value = QueryText(tx, sql, params);
        tx.commit();
      }
    } catch (const pqxx::sql_error& e) {
      if (refuse) answer.instead = refuse(e);
      if (!answer.instead) throw;
    }
    return absl::OkStatus();
  });
  pool->Give(std::move(*conn));
  if (!status.ok()) {
    const absl::string_view message = status.message();
    LOG_WARN("http: {} failed: {}", what, message.substr(0, message.find('\n')));
    answer.value.reset();
    answer.instead = RetryLater("unavailable", "the database could not answer; retry shortly");
  }
  return answer;
}

}  // namespace meterd::api
