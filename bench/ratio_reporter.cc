#include "bench/ratio_reporter.h"

#include <cstdio>

namespace meterd::bench {

void RatioReporter::ReportRuns(const std::vector<Run>& runs) {
  ConsoleReporter::ReportRuns(runs);
  for (const Run& run : runs) {
    auto it = run.counters.find("items_per_second");
    if (it != run.counters.end()) items_per_second_[run.benchmark_name()] = it->second.value;
  }
}

void RatioReporter::Finalize() {
  ConsoleReporter::Finalize();
  std::printf("\n%-58s %14s %14s %8s\n", "benchmark vs baseline (same run)", "items/s",
              "baseline/s", "ratio");
  for (const auto& [name, baseline] : pairs_) {
    auto a = items_per_second_.find(name);
    auto b = items_per_second_.find(baseline);
    if (a == items_per_second_.end() || b == items_per_second_.end() || b->second == 0) continue;
    std::printf("%-58s %14.0f %14.0f %7.2fx\n", (name + " / " + baseline).c_str(), a->second,
                b->second, a->second / b->second);
  }
}

int RunWithRatios(int argc, char** argv, std::vector<std::pair<std::string, std::string>> pairs) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  RatioReporter reporter(std::move(pairs));
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}

}  // namespace meterd::bench
