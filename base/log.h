// Logging: one line per event with a level, to stderr (foreground) or syslog (detached).
//   LOG(kInfo) << "fetching " << digest.Short();
// Lines below the configured level cost one comparison. Safe for concurrent use: each line is
// written whole.
#pragma once

#include <sstream>
#include <string_view>

namespace modelfs {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

// Parses "debug", "info", "warn"/"warning", "error"; false for anything else.
bool ParseLogLevel(std::string_view text, LogLevel* out);
void SetLogLevel(LogLevel level);
LogLevel GetLogLevel();
// Sends every later line to syslog (ident "modelfs") instead of stderr.
void LogToSyslog();

class LogLine {
 public:
  explicit LogLine(LogLevel level) : level_(level) {}
  ~LogLine();
  LogLine(const LogLine&) = delete;
  LogLine& operator=(const LogLine&) = delete;
  template <typename T>
  LogLine& operator<<(const T& v) {
    out_ << v;
    return *this;
  }

 private:
  LogLevel level_;
  std::ostringstream out_;
};

// Makes `LOG(x) << a << b` one expression of type void, so `if (c) LOG(kInfo) << …;` has no
// dangling else (glog's trick: & binds looser than <<).
struct LogVoidify {
  void operator&(const LogLine&) {}
};

}  // namespace modelfs

#define LOG(level)                                              \
  (::modelfs::LogLevel::level < ::modelfs::GetLogLevel())       \
      ? (void)0                                                 \
      : ::modelfs::LogVoidify() & ::modelfs::LogLine(::modelfs::LogLevel::level)
