#include "tests/support/tcp_proxy.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <stdexcept>

namespace meterd::testing {
namespace {

bool WriteAll(int fd, const char* data, ssize_t size) {
  while (size > 0) {
    const ssize_t n = write(fd, data, static_cast<size_t>(size));
    if (n <= 0) return false;
    data += n;
    size -= n;
  }
  return true;
}

}  // namespace

TcpProxy::TcpProxy(int target_port) : target_port_(target_port) {
  listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (listen_fd_ < 0 || bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      listen(listen_fd_, 64) != 0) {
    throw std::runtime_error("tcp proxy: cannot listen");
  }
  socklen_t len = sizeof(addr);
  getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  port_ = ntohs(addr.sin_port);
  thread_ = std::thread([this] { Loop(); });
}

TcpProxy::~TcpProxy() {
  stopping_.store(true);
  thread_.join();
  for (const auto& [a, b] : pairs_) {
    close(a);
    close(b);
  }
  close(listen_fd_);
}

void TcpProxy::Loop() {
  char buffer[65536];
  while (!stopping_.load()) {
    if (stalled_.load()) {
      usleep(20'000);
      continue;
    }
    std::vector<pollfd> fds;
    fds.push_back({listen_fd_, POLLIN, 0});
    for (const auto& [client, upstream] : pairs_) {
      fds.push_back({client, POLLIN, 0});
      fds.push_back({upstream, POLLIN, 0});
    }
    if (poll(fds.data(), fds.size(), 20) <= 0) continue;
    if (stalled_.load()) continue;  // Stalled meanwhile: forward nothing more.
    if (fds[0].revents & POLLIN) {
      const int client = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (client >= 0) {
        const int upstream = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_in addr{};
        addr.sin_family = AF_INET;
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        addr.sin_port = htons(static_cast<uint16_t>(target_port_));
        if (connect(upstream, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
          pairs_.emplace_back(client, upstream);
        } else {
          close(client);
          close(upstream);
        }
      }
    }
    std::vector<std::pair<int, int>> alive;
    for (size_t i = 0; i < pairs_.size(); ++i) {
      const auto [client, upstream] = pairs_[i];
      bool open = true;
      for (int side = 0; side < 2 && open; ++side) {
        const pollfd& p = fds[1 + 2 * i + side];
        if (!(p.revents & (POLLIN | POLLHUP | POLLERR))) continue;
        const ssize_t n = read(p.fd, buffer, sizeof(buffer));
        open = n > 0 && WriteAll(side == 0 ? upstream : client, buffer, n);
      }
      if (open) {
        alive.emplace_back(client, upstream);
      } else {
        close(client);
        close(upstream);
      }
    }
    pairs_ = std::move(alive);
  }
}

}  // namespace meterd::testing
