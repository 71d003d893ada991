// TestServer: a tiny threaded HTTP/1.1 server on 127.0.0.1, port 0, for fetch tests. Unlike
// httplib it lets a handler write raw bytes, so faults are exact: truncated bodies, resets,
// wrong headers, extra bytes, stalls. One thread per connection; keep-alive supported.
// Thread-safe; the destructor stops everything (sleeping handlers wake up) and joins.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace modelfs::fetch::testing {

struct TestRequest {
  std::string method;
  std::string target;  // path plus query
  std::string path;    // without query
  std::string query;
  std::map<std::string, std::string> headers;          // lowercase names
  std::optional<std::pair<uint64_t, uint64_t>> range;  // inclusive, from "bytes=a-b"
  int connection = 0;                                  // connection number, from 1
  std::string Header(const std::string& name) const {
    auto it = headers.find(name);
    return it == headers.end() ? "" : it->second;
  }
};

class TestServer;

class TestConn {
 public:
  // False when the peer is gone or the server is stopping.
  bool Send(std::string_view data);
  // Send() that also counts the bytes in TestServer::body_bytes_sent().
  bool SendBody(std::string_view data);
  // Ends the connection after this response (Close) or at once with a TCP reset (Reset).
  void Close() { close_ = true; }
  void Reset();
  // Sleeps; returns false early if the server is stopping.
  bool Sleep(double seconds);
  bool stopping() const;

 private:
  friend class TestServer;
  TestServer* server_ = nullptr;
  int fd_ = -1;
  bool close_ = false;
  bool reset_ = false;
};

using TestHandler = std::function<void(const TestRequest&, TestConn&)>;

class TestServer {
 public:
  explicit TestServer(TestHandler handler);
  ~TestServer();
  int port() const { return port_; }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }
  uint64_t body_bytes_sent() const { return sent_.load(); }
  int requests() const { return requests_.load(); }
  void Stop();

  // Response helpers.
  static std::string Response(int status, const std::string& body,
                              const std::vector<std::string>& headers = {});
  // Serves [a, b] of blob as a correct 206 (or 200 without a Range).
  static void ServeBlob(const TestRequest& req, TestConn& conn, const std::string& blob);

 private:
  friend class TestConn;
  void AcceptLoop();
  void Serve(int fd, int conn_no);

  TestHandler handler_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> sent_{0};
  std::atomic<int> requests_{0};
  std::thread accept_thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
  std::vector<int> fds_;
};

}  // namespace modelfs::fetch::testing
