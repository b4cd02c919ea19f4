#include "lib/api/stripe_webhook.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "lib/api/api.h"
#include "lib/common/string_views.h"

namespace meterd::api {
namespace {

// HMAC-SHA256(secret, "<t>.<body>") as lowercase hex.
std::string Signature(std::string_view secret, std::string_view t, std::string_view body) {
  const std::string signed_text = absl::StrCat(AbslView(t), ".", AbslView(body));
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
       reinterpret_cast<const unsigned char*>(signed_text.data()), signed_text.size(), mac, &size);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(mac), static_cast<size_t>(size)));
}

}  // namespace

absl::Status StripeSignatureLooksFresh(std::string_view header, absl::Time now,
                                       absl::Duration tolerance) {
  for (absl::string_view part : absl::StrSplit(AbslView(header), ',')) {
    int64_t seconds = 0;
    if (absl::ConsumePrefix(&part, "t=") && absl::SimpleAtoi(part, &seconds)) {
      if (absl::AbsDuration(now - absl::FromUnixSeconds(seconds)) > tolerance) break;
      return absl::OkStatus();
    }
  }
  return absl::InvalidArgumentError("no fresh Stripe-Signature header (t= within 300 s)");
}

absl::Status VerifyStripeSignature(std::string_view header, std::string_view body,
                                   const std::vector<std::string>& secrets, absl::Time now,
                                   absl::Duration tolerance) {
  if (header.empty()) return absl::InvalidArgumentError("no Stripe-Signature header");
  std::string_view t;
  std::vector<std::string_view> signatures;
  for (absl::string_view part : absl::StrSplit(AbslView(header), ',')) {
    const size_t eq = part.find('=');
    if (eq == absl::string_view::npos) continue;
    const absl::string_view name = part.substr(0, eq);
    const absl::string_view value = part.substr(eq + 1);
    if (name == "t") t = StdView(value);
    if (name == "v1") signatures.emplace_back(value.data(), value.size());
  }
  int64_t seconds = 0;
  if (t.empty() || !absl::SimpleAtoi(AbslView(t), &seconds)) {
    return absl::InvalidArgumentError("Stripe-Signature has no timestamp (t=)");
  }
  if (signatures.empty()) return absl::InvalidArgumentError("Stripe-Signature has no v1 signature");
  if (absl::AbsDuration(now - absl::FromUnixSeconds(seconds)) > tolerance) {
    return absl::InvalidArgumentError(absl::StrCat("Stripe-Signature timestamp is more than ",
                                                   absl::ToInt64Seconds(tolerance), " s from now"));
  }
  bool match = false;
  for (const std::string& secret : secrets) {
    const std::string expected = Signature(secret, t, body);
    for (std::string_view candidate : signatures) {
      // Constant time for equal lengths; a length mismatch says nothing about the secret.
      if (candidate.size() == expected.size() &&
          CRYPTO_memcmp(candidate.data(), expected.data(), expected.size()) == 0) {
        match = true;
      }
    }
  }
  if (!match) return absl::InvalidArgumentError("no v1 signature matches the endpoint secret");
  return absl::OkStatus();
}

http::Response ApplyStripeEvent(PgPool* pool, const std::string& body) {
  PgAnswer answer =
      PgCall(pool, "storing a Stripe event", "stripe:webhook",
             "SELECT shared.apply_stripe_event($1::jsonb)", {body},
             [](const pqxx::sql_error& e) -> std::optional<http::Response> {
               // Data errors (not an event, bytes jsonb cannot hold) are the body's: retrying the
               // same body cannot help.
               if (e.sqlstate().rfind("22", 0) != 0) return std::nullopt;
               return ErrorResponse(400, "bad_event",
                                    "not a Stripe event (id, type, created, data.object)");
             });
  if (answer.instead) return std::move(*answer.instead);
  if (!answer.value) return RetryLater("unavailable", "the event could not be stored; retry");
  return {200,
          "application/json",
          absl::StrCat("{\"received\":true,\"result\":\"", *answer.value, "\"}\n"),
          {}};
}

std::string StripeSignatureHeader(std::string_view body, std::string_view secret, int64_t t) {
  const std::string stamp = absl::StrCat(t);
  return absl::StrCat("t=", stamp, ",v1=", Signature(secret, stamp, body));
}

}  // namespace meterd::api
