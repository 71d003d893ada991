#include "fetch/test_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstring>

namespace modelfs::fetch::testing {

bool TestConn::Send(std::string_view data) {
  while (!data.empty()) {
    if (server_->stopping_) return false;
    ssize_t n = ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

bool TestConn::SendBody(std::string_view data) {
  server_->sent_ += data.size();
  return Send(data);
}

void TestConn::Reset() {
  close_ = true;
  reset_ = true;
}

bool TestConn::Sleep(double seconds) {
  std::unique_lock<std::mutex> lock(server_->mu_);
  return !server_->cv_.wait_for(lock, std::chrono::duration<double>(seconds),
                                [&] { return server_->stopping_.load(); });
}

bool TestConn::stopping() const { return server_->stopping_; }

TestServer::TestServer(TestHandler handler) : handler_(std::move(handler)) {
  listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  ::listen(listen_fd_, 128);
  socklen_t len = sizeof addr;
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  port_ = ntohs(addr.sin_port);
  accept_thread_ = std::thread([this] { AcceptLoop(); });
}

TestServer::~TestServer() { Stop(); }

void TestServer::Stop() {
  if (stopping_.exchange(true)) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cv_.notify_all();
    for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
  }
  accept_thread_.join();
  std::vector<std::thread> threads;
  {
    std::lock_guard<std::mutex> lock(mu_);
    threads.swap(threads_);
  }
  for (auto& t : threads) t.join();
  ::close(listen_fd_);
}

void TestServer::AcceptLoop() {
  int conn_no = 0;
  while (!stopping_) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (::poll(&p, 1, 20) <= 0) continue;
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) {
      ::close(fd);
      break;
    }
    fds_.push_back(fd);
    int n = ++conn_no;
    threads_.emplace_back([this, fd, n] { Serve(fd, n); });
  }
}

namespace {

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

}  // namespace

void TestServer::Serve(int fd, int conn_no) {
  std::string buf;
  char tmp[4096];
  TestConn conn;
  conn.server_ = this;
  conn.fd_ = fd;
  while (!stopping_ && !conn.close_) {
    size_t end;
    while ((end = buf.find("\r\n\r\n")) == std::string::npos) {
      pollfd p{fd, POLLIN, 0};
      int pr = ::poll(&p, 1, 20);
      if (stopping_) break;
      if (pr <= 0) continue;
      ssize_t n = ::recv(fd, tmp, sizeof tmp, 0);
      if (n <= 0) {
        conn.close_ = true;
        break;
      }
      buf.append(tmp, static_cast<size_t>(n));
    }
    if (stopping_ || conn.close_) break;
    std::string head = buf.substr(0, end);
    buf.erase(0, end + 4);
    TestRequest req;
    req.connection = conn_no;
    size_t line_end = head.find("\r\n");
    std::string first = head.substr(0, line_end);
    size_t s1 = first.find(' '), s2 = first.rfind(' ');
    req.method = first.substr(0, s1);
    req.target = first.substr(s1 + 1, s2 - s1 - 1);
    size_t q = req.target.find('?');
    req.path = req.target.substr(0, q);
    req.query = q == std::string::npos ? "" : req.target.substr(q + 1);
    size_t pos = line_end == std::string::npos ? head.size() : line_end + 2;
    while (pos < head.size()) {
      size_t e = head.find("\r\n", pos);
      if (e == std::string::npos) e = head.size();
      std::string line = head.substr(pos, e - pos);
      size_t c = line.find(':');
      if (c != std::string::npos) {
        std::string v = line.substr(c + 1);
        while (!v.empty() && v.front() == ' ') v.erase(0, 1);
        req.headers[Lower(line.substr(0, c))] = v;
      }
      pos = e + 2;
    }
    std::string range = req.Header("range");
    if (range.rfind("bytes=", 0) == 0) {
      size_t dash = range.find('-');
      req.range = {std::stoull(range.substr(6, dash - 6)), std::stoull(range.substr(dash + 1))};
    }
    requests_++;
    handler_(req, conn);
  }
  if (conn.reset_) {
    linger l{1, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
  }
  std::lock_guard<std::mutex> lock(mu_);
  std::erase(fds_, fd);
  ::close(fd);
}

std::string TestServer::Response(int status, const std::string& body,
                                 const std::vector<std::string>& headers) {
  std::string r = "HTTP/1.1 " + std::to_string(status) + " X\r\n";
  for (const auto& h : headers) r += h + "\r\n";
  r += "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n";
  r += body;
  return r;
}

void TestServer::ServeBlob(const TestRequest& req, TestConn& conn, const std::string& blob) {
  if (!req.range) {
    std::string head =
        "HTTP/1.1 200 OK\r\nContent-Length: " + std::to_string(blob.size()) + "\r\n\r\n";
    if (conn.Send(head)) conn.SendBody(blob);
    return;
  }
  uint64_t a = req.range->first, b = std::min<uint64_t>(req.range->second, blob.size() - 1);
  std::string head = "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes " + std::to_string(a) +
                     "-" + std::to_string(b) + "/" + std::to_string(blob.size()) +
                     "\r\nContent-Length: " + std::to_string(b - a + 1) + "\r\n\r\n";
  if (!conn.Send(head)) return;
  conn.SendBody(std::string_view(blob).substr(a, b - a + 1));
}

}  // namespace modelfs::fetch::testing
