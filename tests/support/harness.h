#pragma once

#include <sys/types.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "lib/devtools/loadgen.h"

namespace meterd::testing {

// A private PostgreSQL started with deploy/dev-postgres.sh in a fresh temp dir; stopped and
// removed on destruction. One per test binary (see SharedPostgres()).
class PostgresInstance {
 public:
  PostgresInstance();
  ~PostgresInstance();
  // A new empty database with every migration applied; returns its URL.
  std::string CreateMigratedDatabase(const std::string& name);
  std::string CreateDatabase(const std::string& name);
  const std::string& admin_url() const { return admin_url_; }
  // Stops / starts the server on the same port (outage injection). Crash is an immediate
  // shutdown (pg_ctl -m immediate: no checkpoint; crash recovery on the next Start).
  void Stop();
  void Start();
  void Crash();
  // Freezes / thaws the postmaster and every backend (SIGSTOP / SIGCONT): a hung server whose
  // connections stay open.
  void Pause();
  void Resume();

 private:
  std::string dir_;
  std::string admin_url_;
};

PostgresInstance& SharedPostgres();

// A child process (fork/exec), stdout captured through a pipe, stderr to a log file.
class ChildProcess {
 public:
  ChildProcess(const std::vector<std::string>& argv, const std::string& log_path);
  ~ChildProcess();
  // First line the child writes to stdout (blocking, bounded by `timeout`).
  std::string ReadLine(absl::Duration timeout);
  // Everything the child wrote to stdout until it closed it.
  std::string ReadAll();
  void Signal(int signal);
  // Waits for exit; returns the exit status (128+signal if killed), -1 on timeout.
  int Wait(absl::Duration timeout);
  bool Running();
  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_path_; }

 private:
  pid_t pid_ = -1;
  int stdout_fd_ = -1;
  std::string buffered_;
  std::string log_path_;
  int status_ = -1;
};

std::string MeterdBinary();
std::string TempDir(const std::string& prefix);
std::string ReadFile(const std::string& path);

// `meterd dev-broker` as a child; its bootstrap address.
class DevBrokerProcess {
 public:
  DevBrokerProcess(const std::string& topic, int partitions, const std::string& log_dir);
  const std::string& bootstrap() const { return bootstrap_; }

 private:
  std::unique_ptr<ChildProcess> process_;
  std::string bootstrap_;
};

// Reads shared.api_usage_meters as loadgen's ExpectedTotals shape.
devtools::ExpectedTotals StoredTotals(const std::string& url);
// Human-readable difference (first few keys), empty when equal.
std::string DiffTotals(const devtools::ExpectedTotals& expected,
                       const devtools::ExpectedTotals& stored);
int64_t QueryInt(const std::string& url, const std::string& sql);
// Runs `sql` in one transaction, committed if it succeeds: "" then, else the SQLSTATE it failed
// with.
std::string SqlStateOf(const std::string& url, const std::string& sql);
// Polls `condition` every `poll` until it holds (true) or `timeout` passes (false).
bool Eventually(const std::function<bool()>& condition, absl::Duration timeout,
                absl::Duration poll = absl::Milliseconds(100));
// Polls until `SUM(quantity)` equals `expected_sum` or the timeout passes; returns the sum seen.
int64_t WaitForSum(const std::string& url, int64_t expected_sum, absl::Duration timeout);
int64_t SumOf(const devtools::ExpectedTotals& totals);
// Produces `payloads` with message key `key` and waits until every one is acknowledged.
void ProduceOrDie(const std::string& brokers, const std::string& topic, const std::string& key,
                  const std::vector<std::string>& payloads);
// GET http://127.0.0.1:port/path; the status code and body (status -1 if unreachable).
std::pair<int, std::string> HttpGet(int port, const std::string& path);
struct HttpResult {
  int status = -1;      // -1: unreachable or no answer.
  std::string headers;  // The status line and headers, as received.
  std::string body;
};
// One request on its own connection (Connection: close), read to the end.
HttpResult HttpCall(int port, const std::string& method, const std::string& path,
                    const std::vector<std::pair<std::string, std::string>>& headers = {},
                    const std::string& body = "");

// A port on 127.0.0.1 that was free a moment ago (bound to port 0, then released), for
// --http-listen.
int FreeLocalPort();
// A CloudEvent for `org` stamped now.
std::string UsageEventJson(const std::string& org, const std::string& meter, int64_t quantity,
                           const std::string& industry);

}  // namespace meterd::testing
