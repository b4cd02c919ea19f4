#include "tests/support/harness.h"

#include <atomic>

#include <algorithm>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include <pqxx/pqxx>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "lib/kafka/producer.h"
#include "lib/store/migrations.h"

namespace meterd::testing {
namespace {

std::string RunScript(const std::string& command) {
  std::string output;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) throw std::runtime_error("popen failed: " + command);
  char buffer[512];
  while (fgets(buffer, sizeof(buffer), pipe) != nullptr) output += buffer;
  if (pclose(pipe) != 0) throw std::runtime_error("command failed: " + command);
  return std::string(absl::StripAsciiWhitespace(output));
}

std::string WithDatabase(const std::string& admin_url, const std::string& name) {
  return admin_url.substr(0, admin_url.rfind('/') + 1) + name;
}

}  // namespace

std::string MeterdBinary() { return METERD_BINARY; }

std::string TempDir(const std::string& prefix) {
  std::string templ = absl::StrCat("/tmp/", prefix, "-XXXXXX");
  if (mkdtemp(templ.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  return templ;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

PostgresInstance::PostgresInstance() : dir_(TempDir("meterd-pg")) {
  admin_url_ = RunScript(absl::StrCat(METERD_SOURCE_DIR, "/deploy/dev-postgres.sh start ", dir_));
}

PostgresInstance::~PostgresInstance() {
  std::system(absl::StrCat(METERD_SOURCE_DIR, "/deploy/dev-postgres.sh stop ", dir_).c_str());
  std::system(absl::StrCat("rm -rf ", dir_).c_str());
}

void PostgresInstance::Stop() {
  RunScript(absl::StrCat(METERD_SOURCE_DIR, "/deploy/dev-postgres.sh stop ", dir_));
}

void PostgresInstance::Crash() {
  RunScript(absl::StrCat(METERD_SOURCE_DIR, "/deploy/dev-postgres.sh crash ", dir_));
}

namespace {

// The postmaster (first line of postmaster.pid) and its children.
std::vector<pid_t> ServerProcesses(const std::string& dir) {
  std::vector<pid_t> pids;
  std::istringstream pid_file(ReadFile(dir + "/data/postmaster.pid"));
  pid_t postmaster = 0;
  if (!(pid_file >> postmaster) || postmaster <= 0) return pids;
  pids.push_back(postmaster);
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string name = entry.path().filename();
    if (name.empty() || !absl::ascii_isdigit(name[0])) continue;
    // /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so read after ')'.
    const std::string stat = ReadFile(entry.path().string() + "/stat");
    const size_t close = stat.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(stat.substr(close + 1));
    std::string state;
    pid_t parent = 0;
    if (rest >> state >> parent && parent == postmaster) pids.push_back(std::stoi(name));
  }
  return pids;
}

}  // namespace

void PostgresInstance::Pause() {
  for (pid_t pid : ServerProcesses(dir_)) kill(pid, SIGSTOP);
}

void PostgresInstance::Resume() {
  for (pid_t pid : ServerProcesses(dir_)) kill(pid, SIGCONT);
}

void PostgresInstance::Start() {
  RunScript(absl::StrCat(METERD_SOURCE_DIR, "/deploy/dev-postgres.sh start ", dir_));
}

std::string PostgresInstance::CreateDatabase(const std::string& mixed_case_name) {
  const std::string name = absl::AsciiStrToLower(mixed_case_name);
  pqxx::connection conn(admin_url_);
  pqxx::nontransaction tx(conn);
  tx.exec0("DROP DATABASE IF EXISTS " + name + " WITH (FORCE)");
  tx.exec0("CREATE DATABASE " + name);
  return WithDatabase(admin_url_, name);
}

std::string PostgresInstance::CreateMigratedDatabase(const std::string& name) {
  std::string url = CreateDatabase(name);
  auto applied = store::ApplyMigrations(url);
  if (!applied.ok()) throw std::runtime_error(std::string(applied.status().message()));
  return url;
}

PostgresInstance& SharedPostgres() {
  static PostgresInstance* instance = new PostgresInstance();
  static const bool registered = [] {
    std::atexit([] { delete instance; });
    return true;
  }();
  (void)registered;
  return *instance;
}

ChildProcess::ChildProcess(const std::vector<std::string>& argv, const std::string& log_path)
    : log_path_(log_path) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe failed");
  pid_ = fork();
  if (pid_ == 0) {
    dup2(fds[1], STDOUT_FILENO);
    int log = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (log >= 0) dup2(log, STDERR_FILENO);
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  close(fds[1]);
  stdout_fd_ = fds[0];
}

ChildProcess::~ChildProcess() {
  if (Running()) {
    Signal(SIGKILL);
    Wait(absl::Seconds(10));
  }
  if (stdout_fd_ >= 0) close(stdout_fd_);
}

std::string ChildProcess::ReadLine(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (buffered_.find('\n') == std::string::npos && absl::Now() < deadline) {
    pollfd p{stdout_fd_, POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    char buffer[4096];
    ssize_t n = read(stdout_fd_, buffer, sizeof(buffer));
    if (n <= 0) break;
    buffered_.append(buffer, n);
  }
  const size_t nl = buffered_.find('\n');
  if (nl == std::string::npos) return "";
  std::string line = buffered_.substr(0, nl);
  buffered_.erase(0, nl + 1);
  return line;
}

std::string ChildProcess::ReadAll() {
  char buffer[4096];
  ssize_t n;
  while ((n = read(stdout_fd_, buffer, sizeof(buffer))) > 0) buffered_.append(buffer, n);
  std::string all = std::move(buffered_);
  buffered_.clear();
  return all;
}

void ChildProcess::Signal(int signal) {
  if (pid_ > 0 && status_ < 0) kill(pid_, signal);
}

bool ChildProcess::Running() {
  if (pid_ <= 0 || status_ >= 0) return false;
  int status;
  if (waitpid(pid_, &status, WNOHANG) == pid_) {
    status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return false;
  }
  return true;
}

int ChildProcess::Wait(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (Running()) {
    if (absl::Now() > deadline) return -1;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return status_;
}

DevBrokerProcess::DevBrokerProcess(const std::string& topic, int partitions,
                                   const std::string& log_dir) {
  process_ = std::make_unique<ChildProcess>(
      std::vector<std::string>{MeterdBinary(), "dev-broker", "--topic", topic, "--partitions",
                               std::to_string(partitions)},
      log_dir + "/broker.log");
  bootstrap_ = process_->ReadLine(absl::Seconds(30));
  if (bootstrap_.empty()) throw std::runtime_error("dev-broker printed no address");
}

devtools::ExpectedTotals StoredTotals(const std::string& url) {
  pqxx::connection conn(url);
  pqxx::read_transaction tx(conn);
  devtools::ExpectedTotals totals;
  // Summed per key: a key's unfolded deltas are rows of their own (migration 0025).
  for (const auto& row :
       tx.exec("SELECT org_id::text, meter, industry, usage_date::text, "
               "sum(quantity) FROM shared.api_usage_meters GROUP BY 1, 2, 3, 4")) {
    totals[{row[0].as<std::string>(), row[1].as<std::string>(), row[2].as<std::string>(),
            row[3].as<std::string>()}] = row[4].as<int64_t>();
  }
  return totals;
}

std::string DiffTotals(const devtools::ExpectedTotals& expected,
                       const devtools::ExpectedTotals& stored) {
  std::string diff;
  int shown = 0;
  auto key_text = [](const auto& key) {
    return absl::StrCat(std::get<0>(key), "/", std::get<1>(key), "/", std::get<2>(key), "/",
                        std::get<3>(key));
  };
  for (const auto& [key, quantity] : expected) {
    auto it = stored.find(key);
    const int64_t got = it == stored.end() ? 0 : it->second;
    if (got != quantity && shown++ < 5) {
      absl::StrAppend(&diff, key_text(key), " expected ", quantity, " stored ", got, "\n");
    }
  }
  for (const auto& [key, quantity] : stored) {
    if (!expected.contains(key) && shown++ < 10) {
      absl::StrAppend(&diff, key_text(key), " unexpected row with ", quantity, "\n");
    }
  }
  return diff;
}

int64_t QueryInt(const std::string& url, const std::string& sql) {
  pqxx::connection conn(url);
  pqxx::read_transaction tx(conn);
  auto row = tx.exec1(sql);
  return row[0].is_null() ? 0 : row[0].as<int64_t>();
}

std::string SqlStateOf(const std::string& url, const std::string& sql) {
  pqxx::connection conn(url);
  pqxx::work tx(conn);
  try {
    tx.exec(sql);
  } catch (const pqxx::sql_error& e) {
    return e.sqlstate();
  }
  tx.commit();
  return "";
}

int64_t SumOf(const devtools::ExpectedTotals& totals) {
  int64_t sum = 0;
  for (const auto& [key, quantity] : totals) sum += quantity;
  return sum;
}

int64_t WaitForSum(const std::string& url, int64_t expected_sum, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  int64_t sum = -1;
  while (absl::Now() < deadline) {
    sum = QueryInt(url, "SELECT sum(quantity) FROM shared.api_usage_meters");
    if (sum >= expected_sum) return sum;
    absl::SleepFor(absl::Milliseconds(200));
  }
  return sum;
}

void ProduceOrDie(const std::string& brokers, const std::string& topic, const std::string& key,
                  const std::vector<std::string>& payloads) {
  auto producer = kafka::Producer::Create({{"bootstrap.servers", brokers}, {"linger.ms", "0"}});
  if (!producer.ok()) throw std::runtime_error(std::string(producer.status().message()));
  for (const std::string& payload : payloads) {
    const absl::Status sent =
        (*producer)->Send(topic, kafka::Producer::kAnyPartition, key, payload);
    if (!sent.ok()) throw std::runtime_error(std::string(sent.message()));
  }
  const absl::Status flushed = (*producer)->Flush(absl::Seconds(30));
  if (!flushed.ok()) throw std::runtime_error(std::string(flushed.message()));
}

bool Eventually(const std::function<bool()>& condition, absl::Duration timeout,
                absl::Duration poll) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!condition()) {
    if (absl::Now() >= deadline) return false;
    absl::SleepFor(poll);
  }
  return true;
}

int FreeLocalPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = 0;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  if (bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    close(fd);
    throw std::runtime_error("no free port on 127.0.0.1");
  }
  close(fd);
  return ntohs(address.sin_port);
}

HttpResult HttpCall(int port, const std::string& method, const std::string& path,
                    const std::vector<std::pair<std::string, std::string>>& headers,
                    const std::string& body) {
  HttpResult result;
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    close(fd);
    return result;
  }
  std::string request =
      absl::StrCat(method, " ", path, " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
  for (const auto& [name, value] : headers) absl::StrAppend(&request, name, ": ", value, "\r\n");
  const bool has_length = std::any_of(headers.begin(), headers.end(), [](const auto& h) {
    return absl::EqualsIgnoreCase(h.first, "content-length");
  });
  if (!has_length && (!body.empty() || method == "POST")) {
    absl::StrAppend(&request, "Content-Length: ", body.size(), "\r\n");
  }
  absl::StrAppend(&request, "\r\n", body);
  size_t sent = 0;
  while (sent < request.size()) {
    const ssize_t n = send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;
    sent += static_cast<size_t>(n);
  }
  std::string response;
  char buffer[4096];
  ssize_t n;
  while ((n = read(fd, buffer, sizeof(buffer))) > 0) response.append(buffer, n);
  close(fd);
  // "HTTP/1.1 200 OK\r\n...\r\n\r\nbody"
  if (response.size() < 12) return result;
  const size_t end = response.find("\r\n\r\n");
  result.status = std::stoi(response.substr(9, 3));
  result.headers = response.substr(0, end);
  result.body = end == std::string::npos ? "" : response.substr(end + 4);
  return result;
}

std::pair<int, std::string> HttpGet(int port, const std::string& path) {
  HttpResult r = HttpCall(port, "GET", path);
  return {r.status, r.body};
}

std::string UsageEventJson(const std::string& org, const std::string& meter, int64_t quantity,
                           const std::string& industry) {
  // Atomic: concurrent test clients must never be handed the same id (a repeated id is a
  // duplicate, and meterd rightly counts it once).
  static std::atomic<int64_t> counter{0};
  return absl::StrCat(R"({"specversion":"1.0","id":"test-)", counter.fetch_add(1),
                      R"(","source":"tests","type":")", meter, R"(","subject":")", org,
                      R"(","time":")",
                      absl::FormatTime(absl::RFC3339_full, absl::Now(), absl::UTCTimeZone()),
                      R"(","data":{"quantity":)", quantity, R"(,"industry":")", industry, R"("}})");
}

}  // namespace meterd::testing
