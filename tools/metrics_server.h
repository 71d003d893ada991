// MetricsServer: a minimal HTTP/1.0 server for Prometheus scrapes (`--metrics 127.0.0.1:9090`).
// One thread ("modelfs-metrics") accepts one connection at a time, reads the request head
// (2 s limit), answers GET /metrics with the text that render() returns and anything else with
// 404, then closes. Not a general web server: no keep-alive, no bodies, no TLS.
//
// Thread-safety: Start and the destructor from one thread; render() runs on the server thread.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "base/status.h"
#include "base/unique_fd.h"

namespace modelfs::tools {

class MetricsServer {
 public:
  // addr: "HOST:PORT" (IPv4 literal or "localhost"; PORT 0 picks a free one).
  static StatusOr<std::unique_ptr<MetricsServer>> Start(const std::string& addr,
                                                        std::function<std::string()> render);
  ~MetricsServer();
  int port() const { return port_; }

 private:
  MetricsServer() = default;
  void Run();
  void Serve(int fd);

  std::function<std::string()> render_;
  UniqueFd listen_fd_;
  UniqueFd wake_read_, wake_write_;  // a pipe: written to stop the thread
  int port_ = 0;
  std::thread thread_;
};

}  // namespace modelfs::tools
