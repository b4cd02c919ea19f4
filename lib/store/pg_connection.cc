#include "lib/store/pg_connection.h"

#include <libpq-fe.h>
#include <sys/socket.h>

#include <algorithm>
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
  for (const auto& [key, value] : defaults) given.emplace(key, value);
  // Server-side settings go in `options`, after any the caller gave (theirs come first, ours
  // only add what they did not set).
  std::string options = given.count("options") ? given["options"] : "";
  auto add_setting = [&](const std::string& name, const std::string& value) {
    if (options.find(name) != std::string::npos) return;
    absl::StrAppend(&options, options.empty() ? "" : " ", "-c ", name, "=", value);
  };
  auto millis = [](absl::Duration d) { return absl::StrCat(absl::ToInt64Milliseconds(d)); };
  if (timeouts.statement > absl::ZeroDuration()) {
    add_setting("statement_timeout", millis(timeouts.statement));
  }
  if (timeouts.lock > absl::ZeroDuration()) add_setting("lock_timeout", millis(timeouts.lock));
  add_setting("tcp_keepalives_idle", seconds(timeouts.keepalive_idle));
  add_setting("tcp_keepalives_interval", seconds(timeouts.keepalive_interval));
  add_setting("tcp_keepalives_count", absl::StrCat(timeouts.keepalive_count));
  if (!options.empty()) given["options"] = options;

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

absl::StatusOr<std::unique_ptr<pqxx::connection>> Connect(const std::string& conninfo,
                                                          const PgTimeouts& timeouts) {
  try {
    auto conn = std::make_unique<pqxx::connection>(BoundedConninfo(conninfo, timeouts));
    return conn;
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot connect to Postgres: ", OneLine(e.what())));
  }
}

SocketWatchdog::SocketWatchdog() : thread_([this] { Loop(); }) {}

SocketWatchdog::~SocketWatchdog() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void SocketWatchdog::Arm(int fd, absl::Duration timeout) {
  {
    std::lock_guard lock(mu_);
    fired_ = false;
    if (timeout <= absl::ZeroDuration() || fd < 0) {
      fd_ = -1;
      return;
    }
    fd_ = fd;
    deadline_ = absl::Now() + timeout;
  }
  wake_.notify_all();
}

bool SocketWatchdog::Disarm() {
  std::lock_guard lock(mu_);
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
    // Not closed: the owner still holds the descriptor, so it cannot be reused under us.
    shutdown(fd_, SHUT_RDWR);
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
  if (const auto* sql = dynamic_cast<const pqxx::sql_error*>(&e)) {
    // Class 08 is connection exception; 57P01..03 are admin/crash shutdowns: all transient.
    const std::string& state = sql->sqlstate();
    if (state.rfind("08", 0) == 0 || state.rfind("57P", 0) == 0) {
      return absl::UnavailableError(absl::StrCat("Postgres unavailable: ", what));
    }
    return absl::InternalError(absl::StrCat("Postgres error ", state, ": ", what));
  }
  if (dynamic_cast<const pqxx::transaction_rollback*>(&e) != nullptr) {
    return absl::AbortedError(absl::StrCat("Postgres rolled back: ", what));
  }
  return absl::InternalError(absl::StrCat("Postgres: ", what));
}

}  // namespace meterd::store
