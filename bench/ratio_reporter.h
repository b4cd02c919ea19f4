#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>

namespace meterd::bench {

// Console output plus, at the end, each measured benchmark's items/s as a ratio to a baseline
// measured in the same run (this machine is noisy: only ratios are comparable across runs).
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  // `pairs`: (benchmark name, baseline benchmark name).
  explicit RatioReporter(std::vector<std::pair<std::string, std::string>> pairs)
      : pairs_(std::move(pairs)) {}
  void ReportRuns(const std::vector<Run>& runs) override;
  void Finalize() override;

 private:
  std::vector<std::pair<std::string, std::string>> pairs_;
  std::map<std::string, double> items_per_second_;
};

// Runs the registered benchmarks with a RatioReporter; use as main().
int RunWithRatios(int argc, char** argv, std::vector<std::pair<std::string, std::string>> pairs);

}  // namespace meterd::bench
