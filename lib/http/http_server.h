#pragma once

// Boost 1.74's Asio needs <utility> before it under C++20.
#include <utility>

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

#include "absl/status/statusor.h"

namespace meterd::http {

struct Response {
  int status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
};

// GET path -> response. Called on the server's thread; must be quick and thread-safe with
// respect to whatever it reads (meterd's handlers read atomics only).
using Handler = std::function<Response(const std::string& path)>;

// A small HTTP/1.1 server (Boost.Beast) for /metrics and health checks, on its own thread.
// One request per connection, 5 s to send it; anything but GET is 405. Owned by `meterd run`.
class HttpServer {
 public:
  // `listen` is "host:port" (port 0 picks a free one). Fails with a message naming the address.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const std::string& listen,
                                                           Handler handler);
  ~HttpServer();
  int port() const { return port_; }

 private:
  HttpServer(Handler handler) : handler_(std::move(handler)), acceptor_(io_) {}
  void Accept();

  Handler handler_;
  boost::asio::io_context io_;
  boost::asio::ip::tcp::acceptor acceptor_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace meterd::http
