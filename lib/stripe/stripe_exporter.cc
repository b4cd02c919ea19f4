#include "lib/stripe/stripe_exporter.h"

#include <algorithm>
#include <random>

#include <simdjson.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "lib/common/backoff.h"
#include "lib/common/logging.h"
#include "lib/common/status_macros.h"
#include "lib/common/string_views.h"
#include "lib/http/http_client.h"
#include "lib/store/pg_connection.h"

namespace meterd::stripe {
namespace {

// One claimed outbox row.
struct Row {
  int64_t id = 0;
  std::string kind;
  std::string identifier;
  std::string event_name;
  std::string customer;
  int64_t value = 0;
  int64_t timestamp = 0;
  std::string cancel_identifier;
  int attempts = 0;
};

// What Stripe's answer means for a row.
struct Outcome {
  enum Kind { kSent, kRetry, kRefused, kAuth } kind;
  std::string detail;                                 // For last_error and the log.
  absl::Duration retry_after = absl::ZeroDuration();  // kRetry from a 429's Retry-After.
  Counter* retry_counter = nullptr;
};

// A cancellation waits for its meter event to be sent (Stripe refuses to cancel what it does
// not hold); one whose meter event failed is parked with it.
constexpr char kParkedSql[] =
    "kind = 'meter_event_cancel' AND NOT EXISTS (SELECT 1 FROM shared.stripe_outbox t "
    "WHERE t.identifier = o.cancel_identifier AND t.state = 'sent')";

// Reserves the rows due now, in a short transaction of its own: each row's first attempt is
// recorded durably before anything is sent (a send whose batch is never committed still
// counts toward the 23 hours), and a row first attempted more than 23 hours ago is failed
// instead of sent (Stripe keeps idempotency keys 24 h: a resend could count twice).
// The only place the 23-hour rule is applied: every send follows a reservation.
const std::string& ReserveSql() {
  static const std::string sql = absl::StrCat(
      "WITH due AS (SELECT o.outbox_id FROM shared.stripe_outbox o "
      "WHERE o.state = 'pending' AND o.next_attempt_at <= now() AND NOT (",
      kParkedSql,
      ") ORDER BY o.next_attempt_at, o.outbox_id LIMIT $1 FOR UPDATE OF o SKIP LOCKED) "
      "UPDATE shared.stripe_outbox r SET first_attempt_at = coalesce(r.first_attempt_at, now()), "
      "state = CASE WHEN r.first_attempt_at < now() - interval '23 hours' THEN 'failed' "
      "ELSE r.state END, "
      "last_error = CASE WHEN r.first_attempt_at < now() - interval '23 hours' THEN "
      "'not delivered within 23 h of the first attempt (Stripe keeps idempotency keys 24 h): "
      "check Stripe for this identifier before retrying; last: ' || coalesce(r.last_error, '-') "
      "ELSE r.last_error END "
      "FROM due WHERE r.outbox_id = due.outbox_id "
      "RETURNING r.outbox_id, r.state = 'failed', r.kind, r.identifier");
  return sql;
}

// The reserved rows, locked for the batch (one another sender took meanwhile is skipped). The
// timestamp is brought into Stripe's window (at most 35 days back) from the row's creation,
// so every resend of a row carries the same body (a different body under the same
// Idempotency-Key would be refused).
constexpr char kClaimSql[] =
    "SELECT o.outbox_id, kind, identifier, event_name, coalesce(stripe_customer_id, ''), "
    "coalesce(value, 0), coalesce(extract(epoch FROM greatest(least(event_time, created_at), "
    "created_at - interval '34 days'))::bigint, 0), coalesce(cancel_identifier, ''), attempts "
    "FROM shared.stripe_outbox o WHERE o.outbox_id = ANY($1::bigint[]) AND state = 'pending' "
    "ORDER BY o.outbox_id FOR UPDATE OF o SKIP LOCKED";

http::ClientRequest RequestFor(const Row& row, const std::string& key) {
  http::ClientRequest request;
  request.method = "POST";
  request.content_type = "application/x-www-form-urlencoded";
  request.headers = {{"Authorization", absl::StrCat("Bearer ", key)},
                     {"Idempotency-Key", row.identifier}};
  if (row.kind == "meter_event") {
    request.target = "/v1/billing/meter_events";
    request.body = http::FormEncode({{"event_name", row.event_name},
                                     {"payload[stripe_customer_id]", row.customer},
                                     {"payload[value]", absl::StrCat(row.value)},
                                     {"identifier", row.identifier},
                                     {"timestamp", absl::StrCat(row.timestamp)}});
  } else {
    request.target = "/v1/billing/meter_event_adjustments";
    request.body = http::FormEncode({{"event_name", row.event_name},
                                     {"type", "cancel"},
                                     {"cancel[identifier]", row.cancel_identifier}});
  }
  return request;
}

// "HTTP 400 invalid_request_error/parameter_missing: <message>" from Stripe's error object
// (or the start of the body when it is not one).
std::string ErrorText(const http::ClientResponse& response, std::string* code) {
  std::string type, message;
  simdjson::ondemand::parser parser;
  simdjson::padded_string body(response.body);
  simdjson::ondemand::document doc;
  if (parser.iterate(body).get(doc) == simdjson::SUCCESS) {
    simdjson::ondemand::object error;
    if (doc["error"].get_object().get(error) == simdjson::SUCCESS) {
      for (auto field : error) {
        std::string_view name, value;
        if (field.unescaped_key().get(name) != simdjson::SUCCESS) break;
        if (field.value().get_string().get(value) != simdjson::SUCCESS) continue;
        if (name == "type") type = std::string(value);
        if (name == "code") *code = std::string(value);
        if (name == "message") message = std::string(value);
      }
    }
  }
  if (type.empty() && message.empty()) message = response.body.substr(0, 200);
  std::string text = absl::StrCat("HTTP ", response.status, " ", type);
  if (!code->empty()) absl::StrAppend(&text, "/", *code);
  absl::StrAppend(&text, ": ", message.substr(0, 300));
  return text;
}

absl::Duration RetryAfter(const http::ClientResponse& response) {
  int64_t seconds = 0;
  const std::string_view header = response.Header("Retry-After");
  const std::string value(absl::StripAsciiWhitespace(AbslView(header)));
  if (absl::SimpleAtoi(value, &seconds) && seconds >= 0) return absl::Seconds(seconds);
  return absl::ZeroDuration();
}

}  // namespace

constexpr char kRetries[] = "meterd_stripe_export_retries_total";
constexpr char kRetriesHelp[] = "Stripe requests to try again later, by cause";

ExporterMetrics::ExporterMetrics(MetricsRegistry& r)
    : sent(r.AddCounter("meterd_stripe_export_sent_total",
                        "Outbox rows Stripe accepted (meter events and cancellations)")),
      retried_5xx(r.AddCounter(kRetries, kRetriesHelp, {{"cause", "5xx"}})),
      retried_429(r.AddCounter(kRetries, kRetriesHelp, {{"cause", "429"}})),
      retried_network(r.AddCounter(kRetries, kRetriesHelp, {{"cause", "network"}})),
      refused(r.AddCounter("meterd_stripe_export_refused_total",
                           "Outbox rows Stripe refused (4xx): state failed, with its message")),
      auth_failures(r.AddCounter("meterd_stripe_export_auth_failures_total",
                                 "Stripe answers 401/403: the secret key is wrong or lacks a "
                                 "permission; every sender pauses, rows stay pending")),
      pending(r.AddGauge("meterd_stripe_outbox_pending", "Outbox rows not yet sent to Stripe")),
      failed_rows(r.AddGauge("meterd_stripe_outbox_failed",
                             "Outbox rows Stripe refused, waiting for "
                             "shared.retry_stripe_exports()")),
      oldest_pending_seconds(r.AddGauge("meterd_stripe_outbox_oldest_pending_seconds",
                                        "Age of the oldest outbox row not yet sent")) {}

StripeExporter::StripeExporter(std::string conninfo, ExporterOptions options)
    : conninfo_(std::move(conninfo)),
      options_(std::move(options)),
      metrics_(RegistryOrOwn(options_.metrics, own_metrics_)) {}

absl::StatusOr<std::unique_ptr<StripeExporter>> StripeExporter::Create(std::string conninfo,
                                                                       ExporterOptions options) {
  const std::string key(absl::StripAsciiWhitespace(options.secret_key));
  if (!absl::StartsWith(key, "sk_") && !absl::StartsWith(key, "rk_")) {
    return absl::InvalidArgumentError(
        "--stripe-secret-key: not a Stripe secret or restricted key (sk_… or rk_…)");
  }
  options.secret_key = key;
  if (options.senders < 1 || options.senders > 64) {
    return absl::InvalidArgumentError("--stripe-export-senders must be 1..64");
  }
  if (options.batch < 1) return absl::InvalidArgumentError("batch must be at least 1");
  // The key must not travel in clear text: plain HTTP only to this host (the fake Stripe).
  if (absl::StartsWith(options.api_base, "http://") &&
      !absl::StartsWith(options.api_base, "http://127.0.0.1") &&
      !absl::StartsWith(options.api_base, "http://localhost")) {
    return absl::InvalidArgumentError(
        "--stripe-api-base: plain http:// only to 127.0.0.1 or localhost (the secret key "
        "would travel in clear text); use https://");
  }
  // Checks the URL now (InvalidArgument names it); each sender makes its own client.
  auto probe = http::HttpClient::Create(options.api_base, options.request_timeout);
  if (!probe.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--stripe-api-base: ", probe.status().message()));
  }
  return std::unique_ptr<StripeExporter>(new StripeExporter(std::move(conninfo), options));
}

StripeExporter::~StripeExporter() { Stop(); }

void StripeExporter::Start() {
  for (int i = 0; i < options_.senders; ++i) {
    threads_.emplace_back([this, i] { SenderLoop(i, /*drain=*/false); });
  }
}

void StripeExporter::Stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (std::thread& t : threads_) {
    if (t.joinable()) t.join();
  }
  threads_.clear();
}

DrainSummary StripeExporter::Drain(absl::Duration deadline) {
  {
    std::lock_guard lock(mu_);
    drain_deadline_ = absl::Now() + deadline;
  }
  drained_sent_ = 0;
  drained_refused_ = 0;
  std::vector<std::thread> senders;
  for (int i = 0; i < options_.senders; ++i) {
    senders.emplace_back([this, i] { SenderLoop(i, /*drain=*/true); });
  }
  for (std::thread& t : senders) t.join();
  {
    std::lock_guard lock(mu_);
    drain_deadline_ = absl::InfiniteFuture();
  }
  DrainSummary summary;
  summary.status_known = RefreshStatus();
  summary.sent = drained_sent_.load();
  summary.refused = drained_refused_.load();
  summary.still_pending = metrics_.pending->value();
  summary.failed_rows = metrics_.failed_rows->value();
  return summary;
}

bool StripeExporter::Stopping() {
  std::lock_guard lock(mu_);
  return stopping_ || absl::Now() >= drain_deadline_;
}

bool StripeExporter::WaitUntil(absl::Time until) {
  std::unique_lock lock(mu_);
  until = std::min(until, drain_deadline_);
  while (!stopping_ && absl::Now() < until) {
    wake_.wait_for(
        lock, absl::ToChronoNanoseconds(std::min(until - absl::Now(), absl::Milliseconds(200))));
  }
  return !stopping_ && absl::Now() < drain_deadline_;
}

bool StripeExporter::RefreshStatus() {
  absl::Status status = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(auto conn, store::Connect(conninfo_));
    return store::CatchPq([&]() -> absl::Status {
      pqxx::nontransaction tx(*conn);
      const pqxx::row r = tx.exec1("SELECT * FROM shared.stripe_outbox_status()");
      metrics_.pending->Set(r[0].as<int64_t>());
      metrics_.failed_rows->Set(r[2].as<int64_t>());
      metrics_.oldest_pending_seconds->Set(static_cast<int64_t>(r[3].as<double>()));
      return absl::OkStatus();
    });
  }();
  if (!status.ok()) LOG_WARN("stripe export: backlog not read: {}", status.message());
  return status.ok();
}

void StripeExporter::SenderLoop(int index, bool drain) {
  std::unique_ptr<http::HttpClient> client =
      *http::HttpClient::Create(options_.api_base, options_.request_timeout);
  std::unique_ptr<pqxx::connection> conn;
  Backoff sender_backoff({.initial = absl::Milliseconds(200), .max = options_.max_backoff});
  std::mt19937_64 rng(std::random_device{}() + static_cast<uint64_t>(index));
  absl::Time next_status = absl::InfinitePast();
  // A row's own schedule: retry_initial, doubling up to max_backoff, less up to a half of
  // jitter (senders that failed together do not come back together).
  auto row_delay = [&](int attempts) {
    const absl::Duration full = std::min(
        options_.max_backoff, options_.retry_initial * (int64_t{1} << std::min(attempts, 20)));
    return full * std::uniform_real_distribution<double>(0.5, 1.0)(rng);
  };

  while (!Stopping()) {
    if (index == 0 && !drain && absl::Now() >= next_status) {
      RefreshStatus();
      next_status = absl::Now() + options_.status_every;
    }
    {
      std::unique_lock lock(mu_);
      const absl::Time paused = paused_until_;
      lock.unlock();
      if (absl::Now() < paused && !WaitUntil(paused)) break;
    }
    if (conn == nullptr) {
      auto connected = store::Connect(conninfo_);
      if (!connected.ok()) {
        LOG_WARN("stripe export: sender {}: Postgres: {}", index, connected.status().message());
        if (!WaitUntil(absl::Now() + sender_backoff.Next())) break;
        continue;
      }
      conn = std::move(*connected);
    }

    int claimed = 0;
    bool had_retry = false;
    absl::Duration pause_all = absl::ZeroDuration();
    std::string reserved;  // A Postgres array of the reserved ids.
    const absl::Status reserve = store::CatchPq([&]() -> absl::Status {
      pqxx::work tx(*conn);
      for (const auto& r : tx.exec_params(ReserveSql(), options_.batch)) {
        ++claimed;
        if (r[1].as<bool>()) {
          metrics_.refused->Add();
          if (drain) drained_refused_.fetch_add(1);
          LOG_ERROR(
              "stripe export: {} {} not delivered within 23 h of its first attempt; failed "
              "(check Stripe before shared.retry_stripe_exports())",
              r[2].as<std::string>(), r[3].as<std::string>());
          continue;
        }
        absl::StrAppend(&reserved, reserved.empty() ? "{" : ",", r[0].as<int64_t>());
      }
      tx.commit();
      return absl::OkStatus();
    });
    if (!reserve.ok()) {
      LOG_WARN("stripe export: sender {}: outbox not read: {}", index, reserve.message());
      conn.reset();
      if (!WaitUntil(absl::Now() + sender_backoff.Next())) break;
      continue;
    }
    if (!reserved.empty()) reserved += "}";
    const absl::Status done = store::CatchPq([&]() -> absl::Status {
      if (reserved.empty()) return absl::OkStatus();
      pqxx::work tx(*conn);
      std::vector<Row> rows;
      for (const auto& r : tx.exec_params(kClaimSql, reserved)) {
        rows.push_back({r[0].as<int64_t>(), r[1].as<std::string>(), r[2].as<std::string>(),
                        r[3].as<std::string>(), r[4].as<std::string>(), r[5].as<int64_t>(),
                        r[6].as<int64_t>(), r[7].as<std::string>(), r[8].as<int>()});
      }
      for (const Row& row : rows) {
        if (Stopping()) break;
        const Outcome outcome = [&]() -> Outcome {
          absl::StatusOr<http::ClientResponse> response =
              client->Send(RequestFor(row, options_.secret_key));
          if (!response.ok()) {
            return {Outcome::kRetry, std::string(response.status().message()), absl::ZeroDuration(),
                    metrics_.retried_network};
          }
          if (response->status >= 200 && response->status < 300) return {Outcome::kSent, ""};
          std::string code;
          std::string text = ErrorText(*response, &code);
          if (response->status == 429) {
            return {Outcome::kRetry, text, RetryAfter(*response), metrics_.retried_429};
          }
          // 409: a request with this Idempotency-Key is still being processed at Stripe.
          if (response->status >= 500 || response->status == 409) {
            return {Outcome::kRetry, text, absl::ZeroDuration(), metrics_.retried_5xx};
          }
          // 401: the key itself is wrong, every request will fail. 403: the key lacks a
          // permission for this kind of request; other rows may still go.
          if (response->status == 401) return {Outcome::kAuth, text};
          if (response->status == 403) {
            metrics_.auth_failures->Add();
            return {Outcome::kRetry, text, absl::ZeroDuration(), metrics_.retried_5xx};
          }
          // Stripe already holds a meter event with this identifier: what we meant to do.
          if (absl::StrContains(code, "duplicate")) return {Outcome::kSent, text};
          return {Outcome::kRefused, text};
        }();
        switch (outcome.kind) {
          case Outcome::kSent:
            tx.exec_params0(
                "UPDATE shared.stripe_outbox SET state = 'sent', sent_at = now(), "
                "attempts = attempts + 1, last_error = nullif($2, '') WHERE outbox_id = $1",
                row.id, outcome.detail);
            metrics_.sent->Add();
            if (drain) drained_sent_.fetch_add(1);
            sender_backoff.Reset();
            break;
          case Outcome::kRefused:
            tx.exec_params0(
                "UPDATE shared.stripe_outbox SET state = 'failed', attempts = attempts + 1, "
                "last_error = $2 WHERE outbox_id = $1",
                row.id, outcome.detail);
            metrics_.refused->Add();
            if (drain) drained_refused_.fetch_add(1);
            LOG_ERROR("stripe export: {} {} refused by Stripe, not retried: {}", row.kind,
                      row.identifier, outcome.detail);
            break;
          case Outcome::kRetry: {
            const absl::Duration delay = outcome.retry_after > absl::ZeroDuration()
                                             ? std::min(outcome.retry_after, options_.max_backoff)
                                             : row_delay(row.attempts);
            // A row whose 23 hours run out meanwhile is failed by its next reservation,
            // before it could be sent again.
            tx.exec_params0(
                "UPDATE shared.stripe_outbox SET attempts = attempts + 1, last_error = $2, "
                "next_attempt_at = now() + make_interval(secs => $3) WHERE outbox_id = $1",
                row.id, outcome.detail, absl::ToDoubleSeconds(delay));
            outcome.retry_counter->Add();
            LOG_WARN("stripe export: {} {} attempt {} failed, retried in {}: {}", row.kind,
                     row.identifier, row.attempts + 1, absl::FormatDuration(delay), outcome.detail);
            had_retry = true;
            // Stripe's rate limit is the account's: every sender waits.
            if (outcome.retry_counter == metrics_.retried_429) pause_all = delay;
            break;
          }
          case Outcome::kAuth:
            metrics_.auth_failures->Add();
            pause_all = std::max(absl::Minutes(1), sender_backoff.Next());
            LOG_ERROR("stripe export: Stripe refused the secret key ({}); every sender pauses {}",
                      outcome.detail, absl::FormatDuration(pause_all));
            had_retry = true;
            break;
        }
        if (had_retry) break;  // Commit what is done; the rest is claimed again later.
      }
      tx.commit();
      return absl::OkStatus();
    });
    if (!done.ok()) {
      // Rows sent in the rolled-back batch are sent again: Stripe answers from its
      // idempotency cache.
      LOG_WARN("stripe export: sender {}: batch not recorded, retried: {}", index, done.message());
      conn.reset();
      if (!WaitUntil(absl::Now() + sender_backoff.Next())) break;
      continue;
    }
    if (pause_all > absl::ZeroDuration()) {
      std::lock_guard lock(mu_);
      paused_until_ = std::max(paused_until_, absl::Now() + pause_all);
    }
    if (had_retry) {
      if (!WaitUntil(absl::Now() + sender_backoff.Next())) break;
      continue;
    }
    if (claimed > 0) continue;
    if (drain) {
      // Done when nothing is pending at all; otherwise wait for the next row that comes due.
      int64_t pending = 0;
      double wait_seconds = 0;
      const absl::Status read = store::CatchPq([&]() -> absl::Status {
        pqxx::nontransaction tx(*conn);
        const pqxx::row r = tx.exec1(absl::StrCat(
            "SELECT count(*), coalesce(extract(epoch FROM min(next_attempt_at) - now()), 0) "
            "FROM shared.stripe_outbox o WHERE state = 'pending' AND NOT (",
            kParkedSql, ")"));
        pending = r[0].as<int64_t>();
        wait_seconds = r[1].as<double>();
        return absl::OkStatus();
      });
      if (read.ok() && pending == 0) break;
      if (!read.ok()) conn.reset();
      const absl::Duration wait =
          std::clamp(absl::Seconds(wait_seconds), absl::Milliseconds(20), options_.idle_poll);
      if (!WaitUntil(absl::Now() + wait)) break;
      continue;
    }
    if (!WaitUntil(absl::Now() + options_.idle_poll)) break;
  }
}

}  // namespace meterd::stripe
