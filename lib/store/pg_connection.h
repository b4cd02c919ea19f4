#pragma once

#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <pqxx/pqxx>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace meterd::store {

// Bounds on every wait meterd does on Postgres, so an unreachable or black-holed server is a
// failure within seconds (retried like any other), never a stall of minutes or hours.
struct PgTimeouts {
  absl::Duration connect = absl::Seconds(10);  // libpq connect_timeout.
  // Server side, per statement; zero: none. The flush writer also enforces it on the client
  // (see PgFlushWriter), which is what catches a server that stopped answering.
  absl::Duration statement = absl::ZeroDuration();
  absl::Duration lock = absl::ZeroDuration();  // Server side lock_timeout; zero: none.
  // TCP keepalives on both ends (libpq's, and the server's through tcp_keepalives_*): a peer
  // gone silent is noticed after idle + interval x count (25 s by default), and unacknowledged
  // sends give up after tcp_user_timeout. The server end also aborts an abandoned transaction
  // and releases its row locks instead of holding them for the kernel's two hours.
  absl::Duration keepalive_idle = absl::Seconds(10);
  absl::Duration keepalive_interval = absl::Seconds(5);
  int keepalive_count = 3;
  absl::Duration tcp_user_timeout = absl::Seconds(30);
};

// `conninfo` (URL or key=value) with the bounds above added, as a key=value string. Settings
// the caller already gave win: an SRE's connect_timeout in METERD_PG is kept.
std::string BoundedConninfo(const std::string& conninfo, const PgTimeouts& timeouts);

// Opens a connection with `timeouts` applied, converting libpqxx's exception into a Status
// that names the problem.
absl::StatusOr<std::unique_ptr<pqxx::connection>> Connect(const std::string& conninfo,
                                                          const PgTimeouts& timeouts = {});

// Cuts a connection whose call runs past its deadline: shutdown(2) on the socket makes the
// blocked libpq call fail at once (broken_connection, so Unavailable), whatever the network
// does. A server-side statement_timeout cannot do this when the server, or the path to it, no
// longer answers. One watchdog thread per owner; Arm/Disarm from the owner's thread.
class SocketWatchdog {
 public:
  SocketWatchdog();
  ~SocketWatchdog();
  SocketWatchdog(const SocketWatchdog&) = delete;
  SocketWatchdog& operator=(const SocketWatchdog&) = delete;

  // Watches `fd` until Disarm; a non-positive timeout watches nothing.
  void Arm(int fd, absl::Duration timeout);
  // True if the deadline passed and the socket was shut down (the connection is unusable).
  bool Disarm();

 private:
  void Loop();

  std::mutex mu_;
  std::condition_variable wake_;
  int fd_ = -1;            // Guarded by mu_; -1 when disarmed.
  absl::Time deadline_;    // Guarded by mu_.
  bool fired_ = false;     // Guarded by mu_.
  bool stopping_ = false;  // Guarded by mu_.
  std::thread thread_;
};

// Converts an exception thrown by libpqxx into a Status: broken connections are Unavailable
// (retry later), insufficient privilege (42501) PermissionDenied, everything else Internal
// with the server's message.
absl::Status StatusFromException(const std::exception& e);

// Runs `body`, catching libpqxx exceptions at this library boundary.
template <typename F>
absl::Status CatchPq(F&& body) {
  try {
    return body();
  } catch (const std::exception& e) {
    return StatusFromException(e);
  }
}

}  // namespace meterd::store
