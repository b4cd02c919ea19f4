// API keys (migration 0012, lib/api/api_keys.h) against a real Postgres: created keys
// authenticate to their org and scopes, only salt and hash are stored, revocation reaches a
// running KeyStore within its refresh, every change is audited without secrets, and only the
// back office may create, revoke or list keys.
#include "lib/api/api_keys.h"

#include <atomic>
#include <cctype>
#include <thread>

#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/support/harness.h"

namespace meterd::api {
namespace {

constexpr char kOrgA[] = "00000000-0000-4000-8000-00000000000a";
constexpr char kOrgB[] = "00000000-0000-4000-8000-00000000000b";

event::OrgId Org(const char* text) { return *event::ParseOrgId(text); }

// The secret part of a token: what follows "mk_<12 hex>_" (it may itself hold '_').
std::string SecretOf(const std::string& token) { return token.substr(16); }

// `token` with the character at `index` replaced by another base64url digit that keeps the
// token well formed.
std::string WithCharacter(std::string token, size_t index, char c) {
  token[index] = c;
  return token;
}

TEST(ScopeTest, ParsesAndNamesScopes) {
  EXPECT_EQ(*ParseScope("ingest"), kScopeIngest);
  EXPECT_EQ(*ParseScope("read"), kScopeRead);
  EXPECT_EQ(*ParseScope("admin"), kScopeAdmin);
  for (const char* bad : {"", "Ingest", "write", "read,ingest", " read"}) {
    const absl::StatusOr<uint8_t> scope = ParseScope(bad);
    ASSERT_FALSE(scope.ok()) << bad;
    EXPECT_EQ(scope.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(scope.status().message(), absl::StrCat("'", bad, "'")))
        << scope.status();
  }
  EXPECT_EQ(ScopeNames(kScopeRead | kScopeIngest), "ingest,read");
  EXPECT_EQ(ScopeNames(kScopeAdmin | kScopeRead), "read,admin");
  EXPECT_EQ(ScopeNames(kScopeIngest | kScopeRead | kScopeAdmin), "ingest,read,admin");
  EXPECT_EQ(ScopeNames(0), "");
}

TEST(ScopeTest, AllowsAndMayActFor) {
  const ApiKey ingest{"0123456789ab", Org(kOrgA), kScopeIngest};
  EXPECT_TRUE(ingest.Allows(kScopeIngest));
  EXPECT_FALSE(ingest.Allows(kScopeRead));
  EXPECT_FALSE(ingest.Allows(kScopeAdmin));
  EXPECT_FALSE(ingest.Allows(kScopeIngest | kScopeRead));
  EXPECT_TRUE(ingest.MayActFor(Org(kOrgA)));
  EXPECT_FALSE(ingest.MayActFor(Org(kOrgB)));

  const ApiKey both{"0123456789ab", Org(kOrgB), kScopeIngest | kScopeRead};
  EXPECT_TRUE(both.Allows(kScopeIngest | kScopeRead));
  EXPECT_FALSE(both.Allows(kScopeAdmin));

  const ApiKey admin{"0123456789ab", std::nullopt, kScopeAdmin};
  EXPECT_TRUE(admin.Allows(kScopeIngest));
  EXPECT_TRUE(admin.Allows(kScopeRead));
  EXPECT_TRUE(admin.Allows(kScopeAdmin));
  EXPECT_TRUE(admin.MayActFor(Org(kOrgA)));
  EXPECT_TRUE(admin.MayActFor(Org(kOrgB)));
}

class ApiKeysTest : public ::testing::Test {
 protected:
  void SetUp() override {
    url_ = testing::SharedPostgres().CreateMigratedDatabase(
        std::string("ak_") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
  }

  void Exec(const std::string& sql) {
    pqxx::connection conn(url_);
    pqxx::work tx(conn);
    tx.exec(sql);
    tx.commit();
  }
  int64_t Query(const std::string& sql) { return testing::QueryInt(url_, sql); }
  // A URL that logs in as `role` (the test server trusts local logins).
  std::string UrlAs(const std::string& role) {
    return absl::StrCat("postgresql://", role, url_.substr(url_.find('@')));
  }
  // Login roles are cluster-wide: created once per server, whichever test comes first.
  void CreateLogins() {
    Exec(
        "DO $$ BEGIN "
        "IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ak_tenant') THEN "
        "  CREATE ROLE ak_tenant LOGIN IN ROLE meterd_org; END IF; "
        "IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ak_daemon') THEN "
        "  CREATE ROLE ak_daemon LOGIN IN ROLE meterd; END IF; "
        "IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ak_backoffice') THEN "
        "  CREATE ROLE ak_backoffice LOGIN IN ROLE meterd_admin; END IF; "
        "IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ak_nobody') THEN "
        "  CREATE ROLE ak_nobody LOGIN; END IF; END $$");
    Exec(absl::StrCat("INSERT INTO shared.organizations VALUES ('", kOrgA, "', 'A', 'hs')"));
    Exec(absl::StrCat("INSERT INTO shared.org_logins VALUES ('ak_tenant', '", kOrgA, "')"));
  }
  std::unique_ptr<KeyStore> StartStore(const std::string& url) {
    absl::StatusOr<std::unique_ptr<KeyStore>> store = KeyStore::Start(url);
    EXPECT_TRUE(store.ok()) << store.status();
    return store.ok() ? std::move(store).value() : nullptr;
  }

  std::string url_;
};

TEST_F(ApiKeysTest, CreatedKeysAuthenticateToTheirOrgAndScopes) {
  const absl::StatusOr<CreatedKey> org_key =
      CreateApiKey(url_, kOrgA, kScopeIngest | kScopeRead, "ingest from the POS");
  ASSERT_TRUE(org_key.ok()) << org_key.status();
  const absl::StatusOr<CreatedKey> admin_key = CreateApiKey(url_, "", kScopeAdmin, "ops");
  ASSERT_TRUE(admin_key.ok()) << admin_key.status();
  // "mk_" + 12 hex + "_" + 43 base64url characters.
  for (const CreatedKey* key : {&*org_key, &*admin_key}) {
    EXPECT_EQ(key->key_id.size(), 12u);
    EXPECT_EQ(key->key_id.find_first_not_of("0123456789abcdef"), std::string::npos);
    EXPECT_EQ(key->token.size(), 59u);
    EXPECT_EQ(key->token.substr(0, 16), absl::StrCat("mk_", key->key_id, "_"));
    EXPECT_EQ(
        SecretOf(key->token)
            .find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"),
        std::string::npos);
  }
  EXPECT_NE(org_key->key_id, admin_key->key_id);

  std::unique_ptr<KeyStore> store = StartStore(url_);
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->size(), 2u);
  const std::optional<ApiKey> as_org = store->Authenticate(org_key->token);
  ASSERT_TRUE(as_org.has_value());
  EXPECT_EQ(as_org->key_id, org_key->key_id);
  EXPECT_EQ(as_org->org, Org(kOrgA));
  EXPECT_EQ(as_org->scopes, kScopeIngest | kScopeRead);
  const std::optional<ApiKey> as_admin = store->Authenticate(admin_key->token);
  ASSERT_TRUE(as_admin.has_value());
  EXPECT_EQ(as_admin->key_id, admin_key->key_id);
  EXPECT_EQ(as_admin->org, std::nullopt);
  EXPECT_EQ(as_admin->scopes, kScopeAdmin);

  const std::string& token = org_key->token;
  // A wrong secret: one character of it changed (to another well-formed token).
  const size_t secret_at = token.size() - 43;
  EXPECT_FALSE(
      store->Authenticate(WithCharacter(token, secret_at, token[secret_at] == 'A' ? 'B' : 'A')));
  // The other key's secret under this key's id.
  EXPECT_FALSE(
      store->Authenticate(absl::StrCat("mk_", org_key->key_id, "_", SecretOf(admin_key->token))));
  // An unknown id with a right secret.
  const std::string other_id = org_key->key_id == "000000000000" ? "000000000001" : "000000000000";
  EXPECT_FALSE(store->Authenticate(absl::StrCat("mk_", other_id, "_", SecretOf(token))));
  // Malformed tokens.
  std::string upper_id = token;
  for (size_t i = 3; i < 15; ++i) upper_id[i] = static_cast<char>(std::toupper(upper_id[i]));
  for (const std::string& bad :
       {std::string(), std::string("mk_"), token.substr(0, token.size() - 1), token + "A",
        token + "=", absl::StrCat("MK_", token.substr(3)), WithCharacter(token, 15, '-'),
        WithCharacter(token, secret_at, '+'), WithCharacter(token, secret_at, '/'),
        absl::StrCat("Bearer ", token), upper_id}) {
    if (bad == token) continue;  // An id of digits only has no upper case.
    EXPECT_FALSE(store->Authenticate(bad)) << bad;
  }
  // The secret's last character carries 2 unused bits: only the spelling with them zero is
  // the token (so a token has one form).
  const char last = token.back();
  const std::string digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  const size_t value = digits.find(last);
  ASSERT_EQ(value % 4, 0u);
  for (size_t low = 1; low < 4; ++low) {
    EXPECT_FALSE(store->Authenticate(WithCharacter(token, token.size() - 1, digits[value + low])));
  }
  // And the right one still works after all the failures.
  EXPECT_TRUE(store->Authenticate(token));
}

TEST_F(ApiKeysTest, OnlySaltAndHashAreStored) {
  const absl::StatusOr<CreatedKey> key = CreateApiKey(url_, kOrgB, kScopeIngest, "billing");
  ASSERT_TRUE(key.ok()) << key.status();
  const std::string secret = SecretOf(key->token);
  // base64url -> base64 with its padding, for decode().
  const std::string secret_bytes =
      absl::StrCat("decode(translate('", secret, "', '-_', '+/') || '=', 'base64')");
  EXPECT_EQ(Query(absl::StrCat("SELECT octet_length(", secret_bytes, ")")), 32);
  EXPECT_EQ(Query(absl::StrCat("SELECT count(*) FROM shared.api_keys WHERE key_id = '", key->key_id,
                               "' AND octet_length(salt) = 16 ",
                               "AND secret_hash = sha256(salt || ", secret_bytes, ")")),
            1);
  // Neither the secret's text nor its bytes (bytea renders as hex) in any column of any row,
  // of the keys or of the audit trail.
  for (const char* table : {"shared.api_keys", "shared.audit_log"}) {
    EXPECT_EQ(Query(absl::StrCat(
                  "SELECT count(*) FROM ", table, " t WHERE strpos(row_to_json(t)::text, '", secret,
                  "') > 0 OR strpos(row_to_json(t)::text, encode(", secret_bytes, ", 'hex')) > 0")),
              0)
        << table;
  }
  EXPECT_EQ(Query(absl::StrCat("SELECT count(*) FROM shared.api_keys WHERE position(", secret_bytes,
                               " IN salt) > 0 OR position(", secret_bytes, " IN secret_hash) > 0")),
            0);
}

TEST_F(ApiKeysTest, RevocationReachesARunningStoreAndIsAudited) {
  const absl::StatusOr<CreatedKey> key = CreateApiKey(url_, kOrgA, kScopeRead, "dashboard");
  ASSERT_TRUE(key.ok()) << key.status();
  const absl::StatusOr<CreatedKey> kept = CreateApiKey(url_, kOrgA, kScopeIngest, "kept");
  ASSERT_TRUE(kept.ok()) << kept.status();
  std::unique_ptr<KeyStore> store = StartStore(url_);
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->Authenticate(key->token));

  // Readers on another thread all along: the set they see is swapped under them.
  std::atomic<bool> stop{false};
  std::atomic<int64_t> kept_failures{0};
  std::thread reader([&] {
    while (!stop.load()) {
      if (!store->Authenticate(kept->token)) kept_failures.fetch_add(1);
    }
  });

  const absl::Time revoked_at = absl::Now();
  const absl::StatusOr<bool> revoked = RevokeApiKey(url_, key->key_id);
  ASSERT_TRUE(revoked.ok()) << revoked.status();
  EXPECT_TRUE(*revoked);
  EXPECT_TRUE(testing::Eventually([&] { return !store->Authenticate(key->token); },
                                  absl::Seconds(3), absl::Milliseconds(20)))
      << "a revoked key still authenticates after 3 s";
  const absl::Duration took = absl::Now() - revoked_at;
  EXPECT_LT(took, absl::Seconds(1)) << "refresh 500 ms, yet the revocation took " << took;
  stop = true;
  reader.join();
  EXPECT_EQ(kept_failures.load(), 0);
  EXPECT_EQ(store->size(), 1u);
  EXPECT_TRUE(store->Authenticate(kept->token));

  // Once: a second revocation, or one of an unknown key, changes nothing.
  EXPECT_EQ(RevokeApiKey(url_, key->key_id).value_or(true), false);
  EXPECT_EQ(RevokeApiKey(url_, "0123456789ab").value_or(true), false);
  EXPECT_EQ(RevokeApiKey(url_, "not-a-key").status().code(), absl::StatusCode::kInvalidArgument);

  // One row per change, carrying what changed and never the salt or hash.
  const std::string where = absl::StrCat("after->>'key_id' = '", key->key_id, "'");
  EXPECT_EQ(Query(absl::StrCat("SELECT count(*) FROM shared.audit_log WHERE action = "
                               "'api_key.created' AND before IS NULL AND org_id = '",
                               kOrgA,
                               "' AND after->>'label' = 'dashboard' AND after->'scopes' = "
                               "'[\"read\"]' AND actor = 'role:postgres' AND ",
                               where)),
            1);
  EXPECT_EQ(Query(absl::StrCat("SELECT count(*) FROM shared.audit_log WHERE action = "
                               "'api_key.revoked' AND before->'revoked_at' = 'null' AND "
                               "after->>'revoked_at' IS NOT NULL AND ",
                               where)),
            1);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.audit_log, jsonb_object_keys(coalesce(before, "
                  "'{}') || after) AS k WHERE action LIKE 'api_key.%' AND k NOT IN ('key_id', "
                  "'org_id', 'scopes', 'label', 'revoked_at')"),
            0);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.audit_log a JOIN shared.api_keys k ON "
                  "a.after->>'key_id' = k.key_id WHERE strpos(concat(a.before, a.after), "
                  "encode(k.salt, 'hex')) > 0 OR strpos(concat(a.before, a.after), "
                  "encode(k.secret_hash, 'hex')) > 0 OR strpos(concat(a.before, a.after), "
                  "encode(k.secret_hash, 'base64')) > 0"),
            0);

  const absl::StatusOr<std::vector<KeyInfo>> listed = ListApiKeys(url_, kOrgA);
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->size(), 2u);
  EXPECT_EQ((*listed)[0].key_id, key->key_id);
  EXPECT_EQ((*listed)[0].org, kOrgA);
  EXPECT_EQ((*listed)[0].scopes, "read");
  EXPECT_EQ((*listed)[0].label, "dashboard");
  EXPECT_EQ((*listed)[0].created_at.size(), 20u) << (*listed)[0].created_at;
  EXPECT_EQ((*listed)[0].revoked_at.size(), 20u) << (*listed)[0].revoked_at;
  EXPECT_EQ((*listed)[1].revoked_at, "");
  EXPECT_EQ(ListApiKeys(url_, kOrgB)->size(), 0u);
  EXPECT_EQ(ListApiKeys(url_, "")->size(), 2u);
  EXPECT_EQ(ListApiKeys(url_, "nope").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ApiKeysTest, KeyListJsonIsOneArray) {
  EXPECT_EQ(KeyListJson({}), "[]");
  const std::vector<KeyInfo> keys = {
      {"0123456789ab", kOrgA, "ingest,read", "say \"hi\"\\\n", "2024-01-31T12:00:00Z", ""},
      {"ba9876543210", "", "admin", "", "2024-02-01T00:00:00Z", "2024-02-02T00:00:00Z"}};
  EXPECT_EQ(KeyListJson(keys),
            absl::StrCat("[\n  {\"key_id\": \"0123456789ab\", \"org\": \"", kOrgA,
                         "\", \"scopes\": [\"ingest\", \"read\"], \"label\": \"say \\\"hi\\\"\\\\"
                         "\\u000a\", \"created_at\": \"2024-01-31T12:00:00Z\", \"revoked_at\": "
                         "null},\n  {\"key_id\": \"ba9876543210\", \"org\": null, \"scopes\": "
                         "[\"admin\"], \"label\": \"\", \"created_at\": \"2024-02-01T00:00:00Z\", "
                         "\"revoked_at\": \"2024-02-02T00:00:00Z\"}\n]"));
}

TEST_F(ApiKeysTest, OnlyTheBackOfficeCreatesRevokesAndListsKeys) {
  CreateLogins();
  for (const char* role : {"ak_tenant", "ak_daemon", "ak_nobody"}) {
    SCOPED_TRACE(role);
    const absl::StatusOr<CreatedKey> refused = CreateApiKey(UrlAs(role), kOrgA, kScopeIngest, "");
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kPermissionDenied) << refused.status();
    EXPECT_EQ(RevokeApiKey(UrlAs(role), "0123456789ab").status().code(),
              absl::StatusCode::kPermissionDenied);
    EXPECT_EQ(ListApiKeys(UrlAs(role), "").status().code(), absl::StatusCode::kPermissionDenied);
  }
  // meterd's roles hear why.
  const absl::StatusOr<CreatedKey> tenant = CreateApiKey(UrlAs("ak_tenant"), "", kScopeAdmin, "");
  EXPECT_TRUE(absl::StrContains(tenant.status().message(), "lacks the meterd_admin role"))
      << tenant.status();
  EXPECT_EQ(Query("SELECT count(*) FROM shared.api_keys"), 0);

  const absl::StatusOr<CreatedKey> key =
      CreateApiKey(UrlAs("ak_backoffice"), kOrgA, kScopeIngest, "pos");
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ(Query(absl::StrCat("SELECT count(*) FROM shared.api_keys WHERE key_id = '", key->key_id,
                               "' AND created_by = 'role:ak_backoffice'")),
            1);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.audit_log WHERE action = 'api_key.created' AND "
                  "actor = 'role:ak_backoffice'"),
            1);
  const absl::StatusOr<std::vector<KeyInfo>> listed = ListApiKeys(UrlAs("ak_backoffice"), "");
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->size(), 1u);

  // The daemon's login reads what verifying needs, and nothing else; a tenant reads nothing.
  std::unique_ptr<KeyStore> store = StartStore(UrlAs("ak_daemon"));
  ASSERT_NE(store, nullptr);
  const std::optional<ApiKey> authenticated = store->Authenticate(key->token);
  ASSERT_TRUE(authenticated.has_value());
  EXPECT_EQ(authenticated->org, Org(kOrgA));
  for (const auto& [role, sql] : std::vector<std::pair<std::string, std::string>>{
           {"ak_daemon", "SELECT count(label) FROM shared.api_keys"},
           {"ak_daemon", "SELECT count(*) FROM shared.api_key_list"},
           {"ak_tenant", "SELECT count(key_id) FROM shared.api_keys"},
           {"ak_tenant", "SELECT count(*) FROM shared.api_key_list"}}) {
    EXPECT_THROW(testing::QueryInt(UrlAs(role), sql), pqxx::insufficient_privilege)
        << role << ": " << sql;
  }

  const absl::StatusOr<bool> revoked = RevokeApiKey(UrlAs("ak_backoffice"), key->key_id);
  ASSERT_TRUE(revoked.ok()) << revoked.status();
  EXPECT_TRUE(*revoked);
}

TEST_F(ApiKeysTest, RefusesKeysOfTheWrongShape) {
  struct Case {
    std::string org;
    uint8_t scopes;
    std::string label;
  };
  for (const Case& c : std::vector<Case>{{"", kScopeIngest, ""},
                                         {"", kScopeAdmin | kScopeRead, ""},
                                         {kOrgA, 0, ""},
                                         {kOrgA, 8, ""},
                                         {"not-a-uuid", kScopeRead, ""},
                                         {kOrgA, kScopeRead, std::string(201, 'x')}}) {
    SCOPED_TRACE(absl::StrCat(c.org, " ", c.scopes, " ", c.label.size()));
    EXPECT_EQ(CreateApiKey(url_, c.org, c.scopes, c.label).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(Query("SELECT count(*) FROM shared.api_keys"), 0);

  // Postgres holds the same shapes for callers that bypass lib/api.
  const std::string salt = "'\\x00112233445566778899aabbccddeeff'::bytea";
  const std::string hash = "sha256('x')";
  auto call = [&](const std::string& id, const std::string& org, const std::string& scopes,
                  const std::string& salt_sql) {
    const std::string state = testing::SqlStateOf(
        url_, absl::StrCat("SELECT shared.create_api_key('", id, "', ", org, ", '", scopes,
                           "', 'l', ", salt_sql, ", ", hash, ")"));
    return state.empty() ? std::string("ok") : state;
  };
  EXPECT_EQ(call("0123456789ab", "NULL", "{read}", salt), "22023");
  EXPECT_EQ(call("0123456789ab", "NULL", "{admin,read}", salt), "22023");
  EXPECT_EQ(call("0123456789ab", absl::StrCat("'", kOrgA, "'"), "{}", salt), "22023");
  EXPECT_EQ(call("0123456789ab", absl::StrCat("'", kOrgA, "'"), "{write}", salt), "22023");
  EXPECT_EQ(call("0123456789AB", absl::StrCat("'", kOrgA, "'"), "{read}", salt), "22023");
  EXPECT_EQ(call("0123456789ab", absl::StrCat("'", kOrgA, "'"), "{read}", "'\\x00'::bytea"),
            "22023");
  // Scopes are stored in one order, once each.
  EXPECT_EQ(call("0123456789ab", absl::StrCat("'", kOrgA, "'"), "{read,ingest,read}", salt), "ok");
  EXPECT_EQ(Query("SELECT count(*) FROM shared.api_keys WHERE scopes = '{ingest,read}'"), 1);
  EXPECT_EQ(call("0123456789ab", absl::StrCat("'", kOrgA, "'"), "{read}", salt), "23505");
}

TEST_F(ApiKeysTest, StartNeedsTheMigration) {
  const std::string bare = testing::SharedPostgres().CreateDatabase("ak_bare");
  const absl::StatusOr<std::unique_ptr<KeyStore>> store = KeyStore::Start(bare);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(store.status().message(), "meterd migrate")) << store.status();
  EXPECT_EQ(CreateApiKey(bare, kOrgA, kScopeRead, "").status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(KeyStore::Start(url_, absl::ZeroDuration()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(ApiKeysTest, StopsAtOnceWhateverTheRefreshInterval) {
  absl::StatusOr<std::unique_ptr<KeyStore>> store = KeyStore::Start(url_, absl::Hours(1));
  ASSERT_TRUE(store.ok()) << store.status();
  const absl::Time start = absl::Now();
  store->reset();
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(500));
}

// A refresh that fails keeps the keys already loaded; the store reconnects once Postgres is back
// and picks up what changed meanwhile.
TEST_F(ApiKeysTest, KeepsTheLastGoodKeysWhilePostgresIsDown) {
  const absl::StatusOr<CreatedKey> key = CreateApiKey(url_, kOrgA, kScopeIngest, "");
  ASSERT_TRUE(key.ok()) << key.status();
  std::unique_ptr<KeyStore> store = StartStore(url_);
  ASSERT_NE(store, nullptr);
  testing::SharedPostgres().Stop();
  const absl::Time loaded_at = store->last_refresh();
  absl::SleepFor(absl::Milliseconds(1500));  // Three refresh attempts, all failing.
  EXPECT_TRUE(store->Authenticate(key->token));
  EXPECT_EQ(store->size(), 1u);
  EXPECT_EQ(store->last_refresh(), loaded_at);
  testing::SharedPostgres().Start();

  const absl::StatusOr<bool> revoked = RevokeApiKey(url_, key->key_id);
  ASSERT_TRUE(revoked.ok()) << revoked.status();
  EXPECT_TRUE(testing::Eventually([&] { return !store->Authenticate(key->token); },
                                  absl::Seconds(3), absl::Milliseconds(20)));
  EXPECT_GT(store->last_refresh(), loaded_at);
}

}  // namespace
}  // namespace meterd::api
