#include "lib/http/http_server.h"

#include <boost/asio/post.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "lib/common/logging.h"

namespace meterd::http {
namespace {

namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = boost::asio::ip::tcp;

// One connection: read a request, answer it, close.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, const Handler* handler)
      : stream_(std::move(socket)), handler_(handler) {}

  void Run() {
    stream_.expires_after(std::chrono::seconds(5));
    bhttp::async_read(stream_, buffer_, request_,
                      [self = shared_from_this()](beast::error_code error, size_t) {
                        if (!error) self->Respond();
                      });
  }

 private:
  void Respond() {
    Response r;
    if (request_.method() != bhttp::verb::get) {
      r = {405, "text/plain; charset=utf-8", "only GET\n"};
    } else {
      std::string path(request_.target());
      path = path.substr(0, path.find('?'));
      r = (*handler_)(path);
    }
    response_.version(request_.version());
    response_.result(static_cast<bhttp::status>(r.status));
    response_.set(bhttp::field::content_type, r.content_type);
    response_.set(bhttp::field::server, "meterd");
    response_.keep_alive(false);
    response_.body() = std::move(r.body);
    response_.prepare_payload();
    bhttp::async_write(stream_, response_, [self = shared_from_this()](beast::error_code, size_t) {
      beast::error_code ignored;
      self->stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    });
  }

  beast::tcp_stream stream_;
  const Handler* handler_;
  beast::flat_buffer buffer_;
  bhttp::request<bhttp::string_body> request_;
  bhttp::response<bhttp::string_body> response_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& listen,
                                                              Handler handler) {
  const size_t colon = listen.rfind(':');
  int port = -1;
  if (colon == std::string::npos || !absl::SimpleAtoi(listen.substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--http-listen expects host:port, got '", listen, "'"));
  }
  std::string host = listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  std::unique_ptr<HttpServer> server(new HttpServer(std::move(handler)));
  beast::error_code error;
  const auto address = boost::asio::ip::make_address(host.empty() ? "0.0.0.0" : host, error);
  if (error) {
    return absl::InvalidArgumentError(
        absl::StrCat("--http-listen: '", host, "' is not an IP address"));
  }
  const tcp::endpoint endpoint(address, static_cast<unsigned short>(port));
  server->acceptor_.open(endpoint.protocol(), error);
  if (!error) server->acceptor_.set_option(boost::asio::socket_base::reuse_address(true), error);
  if (!error) server->acceptor_.bind(endpoint, error);
  if (!error) server->acceptor_.listen(boost::asio::socket_base::max_listen_connections, error);
  if (error) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", listen, " for HTTP: ", error.message()));
  }
  server->port_ = server->acceptor_.local_endpoint().port();
  server->Accept();
  server->thread_ = std::thread([s = server.get()] {
    auto guard = boost::asio::make_work_guard(s->io_);
    s->io_.run();
  });
  return server;
}

HttpServer::~HttpServer() {
  boost::asio::post(io_, [this] {
    beast::error_code ignored;
    acceptor_.close(ignored);
    io_.stop();
  });
  if (thread_.joinable()) thread_.join();
}

void HttpServer::Accept() {
  acceptor_.async_accept([this](beast::error_code error, tcp::socket socket) {
    if (error == boost::asio::error::operation_aborted) return;
    if (!error) std::make_shared<Session>(std::move(socket), &handler_)->Run();
    Accept();
  });
}

}  // namespace meterd::http
