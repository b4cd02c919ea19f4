#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace meterd {

// Label set of one series, e.g. {{"partition", "3"}}. Order does not matter: the registry keeps
// it sorted by key.
using Labels = std::vector<std::pair<std::string, std::string>>;

// Monotonic count. Add may run on any thread, concurrently with rendering.
class Counter {
 public:
  void Add(int64_t n = 1) { value_.fetch_add(n, std::memory_order_relaxed); }
  // No read-modify-write, so cheaper on a hot path, but only correct while the calling thread is
  // the counter's only writer (a concurrent Add from elsewhere may be lost).
  void AddRelaxed(int64_t n) {
    value_.store(value_.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
  }
  int64_t value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> value_{0};
};

// A value that goes up and down: either set by its owner (Set/Add, any thread) or computed by a
// callback when read (AddCallbackGauge). Set and Add do nothing on a callback gauge.
class Gauge {
 public:
  Gauge() = default;
  explicit Gauge(std::function<int64_t()> callback) : callback_(std::move(callback)) {}

  void Set(int64_t v) { value_.store(v, std::memory_order_relaxed); }
  void Add(int64_t n) { value_.fetch_add(n, std::memory_order_relaxed); }
  // Raises the value to `v` if it is higher (several writers keeping a maximum).
  void SetMax(int64_t v) {
    int64_t current = value_.load(std::memory_order_relaxed);
    while (v > current && !value_.compare_exchange_weak(current, v, std::memory_order_relaxed)) {
    }
  }
  int64_t value() const { return callback_ ? callback_() : value_.load(std::memory_order_relaxed); }
  bool has_callback() const { return static_cast<bool>(callback_); }

 private:
  std::atomic<int64_t> value_{0};
  const std::function<int64_t()> callback_;
};

// Distribution of durations over fixed buckets. Observe may run on any thread, concurrently with
// rendering; a render may then see `sum` and the buckets one observation apart.
class Histogram {
 public:
  // `bounds`: upper bounds in seconds, strictly increasing; a +Inf bucket is implied.
  explicit Histogram(std::vector<double> bounds);

  // Non-finite values are ignored (they would make `sum` useless).
  void Observe(double seconds);

  const std::vector<double>& bounds() const { return bounds_; }
  // Cumulative count of observations <= bounds()[i]; i == bounds().size() is +Inf, the total.
  std::vector<uint64_t> CumulativeCounts() const;
  double sum() const { return sum_.load(std::memory_order_relaxed); }

 private:
  const std::vector<double> bounds_;
  // Per-bucket (not cumulative) counts: cheaper to observe, summed when rendered.
  std::vector<std::atomic<uint64_t>> counts_;
  std::atomic<double> sum_{0};
};

// Named metrics rendered as Prometheus text (format 0.0.4) and as JSON. Owned by the daemon,
// shared by all components.
//
// Thread safety: Add*, Remove, Render* and Value may be called from any thread; an internal mutex
// serializes them. Updates to the returned metrics are lock-free and take no registry lock.
// Callbacks of callback gauges run under that mutex on the rendering thread: they must be safe to
// call from there and must not call into the registry.
//
// Registering a name that is invalid for Prometheus, a name already registered with another type,
// or a callback gauge twice aborts: these are programming errors.
class MetricsRegistry {
 public:
  // Returned pointers stay valid until Remove of that series or the registry's destruction.
  // Registering the same name and labels again returns the existing metric.
  Counter* AddCounter(const std::string& name, const std::string& help, Labels labels = {});
  Gauge* AddGauge(const std::string& name, const std::string& help, Labels labels = {});
  Gauge* AddCallbackGauge(const std::string& name, const std::string& help, Labels labels,
                          std::function<int64_t()> callback);
  Histogram* AddHistogram(const std::string& name, const std::string& help,
                          std::vector<double> bounds, Labels labels = {});

  // Drops one series (the family too, once empty). Once this returns, its callback never runs
  // again and its pointer is dangling. Returns false if there was no such series.
  bool Remove(const std::string& name, Labels labels = {});

  // Families sorted by name, series by labels.
  std::string RenderPrometheus() const;
  // {"name": value} for a family whose only series has no labels, else
  // {"name": [{"labels": {...}, "value": v}, ...]}. A histogram's value is
  // {"count": n, "sum": s, "buckets": [{"le": 0.1, "count": c}, ..., {"le": "+Inf", "count": n}]}
  // with cumulative counts as in Prometheus.
  std::string RenderJson() const;

  // A counter's or gauge's current value; nullopt for a histogram or an unknown series.
  std::optional<int64_t> Value(const std::string& name, Labels labels = {}) const;

 private:
  enum class Kind { kCounter, kGauge, kHistogram };
  // Exactly one pointer is set, the one matching the family's kind.
  struct Series {
    std::unique_ptr<Counter> counter;
    std::unique_ptr<Gauge> gauge;
    std::unique_ptr<Histogram> histogram;
  };
  struct Family {
    Kind kind;
    std::string help;
    std::map<Labels, Series> series;
  };

  // The series for name+labels, inserted empty if new; aborts on a kind mismatch.
  // Caller holds mutex_.
  Series& FindOrInsert(const std::string& name, const std::string& help, Kind kind, Labels labels);

  // std::mutex, not absl::Mutex: Debian's Abseil is not built for TSan, which would then see
  // no synchronization at all.
  mutable std::mutex mutex_;
  std::map<std::string, Family> families_;  // Guarded by mutex_.
};

// For a component whose options may name a registry: `given`, or (when null) a private one
// created in `own`, which the component keeps for its lifetime.
inline MetricsRegistry& RegistryOrOwn(MetricsRegistry* given,
                                      std::unique_ptr<MetricsRegistry>& own) {
  if (given != nullptr) return *given;
  own = std::make_unique<MetricsRegistry>();
  return *own;
}

}  // namespace meterd
