#include "lib/http/http_client.h"

// Boost 1.74's Asio needs <utility> before it under C++20.
#include <utility>

#include <poll.h>

#include <chrono>
#include <memory>
#include <optional>

#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "lib/common/status_macros.h"
#include "lib/common/string_views.h"

namespace meterd::http {
namespace {

namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
namespace ssl = boost::asio::ssl;
using tcp = boost::asio::ip::tcp;
using SteadyTime = std::chrono::steady_clock::time_point;

bool IsIpAddress(const std::string& host) {
  beast::error_code error;
  boost::asio::ip::make_address(host, error);
  return !error;
}

// The peer closed the connection (or reset it) before answering.
bool AnswerNeverStarted(const beast::error_code& error) {
  return error == bhttp::error::end_of_stream || error == boost::asio::error::connection_reset ||
         error == boost::asio::error::eof || error == boost::asio::error::broken_pipe ||
         error == ssl::error::stream_truncated;
}

bool Replayable(const ClientRequest& request) {
  if (request.method == "GET" || request.method == "HEAD") return true;
  for (const auto& [name, value] : request.headers) {
    if (absl::EqualsIgnoreCase(name, "Idempotency-Key") && !value.empty()) return true;
  }
  return false;
}

}  // namespace

// Everything runs on the caller's thread: each step starts one async operation and runs the
// private io_context until it completes or the exchange's deadline passes (Beast's
// expires_after only bounds async operations, and a blocking socket has no deadline at all).
// On the deadline the socket is closed, which completes the pending operation with
// operation_aborted, and the io_context is run until it has: no handler outlives the stream
// it refers to.
struct HttpClient::Io {
  using TlsStream = beast::ssl_stream<beast::tcp_stream>;

  Io(std::string origin, std::unique_ptr<ssl::context> tls_context)
      : origin(std::move(origin)), tls(std::move(tls_context)) {}

  beast::tcp_stream& Tcp() { return secure ? beast::get_lowest_layer(*secure) : *plain; }

  // Calls f with the stream requests go through: TLS or plain.
  template <typename F>
  void WithStream(F&& f) {
    if (secure) {
      f(*secure);
    } else {
      f(*plain);
    }
  }

  // No close_notify: the answer's length is in its headers, so nothing is lost without one.
  void Close() {
    if (!plain && !secure) return;
    beast::error_code ignored;
    Tcp().socket().close(ignored);
    open = false;
  }

  // A kept connection the server closed (its idle timeout) reads as EOF; one with unread bytes
  // (in the socket or the buffer) while no request is outstanding is out of step. Either way it
  // must not carry a request.
  bool StillUsable() {
    if (!open || buffer.size() != 0) return false;
    pollfd fd{Tcp().socket().native_handle(), POLLIN, 0};
    return ::poll(&fd, 1, 0) == 0;
  }

  // Starts one operation through `launch(handler)` and runs it to completion or `deadline`.
  // `error`, when given, receives the operation's error code.
  template <typename Launch>
  absl::Status Step(SteadyTime deadline, const char* what, Launch launch,
                    beast::error_code* error = nullptr) {
    bool done = false;
    beast::error_code result;
    launch([&done, &result](beast::error_code e, auto&&...) {
      result = e;
      done = true;
    });
    io.restart();
    while (!done && io.run_one_until(deadline) > 0) {
    }
    if (!done) {
      Close();
      io.restart();
      while (!done && io.run_one() > 0) {
      }
      if (error != nullptr) *error = boost::asio::error::timed_out;
      return absl::DeadlineExceededError(
          absl::StrCat(what, " ", origin, " timed out after ", absl::FormatDuration(timeout)));
    }
    if (error != nullptr) *error = result;
    if (result) {
      Close();
      return absl::UnavailableError(absl::StrCat(what, " ", origin, " failed: ", result.message()));
    }
    return absl::OkStatus();
  }

  absl::Status Connect(SteadyTime deadline, const std::string& host, const std::string& port) {
    Close();
    buffer.clear();
    plain.reset();
    secure.reset();
    // The resolver's handler owns what it writes: on a timeout it is left pending (getaddrinfo
    // cannot be interrupted) and completes, unheard, during a later exchange.
    struct Resolved {
      bool done = false;
      beast::error_code error;
      tcp::resolver::results_type endpoints;
    };
    auto resolved = std::make_shared<Resolved>();
    resolver.async_resolve(
        host, port, [resolved](beast::error_code error, tcp::resolver::results_type endpoints) {
          resolved->error = error;
          resolved->endpoints = std::move(endpoints);
          resolved->done = true;
        });
    io.restart();
    while (!resolved->done && io.run_one_until(deadline) > 0) {
    }
    if (!resolved->done) {
      resolver.cancel();
      return absl::DeadlineExceededError(absl::StrCat("connect to ", origin,
                                                      " timed out resolving its name after ",
                                                      absl::FormatDuration(timeout)));
    }
    if (resolved->error) {
      return absl::UnavailableError(absl::StrCat("connect to ", origin, " failed: cannot resolve ",
                                                 host, ": ", resolved->error.message()));
    }
    if (tls) {
      secure.emplace(io, *tls);
      // SNI carries names only, never an address (RFC 6066).
      if (!IsIpAddress(host) &&
          SSL_set_tlsext_host_name(secure->native_handle(), host.c_str()) != 1) {
        return absl::InternalError(absl::StrCat("connect to ", origin, " failed: cannot set SNI"));
      }
      // A certificate that does not name the host fails as "hostname mismatch" (or "IP address
      // mismatch"), not as an unspecified verification error.
      secure->set_verify_callback([host](bool preverified, ssl::verify_context& context) {
        if (ssl::host_name_verification(host)(preverified, context)) return true;
        if (preverified) {
          X509_STORE_CTX_set_error(context.native_handle(), IsIpAddress(host)
                                                                ? X509_V_ERR_IP_ADDRESS_MISMATCH
                                                                : X509_V_ERR_HOSTNAME_MISMATCH);
        }
        return false;
      });
    } else {
      plain.emplace(io);
    }
    RETURN_IF_ERROR(Step(deadline, "connect to", [&](auto handler) {
      Tcp().async_connect(resolved->endpoints, std::move(handler));
    }));
    beast::error_code ignored;
    Tcp().socket().set_option(tcp::no_delay(true), ignored);
    if (secure) {
      absl::Status handshake = Step(deadline, "TLS handshake with", [&](auto handler) {
        secure->async_handshake(ssl::stream_base::client, std::move(handler));
      });
      if (absl::IsUnavailable(handshake)) {
        const long verify = SSL_get_verify_result(secure->native_handle());
        if (verify != X509_V_OK) {
          return absl::UnavailableError(
              absl::StrCat(handshake.message(), " (", X509_verify_cert_error_string(verify), ")"));
        }
      }
      RETURN_IF_ERROR(handshake);
    }
    open = true;
    return absl::OkStatus();
  }

  std::string origin;  // For messages.
  absl::Duration timeout;
  boost::asio::io_context io;
  std::unique_ptr<ssl::context> tls;  // Null: plain HTTP.
  tcp::resolver resolver{io};
  std::optional<beast::tcp_stream> plain;
  std::optional<TlsStream> secure;
  beast::flat_buffer buffer;
  bool open = false;
};

std::string_view ClientResponse::Header(std::string_view name) const {
  for (const auto& [key, value] : headers) {
    if (absl::EqualsIgnoreCase(key, AbslView(name))) return value;
  }
  return {};
}

HttpClient::HttpClient(std::string base_url, bool tls, std::string host, std::string port,
                       absl::Duration timeout)
    : base_url_(std::move(base_url)),
      tls_(tls),
      host_(std::move(host)),
      port_(std::move(port)),
      timeout_(timeout) {}

HttpClient::~HttpClient() {
  if (io_ != nullptr) io_->Close();
}

absl::StatusOr<std::unique_ptr<HttpClient>> HttpClient::Create(const std::string& base_url,
                                                               absl::Duration timeout) {
  const auto invalid = [&base_url] {
    return absl::InvalidArgumentError(absl::StrCat(
        "'", base_url, "' is not an HTTP origin: expected http(s)://host[:port], no path"));
  };
  absl::string_view rest = base_url;
  bool tls = false;
  if (absl::StartsWithIgnoreCase(rest, "https://")) {
    tls = true;
    rest.remove_prefix(8);
  } else if (absl::StartsWithIgnoreCase(rest, "http://")) {
    rest.remove_prefix(7);
  } else {
    return invalid();
  }
  absl::ConsumeSuffix(&rest, "/");
  std::string host;
  std::optional<absl::string_view> port_text;
  if (absl::ConsumePrefix(&rest, "[")) {  // [IPv6]
    const size_t close = rest.find(']');
    if (close == absl::string_view::npos) return invalid();
    host = std::string(rest.substr(0, close));
    rest.remove_prefix(close + 1);
    if (absl::ConsumePrefix(&rest, ":")) {
      port_text = rest;
    } else if (!rest.empty()) {
      return invalid();
    }
    if (!IsIpAddress(host)) return invalid();
  } else {
    const size_t colon = rest.find(':');
    host = std::string(rest.substr(0, colon));
    if (colon != absl::string_view::npos) port_text = rest.substr(colon + 1);
    for (const char c : host) {
      if (!absl::ascii_isalnum(c) && c != '.' && c != '-' && c != '_') return invalid();
    }
  }
  if (host.empty()) return invalid();
  int port = tls ? 443 : 80;
  if (port_text) {
    for (const char c : *port_text) {
      if (!absl::ascii_isdigit(c)) return invalid();
    }
    if (!absl::SimpleAtoi(*port_text, &port) || port < 1 || port > 65535) return invalid();
  }
  if (timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("HTTP client for ", base_url, ": the timeout must be positive"));
  }

  std::unique_ptr<ssl::context> context;
  if (tls) {
    context = std::make_unique<ssl::context>(ssl::context::tls_client);
    SSL_CTX_set_min_proto_version(context->native_handle(), TLS1_2_VERSION);
    beast::error_code error;
    context->set_default_verify_paths(error);
    if (error) {
      return absl::FailedPreconditionError(
          absl::StrCat("HTTP client for ", base_url,
                       ": cannot load the system's trusted certificates: ", error.message()));
    }
    context->set_verify_mode(ssl::verify_peer);
  }
  std::unique_ptr<HttpClient> client(
      new HttpClient(base_url, tls, std::move(host), absl::StrCat(port), timeout));
  client->io_ = std::make_unique<Io>(base_url, std::move(context));
  client->io_->timeout = timeout;
  return client;
}

absl::StatusOr<ClientResponse> HttpClient::Send(const ClientRequest& request) {
  const SteadyTime deadline =
      std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(timeout_);
  bhttp::request<bhttp::string_body> message;
  message.version(11);
  message.method_string(request.method);
  message.target(request.target.empty() ? "/" : request.target);
  const bool default_port = port_ == (tls_ ? "443" : "80");
  const std::string host = host_.find(':') == std::string::npos ? host_ : "[" + host_ + "]";
  message.set(bhttp::field::host, default_port ? host : absl::StrCat(host, ":", port_));
  message.set(bhttp::field::user_agent, "meterd");
  if (!request.content_type.empty()) message.set(bhttp::field::content_type, request.content_type);
  // A header the caller gives replaces the default of that name (User-Agent, Host).
  for (const auto& [name, value] : request.headers) {
    if (name.empty() || name.find_first_of(":\r\n") != std::string::npos ||
        value.find_first_of("\r\n") != std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("header '", absl::CEscape(name), "' cannot be sent: empty, or CR/LF in it"));
    }
    message.erase(name);
  }
  for (const auto& [name, value] : request.headers) message.insert(name, value);
  message.body() = request.body;
  message.keep_alive(true);
  message.prepare_payload();

  Io& io = *io_;
  for (int attempt = 0;; ++attempt) {
    if (io.open && !io.StillUsable()) io.Close();
    const bool reused = io.open;
    if (!io.open) RETURN_IF_ERROR(io.Connect(deadline, host_, port_));

    beast::error_code error;
    absl::Status written = io.Step(
        deadline, "write to",
        [&](auto handler) {
          io.WithStream([&](auto& stream) { bhttp::async_write(stream, message, handler); });
        },
        &error);
    bhttp::response_parser<bhttp::string_body> parser;
    parser.header_limit(64 * 1024);
    parser.body_limit(64 * 1024 * 1024);
    if (request.method == "HEAD") parser.skip(true);
    absl::Status read = written;
    if (written.ok()) {
      read = io.Step(
          deadline, "read from",
          [&](auto handler) {
            io.WithStream(
                [&](auto& stream) { bhttp::async_read(stream, io.buffer, parser, handler); });
          },
          &error);
    }
    if (read.ok()) {
      bhttp::response<bhttp::string_body> received = parser.release();
      ClientResponse response;
      response.status = static_cast<int>(received.result_int());
      for (const auto& field : received) {
        response.headers.emplace_back(std::string(field.name_string()), std::string(field.value()));
      }
      response.body = std::move(received.body());
      if (!received.keep_alive()) io.Close();
      return response;
    }
    // A kept connection closed under the request (the server's idle timeout racing it) before
    // any byte of the answer: the request may still have been seen, so it is written again
    // only when doing so twice is harmless.
    const bool stale = reused && absl::IsUnavailable(read) &&
                       (!written.ok() || (AnswerNeverStarted(error) && !parser.got_some()));
    if (attempt == 0 && stale && Replayable(request)) continue;
    return read;
  }
}

std::string FormEncode(const std::vector<std::pair<std::string, std::string>>& fields) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  const auto append = [&out](std::string_view text) {
    for (const char c : text) {
      const auto u = static_cast<unsigned char>(c);
      if (absl::ascii_isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
        out += c;
      } else {
        out += '%';
        out += kHex[u >> 4];
        out += kHex[u & 15];
      }
    }
  };
  for (const auto& [key, value] : fields) {
    if (!out.empty()) out += '&';
    append(key);
    out += '=';
    append(value);
  }
  return out;
}

}  // namespace meterd::http
