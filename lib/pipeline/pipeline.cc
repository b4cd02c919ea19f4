#include "lib/pipeline/pipeline.h"

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "lib/billing/close_period.h"
#include "lib/common/files.h"
#include "lib/common/logging.h"
#include "lib/common/process.h"
#include "lib/common/status_macros.h"
#include "lib/store/migrations.h"
#include "lib/store/pg_flush_writer.h"

namespace meterd::pipeline {

absl::Status Validate(const PipelineOptions& o) {
  if (o.pg.empty()) return absl::InvalidArgumentError("--pg is required (or set METERD_PG)");
  if (o.ingest.brokers.empty()) {
    return absl::InvalidArgumentError("--brokers is required (or set METERD_BROKERS)");
  }
  if (o.ingest.shards < 1) return absl::InvalidArgumentError("--shards must be at least 1");
  if (o.ingest.flush_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--flush-interval must be positive");
  }
  if (o.ingest.max_visibility_latency < o.ingest.flush_interval) {
    return absl::InvalidArgumentError(
        "--max-visibility-latency must be at least --flush-interval (equal: a fixed interval)");
  }
  if (o.compact_interval < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--compact-interval must be at least 0 (0: no folding)");
  }
  if (o.ingest.max_unflushed_keys < 1) {
    return absl::InvalidArgumentError("--max-unflushed-keys must be at least 1");
  }
  if (o.ingest.dedup.window <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--dedup-window must be positive");
  }
  const http::Limits& h = o.http_limits;
  if (h.threads < 1 || h.threads > 64 || h.max_connections < 1 || h.max_body_bytes < 1024 ||
      h.read_timeout <= absl::ZeroDuration() || h.idle_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "--http-threads must be 1..64, --http-max-connections at least 1, "
        "--http-max-body-bytes at least 1024, --http-read-timeout and --http-idle-timeout "
        "positive");
  }
  if (o.http_tls.cert.empty() != o.http_tls.key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together: give both or neither");
  }
  if (!o.http_tls.cert.empty() && o.http_listen.empty()) {
    return absl::InvalidArgumentError("--tls-cert needs --http-listen");
  }
  if (!(o.api_rate > 0) || !(o.api_burst >= 1) || o.api_max_events < 1) {
    return absl::InvalidArgumentError(
        "--api-rate must be positive, --api-burst at least 1, --api-max-events at least 1");
  }
  const store::PgTimeouts& t = o.pg_timeouts;
  if (t.connect < absl::Seconds(2) || t.statement < absl::Seconds(1) ||
      t.lock < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "--pg-connect-timeout must be at least 2s (libpq's minimum), --pg-statement-timeout at "
        "least 1s, --pg-lock-timeout at least 0 (0: none)");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Pipeline>> Pipeline::Start(PipelineOptions options,
                                                          const Clock* clock) {
  RETURN_IF_ERROR(Validate(options));
  std::unique_ptr<Pipeline> p(new Pipeline(std::move(options)));
  const PipelineOptions& o = p->options_;
  p->metrics_.AddCallbackGauge("meterd_peak_rss_bytes", "Peak resident set size (bytes)", {},
                               [] { return PeakRssKib() * 1024; });
  if (!o.http_listen.empty()) {
    Pipeline* self = p.get();
    ASSIGN_OR_RETURN(
        p->server_,
        http::HttpServer::Start(
            o.http_listen,
            [self](http::Request request, http::Responder respond) {
              self->Handle(std::move(request), std::move(respond));
            },
            o.http_limits, [self](const http::Request& head) { return self->Precheck(head); },
            o.http_tls));
    p->metrics_.AddCallbackGauge(
        "meterd_http_connections", "Open HTTP connections", {},
        [server = p->server_.get()] { return server->open_connections(); });
    LOG_INFO("{}: /metrics, /metrics.json, /healthz, /readyz and /v1 on {} (port {})",
             o.http_tls.cert.empty() ? "http" : "https", o.http_listen, p->server_->port());
  }
  RETURN_IF_ERROR(store::CheckSchemaCurrent(o.pg));
  // The close must look back as far as this instance accepts late events.
  RETURN_IF_ERROR(billing::RecordLateWindow(o.pg, o.ingest.parse_limits.late_window));
  ASSIGN_OR_RETURN(p->meters_, store::LoadMeters(o.pg));
  if (p->server_ != nullptr) RETURN_IF_ERROR(p->StartApi());
  ASSIGN_OR_RETURN(auto writer, store::PgFlushWriter::Create(o.pg, {o.ingest.group, o.ingest.topic},
                                                             &p->meters_, o.pg_timeouts));
  ingest::IngestOptions ingest = o.ingest;
  ingest.metrics = &p->metrics_;
  if (o.billing) {
    ASSIGN_OR_RETURN(p->overage_, billing::OverageWorker::Create(
                                      o.pg, {.clock = clock, .metrics = &p->metrics_}));
    ingest.on_committed = [worker = p->overage_.get()](const std::vector<event::OrgId>& orgs) {
      worker->OrgsTouched(orgs);
    };
    p->overage_->Start();
  }
  if (o.compact_interval > absl::ZeroDuration()) {
    ASSIGN_OR_RETURN(p->compactor_,
                     store::UsageCompactor::Create(o.pg, {.interval = o.compact_interval,
                                                          .timeouts = o.pg_timeouts,
                                                          .clock = clock,
                                                          .metrics = &p->metrics_}));
    p->compactor_->Start();
  }
  if (o.stripe_export.has_value()) {
    stripe::ExporterOptions exporter = *o.stripe_export;
    exporter.metrics = &p->metrics_;
    ASSIGN_OR_RETURN(p->exporter_, stripe::StripeExporter::Create(o.pg, std::move(exporter)));
    p->exporter_->Start();
    LOG_INFO("stripe export: {} sender(s) to {}", o.stripe_export->senders,
             o.stripe_export->api_base);
  }
  ASSIGN_OR_RETURN(p->ingestor_,
                   ingest::Ingestor::Create(ingest, std::move(writer), &p->meters_, clock));
  p->serving_.store(p->ingestor_.get());
  return p;
}

Pipeline::~Pipeline() {
  // HTTP ingest first: no new event reaches the producer, every request still waiting for
  // Kafka is answered (acknowledged, or 503 when Kafka does not answer within 10 s) while the
  // server can still send it; only then does the server go (it reads everything else).
  if (api_owned_ != nullptr) api_owned_->Drain();
  if (producer_ != nullptr) producer_->Close(absl::Seconds(10));
  server_.reset();
  serving_.store(nullptr);
}

absl::Status Pipeline::Run(const std::function<bool()>& stop) {
  absl::Status run = ingestor_->Run(stop);
  if (exporter_) {
    exporter_->Stop();  // Rows of an unfinished batch are sent again by the next run.
    const stripe::ExporterMetrics& m = exporter_->metrics();
    LOG_INFO("stripe export: {} sent, {} refused by Stripe", m.sent->value(), m.refused->value());
  }
  if (compactor_) {
    compactor_->Stop();  // Unfolded deltas stay visible; the next fold takes them.
    const store::CompactorMetrics& m = compactor_->metrics();
    LOG_INFO("usage compactor: {} folds, {} delta rows into {} keys, {} failures", m.folds->value(),
             m.delta_rows->value(), m.keys->value(), m.failures->value());
  }
  if (overage_) {
    overage_->Stop();
    const billing::OverageMetrics& m = overage_->metrics();
    LOG_INFO("overage worker: {} refreshes, {} orgs refreshed, {} alerts, {} failures",
             m.refreshes->value(), m.orgs_refreshed->value(), m.alerts_raised->value(),
             m.failures->value());
  }
  if (absl::Status written = WriteSummary(); !written.ok()) {
    LOG_ERROR("{}", written.message());
    if (run.ok()) run = written;
  }
  LOG_INFO("stopped{}; peak RSS {} KiB", run.ok() ? " cleanly" : "", PeakRssKib());
  return run;
}

absl::Status Pipeline::WriteSummary() const {
  if (options_.summary_json.empty()) return absl::OkStatus();
  absl::Status written = WriteFileAtomically(options_.summary_json, metrics_.RenderJson() + "\n");
  if (written.ok()) return written;
  return absl::InternalError(absl::StrCat("--summary-json: ", written.message()));
}

absl::Status Pipeline::StartApi() {
  const PipelineOptions& o = options_;
  ASSIGN_OR_RETURN(keys_, api::KeyStore::Start(o.pg));
  kafka::Properties properties = {{"bootstrap.servers", o.ingest.brokers}};
  properties.insert(properties.end(), o.ingest.kafka_properties.begin(),
                    o.ingest.kafka_properties.end());
  ASSIGN_OR_RETURN(producer_, kafka::AckedProducer::Create(properties));
  api_owned_ = std::make_unique<api::Api>(
      api::ApiOptions{.topic = o.ingest.topic,
                      .parse_limits = o.ingest.parse_limits,
                      .max_events_per_request = o.api_max_events,
                      .rate_per_key = o.api_rate,
                      .burst_per_key = o.api_burst,
                      .metrics = &metrics_,
                      .pg = o.pg,
                      .pg_timeouts = o.pg_timeouts,
                      .stripe_webhook_secrets = o.stripe_webhook_secrets},
      keys_.get(), producer_.get(), &meters_);
  api_.store(api_owned_.get());
  LOG_INFO("http: /v1 API ready ({} API keys loaded)", keys_->size());
  return absl::OkStatus();
}

std::optional<http::Response> Pipeline::Precheck(const http::Request& head) const {
  if (!api::Api::Owns(head.path)) return std::nullopt;
  const api::Api* api = api_.load();
  return api == nullptr ? std::nullopt : api->Precheck(head);
}

void Pipeline::Handle(http::Request request, http::Responder respond) {
  if (!api::Api::Owns(request.path)) {
    if (request.method != "GET") {
      respond({405, "text/plain; charset=utf-8", "only GET\n", {{"Allow", "GET"}}});
      return;
    }
    respond(Serve(request.path));
    return;
  }
  api::Api* api = api_.load();
  if (api == nullptr) {
    respond(api::RetryLater("starting", "meterd is starting; retry shortly"));
    return;
  }
  api->Handle(std::move(request), std::move(respond));
}

http::Response Pipeline::Serve(const std::string& path) const {
  constexpr char kText[] = "text/plain; charset=utf-8";
  if (path == "/healthz") return {200, kText, "ok\n", {}};
  if (path == "/metrics") {
    return {200, "text/plain; version=0.0.4; charset=utf-8", metrics_.RenderPrometheus(), {}};
  }
  if (path == "/metrics.json") return {200, "application/json", metrics_.RenderJson(), {}};
  if (path == api::kOpenApiPath) {
    return {200, "application/yaml", std::string(api::OpenApiDocument()), {}};
  }
  if (path != "/readyz")
    return {404, kText, "try /metrics, /metrics.json, /healthz, /readyz or /v1/openapi.yaml\n", {}};
  const ingest::Ingestor* ingestor = serving_.load();
  if (ingestor == nullptr) return {503, kText, "starting\n", {}};
  const absl::Status ready = ingestor->Readiness();
  if (!ready.ok()) return {503, kText, absl::StrCat(ready.message(), "\n"), {}};
  return {200, kText, "ready\n", {}};
}

}  // namespace meterd::pipeline
