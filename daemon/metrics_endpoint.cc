#include "daemon/metrics_endpoint.h"

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "lib/common/process.h"
#include "lib/http/prometheus.h"

namespace meterd::daemon {

http::Response ServeEndpoint(const std::string& path, const ingest::Ingestor* ingestor,
                             const billing::OverageWorker* overage) {
  if (path != "/healthz" && path != "/readyz" && path != "/metrics")
    return {404, "text/plain; charset=utf-8", "try /metrics, /healthz or /readyz\n"};
  if (ingestor == nullptr) {
    return {path == "/healthz" ? 200 : 503, "text/plain; charset=utf-8", "starting\n"};
  }
  const ingest::IngestSnapshot s = ingestor->Snapshot();
  const ingest::FlushStats& f = ingestor->flush_stats();
  if (path == "/healthz") return {200, "text/plain; charset=utf-8", "ok\n"};
  if (path == "/readyz") {
    if (s.assigned_partitions == 0)
      return {503, "text/plain; charset=utf-8", "no partitions assigned\n"};
    if (!f.last_ok.load()) return {503, "text/plain; charset=utf-8", "last flush failed\n"};
    return {200, "text/plain; charset=utf-8", "ready\n"};
  }

  http::PrometheusText m;
  m.Add("meterd_messages_total", "counter", "Kafka messages consumed", s.messages);
  m.Add("meterd_events_total", "counter", "Valid usage events counted", s.events);
  m.Add("meterd_rejected_events_total", "counter", "Events refused (to shared.rejected_events)",
        s.rejected);
  m.Add("meterd_duplicate_events_total", "counter",
        "Events not counted because the partition counted the same (source, id) within the "
        "dedup window",
        s.duplicates);
  m.Add("meterd_dedup_ids", "gauge", "(source, id) fingerprints remembered for dedup", s.dedup_ids);
  m.Add("meterd_offset_gaps_total", "counter",
        "Log ranges found missing (retention, recreated topic); each is a rejected_events row "
        "with reason offset_gap",
        s.offset_gaps);
  m.Add("meterd_seek_failures_total", "counter", "Partition seeks that failed (retried)",
        s.seek_failures);
  m.Add("meterd_unflushed_keys", "gauge", "Counter keys not yet written to Postgres",
        s.unflushed_keys);
  m.Add("meterd_paused_shards", "gauge", "Shards not draining (Postgres down or key cap reached)",
        s.paused_shards);
  m.Add("meterd_shards", "gauge", "Shard threads", s.shards);
  m.Add("meterd_assigned_partitions", "gauge", "Kafka partitions this instance owns",
        s.assigned_partitions);
  m.Add("meterd_flushes_total", "counter", "Committed flush transactions", f.flushes.load());
  m.Add("meterd_flush_failures_total", "counter", "Flush attempts that failed (retried)",
        f.failures.load());
  m.Add("meterd_fenced_partitions_total", "counter", "Partitions whose offset CAS failed",
        f.fenced.load());
  m.Add("meterd_flushed_rows_total", "counter", "Counter rows upserted", f.rows.load());
  m.Add("meterd_flushed_events_total", "counter", "Events covered by committed flushes",
        f.events.load());
  m.Add("meterd_last_flush_rows", "gauge", "Rows in the latest committed flush",
        f.last_rows.load());
  m.Add("meterd_last_flush_events", "gauge", "Events in the latest committed flush",
        f.last_events.load());
  const int64_t last = f.last_success_unix_ms.load();
  m.Add("meterd_last_flush_age_seconds", "gauge",
        "Seconds since a flush last committed (-1: never)",
        last == 0 ? -1.0 : (absl::ToUnixMillis(absl::Now()) - last) / 1000.0);
  if (overage != nullptr) {
    const billing::OverageStats& o = overage->stats();
    m.Add("meterd_overage_refreshes_total", "counter", "Overage worker refresh rounds",
          o.refreshes.load());
    m.Add("meterd_overage_orgs_refreshed_total", "counter", "Orgs whose charges were recomputed",
          o.orgs_refreshed.load());
    m.Add("meterd_overage_pending_orgs", "gauge", "Touched orgs waiting for a refresh",
          o.pending_orgs.load());
    m.Add("meterd_quota_alerts_total", "counter", "Quota alerts raised", o.alerts_raised.load());
    m.Add("meterd_overage_failures_total", "counter", "Overage refreshes that failed (retried)",
          o.failures.load());
    m.Add("meterd_overage_failed_orgs_total", "counter",
          "Orgs whose charges could not be computed alone (logged, skipped until next usage)",
          o.failed_orgs.load());
    m.Add("meterd_billing_close_failures", "gauge",
          "Subscription periods close-period could not invoice, unresolved "
          "(shared.billing_close_failures)",
          o.open_close_failures.load());
  }
  m.Add("meterd_peak_rss_bytes", "gauge", "Peak resident set size", PeakRssKib() * 1024.0);
  return {200, "text/plain; version=0.0.4; charset=utf-8", m.text()};
}

}  // namespace meterd::daemon
