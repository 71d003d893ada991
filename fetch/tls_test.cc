// TLS trust: a private CA given with ca_file is trusted (on top of the system store); without it
// the same server is refused with a clear message; insecure skips verification.
#ifndef CPPHTTPLIB_OPENSSL_SUPPORT
#define CPPHTTPLIB_OPENSSL_SUPPORT
#endif
#include <gtest/gtest.h>
#include <httplib.h>
#include <unistd.h>

#include <cstdlib>
#include <thread>

#include "fetch/registry.h"

namespace modelfs::fetch {
namespace {

class TlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/modelfs-tls-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    std::string cmd =
        "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1 "
        "-addext subjectAltName=IP:127.0.0.1 -keyout " +
        dir_ + "/key.pem -out " + dir_ + "/cert.pem >/dev/null 2>&1";
    if (std::system(cmd.c_str()) != 0) GTEST_SKIP() << "openssl CLI unavailable";
    server_ = std::make_unique<httplib::SSLServer>((dir_ + "/cert.pem").c_str(),
                                                   (dir_ + "/key.pem").c_str());
    ASSERT_TRUE(server_->is_valid());
    server_->Get(".*", [](const httplib::Request&, httplib::Response& res) {
      res.set_content("{\"schemaVersion\":2}", "application/vnd.oci.image.manifest.v1+json");
    });
    port_ = server_->bind_to_any_port("127.0.0.1");
    ASSERT_GT(port_, 0);
    thread_ = std::thread([this] { server_->listen_after_bind(); });
    for (int i = 0; i < 1000 && !server_->is_running(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    ASSERT_TRUE(server_->is_running());
  }
  void TearDown() override {
    if (server_) server_->stop();
    if (thread_.joinable()) thread_.join();
    std::system(("rm -rf " + dir_).c_str());
  }
  std::string url() const { return "https://127.0.0.1:" + std::to_string(port_); }

  std::string dir_;
  std::unique_ptr<httplib::SSLServer> server_;
  std::thread thread_;
  int port_ = 0;
};

TEST_F(TlsTest, UntrustedCertificateIsRefused) {
  auto c = RegistryClient::Create({});
  ASSERT_TRUE(c.ok());
  auto m = (*c)->GetManifest(url(), "a/b", "latest");
  EXPECT_EQ(m.status().code(), Code::kUnavailable);
  EXPECT_NE(m.status().message().find("TLS"), std::string::npos) << m.status().ToString();
}

TEST_F(TlsTest, CaFileIsTrusted) {
  ClientOptions o;
  o.ca_file = dir_ + "/cert.pem";
  auto c = RegistryClient::Create(o);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto m = (*c)->GetManifest(url(), "a/b", "latest");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->content_type, "application/vnd.oci.image.manifest.v1+json");
}

TEST_F(TlsTest, InsecureSkipsVerification) {
  ClientOptions o;
  o.insecure = true;
  auto c = RegistryClient::Create(o);
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE((*c)->GetManifest(url(), "a/b", "latest").ok());
}

TEST_F(TlsTest, BadCaFileIsRejectedAtCreate) {
  ClientOptions o;
  o.ca_file = dir_ + "/missing.pem";
  EXPECT_FALSE(RegistryClient::Create(o).ok());
  o.ca_file = dir_ + "/key.pem";  // no certificate in it
  EXPECT_EQ(RegistryClient::Create(o).status().code(), Code::kInvalidArgument);
}

}  // namespace
}  // namespace modelfs::fetch
