#include "lib/store/pg_connection.h"

#include <fcntl.h>
#include <libpq-fe.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"

namespace meterd::store {
namespace {

// libpq's messages span lines ("...refused\n\tIs the server running..."): one line for logs.
std::string OneLine(const char* what) {
  return absl::StrReplaceAll(absl::StripAsciiWhitespace(what), {{"\n\t", " "}, {"\n", " "}});
}

}  // namespace

std::string BoundedConninfo(const std::string& conninfo, const PgTimeouts& timeouts) {
  char* error = nullptr;
  PQconninfoOption* parsed = PQconninfoParse(conninfo.c_str(), &error);
  if (parsed == nullptr) {
    // Let the connect attempt report the problem in libpq's words.
    PQfreemem(error);
    return conninfo;
  }
  std::map<std::string, std::string> given;
  for (PQconninfoOption* o = parsed; o->keyword != nullptr; ++o) {
    if (o->val != nullptr) given[o->keyword] = o->val;
  }
  PQconninfoFree(parsed);
  // What the environment sets (PGCONNECT_TIMEOUT, PGSERVICE, …) wins over our defaults too.
  std::map<std::string, bool> from_environment;
  if (PQconninfoOption* defaults = PQconndefaults()) {
    for (PQconninfoOption* o = defaults; o->keyword != nullptr; ++o) {
      if (o->envvar != nullptr && std::getenv(o->envvar) != nullptr) {
        from_environment[o->keyword] = true;
      }
    }
    PQconninfoFree(defaults);
  }
  if (given.count("service") || from_environment.count("service")) {
    // A service file may set any of these; libpq applies it after the string, and we cannot
    // tell which it sets, so it is left as the SRE wrote it.
    return conninfo;
  }
  auto seconds = [](absl::Duration d) {
    return absl::StrCat(std::max<int64_t>(1, absl::ToInt64Seconds(d)));
  };
  const std::map<std::string, std::string> defaults = {
      {"connect_timeout", seconds(timeouts.connect)},
      {"keepalives", "1"},
      {"keepalives_idle", seconds(timeouts.keepalive_idle)},
      {"keepalives_interval", seconds(timeouts.keepalive_interval)},
      {"keepalives_count", absl::StrCat(timeouts.keepalive_count)},
      {"tcp_user_timeout", absl::StrCat(absl::ToInt64Milliseconds(timeouts.tcp_user_timeout))},
  };
  for (const auto& [key, value] : defaults) {
    if (!from_environment.count(key)) given.emplace(key, value);
  }
  std::string out;
  for (const auto& [key, value] : given) {
    std::string quoted;
    for (char c : value) {
      if (c == '\\' || c == '\'') quoted += '\\';
      quoted += c;
    }
    absl::StrAppend(&out, out.empty() ? "" : " ", key, "='", quoted, "'");
  }
  return out;
}

namespace {

// Server-side bounds for this session, set after connecting so the caller's `options` (in the
// string, PGOPTIONS or a service file) stay untouched; a setting the client already chose
// (pg_settings.source = 'client') is kept.
void ApplySessionBounds(pqxx::connection& conn, const PgTimeouts& timeouts) {
  auto millis = [](absl::Duration d) { return absl::StrCat(absl::ToInt64Milliseconds(d)); };
  std::string values = absl::StrCat(
      "('tcp_keepalives_idle', '", absl::ToInt64Seconds(timeouts.keepalive_idle), "'), ",
      "('tcp_keepalives_interval', '", absl::ToInt64Seconds(timeouts.keepalive_interval), "'), ",
      "('tcp_keepalives_count', '", timeouts.keepalive_count, "')");
  if (timeouts.statement > absl::ZeroDuration()) {
    absl::StrAppend(&values, ", ('statement_timeout', '", millis(timeouts.statement), "')");
  }
  if (timeouts.lock > absl::ZeroDuration()) {
    absl::StrAppend(&values, ", ('lock_timeout', '", millis(timeouts.lock), "')");
  }
  pqxx::nontransaction tx(conn);
  tx.exec(absl::StrCat("SELECT set_config(v.name, v.value, false) FROM (VALUES ", values,
                       ") AS v (name, value) JOIN pg_settings s ON s.name = v.name "
                       "WHERE s.source <> 'client'"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<pqxx::connection>> Connect(const std::string& conninfo,
                                                          const PgTimeouts& timeouts) {
  std::unique_ptr<pqxx::connection> conn;
  try {
    conn = std::make_unique<pqxx::connection>(BoundedConninfo(conninfo, timeouts));
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot connect to Postgres: ", OneLine(e.what())));
  }
  absl::Status status = CatchPq([&]() -> absl::Status {
    ApplySessionBounds(*conn, timeouts);
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return conn;
}

SocketWatchdog::SocketWatchdog() : thread_([this] { Loop(); }) {}

SocketWatchdog::~SocketWatchdog() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }
  wake_.notify_all();
  thread_.join();
}

void SocketWatchdog::Arm(int fd, absl::Duration timeout) {
  {
    std::lock_guard lock(mu_);
    fired_ = false;
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
    if (timeout <= absl::ZeroDuration() || fd < 0) return;
    // Our own descriptor of the socket: libpq may close its own (on EOF) before Disarm, and
    // the number could then be reused by another connection we must not cut.
    fd_ = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    deadline_ = absl::Now() + timeout;
  }
  wake_.notify_all();
}

bool SocketWatchdog::Disarm() {
  std::lock_guard lock(mu_);
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
  return fired_;
}

void SocketWatchdog::Loop() {
  std::unique_lock lock(mu_);
  while (!stopping_) {
    if (fd_ < 0) {
      wake_.wait(lock);
      continue;
    }
    const absl::Time deadline = deadline_;
    if (absl::Now() < deadline) {
      wake_.wait_for(lock, absl::ToChronoNanoseconds(deadline - absl::Now()));
      continue;  // Re-check: disarmed, re-armed or stopping meanwhile.
    }
    // shutdown(2) acts on the socket, so it reaches libpq's descriptor through our duplicate.
    shutdown(fd_, SHUT_RDWR);
    close(fd_);
    fired_ = true;
    fd_ = -1;
  }
}

absl::Status StatusFromException(const std::exception& e) {
  const std::string what = OneLine(e.what());
  if (dynamic_cast<const pqxx::broken_connection*>(&e) != nullptr ||
      dynamic_cast<const pqxx::in_doubt_error*>(&e) != nullptr) {
    return absl::UnavailableError(absl::StrCat("Postgres connection lost: ", what));
  }
  // libpqxx 6.4 throws this one without its SQLSTATE: recognised by type.
  if (dynamic_cast<const pqxx::insufficient_privilege*>(&e) != nullptr) {
    return absl::PermissionDeniedError(absl::StrCat("Postgres refused: ", what));
  }
  if (const auto* sql = dynamic_cast<const pqxx::sql_error*>(&e)) {
    // Class 08 is connection exception; 57P01..03 are admin/crash shutdowns: all transient.
    const std::string& state = sql->sqlstate();
    if (state.rfind("08", 0) == 0 || state.rfind("57P", 0) == 0) {
      return absl::UnavailableError(absl::StrCat("Postgres unavailable: ", what));
    }
    // A lock wait that hit lock_timeout: the holder will finish; try again later.
    if (state == "55P03") {
      return absl::UnavailableError(absl::StrCat("Postgres lock wait timed out: ", what));
    }
    if (state == "42501") {
      return absl::PermissionDeniedError(absl::StrCat("Postgres refused: ", what));
    }
    return absl::InternalError(absl::StrCat("Postgres error ", state, ": ", what));
  }
  if (dynamic_cast<const pqxx::transaction_rollback*>(&e) != nullptr) {
    return absl::AbortedError(absl::StrCat("Postgres rolled back: ", what));
  }
  return absl::InternalError(absl::StrCat("Postgres: ", what));
}

}  // namespace meterd::store
