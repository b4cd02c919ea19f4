// Subcommands: each reads its flags, wires library objects together, and maps the result to an
// exit code with one clear line on failure. No logic of its own.
#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>

#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/civil_time.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "daemon/flags.h"
#include "lib/api/api_keys.h"
#include "lib/billing/billing_metrics.h"
#include "lib/billing/close_period.h"
#include "lib/common/clock.h"
#include "lib/common/files.h"
#include "lib/common/logging.h"
#include "lib/common/process.h"
#include "lib/common/status_macros.h"
#include "lib/devtools/dev_broker.h"
#include "lib/devtools/fake_stripe.h"
#include "lib/devtools/loadgen.h"
#include "lib/pipeline/pipeline.h"
#include "lib/store/data_protection.h"
#include "lib/store/migrations.h"
#include "lib/store/rejected_replay.h"
#include "lib/store/usage_archive.h"
#include "lib/stripe/stripe_exporter.h"

// The flags. Each subcommand lists the ones it reads (Subcommands() below); main refuses the
// others and reads the environment through Abseil's reflection.
ABSL_FLAG(std::string, pg, "", "Postgres connection: libpq URL or key=value string (required)");
ABSL_FLAG(std::string, brokers, "", "Kafka bootstrap servers, host:port[,host:port] (required)");
ABSL_FLAG(std::string, topic, "usage-events", "Kafka topic carrying the usage CloudEvents");
ABSL_FLAG(std::string, group, "meterd", "Kafka consumer group; also keys shared.ingest_offsets");
ABSL_FLAG(int, shards, static_cast<int>(std::max(1u, std::thread::hardware_concurrency())),
          "Consumer shard threads (default: number of cores)");
ABSL_FLAG(absl::Duration, flush_interval, absl::Seconds(1),
          "How often counters are written to Postgres");
ABSL_FLAG(absl::Duration, max_visibility_latency, absl::ZeroDuration(),
          "Adaptive flushing: while a flush takes more than half the interval, flush less "
          "often, up to this (events become visible within about it plus one flush); 0: 5 x "
          "--flush-interval; equal to --flush-interval: a fixed interval");
ABSL_FLAG(absl::Duration, compact_interval, absl::Seconds(2),
          "How often the usage delta log every flush appends to is folded into "
          "shared.api_usage_meters (readers see unfolded deltas too); 0: never, e.g. when "
          "another meterd of the group folds");
ABSL_FLAG(int64_t, max_unflushed_keys, 2'000'000,
          "Unflushed counter keys (all shards) that force an early flush and pause consumption");
ABSL_FLAG(absl::Duration, late_window, absl::Hours(24 * 62),
          "Events older than this are rejected as time_too_old");
ABSL_FLAG(absl::Duration, max_future_skew, absl::Minutes(5),
          "Events further ahead of this host's clock are rejected as time_in_future");
ABSL_FLAG(absl::Duration, stats_interval, absl::Seconds(10), "How often a stats line is logged");
ABSL_FLAG(std::string, kafka_property, "",
          "Extra librdkafka property key=value; repeat the flag for several");
ABSL_FLAG(int, partitions, 16, "Partitions of the topic the embedded broker creates");
ABSL_FLAG(int64_t, events, 100'000, "Events to produce");
ABSL_FLAG(int, orgs, 1000, "Distinct organizations the events are spread over");
ABSL_FLAG(double, malformed_share, 0.0, "Share (0..1) of malformed events mixed in");
ABSL_FLAG(absl::Duration, pg_connect_timeout, absl::Seconds(10),
          "Give up connecting to Postgres after this long (then retry with backoff)");
ABSL_FLAG(absl::Duration, pg_statement_timeout, absl::Seconds(60),
          "A flush (or offset load) not finished within this is abandoned and retried: set on "
          "the server as statement_timeout and enforced on the client, so a Postgres that "
          "stopped answering cannot stall ingestion");
ABSL_FLAG(absl::Duration, pg_lock_timeout, absl::Seconds(10),
          "Postgres lock_timeout of the flush (0: none): a flush blocked on a row lock fails "
          "and is retried instead of waiting behind it");
ABSL_FLAG(double, duplicate_share, 0.0,
          "Share (0..1) of valid events produced again later with the same source and id "
          "(a retrying producer); not in the expected totals");
ABSL_FLAG(absl::Duration, dedup_window, absl::Hours(24),
          "An event whose (source, id) its partition counted from a message sent at most this "
          "long before (Kafka message timestamps) is a duplicate and not counted");
ABSL_FLAG(int64_t, dedup_max_ids, 100'000,
          "Ids remembered per partition for dedup (about 40 bytes each; 0 turns dedup off); "
          "also how many messages are re-read on assignment to rebuild the window");
ABSL_FLAG(std::string, expected_out, "",
          "Write the expected per-(org, meter, industry, day) totals to this CSV file");
ABSL_FLAG(int, days, 3, "Spread event times over the last N days");
ABSL_FLAG(int64_t, rate, 0, "Events per second to produce at; 0 = as fast as possible");
ABSL_FLAG(absl::Duration, startup_timeout, absl::Seconds(15),
          "How long to wait for Kafka metadata at start before failing");
ABSL_FLAG(std::string, reason, "",
          "replay-rejected: the shared.rejected_events.reason code to replay (required)");
ABSL_FLAG(std::string, since, "",
          "replay-rejected: only rows rejected at or after this RFC 3339 time (default: all)");
ABSL_FLAG(absl::Duration, older_than, absl::Hours(24 * 90),
          "purge-rejected: delete rows rejected longer ago than this (at least the late window "
          "plus 7 days)");
ABSL_FLAG(int, archive_batch_rows, 100'000,
          "archive-usage: rows moved per committed batch (each batch is one short transaction)");
ABSL_FLAG(bool, billing, true,
          "Run the overage worker: keep shared.usage_charges and quota alerts current");
ABSL_FLAG(std::string, http_listen, "",
          "Serve /metrics, /metrics.json, /healthz, /readyz and the /v1 API on host:port (e.g. "
          "0.0.0.0:9464); empty: off");
ABSL_FLAG(
    std::string, tls_cert, "",
    "Serve HTTPS (TLS 1.2+) on --http-listen with this PEM certificate chain (with --tls-key)");
ABSL_FLAG(std::string, tls_key, "", "The PEM private key of --tls-cert");
ABSL_FLAG(int, http_threads, 2, "Threads serving HTTP (never a shard's)");
ABSL_FLAG(int, http_max_connections, 1024,
          "Open HTTP connections at most; further ones are closed at once");
ABSL_FLAG(int64_t, http_max_body_bytes, 1024 * 1024,
          "Largest HTTP request body accepted (larger: 413)");
ABSL_FLAG(absl::Duration, http_read_timeout, absl::Seconds(10),
          "A client must send a whole request within this (slow clients are disconnected)");
ABSL_FLAG(absl::Duration, http_idle_timeout, absl::Seconds(30),
          "A keep-alive connection idle this long is closed");
ABSL_FLAG(double, api_rate, 1000, "API requests per second per API key (token bucket rate)");
ABSL_FLAG(double, api_burst, 2000, "API requests per API key in a burst (token bucket size)");
ABSL_FLAG(int64_t, api_max_events, 1000, "Events per POST /v1/events request at most");
ABSL_FLAG(std::vector<std::string>, stripe_webhook_secret, {},
          "Stripe webhook endpoint secret(s) (whsec_…, comma-separated during a rotation): "
          "enables POST /v1/stripe/webhook; better set as METERD_STRIPE_WEBHOOK_SECRET than on "
          "the command line");
ABSL_FLAG(std::string, stripe_secret_key, "",
          "Stripe secret or restricted key (sk_…/rk_…) for the export of shared.stripe_outbox; "
          "in `run`, enables the export. Never logged; better set as METERD_STRIPE_SECRET_KEY or "
          "in --stripe-secret-key-file than on the command line");
ABSL_FLAG(std::string, stripe_secret_key_file, "",
          "A file holding the Stripe secret key (e.g. a mounted secret), instead of "
          "--stripe-secret-key");
ABSL_FLAG(std::string, stripe_api_base, "https://api.stripe.com",
          "Where the Stripe API is (tests and the demo point it at a local fake)");
ABSL_FLAG(int, stripe_export_senders, 4, "Concurrent connections sending the outbox to Stripe");
ABSL_FLAG(absl::Duration, stripe_export_timeout, absl::Minutes(10),
          "stripe-export: give up after this long (rows left are sent by the next run)");
ABSL_FLAG(std::string, summary_json, "",
          "When the run ends, write every metric (the same registry as /metrics) as one JSON "
          "object to this file; empty: off");
ABSL_FLAG(std::string, as_of, "", "Close periods that ended by this RFC 3339 time (default: now)");
ABSL_FLAG(bool, allow_future, false,
          "close-period: accept an --as-of in the future (invoices periods not yet ended)");
ABSL_FLAG(std::string, org, "", "org export / org erase: the organization id (UUID; required)");
ABSL_FLAG(std::string, out, "",
          "org export: write the JSON document to this file (mode 0600) instead of stdout");
ABSL_FLAG(std::vector<std::string>, scope, {},
          "api-key create: what the key may do for its org, comma-separated: ingest, read, admin "
          "(admin: everything, including its subscription; default ingest)");
ABSL_FLAG(bool, admin, false,
          "api-key create: an admin key (any org, every scope) instead of an org key");
ABSL_FLAG(std::string, label, "", "api-key create: a note for people (who or what uses the key)");
ABSL_FLAG(std::string, key_id, "", "api-key revoke: the key's id (the 12 hex digits after mk_)");
ABSL_FLAG(uint64_t, seed, 1, "Seed for organization ids and event mix (same seed, same events)");

namespace meterd::daemon {
namespace {

absl::Status Require(const char* flag, const std::string& value) {
  if (value.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " is required (or set METERD_", absl::AsciiStrToUpper(flag), ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<kafka::Properties> ParseProperties(const std::vector<std::string>& raw) {
  kafka::Properties properties;
  for (const std::string& text : raw) {
    ASSIGN_OR_RETURN(auto pair, kafka::ParseProperty(text));
    properties.push_back(std::move(pair));
  }
  return properties;
}

// The Stripe export's options from the flags; nullopt when no key is given.
absl::StatusOr<std::optional<stripe::ExporterOptions>> StripeExportOptions() {
  std::string key = absl::GetFlag(FLAGS_stripe_secret_key);
  const std::string file = absl::GetFlag(FLAGS_stripe_secret_key_file);
  if (!key.empty() && !file.empty()) {
    return absl::InvalidArgumentError(
        "give --stripe-secret-key or --stripe-secret-key-file, not both");
  }
  if (!file.empty()) {
    std::ifstream in(file);
    std::stringstream text;
    text << in.rdbuf();
    if (!in) {
      return absl::InvalidArgumentError(
          absl::StrCat("--stripe-secret-key-file: cannot read ", file));
    }
    key = std::string(absl::StripAsciiWhitespace(text.str()));
    if (key.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--stripe-secret-key-file: ", file, " is empty"));
    }
  }
  if (key.empty()) return std::nullopt;
  stripe::ExporterOptions options;
  options.secret_key = key;
  options.api_base = absl::GetFlag(FLAGS_stripe_api_base);
  options.senders = absl::GetFlag(FLAGS_stripe_export_senders);  // Checked by the exporter.
  return options;
}

absl::Status Run(const std::vector<std::string>& raw_properties) {
  pipeline::PipelineOptions o;
  o.pg = absl::GetFlag(FLAGS_pg);
  o.pg_timeouts.connect = absl::GetFlag(FLAGS_pg_connect_timeout);
  o.pg_timeouts.statement = absl::GetFlag(FLAGS_pg_statement_timeout);
  o.pg_timeouts.lock = absl::GetFlag(FLAGS_pg_lock_timeout);
  o.ingest.brokers = absl::GetFlag(FLAGS_brokers);
  o.ingest.topic = absl::GetFlag(FLAGS_topic);
  o.ingest.group = absl::GetFlag(FLAGS_group);
  o.ingest.shards = absl::GetFlag(FLAGS_shards);
  o.ingest.flush_interval = absl::GetFlag(FLAGS_flush_interval);
  o.ingest.max_visibility_latency = absl::GetFlag(FLAGS_max_visibility_latency);
  if (o.ingest.max_visibility_latency == absl::ZeroDuration()) {
    o.ingest.max_visibility_latency = 5 * o.ingest.flush_interval;
  }
  o.ingest.max_unflushed_keys =
      static_cast<size_t>(std::max<int64_t>(0, absl::GetFlag(FLAGS_max_unflushed_keys)));
  o.ingest.stats_interval = absl::GetFlag(FLAGS_stats_interval);
  o.ingest.startup_timeout = absl::GetFlag(FLAGS_startup_timeout);
  o.ingest.parse_limits.late_window = absl::GetFlag(FLAGS_late_window);
  o.ingest.parse_limits.max_future_skew = absl::GetFlag(FLAGS_max_future_skew);
  if (absl::GetFlag(FLAGS_dedup_max_ids) < 0) {
    return absl::InvalidArgumentError("--dedup-max-ids must be >= 0 (0 turns dedup off)");
  }
  o.ingest.dedup.max_ids = static_cast<size_t>(absl::GetFlag(FLAGS_dedup_max_ids));
  o.ingest.dedup.window = absl::GetFlag(FLAGS_dedup_window);
  ASSIGN_OR_RETURN(o.ingest.kafka_properties, ParseProperties(raw_properties));
  o.billing = absl::GetFlag(FLAGS_billing);
  o.compact_interval = absl::GetFlag(FLAGS_compact_interval);
  o.http_listen = absl::GetFlag(FLAGS_http_listen);
  o.http_tls = {absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key)};
  o.http_limits.threads = absl::GetFlag(FLAGS_http_threads);
  o.http_limits.max_connections = absl::GetFlag(FLAGS_http_max_connections);
  o.http_limits.max_body_bytes =
      static_cast<size_t>(std::max<int64_t>(0, absl::GetFlag(FLAGS_http_max_body_bytes)));
  o.http_limits.read_timeout = absl::GetFlag(FLAGS_http_read_timeout);
  o.http_limits.idle_timeout = absl::GetFlag(FLAGS_http_idle_timeout);
  o.api_rate = absl::GetFlag(FLAGS_api_rate);
  o.api_burst = absl::GetFlag(FLAGS_api_burst);
  o.api_max_events = absl::GetFlag(FLAGS_api_max_events);
  for (const std::string& entry : absl::GetFlag(FLAGS_stripe_webhook_secret)) {
    const std::string secret(absl::StripAsciiWhitespace(entry));
    if (secret.empty()) continue;
    if (secret.size() < 16) {
      return absl::InvalidArgumentError(
          "--stripe-webhook-secret: a secret is at least 16 characters (Stripe's whsec_…)");
    }
    o.stripe_webhook_secrets.push_back(secret);
  }
  ASSIGN_OR_RETURN(o.stripe_export, StripeExportOptions());
  o.summary_json = absl::GetFlag(FLAGS_summary_json);
  InstallStopSignals();
  ASSIGN_OR_RETURN(auto pipeline, pipeline::Pipeline::Start(std::move(o), &SystemClock::Get()));
  return pipeline->Run([] { return StopRequested(); });
}

absl::Status Migrate(const std::vector<std::string>&) {
  const std::string pg = absl::GetFlag(FLAGS_pg);
  RETURN_IF_ERROR(Require("pg", pg));
  ASSIGN_OR_RETURN(int applied, store::ApplyMigrations(pg));
  LOG_INFO("migrate: {} migration(s) applied, schema is current", applied);
  return absl::OkStatus();
}

absl::Status ClosePeriod(const std::vector<std::string>&) {
  const std::string pg = absl::GetFlag(FLAGS_pg);
  RETURN_IF_ERROR(Require("pg", pg));
  absl::Time as_of = absl::Now();
  const std::string text = absl::GetFlag(FLAGS_as_of);
  std::string error;
  if (!text.empty() && !absl::ParseTime(absl::RFC3339_full, text, &as_of, &error)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--as-of must be RFC 3339 (e.g. 2026-12-01T00:00:00Z): ", error));
  }
  // Invoicing a period that has not ended yet bills a partial month as if it were whole.
  if (as_of > absl::Now() + absl::Minutes(1) && !absl::GetFlag(FLAGS_allow_future)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--as-of ", text,
                     " is in the future; periods that have not ended would be "
                     "invoiced (pass --allow-future to do it anyway)"));
  }
  RETURN_IF_ERROR(store::CheckSchemaCurrent(pg));
  ASSIGN_OR_RETURN(billing::CloseSummary summary, billing::ClosePeriods(pg, as_of));
  LOG_INFO("close-period: {} invoice(s) created for periods ended by {}", summary.invoices_created,
           absl::FormatTime(absl::RFC3339_sec, as_of, absl::UTCTimeZone()));
  std::printf("%s\n", billing::CloseSummaryJson(summary).c_str());
  std::fflush(stdout);
  // The revenue KPIs through the last month before --as-of's (a month's invoices exist once
  // its periods ended; the current month's are not there yet).
  const absl::CivilDay through =
      absl::CivilDay(absl::CivilMonth(absl::ToCivilDay(as_of, absl::UTCTimeZone()))) - 1;
  absl::StatusOr<int64_t> kpis = billing::ComputeBillingMetrics(pg, through);
  if (!kpis.ok()) {
    return absl::Status(kpis.status().code(),
                        absl::StrCat("invoices were created, but the billing metrics were not "
                                     "computed: ",
                                     kpis.status().message()));
  }
  LOG_INFO("close-period: {} billing metric(s) computed through {}", *kpis,
           absl::FormatCivilTime(through));
  return billing::FailuresStatus(summary);
}

absl::Status StripeExport(const std::vector<std::string>&) {
  const std::string pg = absl::GetFlag(FLAGS_pg);
  RETURN_IF_ERROR(Require("pg", pg));
  ASSIGN_OR_RETURN(std::optional<stripe::ExporterOptions> options, StripeExportOptions());
  if (!options.has_value()) {
    return absl::InvalidArgumentError(
        "--stripe-secret-key or --stripe-secret-key-file is required (or set "
        "METERD_STRIPE_SECRET_KEY)");
  }
  ASSIGN_OR_RETURN(auto exporter, stripe::StripeExporter::Create(pg, *options));
  RETURN_IF_ERROR(store::CheckSchemaCurrent(pg));
  const stripe::DrainSummary summary = exporter->Drain(absl::GetFlag(FLAGS_stripe_export_timeout));
  std::printf("{\"sent\":%lld,\"refused\":%lld,\"pending\":%lld,\"failed_rows\":%lld}\n",
              static_cast<long long>(summary.sent), static_cast<long long>(summary.refused),
              static_cast<long long>(summary.still_pending),
              static_cast<long long>(summary.failed_rows));
  std::fflush(stdout);
  if (!summary.status_known) {
    return absl::UnavailableError(
        "the outbox's backlog could not be read at the end (see the log); run again");
  }
  if (summary.failed_rows > 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        summary.failed_rows,
        " outbox row(s) failed (shared.stripe_outbox state 'failed', last_error says why); "
        "fix, then SELECT shared.retry_stripe_exports(); ",
        summary.still_pending, " row(s) pending"));
  }
  if (summary.still_pending > 0) {
    return absl::UnavailableError(absl::StrCat(
        summary.still_pending,
        " outbox row(s) still pending (Stripe unreachable or rate limiting?); run again later"));
  }
  return absl::OkStatus();
}

absl::Status ReplayRejected(const std::vector<std::string>&) {
  const std::string pg = absl::GetFlag(FLAGS_pg);
  RETURN_IF_ERROR(Require("pg", pg));
  store::ReplayOptions options;
  options.reason = absl::GetFlag(FLAGS_reason);
  RETURN_IF_ERROR(Require("reason", options.reason));
  const std::string since = absl::GetFlag(FLAGS_since);
  std::string error;
  if (!since.empty() && !absl::ParseTime(absl::RFC3339_full, since, &options.since, &error)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--since must be RFC 3339 (e.g. 2026-12-01T00:00:00Z): ", error));
  }
  options.limits.late_window = absl::GetFlag(FLAGS_late_window);
  options.limits.max_future_skew = absl::GetFlag(FLAGS_max_future_skew);
  // Replayed usage may be as old as --late-window: the close must look back that far.
  RETURN_IF_ERROR(store::CheckSchemaCurrent(pg));
  RETURN_IF_ERROR(billing::RecordLateWindow(pg, options.limits.late_window));
  // Checks the reason code, then the schema, before reading anything.
  ASSIGN_OR_RETURN(store::ReplaySummary summary, store::ReplayRejected(pg, options, absl::Now()));
  std::printf("%s\n", store::ReplaySummaryJson(summary).c_str());
  return absl::OkStatus();
}

absl::Status PurgeRejected(const std::vector<std::string>&) {
  const std::string pg = absl::GetFlag(FLAGS_pg);
  RETURN_IF_ERROR(Require("pg", pg));
  RETURN_IF_ERROR(store::CheckSchemaCurrent(pg));
  ASSIGN_OR_RETURN(int64_t purged, store::PurgeRejected(pg, absl::GetFlag(FLAGS_older_than)));
  std::printf("{\"purged\":%lld}\n", static_cast<long long>(purged));
  LOG_INFO("purge-rejected: {} row(s) rejected more than {} ago deleted", purged,
           absl::FormatDuration(absl::GetFlag(FLAGS_older_than)));
  return absl::OkStatus();
}

absl::Status ArchiveUsage(const std::vector<std::string>&) {
  const std::string pg = absl::GetFlag(FLAGS_pg);
  RETURN_IF_ERROR(Require("pg", pg));
  if (absl::GetFlag(FLAGS_archive_batch_rows) < 1) {
    return absl::InvalidArgumentError("--archive-batch-rows must be at least 1");
  }
  RETURN_IF_ERROR(store::CheckSchemaCurrent(pg));
  ASSIGN_OR_RETURN(std::vector<store::ArchivedMonth> months,
                   store::ArchiveUsage(pg, absl::Now(), absl::GetFlag(FLAGS_archive_batch_rows)));
  std::printf("%s\n", store::ArchiveSummaryJson(months).c_str());
  LOG_INFO("archive-usage: {} closed month(s) had rows in the hot table", months.size());
  return absl::OkStatus();
}

absl::Status OrgExport(const std::vector<std::string>&) {
  const std::string pg = absl::GetFlag(FLAGS_pg);
  RETURN_IF_ERROR(Require("pg", pg));
  const std::string org = absl::GetFlag(FLAGS_org);
  RETURN_IF_ERROR(Require("org", org));
  ASSIGN_OR_RETURN(std::string document, store::ExportOrg(pg, org));
  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) {
    std::printf("%s\n", document.c_str());
    return absl::OkStatus();
  }
  // Personal data: readable by its owner only.
  absl::Status written = WriteFileAtomically(out, document + "\n", 0600);
  if (!written.ok()) return absl::InternalError(absl::StrCat("--out: ", written.message()));
  LOG_INFO("org export: {} bytes written to {}", document.size() + 1, out);
  return absl::OkStatus();
}

absl::Status OrgErase(const std::vector<std::string>&) {
  const std::string pg = absl::GetFlag(FLAGS_pg);
  RETURN_IF_ERROR(Require("pg", pg));
  const std::string org = absl::GetFlag(FLAGS_org);
  RETURN_IF_ERROR(Require("org", org));
  ASSIGN_OR_RETURN(std::string summary, store::EraseOrg(pg, org));
  std::printf("%s\n", summary.c_str());
  return absl::OkStatus();
}

absl::Status ApiKeyCreate(const std::vector<std::string>&) {
  const std::string pg = absl::GetFlag(FLAGS_pg);
  RETURN_IF_ERROR(Require("pg", pg));
  const bool admin = absl::GetFlag(FLAGS_admin);
  const std::string org = absl::GetFlag(FLAGS_org);
  uint8_t scopes = 0;
  for (const std::string& name : absl::GetFlag(FLAGS_scope)) {
    ASSIGN_OR_RETURN(uint8_t scope, api::ParseScope(name));
    scopes |= scope;
  }
  if (admin) {
    if (!org.empty() || (scopes != 0 && scopes != api::kScopeAdmin)) {
      return absl::InvalidArgumentError(
          "--admin makes a key for every org and scope: give neither --org nor --scope");
    }
    scopes = api::kScopeAdmin;
  } else {
    if (org.empty()) {
      return absl::InvalidArgumentError("--org is required (or --admin for an admin key)");
    }
    if (scopes == 0) scopes = api::kScopeIngest;
  }
  ASSIGN_OR_RETURN(api::CreatedKey key,
                   api::CreateApiKey(pg, org, scopes, absl::GetFlag(FLAGS_label)));
  // The token is shown this once; only its salted hash is stored.
  std::printf("{\"key_id\":\"%s\",\"org\":\"%s\",\"scopes\":\"%s\",\"token\":\"%s\"}\n",
              key.key_id.c_str(), org.c_str(), api::ScopeNames(scopes).c_str(), key.token.c_str());
  LOG_INFO("api-key create: key {} for {} ({}); the token is printed once, store it now",
           key.key_id, admin ? "every org" : org, api::ScopeNames(scopes));
  return absl::OkStatus();
}

absl::Status ApiKeyList(const std::vector<std::string>&) {
  const std::string pg = absl::GetFlag(FLAGS_pg);
  RETURN_IF_ERROR(Require("pg", pg));
  ASSIGN_OR_RETURN(auto keys, api::ListApiKeys(pg, absl::GetFlag(FLAGS_org)));
  std::printf("%s\n", api::KeyListJson(keys).c_str());
  return absl::OkStatus();
}

absl::Status ApiKeyRevoke(const std::vector<std::string>&) {
  const std::string pg = absl::GetFlag(FLAGS_pg);
  RETURN_IF_ERROR(Require("pg", pg));
  const std::string key_id = absl::GetFlag(FLAGS_key_id);
  RETURN_IF_ERROR(Require("key_id", key_id));
  ASSIGN_OR_RETURN(bool revoked, api::RevokeApiKey(pg, key_id));
  std::printf("{\"key_id\":\"%s\",\"revoked\":%s}\n", key_id.c_str(), revoked ? "true" : "false");
  if (!revoked) LOG_WARN("api-key revoke: no live key {} (unknown or revoked before)", key_id);
  return absl::OkStatus();
}

absl::Status DevBroker(const std::vector<std::string>&) {
  InstallStopSignals();
  ASSIGN_OR_RETURN(auto broker, devtools::DevBroker::Start(absl::GetFlag(FLAGS_topic),
                                                           absl::GetFlag(FLAGS_partitions)));
  std::printf("%s\n", broker->bootstrap().c_str());
  std::fflush(stdout);
  LOG_INFO("dev-broker: topic {} with {} partitions at {}; SIGTERM stops it",
           absl::GetFlag(FLAGS_topic), absl::GetFlag(FLAGS_partitions), broker->bootstrap());
  while (!StopRequested()) absl::SleepFor(absl::Milliseconds(100));
  return absl::OkStatus();
}

absl::Status DevStripe(const std::vector<std::string>&) {
  InstallStopSignals();
  devtools::FakeStripeOptions options;
  const std::string listen = absl::GetFlag(FLAGS_http_listen);
  if (!listen.empty()) options.listen = listen;
  ASSIGN_OR_RETURN(auto fake, devtools::FakeStripe::Start(options));
  std::printf("%s\n", fake->base_url().c_str());
  std::fflush(stdout);
  LOG_INFO(
      "dev-stripe: a fake Stripe API at {} (test key {}, webhook secret {}); GET "
      "/__fake/meter_events lists what it got; SIGTERM stops it",
      fake->base_url(), options.secret_key, options.webhook_secret);
  while (!StopRequested()) absl::SleepFor(absl::Milliseconds(100));
  return absl::OkStatus();
}

absl::Status Loadgen(const std::vector<std::string>& raw_properties) {
  devtools::LoadgenOptions options;
  options.brokers = absl::GetFlag(FLAGS_brokers);
  RETURN_IF_ERROR(Require("brokers", options.brokers));
  options.topic = absl::GetFlag(FLAGS_topic);
  options.events = absl::GetFlag(FLAGS_events);
  options.orgs = absl::GetFlag(FLAGS_orgs);
  options.malformed_share = absl::GetFlag(FLAGS_malformed_share);
  options.duplicate_share = absl::GetFlag(FLAGS_duplicate_share);
  options.days = absl::GetFlag(FLAGS_days);
  options.seed = absl::GetFlag(FLAGS_seed);
  options.rate = absl::GetFlag(FLAGS_rate);
  ASSIGN_OR_RETURN(options.kafka_properties, ParseProperties(raw_properties));
  options.progress = [](int64_t produced, int64_t total) {
    std::fprintf(stderr, "loadgen: %lld/%lld events (%.0f%%)\n", static_cast<long long>(produced),
                 static_cast<long long>(total), total ? 100.0 * produced / total : 100.0);
  };
  InstallStopSignals();
  ASSIGN_OR_RETURN(devtools::LoadgenResult result, devtools::RunLoadgen(options));
  const std::string out = absl::GetFlag(FLAGS_expected_out);
  if (!out.empty()) RETURN_IF_ERROR(devtools::WriteExpectedCsv(result, out));
  std::printf("%s\n", devtools::SummaryJson(result).c_str());
  return absl::OkStatus();
}

}  // namespace

const std::vector<Subcommand>& Subcommands() {
  static const std::vector<Subcommand> kSubcommands = {
      {"run",
       "consume usage events from Kafka into Postgres, exactly once",
       {"pg",
        "brokers",
        "topic",
        "group",
        "shards",
        "flush_interval",
        "max_visibility_latency",
        "compact_interval",
        "max_unflushed_keys",
        "late_window",
        "max_future_skew",
        "dedup_window",
        "dedup_max_ids",
        "pg_connect_timeout",
        "pg_statement_timeout",
        "pg_lock_timeout",
        "stats_interval",
        "startup_timeout",
        "billing",
        "http_listen",
        "tls_cert",
        "tls_key",
        "http_threads",
        "http_max_connections",
        "http_max_body_bytes",
        "http_read_timeout",
        "http_idle_timeout",
        "api_rate",
        "api_burst",
        "api_max_events",
        "stripe_webhook_secret",
        "stripe_secret_key",
        "stripe_secret_key_file",
        "stripe_api_base",
        "stripe_export_senders",
        "summary_json",
        "kafka_property"},
       &Run},
      {"migrate", "apply the embedded schema migrations", {"pg"}, &Migrate},
      {"close-period",
       "invoice every subscription period that has ended, then recompute the revenue KPIs "
       "(shared.billing_metrics) through last month (the daily cron); idempotent",
       {"pg", "as_of", "allow_future"},
       &ClosePeriod},
      {"stripe-export",
       "send the Stripe outbox (meter events of closed periods) until it is empty; exactly "
       "once per row",
       {"pg", "stripe_secret_key", "stripe_secret_key_file", "stripe_api_base",
        "stripe_export_senders", "stripe_export_timeout"},
       &StripeExport},
      {"replay-rejected",
       "count the rejected events of one reason that parse now (new meter, raised maximum); "
       "each row at most once",
       {"pg", "reason", "since", "late_window", "max_future_skew"},
       &ReplayRejected},
      {"purge-rejected",
       "delete shared.rejected_events rows older than --older-than (90 days; never within the "
       "late window plus 7 days, which replay-rejected could still bill)",
       {"pg", "older_than"},
       &PurgeRejected},
      {"archive-usage",
       "move every month older than the late window out of the hot shared.api_usage_meters "
       "into its own table, shared.api_usage_meters_YYYY_MM (readers see the same totals); "
       "idempotent",
       {"pg", "archive_batch_rows"},
       &ArchiveUsage},
      {"org export",
       "print everything meterd holds about one organization as one JSON document (admin)",
       {"pg", "org", "out"},
       &OrgExport},
      {"org erase",
       "erase one organization's personal data; invoices, payments and usage stay under a "
       "new pseudonymous id; idempotent (admin)",
       {"pg", "org"},
       &OrgErase},
      {"api-key create",
       "create an API key for one org (or --admin) and print its token once",
       {"pg", "org", "scope", "admin", "label"},
       &ApiKeyCreate},
      {"api-key list", "list API keys (never their secrets)", {"pg", "org"}, &ApiKeyList},
      {"api-key revoke",
       "revoke an API key; every instance refuses it within a second",
       {"pg", "key_id"},
       &ApiKeyRevoke},
      {"dev-broker",
       "start an embedded Kafka (librdkafka mock cluster) on 127.0.0.1; prints its address",
       {"topic", "partitions"},
       &DevBroker},
      {"dev-stripe",
       "start a fake Stripe API on 127.0.0.1 for tests and the demo; prints its URL",
       {"http_listen"},
       &DevStripe},
      {"loadgen",
       "produce generated usage events and print the expected totals as JSON",
       {"brokers", "topic", "events", "orgs", "malformed_share", "duplicate_share", "expected_out",
        "days", "seed", "rate", "kafka_property"},
       &Loadgen},
  };
  return kSubcommands;
}

}  // namespace meterd::daemon
