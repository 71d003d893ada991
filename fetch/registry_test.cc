// RegistryClient small-request path on real sockets: manifests, chunksums, auth flows, errors,
// caps.
#include "fetch/registry.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "fetch/test_server.h"

namespace modelfs::fetch {
namespace {

using testing::TestConn;
using testing::TestRequest;
using testing::TestServer;

constexpr char kManifest[] = R"({"schemaVersion":2,"layers":[]})";
constexpr char kCt[] = "application/vnd.docker.distribution.manifest.v2+json";
// Two chunks of a 15-byte blob.
const std::string kChunksums =
    "sha256:" + std::string(64, 'a') + " 0-9\n" + "sha256:" + std::string(64, 'b') + " 10-14\n";
const Digest kBlob = Sha256::Of("the 15-byte blob");
const std::string kChunksumsPath = "/v2/library/m/chunksums/" + kBlob.ToString();

ClientOptions FastOptions() {
  ClientOptions o;
  o.request_timeout_s = 5;
  o.connect_timeout_s = 2;
  return o;
}

std::unique_ptr<RegistryClient> NewClient(ClientOptions o = FastOptions()) {
  auto c = RegistryClient::Create(std::move(o));
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return std::move(c).value();
}

// A registry that wants `Bearer good-token`, issued anonymously by its own /token endpoint.
struct BearerRegistry {
  std::atomic<int> token_requests{0};
  std::atomic<int> manifest_requests{0};
  std::atomic<int> expires_in{300};
  std::string last_token_query;
  std::mutex mu;
  TestServer server{[this](const TestRequest& r, TestConn& c) { Handle(r, c); }};

  void Handle(const TestRequest& r, TestConn& c) {
    if (r.path == "/token") {
      token_requests++;
      {
        std::lock_guard<std::mutex> lock(mu);
        last_token_query = r.query;
      }
      c.Sleep(0.05);  // let concurrent callers pile up behind one token request
      c.Send(TestServer::Response(200, R"({"token":"good-token","expires_in":)" +
                                           std::to_string(expires_in.load()) + "}"));
      return;
    }
    bool manifest = r.path.find("/manifests/") != std::string::npos;
    if (!manifest && r.path != kChunksumsPath) {
      c.Send(TestServer::Response(404, ""));
      return;
    }
    if (manifest) manifest_requests++;
    if (r.Header("authorization") != "Bearer good-token") {
      c.Send(TestServer::Response(
          401, R"({"errors":[{"code":"UNAUTHORIZED"}]})",
          {"WWW-Authenticate: Bearer realm=\"" + server.url() +
           "/token\",service=\"test-registry\",scope=\"repository:library/m:pull\""}));
      return;
    }
    if (r.path == kChunksumsPath) {
      c.Send(TestServer::Response(200, kChunksums));
    } else if (r.path == "/v2/library/m/manifests/latest") {
      c.Send(TestServer::Response(200, kManifest,
                                  {std::string("Content-Type: ") + kCt + "; charset=utf-8"}));
    } else {
      c.Send(TestServer::Response(404, R"({"errors":[{"code":"MANIFEST_UNKNOWN"}]})"));
    }
  }
};

// Collects GetChunksums' answer: the first result, how often done ran, and whether always on the
// fetch loop thread. done holds the state, so a late call after a failed Wait() is harmless.
class ChunksumsAnswer {
 public:
  Fetcher::ChunksumsFn Done() {
    return [st = state_](StatusOr<std::vector<Chunk>> r) {
      char name[16] = {};
      pthread_getname_np(pthread_self(), name, sizeof name);
      std::lock_guard<std::mutex> lock(st->mu);
      if (++st->calls == 1) st->result = std::move(r);
      st->on_loop_thread = st->on_loop_thread && std::string(name) == "modelfs-curl";
      st->cv.notify_all();
    };
  }
  StatusOr<std::vector<Chunk>> Wait() {
    std::unique_lock<std::mutex> lock(state_->mu);
    EXPECT_TRUE(
        state_->cv.wait_for(lock, std::chrono::seconds(10), [&] { return state_->calls > 0; }));
    EXPECT_TRUE(state_->on_loop_thread);
    return state_->result;
  }
  int Calls() {
    std::lock_guard<std::mutex> lock(state_->mu);
    return state_->calls;
  }

 private:
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    int calls = 0;
    bool on_loop_thread = true;
    StatusOr<std::vector<Chunk>> result = Status(Code::kInternal, "no answer");
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
};

StatusOr<std::vector<Chunk>> GetChunksums(RegistryClient* client, const BlobLocation& where) {
  ChunksumsAnswer answer;
  client->GetChunksums(where, answer.Done());
  return answer.Wait();
}

TEST(RegistryTest, ManifestWithAnonymousBearerToken) {
  BearerRegistry reg;
  auto client = NewClient();
  auto m = client->GetManifest(reg.server.url(), "library/m", "latest");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->body, kManifest);
  EXPECT_EQ(m->content_type, kCt);
  EXPECT_EQ(reg.token_requests.load(), 1);
  EXPECT_EQ(reg.last_token_query, "service=test-registry&scope=repository%3Alibrary%2Fm%3Apull");
  // The token is cached: no second token request, one manifest request.
  int before = reg.manifest_requests.load();
  ASSERT_TRUE(client->GetManifest(reg.server.url(), "library/m", "latest").ok());
  EXPECT_EQ(reg.token_requests.load(), 1);
  EXPECT_EQ(reg.manifest_requests.load(), before + 1);
}

// Issue 7: a token is reused until it expires, then replaced by exactly one new request.
TEST(RegistryTest, TokenIsCachedUntilExpiryThenRefreshed) {
  BearerRegistry reg;
  reg.expires_in = 1;  // the client renews a little early, but keeps a token at least 1 s
  auto client = NewClient();
  ASSERT_TRUE(client->GetManifest(reg.server.url(), "library/m", "latest").ok());
  ASSERT_TRUE(client->GetManifest(reg.server.url(), "library/m", "latest").ok());
  EXPECT_EQ(reg.token_requests.load(), 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(1300));
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      if (client->GetManifest(reg.server.url(), "library/m", "latest").ok()) ok++;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 4);
  EXPECT_EQ(reg.token_requests.load(), 2);
}

TEST(RegistryTest, ConcurrentCallersShareOneTokenRequest) {
  BearerRegistry reg;
  auto client = NewClient();
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&] {
      if (client->GetManifest(reg.server.url(), "library/m", "latest").ok()) ok++;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 8);
  EXPECT_EQ(reg.token_requests.load(), 1);
}

TEST(RegistryTest, UnknownManifestIsNotFound) {
  BearerRegistry reg;
  auto client = NewClient();
  auto m = client->GetManifest(reg.server.url(), "library/m", "nope");
  ASSERT_EQ(m.status().code(), Code::kNotFound) << m.status().ToString();
  EXPECT_NE(m.status().message().find("model library/m:nope not found at"), std::string::npos);
}

TEST(RegistryTest, NameUnknownWithOtherStatusIsNotFound) {
  TestServer s([](const TestRequest&, TestConn& c) {
    c.Send(TestServer::Response(400, R"({"errors":[{"code":"NAME_UNKNOWN","message":"x"}]})"));
  });
  auto client = NewClient();
  EXPECT_EQ(client->GetManifest(s.url(), "a/b", "c").status().code(), Code::kNotFound);
}

TEST(RegistryTest, BasicAuth) {
  TestServer s([](const TestRequest& r, TestConn& c) {
    if (r.Header("authorization") != "Basic dXNlcjpwYXNz") {
      c.Send(TestServer::Response(401, "", {"WWW-Authenticate: Basic realm=\"Registry\""}));
      return;
    }
    c.Send(TestServer::Response(200, kManifest, {std::string("Content-Type: ") + kCt}));
  });
  auto anon = NewClient();
  auto a = anon->GetManifest(s.url(), "a/b", "c");
  EXPECT_EQ(a.status().code(), Code::kUnauthenticated) << a.status().ToString();

  ClientOptions o = FastOptions();
  o.credentials["http://127.0.0.1:" + std::to_string(s.port())] = {"user", "pass"};
  auto client = NewClient(o);
  auto m = client->GetManifest(s.url(), "a/b", "c");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->body, kManifest);

  ClientOptions bad = FastOptions();
  bad.credentials["127.0.0.1:" + std::to_string(s.port())] = {"user", "wrong"};
  auto b = NewClient(bad)->GetManifest(s.url(), "a/b", "c");
  EXPECT_EQ(b.status().code(), Code::kUnauthenticated);
  EXPECT_NE(b.status().message().find("authentication failed for 127.0.0.1:"), std::string::npos)
      << b.status().ToString();
}

TEST(RegistryTest, RejectedTokenIsUnauthenticated) {
  std::atomic<int> port{0};
  TestServer reg([&](const TestRequest& r, TestConn& c) {
    if (r.path == "/token") {
      EXPECT_EQ(r.Header("authorization"), "Basic dXNlcjpwYXNz");
      c.Send(TestServer::Response(401, "{}"));
      return;
    }
    c.Send(TestServer::Response(401, "",
                                {"WWW-Authenticate: Bearer realm=\"http://127.0.0.1:" +
                                 std::to_string(port.load()) + "/token\""}));
  });
  port = reg.port();
  ClientOptions o = FastOptions();
  o.credentials["127.0.0.1:" + std::to_string(reg.port())] = {"user", "pass"};
  auto m = NewClient(o)->GetManifest(reg.url(), "a/b", "c");
  EXPECT_EQ(m.status().code(), Code::kUnauthenticated) << m.status().ToString();
  EXPECT_NE(m.status().message().find("authentication failed for 127.0.0.1:" +
                                      std::to_string(reg.port())),
            std::string::npos);
}

TEST(RegistryTest, ConnectionRefusedIsUnavailable) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  int port = ntohs(addr.sin_port);
  ::close(fd);  // nothing listens there now
  auto client = NewClient();
  auto m = client->GetManifest("http://127.0.0.1:" + std::to_string(port), "a/b", "c");
  ASSERT_EQ(m.status().code(), Code::kUnavailable) << m.status().ToString();
  EXPECT_NE(m.status().message().find("127.0.0.1:" + std::to_string(port)), std::string::npos);
}

TEST(RegistryTest, OversizedManifestIsRefused) {
  TestServer s([](const TestRequest&, TestConn& c) {
    c.Send(TestServer::Response(200, std::string((4 << 20) + 1, 'x')));
  });
  auto m = NewClient()->GetManifest(s.url(), "a/b", "c");
  EXPECT_EQ(m.status().code(), Code::kResourceExhausted) << m.status().ToString();
}

TEST(RegistryTest, SlowlorisTimesOut) {
  TestServer s([](const TestRequest&, TestConn& c) {
    c.Send("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
    while (c.Send("x") && c.Sleep(0.1)) {
    }
  });
  ClientOptions o = FastOptions();
  o.request_timeout_s = 0.5;
  auto start = std::chrono::steady_clock::now();
  auto m = NewClient(o)->GetManifest(s.url(), "a/b", "c");
  EXPECT_EQ(m.status().code(), Code::kUnavailable) << m.status().ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(3));
}

TEST(RegistryTest, ServerErrorIsUnavailable) {
  TestServer s([](const TestRequest&, TestConn& c) { c.Send(TestServer::Response(502, "")); });
  EXPECT_EQ(NewClient()->GetManifest(s.url(), "a/b", "c").status().code(), Code::kUnavailable);
}

TEST(RegistryTest, ShutdownCancelsBlockedCaller) {
  TestServer s([](const TestRequest&, TestConn& c) { c.Sleep(30); });
  auto client = NewClient();
  std::atomic<bool> returned{false};
  Status result;
  std::thread t([&] {
    result = client->GetManifest(s.url(), "a/b", "c").status();
    returned = true;
  });
  while (s.requests() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  client.reset();
  t.join();
  EXPECT_TRUE(returned);
  EXPECT_EQ(result.code(), Code::kCancelled) << result.ToString();
}

TEST(RegistryTest, GetBlobFollowsRedirectWithoutLeakingAuth) {
  std::atomic<bool> cdn_saw_auth{false};
  TestServer cdn([&](const TestRequest& r, TestConn& c) {
    if (!r.Header("authorization").empty()) cdn_saw_auth = true;
    c.Send(TestServer::Response(200, "{\"config\":1}"));
  });
  std::string cdn_url = cdn.url();
  TestServer reg([&](const TestRequest& r, TestConn& c) {
    if (r.Header("authorization") != "Basic dXNlcjpwYXNz") {
      c.Send(TestServer::Response(401, "", {"WWW-Authenticate: Basic realm=\"r\""}));
      return;
    }
    c.Send(TestServer::Response(307, "", {"Location: " + cdn_url + "/data?sig=secret"}));
  });
  ClientOptions o = FastOptions();
  o.credentials["127.0.0.1:" + std::to_string(reg.port())] = {"user", "pass"};
  auto client = NewClient(o);
  BlobLocation where{reg.url(), "a/b", Sha256::Of("x"), 12};
  auto b = client->GetBlob(where, 1024);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(*b, "{\"config\":1}");
  EXPECT_FALSE(cdn_saw_auth);
  auto big = client->GetBlob(where, 4);
  EXPECT_EQ(big.status().code(), Code::kResourceExhausted);
  where.size = 0;  // unknown size: the body cap still applies
  EXPECT_EQ(client->GetBlob(where, 4).status().code(), Code::kResourceExhausted);
}

TEST(RegistryTest, ChunksumsAreParsedAndDelivered) {
  std::atomic<int> requests{0};
  TestServer s([&](const TestRequest& r, TestConn& c) {
    requests++;
    EXPECT_EQ(r.path, kChunksumsPath);
    c.Send(TestServer::Response(200, kChunksums, {"Content-Type: text/plain"}));
  });
  ChunksumsAnswer answer;
  auto client = NewClient();
  client->GetChunksums({s.url() + "/", "library/m", kBlob, 15}, answer.Done());
  auto c = answer.Wait();
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  ASSERT_EQ(c->size(), 2u);
  EXPECT_EQ((*c)[1].begin, 10u);
  EXPECT_EQ((*c)[1].end, 15u);
  EXPECT_EQ((*c)[1].digest.ToString(), "sha256:" + std::string(64, 'b'));
  client.reset();
  EXPECT_EQ(answer.Calls(), 1);
  EXPECT_EQ(requests.load(), 1);
}

// docker-registry has no chunksums endpoint and answers 404 with a JSON error body; others may
// say 405 or 501.
TEST(RegistryTest, ChunksumsMissingAreNotFound) {
  std::atomic<int> code{404};
  TestServer s([&](const TestRequest&, TestConn& c) {
    c.Send(TestServer::Response(
        code, R"({"errors":[{"code":"UNSUPPORTED","message":"The operation is unsupported."}]})",
        {"Content-Type: application/json"}));
  });
  auto client = NewClient();
  for (int status : {404, 405, 501}) {
    code = status;
    auto c = GetChunksums(client.get(), {s.url(), "library/m", kBlob, 15});
    EXPECT_EQ(c.status().code(), Code::kNotFound) << status << ": " << c.status().ToString();
  }
}

TEST(RegistryTest, ChunksumsThatDoNotParseAreDataLoss) {
  std::atomic<bool> garbage{true};
  TestServer s([&](const TestRequest&, TestConn& c) {
    c.Send(TestServer::Response(200, garbage ? "<html>hello</html>" : kChunksums));
  });
  auto client = NewClient();
  auto c = GetChunksums(client.get(), {s.url(), "library/m", kBlob, 15});
  ASSERT_EQ(c.status().code(), Code::kDataLoss) << c.status().ToString();
  EXPECT_NE(c.status().message().find("127.0.0.1:" + std::to_string(s.port())), std::string::npos)
      << c.status().ToString();
  EXPECT_NE(c.status().message().find(kBlob.Short()), std::string::npos);
  EXPECT_NE(c.status().message().find("chunksums line 1"), std::string::npos);

  garbage = false;  // well-formed, but for a 20-byte blob they stop 5 bytes short
  c = GetChunksums(client.get(), {s.url(), "library/m", kBlob, 20});
  ASSERT_EQ(c.status().code(), Code::kDataLoss) << c.status().ToString();
  EXPECT_NE(c.status().message().find("cover 15 of 20 bytes"), std::string::npos)
      << c.status().ToString();
}

TEST(RegistryTest, ChunksumsAnswerABearerChallenge) {
  BearerRegistry reg;
  auto client = NewClient();
  auto c = GetChunksums(client.get(), {reg.server.url(), "library/m", kBlob, 15});
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->size(), 2u);
  EXPECT_EQ(reg.token_requests.load(), 1);
  // The token serves the manifest too.
  ASSERT_TRUE(client->GetManifest(reg.server.url(), "library/m", "latest").ok());
  EXPECT_EQ(reg.token_requests.load(), 1);
}

TEST(RegistryTest, ChunksumsAreCancelledOnceWhenTheClientIsDestroyed) {
  std::mutex mu;
  std::condition_variable cv;
  bool asked = false;
  TestServer s([&](const TestRequest&, TestConn& c) {
    {
      std::lock_guard<std::mutex> lock(mu);
      asked = true;
    }
    cv.notify_all();
    c.Sleep(30);  // never answers; the server's destructor wakes this
  });
  ChunksumsAnswer answer;
  auto client = NewClient();
  client->GetChunksums({s.url(), "library/m", kBlob, 15}, answer.Done());
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(10), [&] { return asked; }));
  }
  EXPECT_EQ(answer.Calls(), 0);
  client.reset();  // joins the loop thread, so done has run by now
  EXPECT_EQ(answer.Calls(), 1);
  EXPECT_EQ(answer.Wait().status().code(), Code::kCancelled) << answer.Wait().status().ToString();
}

TEST(RegistryTest, ChunksumsOfAnInvalidRegistryUrlAreInvalidArgument) {
  auto client = NewClient();
  auto c = GetChunksums(client.get(), {"ftp://example.com", "library/m", kBlob, 15});
  EXPECT_EQ(c.status().code(), Code::kInvalidArgument) << c.status().ToString();
}

TEST(RegistryTest, ChunksumsFollowARedirectWithoutLeakingAuth) {
  std::atomic<bool> cdn_saw_auth{false};
  TestServer cdn([&](const TestRequest& r, TestConn& c) {
    if (!r.Header("authorization").empty()) cdn_saw_auth = true;
    c.Send(TestServer::Response(200, kChunksums));
  });
  std::string cdn_url = cdn.url();
  TestServer reg([&](const TestRequest& r, TestConn& c) {
    if (r.Header("authorization") != "Basic dXNlcjpwYXNz") {
      c.Send(TestServer::Response(401, "", {"WWW-Authenticate: Basic realm=\"r\""}));
      return;
    }
    c.Send(TestServer::Response(302, "", {"Location: " + cdn_url + "/chunks?sig=secret"}));
  });
  ClientOptions o = FastOptions();
  o.credentials["127.0.0.1:" + std::to_string(reg.port())] = {"user", "pass"};
  auto client = NewClient(o);
  auto c = GetChunksums(client.get(), {reg.url(), "library/m", kBlob, 15});
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->size(), 2u);
  EXPECT_FALSE(cdn_saw_auth);
}

TEST(RegistryTest, OversizedChunksumsAreRefused) {
  TestServer s([](const TestRequest&, TestConn& c) {
    c.Send(TestServer::Response(200, std::string((32 << 20) + 1, 'x')));
  });
  auto c = GetChunksums(NewClient().get(), {s.url(), "library/m", kBlob, 15});
  ASSERT_EQ(c.status().code(), Code::kResourceExhausted) << c.status().ToString();
  EXPECT_NE(c.status().message().find("32 MiB"), std::string::npos) << c.status().ToString();
}

}  // namespace
}  // namespace modelfs::fetch
