#include "lib/api/api_keys.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include <cstring>

#include <pqxx/pqxx>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "lib/common/json.h"
#include "lib/common/logging.h"
#include "lib/common/status_macros.h"
#include "lib/common/string_views.h"

namespace meterd::api {
namespace {

constexpr uint8_t kAllScopes = kScopeIngest | kScopeRead | kScopeAdmin;
constexpr std::pair<uint8_t, std::string_view> kScopeNames[] = {
    {kScopeIngest, "ingest"}, {kScopeRead, "read"}, {kScopeAdmin, "admin"}};

// A token is "mk_" + key id (12 lowercase hex) + "_" + the secret, base64url without padding.
constexpr char kTokenPrefix[] = "mk_";
constexpr size_t kTokenPrefixChars = sizeof(kTokenPrefix) - 1;
constexpr size_t kKeyIdBytes = 6;
constexpr size_t kKeyIdChars = 2 * kKeyIdBytes;
constexpr size_t kSecretBytes = 32;
constexpr size_t kSecretChars = 43;  // ceil(32 * 8 / 6)
constexpr size_t kTokenChars = kTokenPrefixChars + kKeyIdChars + 1 + kSecretChars;
constexpr size_t kSaltBytes = 16;
constexpr size_t kMaxLabelBytes = 200;  // The table's CHECK counts characters: never fewer.

using Secret = std::array<uint8_t, kSecretBytes>;
using Hash = std::array<uint8_t, SHA256_DIGEST_LENGTH>;

// The key id's 48 bits, if `text` is 12 lowercase hex characters.
std::optional<uint64_t> ParseKeyId(std::string_view text) {
  if (text.size() != kKeyIdChars) return std::nullopt;
  uint64_t id = 0;
  for (char c : text) {
    int digit;
    if (c >= '0' && c <= '9') {
      digit = c - '0';
    } else if (c >= 'a' && c <= 'f') {
      digit = c - 'a' + 10;
    } else {
      return std::nullopt;
    }
    id = id << 4 | static_cast<uint64_t>(digit);
  }
  return id;
}

int Base64UrlDigit(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '-') return 62;
  if (c == '_') return 63;
  return -1;
}

// Strict: exactly 43 base64url characters whose 2 trailing bits are zero, so each secret has
// exactly one spelling.
bool DecodeSecret(std::string_view text, Secret* secret) {
  if (text.size() != kSecretChars) return false;
  uint32_t bits = 0;
  int pending = 0;
  size_t written = 0;
  for (char c : text) {
    const int digit = Base64UrlDigit(c);
    if (digit < 0) return false;
    bits = bits << 6 | static_cast<uint32_t>(digit);
    pending += 6;
    if (pending >= 8) {
      pending -= 8;
      (*secret)[written++] = static_cast<uint8_t>(bits >> pending);
    }
    bits &= (1u << pending) - 1;
  }
  return written == kSecretBytes && bits == 0;
}

Hash SaltedHash(const std::array<uint8_t, kSaltBytes>& salt, const Secret& secret) {
  uint8_t input[kSaltBytes + kSecretBytes];
  std::memcpy(input, salt.data(), salt.size());
  std::memcpy(input + salt.size(), secret.data(), secret.size());
  Hash hash;
  SHA256(input, sizeof(input), hash.data());
  OPENSSL_cleanse(input, sizeof(input));
  return hash;
}

absl::Status RandomBytes(uint8_t* out, size_t size) {
  if (RAND_bytes(out, static_cast<int>(size)) != 1) {
    return absl::InternalError("OpenSSL RAND_bytes failed: no secure randomness available");
  }
  return absl::OkStatus();
}

absl::string_view AsChars(const uint8_t* data, size_t size) {
  return absl::string_view(reinterpret_cast<const char*>(data), size);
}

// store::CatchPq, but also PermissionDenied for libpqxx 6.4's insufficient_privilege: that
// exception is thrown without its SQLSTATE, so StatusFromException cannot see 42501 on it.
template <typename F>
absl::Status CatchPqRefusals(F&& body) {
  return store::CatchPq([&]() -> absl::Status {
    try {
      return body();
    } catch (const pqxx::insufficient_privilege& e) {
      return absl::PermissionDeniedError(
          absl::StrCat("Postgres refused: ", absl::StripAsciiWhitespace(e.what())));
    }
  });
}

// FailedPrecondition unless `function` (a signature for to_regprocedure) exists.
absl::Status RequireFunction(pqxx::transaction_base& tx, const char* function) {
  if (tx.exec_params1("SELECT to_regprocedure($1) IS NULL", function)[0].as<bool>()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the database has no ", function, " (migration 0012); run `meterd migrate`"));
  }
  return absl::OkStatus();
}

void AppendJsonStringOrNull(std::string* out, std::string_view text) {
  if (text.empty()) {
    *out += "null";
  } else {
    AppendJsonString(out, text);
  }
}

constexpr char kLoadKeys[] = R"sql(
  SELECT key_id, coalesce(org_id::text, ''), array_to_string(scopes, ','), salt, secret_hash
  FROM shared.api_keys
  WHERE revoked_at IS NULL)sql";

constexpr char kListKeys[] = R"sql(
  SELECT key_id, coalesce(org_id::text, ''), array_to_string(scopes, ','), label,
         to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
         coalesce(to_char(revoked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), '')
  FROM shared.api_key_list
  WHERE $1::text = '' OR org_id = nullif($1::text, '')::uuid
  ORDER BY created_at, key_id)sql";

// The scopes of a comma-separated list as stored; unknown names (a newer schema) are ignored.
uint8_t ScopesFromNames(std::string_view names) {
  uint8_t scopes = 0;
  for (absl::string_view name : absl::StrSplit(AbslView(names), ',', absl::SkipEmpty())) {
    auto scope = ParseScope(StdView(name));
    if (scope.ok()) scopes |= *scope;
  }
  return scopes;
}

}  // namespace

absl::StatusOr<uint8_t> ParseScope(std::string_view name) {
  for (const auto& [scope, scope_name] : kScopeNames) {
    if (name == scope_name) return scope;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown scope '", AbslView(name), "'; one of: ingest, read, admin"));
}

std::string ScopeNames(uint8_t scopes) {
  std::string names;
  for (const auto& [scope, name] : kScopeNames) {
    if ((scopes & scope) == 0) continue;
    if (!names.empty()) names += ',';
    names.append(name);
  }
  return names;
}

bool ApiKey::Allows(uint8_t scope) const {
  return (scopes & kScopeAdmin) != 0 || (scopes & scope) == scope;
}

bool ApiKey::MayActFor(const event::OrgId& for_org) const { return !org || *org == for_org; }

absl::StatusOr<CreatedKey> CreateApiKey(const std::string& conninfo, const std::string& org,
                                        uint8_t scopes, const std::string& label) {
  if (scopes == 0 || (scopes & ~kAllScopes) != 0) {
    return absl::InvalidArgumentError("scopes must be a non-empty set of ingest, read, admin");
  }
  if (org.empty()) {
    if (scopes != kScopeAdmin) {
      return absl::InvalidArgumentError(
          absl::StrCat("a key without an org is an admin key and has exactly the admin scope, "
                       "not '",
                       ScopeNames(scopes), "'"));
    }
  } else {
    if (!event::ParseOrgId(org)) {
      return absl::InvalidArgumentError(
          absl::StrCat("org must be an organization id (UUID), got '", org, "'"));
    }
  }
  if (label.size() > kMaxLabelBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("label must be at most ", kMaxLabelBytes, " bytes"));
  }

  uint8_t key_id_bytes[kKeyIdBytes];
  std::array<uint8_t, kSaltBytes> salt;
  Secret secret;
  RETURN_IF_ERROR(RandomBytes(key_id_bytes, sizeof(key_id_bytes)));
  RETURN_IF_ERROR(RandomBytes(salt.data(), salt.size()));
  RETURN_IF_ERROR(RandomBytes(secret.data(), secret.size()));
  const Hash hash = SaltedHash(salt, secret);
  CreatedKey created;
  created.key_id = absl::BytesToHexString(AsChars(key_id_bytes, sizeof(key_id_bytes)));
  created.token = absl::StrCat(kTokenPrefix, created.key_id, "_",
                               absl::WebSafeBase64Escape(AsChars(secret.data(), secret.size())));
  OPENSSL_cleanse(secret.data(), secret.size());

  ASSIGN_OR_RETURN(auto conn, store::Connect(conninfo));
  RETURN_IF_ERROR(CatchPqRefusals([&]() -> absl::Status {
    pqxx::work tx(*conn);
    RETURN_IF_ERROR(
        RequireFunction(tx, "shared.create_api_key(text, uuid, text[], text, bytea, bytea)"));
    tx.exec_params(
        "SELECT shared.create_api_key($1, nullif($2, '')::uuid, $3::text[], $4, "
        "decode($5, 'hex'), decode($6, 'hex'))",
        created.key_id, org, absl::StrCat("{", ScopeNames(scopes), "}"), label,
        absl::BytesToHexString(AsChars(salt.data(), salt.size())),
        absl::BytesToHexString(AsChars(hash.data(), hash.size())));
    tx.commit();
    return absl::OkStatus();
  }));
  return created;
}

absl::StatusOr<bool> RevokeApiKey(const std::string& conninfo, const std::string& key_id) {
  if (!ParseKeyId(key_id)) {
    return absl::InvalidArgumentError(
        absl::StrCat("a key id is 12 lowercase hex characters, got '", key_id, "'"));
  }
  ASSIGN_OR_RETURN(auto conn, store::Connect(conninfo));
  bool revoked = false;
  RETURN_IF_ERROR(CatchPqRefusals([&]() -> absl::Status {
    pqxx::work tx(*conn);
    RETURN_IF_ERROR(RequireFunction(tx, "shared.revoke_api_key(text)"));
    revoked = tx.exec_params1("SELECT shared.revoke_api_key($1)", key_id)[0].as<bool>();
    tx.commit();
    return absl::OkStatus();
  }));
  return revoked;
}

absl::StatusOr<std::vector<KeyInfo>> ListApiKeys(const std::string& conninfo,
                                                 const std::string& org_filter) {
  if (!org_filter.empty() && !event::ParseOrgId(org_filter)) {
    return absl::InvalidArgumentError(
        absl::StrCat("org must be an organization id (UUID), got '", org_filter, "'"));
  }
  ASSIGN_OR_RETURN(auto conn, store::Connect(conninfo));
  std::vector<KeyInfo> keys;
  RETURN_IF_ERROR(CatchPqRefusals([&]() -> absl::Status {
    pqxx::read_transaction tx(*conn);
    if (tx.exec1("SELECT to_regclass('shared.api_key_list') IS NULL")[0].as<bool>()) {
      return absl::FailedPreconditionError(
          "the database has no shared.api_key_list (migration 0012); run `meterd migrate`");
    }
    for (const pqxx::row& row : tx.exec_params(kListKeys, org_filter)) {
      keys.push_back(KeyInfo{row[0].as<std::string>(), row[1].as<std::string>(),
                             row[2].as<std::string>(), row[3].as<std::string>(),
                             row[4].as<std::string>(), row[5].as<std::string>()});
    }
    return absl::OkStatus();
  }));
  return keys;
}

std::string KeyListJson(const std::vector<KeyInfo>& keys) {
  std::string out = "[";
  for (const KeyInfo& key : keys) {
    out += out.size() == 1 ? "\n  " : ",\n  ";
    out += "{\"key_id\": ";
    AppendJsonString(&out, key.key_id);
    out += ", \"org\": ";
    AppendJsonStringOrNull(&out, key.org);
    out += ", \"scopes\": [";
    bool first = true;
    for (absl::string_view scope : absl::StrSplit(key.scopes, ',', absl::SkipEmpty())) {
      if (!first) out += ", ";
      first = false;
      AppendJsonString(&out, StdView(scope));
    }
    out += "], \"label\": ";
    AppendJsonString(&out, key.label);
    out += ", \"created_at\": ";
    AppendJsonString(&out, key.created_at);
    out += ", \"revoked_at\": ";
    AppendJsonStringOrNull(&out, key.revoked_at);
    out += "}";
  }
  out += keys.empty() ? "]" : "\n]";
  return out;
}

absl::StatusOr<std::unique_ptr<KeyStore>> KeyStore::Start(const std::string& conninfo,
                                                          absl::Duration refresh) {
  if (refresh <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("the API key refresh interval must be positive");
  }
  std::unique_ptr<KeyStore> store(new KeyStore(conninfo, refresh));
  RETURN_IF_ERROR(store->Refresh());
  store->thread_ = std::thread([raw = store.get()] { raw->Loop(); });
  return store;
}

KeyStore::~KeyStore() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

absl::Status KeyStore::Refresh() {
  if (conn_ == nullptr) {
    store::PgTimeouts timeouts;
    timeouts.connect = kQueryTimeout;
    timeouts.statement = kQueryTimeout;
    timeouts.lock = kQueryTimeout;
    ASSIGN_OR_RETURN(auto conn, store::Connect(conninfo_, timeouts));
    RETURN_IF_ERROR(CatchPqRefusals([&]() -> absl::Status {
      pqxx::nontransaction tx(*conn);
      if (tx.exec1("SELECT to_regclass('shared.api_keys') IS NULL")[0].as<bool>()) {
        return absl::FailedPreconditionError(
            "the database has no shared.api_keys (migration 0012); run `meterd migrate`");
      }
      return absl::OkStatus();
    }));
    conn_ = std::move(conn);
  }

  KeyMap loaded;
  watchdog_.Arm(conn_->sock(), kQueryTimeout);
  absl::Status status = CatchPqRefusals([&]() -> absl::Status {
    pqxx::nontransaction tx(*conn_);
    for (const pqxx::row& row : tx.exec(kLoadKeys)) {
      const std::optional<uint64_t> id = ParseKeyId(row[0].as<std::string>());
      const std::string org_text = row[1].as<std::string>();
      const std::optional<event::OrgId> org =
          org_text.empty() ? std::nullopt : event::ParseOrgId(org_text);
      const pqxx::binarystring salt(row[3]);
      const pqxx::binarystring hash(row[4]);
      // The table's CHECKs rule these out; a key that breaks them could never authenticate.
      if (!id || (!org_text.empty() && !org) || salt.size() != kSaltBytes ||
          hash.size() != SHA256_DIGEST_LENGTH) {
        continue;
      }
      StoredKey& key = loaded[*id];
      key.org = org;
      key.scopes = ScopesFromNames(row[2].as<std::string>());
      std::memcpy(key.salt.data(), salt.data(), kSaltBytes);
      std::memcpy(key.hash.data(), hash.data(), SHA256_DIGEST_LENGTH);
    }
    return absl::OkStatus();
  });
  if (watchdog_.Disarm()) {
    status = absl::UnavailableError(absl::StrCat("loading the API keys did not finish within ",
                                                 absl::FormatDuration(kQueryTimeout),
                                                 "; connection abandoned"));
  }
  if (!status.ok()) {
    conn_.reset();  // Reconnect on the next refresh.
    return status;
  }
  {
    absl::MutexLock lock(&mu_);
    keys_.swap(loaded);
    last_refresh_ = absl::Now();
  }
  return absl::OkStatus();  // `loaded`, now the old set, is freed outside the lock.
}

void KeyStore::Loop() {
  bool failing = false;
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (mu_.AwaitWithTimeout(absl::Condition(&stopping_), refresh_)) return;
    }
    const absl::Status status = Refresh();
    if (!status.ok() && !failing) {
      LOG_WARN("API keys: refresh failed, keeping the {} keys loaded at {} until it works: {}",
               size(), absl::FormatTime(last_refresh()), status.ToString());
    } else if (status.ok() && failing) {
      LOG_INFO("API keys: refresh works again, {} live keys", size());
    }
    failing = !status.ok();
  }
}

std::optional<ApiKey> KeyStore::Authenticate(std::string_view token) const {
  if (token.size() != kTokenChars || token.substr(0, kTokenPrefixChars) != kTokenPrefix ||
      token[kTokenPrefixChars + kKeyIdChars] != '_') {
    return std::nullopt;
  }
  const std::string_view key_id = token.substr(kTokenPrefixChars, kKeyIdChars);
  const std::optional<uint64_t> id = ParseKeyId(key_id);
  Secret secret;
  if (!id || !DecodeSecret(token.substr(kTokenChars - kSecretChars), &secret)) {
    return std::nullopt;
  }
  StoredKey key;
  {
    absl::ReaderMutexLock lock(&mu_);
    auto it = keys_.find(*id);
    if (it == keys_.end()) return std::nullopt;
    key = it->second;
  }
  const Hash hash = SaltedHash(key.salt, secret);
  OPENSSL_cleanse(secret.data(), secret.size());
  if (CRYPTO_memcmp(hash.data(), key.hash.data(), hash.size()) != 0) return std::nullopt;
  return ApiKey{std::string(key_id), key.org, key.scopes};
}

size_t KeyStore::size() const {
  absl::ReaderMutexLock lock(&mu_);
  return keys_.size();
}

absl::Time KeyStore::last_refresh() const {
  absl::ReaderMutexLock lock(&mu_);
  return last_refresh_;
}

}  // namespace meterd::api
