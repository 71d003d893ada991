#include "base/log.h"

#include <sys/time.h>
#include <syslog.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <string>

namespace modelfs {
namespace {

std::atomic<LogLevel> g_level{LogLevel::kInfo};
std::atomic<bool> g_syslog{false};
std::mutex g_mu;

const char* LevelName(LogLevel l) {
  switch (l) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarn: return "warn";
    case LogLevel::kError: return "error";
  }
  return "?";
}

int SyslogPriority(LogLevel l) {
  switch (l) {
    case LogLevel::kDebug: return LOG_DEBUG;
    case LogLevel::kInfo: return LOG_INFO;
    case LogLevel::kWarn: return LOG_WARNING;
    case LogLevel::kError: return LOG_ERR;
  }
  return LOG_INFO;
}

}  // namespace

bool ParseLogLevel(std::string_view t, LogLevel* out) {
  if (t == "debug") *out = LogLevel::kDebug;
  else if (t == "info") *out = LogLevel::kInfo;
  else if (t == "warn" || t == "warning") *out = LogLevel::kWarn;
  else if (t == "error") *out = LogLevel::kError;
  else return false;
  return true;
}

void SetLogLevel(LogLevel level) { g_level = level; }
LogLevel GetLogLevel() { return g_level; }

void LogToSyslog() {
  openlog("modelfs", LOG_PID, LOG_DAEMON);
  g_syslog = true;
}

LogLine::~LogLine() {
  std::string text = out_.str();
  // One event, one line: a message never smuggles in a newline.
  for (char& c : text) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  if (g_syslog) {
    syslog(SyslogPriority(level_), "%s: %s", LevelName(level_), text.c_str());
    return;
  }
  timeval tv;
  gettimeofday(&tv, nullptr);
  tm parts;
  localtime_r(&tv.tv_sec, &parts);
  char stamp[32];
  strftime(stamp, sizeof stamp, "%H:%M:%S", &parts);
  std::lock_guard<std::mutex> lock(g_mu);
  std::fprintf(stderr, "%s.%03ld modelfs %s: %s\n", stamp, static_cast<long>(tv.tv_usec / 1000),
               LevelName(level_), text.c_str());
}

}  // namespace modelfs
