#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "lib/event/usage_event.h"
#include "lib/store/pg_connection.h"

namespace meterd::api {

// What a key may do: a bit set.
enum Scope : uint8_t { kScopeIngest = 1, kScopeRead = 2, kScopeAdmin = 4 };
// Parses "ingest" | "read" | "admin"; InvalidArgument naming the bad value otherwise.
absl::StatusOr<uint8_t> ParseScope(std::string_view name);
// The scopes' names in the order ingest, read, admin, comma separated ("ingest,read").
std::string ScopeNames(uint8_t scopes);

// An authenticated key.
struct ApiKey {
  std::string key_id;
  std::optional<event::OrgId> org;  // nullopt: an admin key, acting for any org.
  uint8_t scopes = 0;

  // The admin scope allows everything.
  bool Allows(uint8_t scope) const;
  // An org key acts only for its org; an admin key for any.
  bool MayActFor(const event::OrgId& org) const;
};

// Creating, revoking and listing keys (migration 0012), as the connecting login: Postgres
// decides who may (meterd_admin or the schema's owner); anyone else gets PermissionDenied.

struct CreatedKey {
  std::string key_id;
  std::string token;  // "mk_<key_id>_<secret>": shown once, stored nowhere.
};
// Generates a key id (6 random bytes, hex), a 32-byte secret and a 16-byte salt, and stores
// SHA-256(salt || secret) through shared.create_api_key. `org` empty: an admin key, whose
// scopes must be exactly kScopeAdmin; otherwise a UUID, with any scopes (admin: everything
// for that org, including its subscription).
absl::StatusOr<CreatedKey> CreateApiKey(const std::string& conninfo, const std::string& org,
                                        uint8_t scopes, const std::string& label);
// True if the key was live and is now revoked; false if unknown or already revoked.
absl::StatusOr<bool> RevokeApiKey(const std::string& conninfo, const std::string& key_id);

struct KeyInfo {
  std::string key_id;
  std::string org;     // "" for an admin key.
  std::string scopes;  // ScopeNames form.
  std::string label;
  std::string created_at;  // UTC, 2024-01-31T12:00:00Z.
  std::string revoked_at;  // "" while live.
};
// Every key (`org_filter` empty) or the keys of one org, oldest first; never salt or hash.
absl::StatusOr<std::vector<KeyInfo>> ListApiKeys(const std::string& conninfo,
                                                 const std::string& org_filter);
// One JSON array of objects (org and revoked_at null when empty, scopes an array), for the CLI.
std::string KeyListJson(const std::vector<KeyInfo>& keys);

// The daemon's view of the keys. Loads the live keys (id, org, scopes, salt, hash) when started
// and again every `refresh` on its own thread, over its own connection with bounded waits; a
// failed refresh keeps the last good set and is logged once per failure streak. A revocation
// thus takes effect on every instance within `refresh` plus one query.
//
// Owned by the daemon. Authenticate, size and last_refresh may be called from any thread: they
// read the current key set under a reader lock and do no I/O. The refresh thread alone touches
// the connection.
class KeyStore {
 public:
  // Fails if the first load fails: FailedPrecondition when the schema lacks shared.api_keys.
  static absl::StatusOr<std::unique_ptr<KeyStore>> Start(
      const std::string& conninfo, absl::Duration refresh = absl::Milliseconds(500));
  // Stops and joins the refresh thread (woken at once; a query in flight is bounded by
  // kQueryTimeout).
  ~KeyStore();
  KeyStore(const KeyStore&) = delete;
  KeyStore& operator=(const KeyStore&) = delete;

  // The key `token` names, if the token is well formed, the key live and its secret right
  // (compared in constant time); nullopt otherwise.
  std::optional<ApiKey> Authenticate(std::string_view token) const;
  size_t size() const;  // Live keys loaded.
  absl::Time last_refresh() const;

  // Bounds one load (connect, query) so that a dead server cannot stall the thread for long.
  static constexpr absl::Duration kQueryTimeout = absl::Seconds(5);

 private:
  struct StoredKey {
    std::optional<event::OrgId> org;
    uint8_t scopes = 0;
    std::array<uint8_t, 16> salt{};
    std::array<uint8_t, 32> hash{};
  };
  // By the key id's 48 bits.
  using KeyMap = absl::flat_hash_map<uint64_t, StoredKey>;

  KeyStore(std::string conninfo, absl::Duration refresh)
      : conninfo_(std::move(conninfo)), refresh_(refresh) {}
  // Loads the keys and swaps them in. Refresh thread only (and Start, before it runs).
  absl::Status Refresh();
  void Loop();

  const std::string conninfo_;
  const absl::Duration refresh_;
  std::unique_ptr<pqxx::connection> conn_;  // Refresh thread only; null until (re)connected.
  store::SocketWatchdog watchdog_;          // Refresh thread only.

  mutable absl::Mutex mu_;
  KeyMap keys_ ABSL_GUARDED_BY(mu_);
  absl::Time last_refresh_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace meterd::api
