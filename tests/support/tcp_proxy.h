#pragma once

#include <atomic>
#include <thread>
#include <vector>

namespace meterd::testing {

// A TCP forwarder on 127.0.0.1 that a test can black-hole: while stalled it neither reads nor
// accepts, so the peer sees a server that stopped answering (its kernel still ACKs, as a
// half-dead middlebox or a hung host does). Resume forwards again, buffered bytes included.
class TcpProxy {
 public:
  explicit TcpProxy(int target_port);
  ~TcpProxy();
  TcpProxy(const TcpProxy&) = delete;
  TcpProxy& operator=(const TcpProxy&) = delete;

  int port() const { return port_; }
  void Stall() { stalled_.store(true); }
  void Resume() { stalled_.store(false); }

 private:
  void Loop();

  int target_port_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stalled_{false};
  std::atomic<bool> stopping_{false};
  std::vector<std::pair<int, int>> pairs_;  // (client, upstream); proxy thread only.
  std::thread thread_;
};

}  // namespace meterd::testing
