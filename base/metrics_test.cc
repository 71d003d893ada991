#include "base/metrics.h"

#include <gtest/gtest.h>

#include <regex>
#include <sstream>
#include <thread>
#include <vector>

namespace modelfs::metrics {
namespace {

Counter g_a("metrics_test_events_total", "Events", "kind=\"a\"");
Counter g_b("metrics_test_events_total", "Events", "kind=\"b\"");
Histogram g_h("metrics_test_wait_seconds", "Waits", {0.1, 1});

TEST(MetricsTest, RendersOneFamilyPerNameAndValidSamples) {
  g_a.Add(2);
  g_b.Add();
  std::string text = RenderText();
  EXPECT_NE(text.find("# TYPE metrics_test_events_total counter\n"
                      "metrics_test_events_total{kind=\"a\"} 2\n"
                      "metrics_test_events_total{kind=\"b\"} 1\n"),
            std::string::npos)
      << text;
  std::regex sample(R"(^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? [-+0-9.eInfa]+$)");
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0) continue;
    EXPECT_TRUE(std::regex_match(line, sample)) << line;
  }
}

TEST(MetricsTest, HistogramBucketsAreCumulative) {
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([] {
      for (int i = 0; i < 1000; ++i) {
        g_h.Observe(0.0625);  // binary fractions: an exact sum
        g_h.Observe(0.5);
        g_h.Observe(4);
      }
    });
  }
  for (auto& t : threads) t.join();
  std::string out;
  g_h.Render(&out);
  EXPECT_NE(out.find("metrics_test_wait_seconds_bucket{le=\"0.1\"} 4000\n"), std::string::npos);
  EXPECT_NE(out.find("metrics_test_wait_seconds_bucket{le=\"1\"} 8000\n"), std::string::npos);
  EXPECT_NE(out.find("metrics_test_wait_seconds_bucket{le=\"+Inf\"} 12000\n"), std::string::npos);
  EXPECT_NE(out.find("metrics_test_wait_seconds_sum 18250\n"), std::string::npos) << out;
  EXPECT_NE(out.find("metrics_test_wait_seconds_count 12000\n"), std::string::npos);
}

}  // namespace
}  // namespace modelfs::metrics
