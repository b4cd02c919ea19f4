#include "lib/common/metrics.h"

#include <gtest/gtest.h>

#include <thread>
#include <vector>

namespace meterd {
namespace {

TEST(MetricsTest, RendersCounterAndGaugeAsPrometheusText) {
  MetricsRegistry registry;
  registry.AddCounter("meterd_events_total", "Events read.")->Add(41);
  registry.AddCounter("meterd_events_total", "Events read.")->Add();
  registry.AddGauge("meterd_a_gauge", "Sorted first.")->Set(-3);
  EXPECT_EQ(registry.RenderPrometheus(),
            "# HELP meterd_a_gauge Sorted first.\n"
            "# TYPE meterd_a_gauge gauge\n"
            "meterd_a_gauge -3\n"
            "# HELP meterd_events_total Events read.\n"
            "# TYPE meterd_events_total counter\n"
            "meterd_events_total 42\n");
}

TEST(MetricsTest, CallbackGaugeIsEvaluatedAtEachRender) {
  MetricsRegistry registry;
  int64_t lag = 7;
  registry.AddCallbackGauge("meterd_lag", "Lag.", {}, [&lag] { return lag; });
  EXPECT_EQ(registry.RenderPrometheus(),
            "# HELP meterd_lag Lag.\n# TYPE meterd_lag gauge\n"
            "meterd_lag 7\n");
  lag = 9;
  EXPECT_EQ(registry.Value("meterd_lag"), 9);
}

TEST(MetricsTest, LabelSetsShareOneHeaderAndValuesAreEscaped) {
  MetricsRegistry registry;
  registry.AddGauge("meterd_partition_lag", "Messages behind.", {{"partition", "3"}})->Set(5);
  registry.AddGauge("meterd_partition_lag", "Messages behind.", {{"partition", "10"}})->Set(1);
  registry.AddCounter("meterd_odd", "Help with \\ and\nnewline \"kept\".",
                      {{"topic", "a\"b\\c\nd"}, {"b_first", "x"}});
  EXPECT_EQ(registry.RenderPrometheus(),
            "# HELP meterd_odd Help with \\\\ and\\nnewline \"kept\".\n"
            "# TYPE meterd_odd counter\n"
            "meterd_odd{b_first=\"x\",topic=\"a\\\"b\\\\c\\nd\"} 0\n"
            "# HELP meterd_partition_lag Messages behind.\n"
            "# TYPE meterd_partition_lag gauge\n"
            "meterd_partition_lag{partition=\"10\"} 1\n"
            "meterd_partition_lag{partition=\"3\"} 5\n");
}

TEST(MetricsTest, HistogramBucketsAreCumulative) {
  MetricsRegistry registry;
  Histogram* h = registry.AddHistogram("meterd_flush_seconds", "Flush time.", {0.005, 0.1, 1},
                                       {{"shard", "0"}});
  h->Observe(0.005);  // On a bound: counts in that bucket ("le").
  h->Observe(0.05);
  h->Observe(0.05);
  h->Observe(2.5);
  EXPECT_EQ(registry.RenderPrometheus(),
            "# HELP meterd_flush_seconds Flush time.\n"
            "# TYPE meterd_flush_seconds histogram\n"
            "meterd_flush_seconds_bucket{shard=\"0\",le=\"0.005\"} 1\n"
            "meterd_flush_seconds_bucket{shard=\"0\",le=\"0.1\"} 3\n"
            "meterd_flush_seconds_bucket{shard=\"0\",le=\"1\"} 3\n"
            "meterd_flush_seconds_bucket{shard=\"0\",le=\"+Inf\"} 4\n"
            "meterd_flush_seconds_sum{shard=\"0\"} 2.605\n"
            "meterd_flush_seconds_count{shard=\"0\"} 4\n");
  EXPECT_EQ(registry.Value("meterd_flush_seconds", {{"shard", "0"}}), std::nullopt);
}

TEST(MetricsTest, RendersJson) {
  MetricsRegistry registry;
  registry.AddCounter("meterd_events_total", "Events.")->Add(3);
  registry.AddGauge("meterd_lag", "Lag.", {{"partition", "1"}})->Set(4);
  registry.AddGauge("meterd_lag", "Lag.", {{"partition", "q\"\n"}})->Set(5);
  Histogram* h = registry.AddHistogram("meterd_flush_seconds", "Flush.", {0.5, 1});
  h->Observe(0.25);
  h->Observe(3);
  EXPECT_EQ(registry.RenderJson(),
            "{\"meterd_events_total\":3,"
            "\"meterd_flush_seconds\":{\"count\":2,\"sum\":3.25,\"buckets\":["
            "{\"le\":0.5,\"count\":1},{\"le\":1,\"count\":1},{\"le\":\"+Inf\",\"count\":2}]},"
            "\"meterd_lag\":[{\"labels\":{\"partition\":\"1\"},\"value\":4},"
            "{\"labels\":{\"partition\":\"q\\\"\\u000a\"},\"value\":5}]}");
  EXPECT_EQ(MetricsRegistry().RenderJson(), "{}");
}

TEST(MetricsTest, ConcurrentAddsSumExactly) {
  MetricsRegistry registry;
  constexpr int kThreads = 4;
  constexpr int kAdds = 100'000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&registry] {
      // Each thread registers too: the same name and labels must give the same counter.
      Counter* counter = registry.AddCounter("meterd_adds_total", "Adds.", {{"k", "v"}});
      Histogram* histogram = registry.AddHistogram("meterd_seconds", "Seconds.", {1});
      for (int i = 0; i < kAdds; ++i) {
        counter->Add(2);
        histogram->Observe(0.5);
      }
    });
  }
  // Rendering while the threads add must be safe (meaningful under TSan).
  for (int i = 0; i < 10; ++i) registry.RenderPrometheus();
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(registry.Value("meterd_adds_total", {{"k", "v"}}), int64_t{2} * kThreads * kAdds);
  Histogram* histogram = registry.AddHistogram("meterd_seconds", "Seconds.", {1});
  EXPECT_EQ(histogram->CumulativeCounts().back(), uint64_t{kThreads} * kAdds);
  EXPECT_EQ(histogram->sum(), 0.5 * kThreads * kAdds);
}

TEST(MetricsTest, AddRelaxedAddsForASingleWriter) {
  Counter counter;
  for (int i = 0; i < 10; ++i) counter.AddRelaxed(3);
  EXPECT_EQ(counter.value(), 30);
}

TEST(MetricsTest, SameNameAndLabelsReturnTheSameMetric) {
  MetricsRegistry registry;
  Counter* a = registry.AddCounter("meterd_c", "C.", {{"x", "1"}, {"y", "2"}});
  EXPECT_EQ(registry.AddCounter("meterd_c", "C.", {{"y", "2"}, {"x", "1"}}), a);
  EXPECT_NE(registry.AddCounter("meterd_c", "C.", {{"x", "1"}}), a);
  Gauge* g = registry.AddGauge("meterd_g", "G.");
  EXPECT_EQ(registry.AddGauge("meterd_g", "G."), g);
}

TEST(MetricsTest, RemoveDropsTheSeriesAndStopsItsCallback) {
  MetricsRegistry registry;
  int calls = 0;
  registry.AddCallbackGauge("meterd_lag", "Lag.", {{"partition", "3"}}, [&calls] {
    ++calls;
    return 1;
  });
  registry.AddGauge("meterd_lag", "Lag.", {{"partition", "4"}})->Set(2);
  registry.RenderPrometheus();
  EXPECT_EQ(calls, 1);

  EXPECT_TRUE(registry.Remove("meterd_lag", {{"partition", "3"}}));
  EXPECT_FALSE(registry.Remove("meterd_lag", {{"partition", "3"}}));
  EXPECT_EQ(registry.RenderPrometheus(),
            "# HELP meterd_lag Lag.\n# TYPE meterd_lag gauge\nmeterd_lag{partition=\"4\"} 2\n");
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(registry.Value("meterd_lag", {{"partition", "3"}}), std::nullopt);

  // The last series takes its family (header) with it, and the name can be registered anew.
  EXPECT_TRUE(registry.Remove("meterd_lag", {{"partition", "4"}}));
  EXPECT_EQ(registry.RenderPrometheus(), "");
  registry.AddCallbackGauge("meterd_lag", "Lag.", {{"partition", "3"}}, [] { return 8; });
  EXPECT_EQ(registry.Value("meterd_lag", {{"partition", "3"}}), 8);
}

TEST(MetricsDeathTest, ProgrammingErrorsAbort) {
  MetricsRegistry registry;
  registry.AddCounter("meterd_x", "X.");
  EXPECT_DEATH(registry.AddGauge("meterd_x", "X."), "another type: meterd_x");
  EXPECT_DEATH(registry.AddGauge("meterd_x", "X.", {{"other", "labels"}}), "another type");
  registry.AddCallbackGauge("meterd_cb", "Cb.", {}, [] { return 0; });
  EXPECT_DEATH(registry.AddCallbackGauge("meterd_cb", "Cb.", {}, [] { return 1; }), "twice");
  EXPECT_DEATH(registry.AddGauge("meterd_cb", "Cb."), "without its callback");
  EXPECT_DEATH(registry.AddCounter("2bad", "Bad."), "invalid metric name");
  EXPECT_DEATH(registry.AddCounter("meterd_y", "Y.", {{"bad-label", "v"}}), "invalid label name");
  EXPECT_DEATH(registry.AddHistogram("meterd_h", "H.", {1, 0.5}), "strictly increasing");
  EXPECT_DEATH(registry.AddHistogram("meterd_h", "H.", {1}, {{"le", "1"}}), "label le");
}

}  // namespace
}  // namespace meterd
