#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "lib/api/api.h"
#include "lib/api/api_keys.h"
#include "lib/billing/overage_worker.h"
#include "lib/common/clock.h"
#include "lib/common/metrics.h"
#include "lib/event/usage_event.h"
#include "lib/http/http_server.h"
#include "lib/ingest/ingestor.h"
#include "lib/kafka/acked_producer.h"
#include "lib/store/pg_connection.h"
#include "lib/store/usage_compactor.h"
#include "lib/stripe/stripe_exporter.h"

namespace meterd::pipeline {

struct PipelineOptions {
  std::string pg;  // Postgres conninfo or URL.
  store::PgTimeouts pg_timeouts;
  // brokers, topic, group, shards, flush interval, limits, dedup, Kafka properties. Its
  // `metrics` and `on_committed` are set by the pipeline.
  ingest::IngestOptions ingest;
  bool billing = true;  // Run the overage worker (charges and quota alerts as usage lands).
  // How often the usage delta log is folded into shared.api_usage_meters; zero: never (another
  // meterd, or an operator's shared.fold_usage_deltas(), must).
  absl::Duration compact_interval = absl::Seconds(2);
  // host:port for /metrics, /metrics.json, /healthz, /readyz and the /v1 API; "": none.
  std::string http_listen;
  http::TlsFiles http_tls;  // Both set: HTTPS.
  http::Limits http_limits;
  // The API's per-key rate limit and batch bound (its topic is ingest.topic).
  double api_rate = 1000;
  double api_burst = 2000;
  int64_t api_max_events = 1000;
  std::vector<std::string> stripe_webhook_secrets;  // Empty: no Stripe webhook endpoint.
  // Set (a secret key given): send shared.stripe_outbox to Stripe while running.
  std::optional<stripe::ExporterOptions> stripe_export;
  std::string summary_json;  // Where to write the metrics as JSON when the run ends; "": none.
};

// InvalidArgument naming the flag when an option cannot work.
absl::Status Validate(const PipelineOptions& options);

// One `meterd run`: the HTTP endpoint, the meter registry, the overage worker and the
// ingestor (with its shards, flusher and Kafka consumer), sharing one metrics registry.
// Members are declared in dependency order, so destruction runs the other way without a
// comment at every reset: the server (it reads the rest) goes first, then the ingestor (its
// shards read the meters, its flusher calls the overage worker), the worker, the meters, and
// the metrics last.
class Pipeline {
 public:
  // Starts the endpoint first (a bad --http-listen fails before anything connects, and
  // /healthz answers during start-up), then checks the schema, records the late window, loads
  // the meters, and creates the writer, the overage worker and the ingestor.
  static absl::StatusOr<std::unique_ptr<Pipeline>> Start(PipelineOptions options,
                                                         const Clock* clock);
  ~Pipeline();

  // Consumes until `stop()` returns true, then flushes, leaves the group, stops the worker and
  // writes the summary JSON. The error of the final flush, if any (nothing is lost: offsets
  // were not advanced).
  absl::Status Run(const std::function<bool()>& stop);

  MetricsRegistry& metrics() { return metrics_; }
  // The endpoint's answer for GET `path` (public for tests).
  http::Response Serve(const std::string& path) const;
  // Every request: the /v1 API's, or the GET endpoints'.
  void Handle(http::Request request, http::Responder respond);
  // Before a request's body is read: the API refuses requests without a valid key.
  std::optional<http::Response> Precheck(const http::Request& head) const;

 private:
  explicit Pipeline(PipelineOptions options) : options_(std::move(options)) {}
  absl::Status WriteSummary() const;
  // Loads the API keys and starts the API's producer, then publishes the API to the server.
  absl::Status StartApi();

  const PipelineOptions options_;
  MetricsRegistry metrics_;
  event::MeterRegistry meters_;
  std::unique_ptr<store::UsageCompactor> compactor_;
  std::unique_ptr<billing::OverageWorker> overage_;
  std::unique_ptr<stripe::StripeExporter> exporter_;
  std::unique_ptr<ingest::Ingestor> ingestor_;
  // Set once the ingestor exists; the endpoint thread reads it (null: starting).
  std::atomic<const ingest::Ingestor*> serving_{nullptr};
  // The /v1 API: keys, its producer, the handler (published through `api_` once all exist).
  std::unique_ptr<api::KeyStore> keys_;
  std::unique_ptr<kafka::AckedProducer> producer_;
  std::unique_ptr<api::Api> api_owned_;
  std::atomic<api::Api*> api_{nullptr};
  std::unique_ptr<http::HttpServer> server_;
};

}  // namespace meterd::pipeline
