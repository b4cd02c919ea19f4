#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace meterd::http {

struct ClientRequest {
  std::string method = "POST";
  std::string target;  // Path and optional query, e.g. "/v1/billing/meter_events".
  // Extra headers (Authorization, Idempotency-Key, Stripe-Signature, …), sent as given; one
  // named Host or User-Agent replaces the client's.
  std::vector<std::pair<std::string, std::string>> headers;
  std::string content_type;  // Empty: no Content-Type header.
  std::string body;
};

struct ClientResponse {
  int status = 0;
  std::vector<std::pair<std::string, std::string>> headers;  // As received.
  std::string body;

  // The first header named `name` (case-insensitive); empty if absent.
  std::string_view Header(std::string_view name) const;
};

// A blocking HTTP/1.1 client (Boost.Beast) holding one keep-alive connection to one origin,
// "http://host:port" or "https://host[:port]" (a trailing slash allowed, no path). HTTPS
// verifies the server's certificate against the system's trust store (OpenSSL's default
// paths, so SSL_CERT_FILE / SSL_CERT_DIR apply) and its name against the host.
//
// A connection is opened on first use and kept; it is closed after any error, a timeout or a
// response with `Connection: close`, and one found closed by the server (its idle timeout) is
// replaced before a request is written on it. Not thread-safe: owned and used by one thread.
class HttpClient {
 public:
  // InvalidArgument naming `base_url` when it is not http(s)://host[:port][/]; a timeout that
  // is not positive is refused too.
  static absl::StatusOr<std::unique_ptr<HttpClient>> Create(const std::string& base_url,
                                                            absl::Duration timeout);
  ~HttpClient();
  HttpClient(const HttpClient&) = delete;
  HttpClient& operator=(const HttpClient&) = delete;

  // One exchange (resolve, connect, TLS handshake, write, read), all of it within the timeout.
  // Any HTTP status is a successful return. Unavailable ("connect to … failed: …",
  // "handshake …", "write …", "read …") on a network error, DeadlineExceeded when the
  // timeout passes; after either, the request may or may not have reached the server. A
  // request carrying an Idempotency-Key (or a GET/HEAD) is written once more on a new
  // connection, within the same timeout, when a reused connection turns out to have been
  // closed under it before any byte of the answer.
  absl::StatusOr<ClientResponse> Send(const ClientRequest& request);

  const std::string& base_url() const { return base_url_; }

 private:
  struct Io;  // Asio state, kept out of this header.
  HttpClient(std::string base_url, bool tls, std::string host, std::string port,
             absl::Duration timeout);

  std::string base_url_;
  bool tls_;
  std::string host_;  // Without IPv6 brackets.
  std::string port_;
  absl::Duration timeout_;
  std::unique_ptr<Io> io_;
};

// application/x-www-form-urlencoded, as Stripe takes it: keys and values percent-encoded
// (RFC 3986 unreserved characters kept, every other byte as %XX, so "payload[value]" becomes
// "payload%5Bvalue%5D" and a space "%20"), "key=value" fields joined with '&', in order.
std::string FormEncode(const std::vector<std::pair<std::string, std::string>>& fields);

}  // namespace meterd::http
