#include "lib/common/metrics.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "absl/strings/str_cat.h"

namespace meterd {
namespace {

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "metrics: %s\n", message.c_str());
  std::abort();
}

// Prometheus: metric names [a-zA-Z_:][a-zA-Z0-9_:]*, label names the same without ':'.
bool IsValidName(const std::string& name, bool colon_allowed) {
  if (name.empty() || (name[0] >= '0' && name[0] <= '9')) return false;
  return std::all_of(name.begin(), name.end(), [&](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           (colon_allowed && c == ':');
  });
}

// Shortest text that reads back as the same double; finite values only.
std::string FormatDouble(double v) {
  char buffer[32];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), v);
  return std::string(buffer, result.ptr);
}

// Label values: backslash, double quote and newline escaped. Help text: the same but quotes.
std::string PrometheusEscape(const std::string& text, bool escape_quote) {
  std::string out;
  for (char c : text) {
    if (c == '\\' || (c == '"' && escape_quote)) out += '\\';
    out += c == '\n' ? "\\n" : std::string(1, c);
  }
  return out;
}

std::string JsonString(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    if (static_cast<unsigned char>(c) < 0x20) {  // Control characters may not appear raw.
      char escaped[8];
      std::snprintf(escaped, sizeof(escaped), "\\u%04x", static_cast<unsigned>(c));
      out += escaped;
      continue;
    }
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

// {k="v",...} with `extra` (already formatted, e.g. le="0.1") last; empty if nothing to show.
std::string PrometheusLabels(const Labels& labels, const std::string& extra = "") {
  std::string out;
  for (const auto& [key, value] : labels) {
    absl::StrAppend(&out, out.empty() ? "" : ",", key, "=\"", PrometheusEscape(value, true), "\"");
  }
  if (!extra.empty()) absl::StrAppend(&out, out.empty() ? "" : ",", extra);
  return out.empty() ? out : absl::StrCat("{", out, "}");
}

// Sorted by key so that the same set given in another order names the same series.
Labels Canonical(Labels labels) {
  std::sort(labels.begin(), labels.end());
  for (size_t i = 0; i < labels.size(); ++i) {
    if (!IsValidName(labels[i].first, false)) Die("invalid label name: " + labels[i].first);
    if (i > 0 && labels[i].first == labels[i - 1].first)
      Die("label given twice: " + labels[i].first);
  }
  return labels;
}

}  // namespace

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1) {
  for (size_t i = 0; i < bounds_.size(); ++i) {
    if (!std::isfinite(bounds_[i]) || (i > 0 && bounds_[i] <= bounds_[i - 1])) {
      Die("histogram bounds must be finite and strictly increasing");
    }
  }
}

void Histogram::Observe(double seconds) {
  if (!std::isfinite(seconds)) return;
  // First bound >= seconds: Prometheus buckets are "less than or equal".
  const size_t bucket = std::lower_bound(bounds_.begin(), bounds_.end(), seconds) - bounds_.begin();
  counts_[bucket].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(seconds, std::memory_order_relaxed);
}

std::vector<uint64_t> Histogram::CumulativeCounts() const {
  std::vector<uint64_t> cumulative;
  uint64_t total = 0;
  for (const auto& count : counts_) {
    total += count.load(std::memory_order_relaxed);
    cumulative.push_back(total);
  }
  return cumulative;
}

MetricsRegistry::Series& MetricsRegistry::FindOrInsert(const std::string& name,
                                                       const std::string& help, Kind kind,
                                                       Labels labels) {
  if (!IsValidName(name, true)) Die("invalid metric name: " + name);
  // try_emplace keeps the first help text if the family exists.
  Family& family = families_.try_emplace(name, Family{kind, help, {}}).first->second;
  if (family.kind != kind) Die("metric registered again with another type: " + name);
  return family.series[Canonical(std::move(labels))];
}

Counter* MetricsRegistry::AddCounter(const std::string& name, const std::string& help,
                                     Labels labels) {
  std::lock_guard lock(mutex_);
  Series& series = FindOrInsert(name, help, Kind::kCounter, std::move(labels));
  if (!series.counter) series.counter = std::make_unique<Counter>();
  return series.counter.get();
}

Gauge* MetricsRegistry::AddGauge(const std::string& name, const std::string& help, Labels labels) {
  std::lock_guard lock(mutex_);
  Series& series = FindOrInsert(name, help, Kind::kGauge, std::move(labels));
  if (!series.gauge) series.gauge = std::make_unique<Gauge>();
  if (series.gauge->has_callback()) Die("gauge registered again without its callback: " + name);
  return series.gauge.get();
}

Gauge* MetricsRegistry::AddCallbackGauge(const std::string& name, const std::string& help,
                                         Labels labels, std::function<int64_t()> callback) {
  std::lock_guard lock(mutex_);
  Series& series = FindOrInsert(name, help, Kind::kGauge, std::move(labels));
  // A second callback would silently replace or be shadowed by the first: both are bugs.
  if (series.gauge) Die("callback gauge registered twice: " + name);
  series.gauge = std::make_unique<Gauge>(std::move(callback));
  return series.gauge.get();
}

Histogram* MetricsRegistry::AddHistogram(const std::string& name, const std::string& help,
                                         std::vector<double> bounds, Labels labels) {
  for (const auto& label : labels) {
    if (label.first == "le") Die("a histogram may not have the label le: " + name);
  }
  std::lock_guard lock(mutex_);
  Series& series = FindOrInsert(name, help, Kind::kHistogram, std::move(labels));
  if (!series.histogram) {
    series.histogram = std::make_unique<Histogram>(std::move(bounds));
  } else if (series.histogram->bounds() != bounds) {
    Die("histogram registered again with other bounds: " + name);
  }
  return series.histogram.get();
}

bool MetricsRegistry::Remove(const std::string& name, Labels labels) {
  std::lock_guard lock(mutex_);
  const auto family = families_.find(name);
  if (family == families_.end()) return false;
  if (family->second.series.erase(Canonical(std::move(labels))) == 0) return false;
  if (family->second.series.empty()) families_.erase(family);
  return true;
}

std::string MetricsRegistry::RenderPrometheus() const {
  std::lock_guard lock(mutex_);
  std::string out;
  for (const auto& [name, family] : families_) {
    const char* type = family.kind == Kind::kCounter ? "counter"
                       : family.kind == Kind::kGauge ? "gauge"
                                                     : "histogram";
    absl::StrAppend(&out, "# HELP ", name, " ", PrometheusEscape(family.help, false), "\n",
                    "# TYPE ", name, " ", type, "\n");
    for (const auto& [labels, series] : family.series) {
      if (series.counter) {
        absl::StrAppend(&out, name, PrometheusLabels(labels), " ", series.counter->value(), "\n");
      } else if (series.gauge) {
        absl::StrAppend(&out, name, PrometheusLabels(labels), " ", series.gauge->value(), "\n");
      } else {
        const Histogram& histogram = *series.histogram;
        const std::vector<uint64_t> counts = histogram.CumulativeCounts();
        for (size_t i = 0; i < counts.size(); ++i) {
          const std::string le =
              i < histogram.bounds().size() ? FormatDouble(histogram.bounds()[i]) : "+Inf";
          absl::StrAppend(&out, name, "_bucket", PrometheusLabels(labels, "le=\"" + le + "\""), " ",
                          counts[i], "\n");
        }
        absl::StrAppend(&out, name, "_sum", PrometheusLabels(labels), " ",
                        FormatDouble(histogram.sum()), "\n", name, "_count",
                        PrometheusLabels(labels), " ", counts.back(), "\n");
      }
    }
  }
  return out;
}

std::string MetricsRegistry::RenderJson() const {
  std::lock_guard lock(mutex_);
  const auto value = [](const Series& series) -> std::string {
    if (series.counter) return absl::StrCat(series.counter->value());
    if (series.gauge) return absl::StrCat(series.gauge->value());
    const Histogram& histogram = *series.histogram;
    const std::vector<uint64_t> counts = histogram.CumulativeCounts();
    std::string buckets;
    for (size_t i = 0; i < counts.size(); ++i) {
      const std::string le =
          i < histogram.bounds().size() ? FormatDouble(histogram.bounds()[i]) : "\"+Inf\"";
      absl::StrAppend(&buckets, i > 0 ? "," : "", "{\"le\":", le, ",\"count\":", counts[i], "}");
    }
    return absl::StrCat("{\"count\":", counts.back(), ",\"sum\":", FormatDouble(histogram.sum()),
                        ",\"buckets\":[", buckets, "]}");
  };
  std::string out = "{";
  for (const auto& [name, family] : families_) {
    absl::StrAppend(&out, out.size() > 1 ? "," : "", JsonString(name), ":");
    if (family.series.size() == 1 && family.series.begin()->first.empty()) {
      absl::StrAppend(&out, value(family.series.begin()->second));
      continue;
    }
    std::string series_json;
    for (const auto& [labels, series] : family.series) {
      std::string labels_json;
      for (const auto& [key, label_value] : labels) {
        absl::StrAppend(&labels_json, labels_json.empty() ? "" : ",", JsonString(key), ":",
                        JsonString(label_value));
      }
      absl::StrAppend(&series_json, series_json.empty() ? "" : ",", "{\"labels\":{", labels_json,
                      "},\"value\":", value(series), "}");
    }
    absl::StrAppend(&out, "[", series_json, "]");
  }
  return out + "}";
}

std::optional<int64_t> MetricsRegistry::Value(const std::string& name, Labels labels) const {
  std::lock_guard lock(mutex_);
  const auto family = families_.find(name);
  if (family == families_.end()) return std::nullopt;
  const auto series = family->second.series.find(Canonical(std::move(labels)));
  if (series == family->second.series.end()) return std::nullopt;
  if (series->second.counter) return series->second.counter->value();
  if (series->second.gauge) return series->second.gauge->value();
  return std::nullopt;
}

}  // namespace meterd
