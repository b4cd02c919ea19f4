#pragma once

// Boost 1.74's Asio needs <utility> before it under C++20.
#include <utility>

#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace meterd::http {

struct Request {
  std::string method;                                        // "GET", "POST", …
  std::string path;                                          // The target without its query string.
  std::string query;                                         // After '?', undecoded; empty if none.
  std::vector<std::pair<std::string, std::string>> headers;  // As received.
  std::string body;
  std::string remote;  // Peer address.

  // The first header named `name` (case-insensitive); empty if absent.
  std::string_view Header(std::string_view name) const;
  // The query parameter `name` (percent-decoded); empty if absent.
  std::string Param(std::string_view name) const;
};

struct Response {
  int status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;  // Extra ones (Retry-After, …).
};

// Called with a request's method, target and headers before its body is read: a response to
// send instead (the body is then never read: unauthenticated clients cannot make the server
// buffer bodies), or nullopt to go on.
using Precheck = std::function<std::optional<Response>(const Request& head)>;

// Answers a request exactly once, from any thread.
using Responder = std::function<void(Response)>;
// Called on a server thread. It may answer before returning, or keep the responder and answer
// later from another thread (HTTP ingest answers once Kafka acknowledged): a server thread is
// never held while something slow completes.
using Handler = std::function<void(Request, Responder)>;

// What a hostile or broken client can take from the server: each bounded.
struct Limits {
  int threads = 2;             // Server threads (never a shard's).
  int max_connections = 1024;  // Beyond this, a new connection is closed at once.
  size_t max_header_bytes = 16 * 1024;
  size_t max_body_bytes = 1024 * 1024;
  absl::Duration read_timeout = absl::Seconds(10);  // To receive one whole request.
  absl::Duration idle_timeout = absl::Seconds(30);  // Keep-alive between requests.
  absl::Duration write_timeout = absl::Seconds(10);
};

// Query strings and form bodies: %XX and '+' (a space) decoded; a malformed escape stays as it
// is.
std::string PercentDecode(std::string_view text);

// PEM files for HTTPS; both empty: plain HTTP.
struct TlsFiles {
  std::string cert;  // The certificate chain, leaf first.
  std::string key;   // Its private key.
};

// HTTP/1.1 (Boost.Beast) with keep-alive on its own threads, over TLS 1.2+ when given a
// certificate and key (OpenSSL). A request over a limit gets its
// status (413 body, 431 headers) and the connection is closed; a client that does not finish
// its request within read_timeout, or stays idle past idle_timeout, is disconnected.
class HttpServer {
 public:
  // `listen` is "host:port" (port 0 picks a free one). Fails with a message naming the address,
  // or the TLS file that cannot be loaded.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const std::string& listen,
                                                           Handler handler, Limits limits = {},
                                                           Precheck precheck = {},
                                                           TlsFiles tls = {});
  ~HttpServer();
  int port() const { return port_; }
  int open_connections() const { return connections_.load(std::memory_order_relaxed); }

 private:
  HttpServer(Handler handler, Limits limits, Precheck precheck)
      : handler_(std::move(handler)),
        precheck_(std::move(precheck)),
        limits_(limits),
        acceptor_(io_),
        accept_retry_(io_) {}
  void Accept();

  Handler handler_;
  Precheck precheck_;
  Limits limits_;
  // Before io_: sessions still queued in io_ when it is destroyed count themselves out here.
  std::atomic<int> connections_{0};
  std::unique_ptr<boost::asio::ssl::context> tls_;  // Null: plain HTTP.
  boost::asio::io_context io_;
  boost::asio::ip::tcp::acceptor acceptor_;
  boost::asio::steady_timer accept_retry_;
  std::vector<std::thread> threads_;
  int port_ = 0;
};

}  // namespace meterd::http
