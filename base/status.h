// Status and StatusOr: errors as values at module boundaries.
//
// A Status is a code plus a message a user can act on. Codes carry retry meaning:
//   kUnavailable       transient (network, 5xx): retrying the same call may succeed.
//   kNotFound          the thing does not exist (unknown model, 404).
//   kInvalidArgument   bad input (a name, a manifest, a command line): never retry.
//   kUnauthenticated   credentials missing or rejected.
//   kPermissionDenied  the server or the OS refused.
//   kFailedPrecondition do not retry until some state changes.
//   kDataLoss          corruption: bytes that do not match their digest.
//   kResourceExhausted out of space or over a limit (ENOSPC, size caps).
//   kDeadlineExceeded  a timeout.
//   kCancelled         the operation was abandoned (unmount, shutdown).
//   kIoError           a local I/O error.
//   kInternal          a bug.
// Value types; safe to copy between threads.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace modelfs {

enum class Code {
  kOk = 0,
  kInvalidArgument,
  kNotFound,
  kUnavailable,
  kUnauthenticated,
  kPermissionDenied,
  kFailedPrecondition,
  kDataLoss,
  kResourceExhausted,
  kDeadlineExceeded,
  kCancelled,
  kIoError,
  kInternal,
};

std::string_view CodeName(Code code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  // "NotFound: model library/x:latest not found in https://…"
  std::string ToString() const;

  // Returns a copy with "context: " prepended to the message.
  Status Annotate(std::string_view context) const;

 private:
  Code code_ = Code::kOk;
  std::string message_;
};

inline Status InvalidArgument(std::string m) { return {Code::kInvalidArgument, std::move(m)}; }
inline Status NotFound(std::string m) { return {Code::kNotFound, std::move(m)}; }
inline Status Unavailable(std::string m) { return {Code::kUnavailable, std::move(m)}; }
inline Status Unauthenticated(std::string m) { return {Code::kUnauthenticated, std::move(m)}; }
inline Status PermissionDenied(std::string m) { return {Code::kPermissionDenied, std::move(m)}; }
inline Status FailedPrecondition(std::string m) {
  return {Code::kFailedPrecondition, std::move(m)};
}
inline Status DataLoss(std::string m) { return {Code::kDataLoss, std::move(m)}; }
inline Status ResourceExhausted(std::string m) { return {Code::kResourceExhausted, std::move(m)}; }
inline Status DeadlineExceeded(std::string m) { return {Code::kDeadlineExceeded, std::move(m)}; }
inline Status Cancelled(std::string m) { return {Code::kCancelled, std::move(m)}; }
inline Status IoError(std::string m) { return {Code::kIoError, std::move(m)}; }
inline Status Internal(std::string m) { return {Code::kInternal, std::move(m)}; }

// The one place errno becomes a Status: "context: strerror" with a code that fits
// (ENOENT → kNotFound, ENOSPC/EDQUOT → kResourceExhausted, EACCES/EPERM → kPermissionDenied,
// anything else → kIoError).
Status ErrnoStatus(int err, std::string_view context);

// The FUSE edge's mapping back to an errno.
int StatusToErrno(const Status& status);

// A value or an error. Access value() only when ok().
template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(Status status) : v_(std::move(status)) {}  // NOLINT: implicit by design
  StatusOr(T value) : v_(std::move(value)) {}         // NOLINT: implicit by design

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<Status, T> v_;
};

}  // namespace modelfs

#define MODELFS_CONCAT_INNER(a, b) a##b
#define MODELFS_CONCAT(a, b) MODELFS_CONCAT_INNER(a, b)

// Returns early from a function returning Status (or StatusOr) when expr is not ok.
#define RETURN_IF_ERROR(expr)                         \
  do {                                                \
    ::modelfs::Status _status_tmp = (expr);           \
    if (!_status_tmp.ok()) return _status_tmp;        \
  } while (0)

// ASSIGN_OR_RETURN(auto x, MaybeX()); declares x from a StatusOr or returns its error.
#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL(MODELFS_CONCAT(_statusor_, __LINE__), lhs, expr)
#define ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                          \
  if (!tmp.ok()) return tmp.status();         \
  lhs = std::move(tmp).value()
