#include "lib/http/http_server.h"

#include <array>
#include <chrono>
#include <optional>

#include <openssl/ssl.h>

#include <boost/asio/post.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "lib/common/json.h"
#include "lib/common/logging.h"
#include "lib/common/status_macros.h"
#include "lib/common/string_views.h"

namespace meterd::http {
namespace {

namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = boost::asio::ip::tcp;

std::chrono::milliseconds Chrono(absl::Duration d) {
  return std::chrono::milliseconds(absl::ToInt64Milliseconds(d));
}

Response JsonError(int status, std::string_view code, std::string_view message) {
  std::string body = "{\"error\":{\"code\":";
  AppendJsonString(&body, code);
  body += ",\"message\":";
  AppendJsonString(&body, message);
  body += "}}\n";
  return {status, "application/json", std::move(body), {}};
}

using TlsStream = beast::ssl_stream<beast::tcp_stream>;

// One connection: requests read and answered in turn (keep-alive) until the client closes, a
// limit is hit or it goes idle. All of a session's work runs on its strand. `Stream` is a
// plain TCP stream or a TLS one over it.
template <typename Stream>
class Session : public std::enable_shared_from_this<Session<Stream>> {
 public:
  Session(tcp::socket socket, boost::asio::ssl::context* tls, const Handler* handler,
          const Precheck* precheck, const Limits* limits, std::atomic<int>* connections)
      : stream_(MakeStream(std::move(socket), tls)),
        handler_(handler),
        precheck_(precheck),
        limits_(limits),
        connections_(connections) {
    beast::error_code ignored;
    const auto peer = Tcp().socket().remote_endpoint(ignored);
    remote_ = ignored ? "" : peer.address().to_string();
  }
  ~Session() { connections_->fetch_sub(1, std::memory_order_relaxed); }

  // TLS: the handshake first, within read_timeout (a client that never finishes it holds a
  // connection no longer than one that never sends a request).
  void Start() {
    if constexpr (std::is_same_v<Stream, TlsStream>) {
      Tcp().expires_after(Chrono(limits_->read_timeout));
      stream_.async_handshake(boost::asio::ssl::stream_base::server,
                              [self = this->shared_from_this()](beast::error_code error) {
                                if (error) return self->Close();
                                self->Read(/*first=*/true);
                              });
    } else {
      Read(/*first=*/true);
    }
  }

  void Read(bool first) {
    parser_.emplace();
    parser_->header_limit(static_cast<uint32_t>(limits_->max_header_bytes));
    parser_->body_limit(limits_->max_body_bytes);
    // Idle between requests, then the whole request within read_timeout: the idle wait is the
    // first, the read timeout starts over once bytes arrive (a byte-per-second client still
    // has only read_timeout in all for its headers and body).
    Tcp().expires_after(Chrono(first ? limits_->read_timeout : limits_->idle_timeout));
    bhttp::async_read_header(stream_, buffer_, *parser_,
                             [self = this->shared_from_this()](beast::error_code error, size_t) {
                               self->OnHeader(error);
                             });
  }

 private:
  static Stream MakeStream(tcp::socket socket, boost::asio::ssl::context* tls) {
    if constexpr (std::is_same_v<Stream, TlsStream>) {
      return Stream(beast::tcp_stream(std::move(socket)), *tls);
    } else {
      return Stream(std::move(socket));
    }
  }
  beast::tcp_stream& Tcp() { return beast::get_lowest_layer(stream_); }

  void OnHeader(beast::error_code error) {
    if (error) return Fail(error);
    if (*precheck_) {
      const auto& head = parser_->get();
      Request request;
      request.method = std::string(head.method_string());
      const std::string_view target(head.target().data(), head.target().size());
      const size_t question = target.find('?');
      request.path = std::string(target.substr(0, question));
      if (question != std::string_view::npos) {
        request.query = std::string(target.substr(question + 1));
      }
      for (const auto& field : head) {
        request.headers.emplace_back(std::string(field.name_string()), std::string(field.value()));
      }
      request.remote = remote_;
      version_ = head.version();
      if (std::optional<Response> early = (*precheck_)(request)) {
        return Write(std::move(*early), /*keep_alive=*/false);
      }
    }
    // Room for the body (up to 64 KiB) before reading it: reads sized by a small buffer would
    // take a system call per few hundred bytes of a large batch.
    if (const boost::optional<uint64_t> length = parser_->content_length(); length) {
      const size_t want = buffer_.size() + static_cast<size_t>(std::min<uint64_t>(*length, 65536));
      if (buffer_.capacity() < want) buffer_.reserve(want);
    }
    Tcp().expires_after(Chrono(limits_->read_timeout));
    bhttp::async_read(
        stream_, buffer_, *parser_,
        [self = this->shared_from_this()](beast::error_code e, size_t) { self->OnBody(e); });
  }

  void Fail(beast::error_code error) {
    if (error == bhttp::error::body_limit) {
      return Write(JsonError(413, "body_too_large",
                             absl::StrCat("request bodies are limited to ", limits_->max_body_bytes,
                                          " bytes")),
                   /*keep_alive=*/false);
    }
    if (error == bhttp::error::header_limit) {
      return Write(JsonError(431, "headers_too_large",
                             absl::StrCat("request headers are limited to ",
                                          limits_->max_header_bytes, " bytes")),
                   /*keep_alive=*/false);
    }
    if (error == bhttp::error::end_of_stream || error == beast::error::timeout ||
        error == boost::asio::error::operation_aborted ||
        error == boost::asio::ssl::error::stream_truncated) {
      return Close();
    }
    if (&error.category() == &bhttp::make_error_code(bhttp::error::bad_target).category()) {
      return Write(JsonError(400, "bad_request", "malformed HTTP request"), false);
    }
    Close();
  }

  void OnBody(beast::error_code error) {
    if (error) return Fail(error);
    bhttp::request<bhttp::string_body> message = parser_->release();
    keep_alive_ = message.keep_alive();
    version_ = message.version();
    Request request;
    request.method = std::string(message.method_string());
    const std::string_view target(message.target().data(), message.target().size());
    const size_t question = target.find('?');
    request.path = std::string(target.substr(0, question));
    if (question != std::string_view::npos)
      request.query = std::string(target.substr(question + 1));
    for (const auto& field : message) {
      request.headers.emplace_back(std::string(field.name_string()), std::string(field.value()));
    }
    request.body = std::move(message.body());
    request.remote = remote_;
    // No timer while the handler works (HTTP ingest waits for Kafka): the answer re-arms it.
    Tcp().expires_never();
    auto self = this->shared_from_this();
    (*handler_)(std::move(request), [self](Response response) {
      boost::asio::post(self->stream_.get_executor(), [self, r = std::move(response)]() mutable {
        self->Write(std::move(r), self->keep_alive_);
      });
    });
  }

  void Write(Response r, bool keep_alive) {
    auto response = std::make_shared<bhttp::response<bhttp::string_body>>();
    response->version(version_);
    response->result(static_cast<bhttp::status>(r.status));
    response->set(bhttp::field::content_type, r.content_type);
    response->set(bhttp::field::server, "meterd");
    for (const auto& [name, value] : r.headers) response->set(name, value);
    response->keep_alive(keep_alive);
    response->body() = std::move(r.body);
    response->prepare_payload();
    Tcp().expires_after(Chrono(limits_->write_timeout));
    bhttp::async_write(
        stream_, *response,
        [self = this->shared_from_this(), response, keep_alive](beast::error_code error, size_t) {
          if (error) return self->Close();
          if (!keep_alive) return self->Linger();
          self->Read(/*first=*/false);
        });
  }

  // A lingering close: our side is shut for sending (the client reads the answer to its end),
  // what the client still sends is read and dropped for up to 2 s, then the socket closes.
  // Closing at once with unread input would reset the connection and could destroy the
  // answer (a 413 or 431) before the client read it. Over TLS the bytes drained are the raw
  // records (nothing more is answered); the answer's length is in its headers, so the client
  // needs no close_notify to know it has all of it.
  void Linger() {
    beast::error_code ignored;
    Tcp().socket().shutdown(tcp::socket::shutdown_send, ignored);
    Tcp().expires_after(std::chrono::seconds(2));
    Drain();
  }
  void Drain() {
    Tcp().async_read_some(boost::asio::buffer(drain_),
                          [self = this->shared_from_this()](beast::error_code error, size_t) {
                            if (error) return self->Close();
                            self->Drain();
                          });
  }

  void Close() {
    beast::error_code ignored;
    Tcp().socket().shutdown(tcp::socket::shutdown_both, ignored);
    Tcp().close();
  }

  Stream stream_;
  const Handler* handler_;
  const Precheck* precheck_;
  const Limits* limits_;
  std::atomic<int>* connections_;
  std::string remote_;
  beast::flat_buffer buffer_;
  std::optional<bhttp::request_parser<bhttp::string_body>> parser_;
  bool keep_alive_ = false;
  unsigned version_ = 11;
  std::array<char, 4096> drain_;
};

}  // namespace

std::string_view Request::Header(std::string_view name) const {
  for (const auto& [key, value] : headers) {
    if (absl::EqualsIgnoreCase(key, AbslView(name))) return value;
  }
  return {};
}

std::string Request::Param(std::string_view name) const {
  for (absl::string_view part : absl::StrSplit(query, '&')) {
    const std::string_view pair(part.data(), part.size());
    const size_t eq = pair.find('=');
    if (PercentDecode(pair.substr(0, eq)) != name) continue;
    return eq == std::string_view::npos ? "" : PercentDecode(pair.substr(eq + 1));
  }
  return "";
}

absl::StatusOr<std::unique_ptr<boost::asio::ssl::context>> TlsContext(const TlsFiles& files) {
  if (files.cert.empty() != files.key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together: give both or neither");
  }
  auto context = std::make_unique<boost::asio::ssl::context>(boost::asio::ssl::context::tls_server);
  // TLS 1.2 and later only.
  SSL_CTX_set_min_proto_version(context->native_handle(), TLS1_2_VERSION);
  context->set_options(boost::asio::ssl::context::default_workarounds |
                       boost::asio::ssl::context::single_dh_use);
  beast::error_code error;
  context->use_certificate_chain_file(files.cert, error);
  if (error) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls-cert: cannot load a PEM certificate chain from ", files.cert, ": ",
                     error.message()));
  }
  context->use_private_key_file(files.key, boost::asio::ssl::context::pem, error);
  if (error) {
    return absl::InvalidArgumentError(absl::StrCat("--tls-key: cannot load a PEM private key from ",
                                                   files.key, ": ", error.message()));
  }
  if (SSL_CTX_check_private_key(context->native_handle()) != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tls-key: ", files.key, " is not the key of the certificate in ", files.cert));
  }
  return context;
}

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& listen,
                                                              Handler handler, Limits limits,
                                                              Precheck precheck, TlsFiles tls) {
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
  std::unique_ptr<HttpServer> server(
      new HttpServer(std::move(handler), limits, std::move(precheck)));
  if (!tls.cert.empty() || !tls.key.empty()) {
    ASSIGN_OR_RETURN(server->tls_, TlsContext(tls));
  }
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
  for (int i = 0; i < std::max(1, limits.threads); ++i) {
    server->threads_.emplace_back([s = server.get()] {
      auto guard = boost::asio::make_work_guard(s->io_);
      s->io_.run();
    });
  }
  return server;
}

HttpServer::~HttpServer() {
  boost::asio::post(io_, [this] {
    beast::error_code ignored;
    acceptor_.close(ignored);
    accept_retry_.cancel();
    io_.stop();
  });
  for (std::thread& thread : threads_) thread.join();
}

void HttpServer::Accept() {
  acceptor_.async_accept(
      boost::asio::make_strand(io_), [this](beast::error_code error, tcp::socket socket) {
        if (error == boost::asio::error::operation_aborted) return;
        if (!error) {
          // Over the connection limit: closed at once, so descriptors stay bounded.
          if (connections_.fetch_add(1, std::memory_order_relaxed) >= limits_.max_connections) {
            connections_.fetch_sub(1, std::memory_order_relaxed);
            beast::error_code ignored;
            socket.close(ignored);
          } else if (tls_ != nullptr) {
            std::make_shared<Session<TlsStream>>(std::move(socket), tls_.get(), &handler_,
                                                 &precheck_, &limits_, &connections_)
                ->Start();
          } else {
            std::make_shared<Session<beast::tcp_stream>>(std::move(socket), nullptr, &handler_,
                                                         &precheck_, &limits_, &connections_)
                ->Start();
          }
        } else {
          // Out of descriptors (or another accept error): wait before accepting again, so the
          // loop does not spin and flood the log.
          LOG_WARN("http: accept failed ({}); accepting again in 100 ms", error.message());
          accept_retry_.expires_after(std::chrono::milliseconds(100));
          accept_retry_.async_wait([this](beast::error_code e) {
            if (!e) Accept();
          });
          return;
        }
        Accept();
      });
}

namespace {

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  c = absl::ascii_tolower(c);
  return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

}  // namespace

std::string PercentDecode(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '+') {
      out += ' ';
    } else if (text[i] == '%' && i + 2 < text.size() && HexValue(text[i + 1]) >= 0 &&
               HexValue(text[i + 2]) >= 0) {
      out += static_cast<char>(HexValue(text[i + 1]) * 16 + HexValue(text[i + 2]));
      i += 2;
    } else {
      out += text[i];
    }
  }
  return out;
}

}  // namespace meterd::http
