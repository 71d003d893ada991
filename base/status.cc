#include "base/status.h"

#include <cerrno>
#include <cstring>

namespace modelfs {

std::string_view CodeName(Code code) {
  switch (code) {
    case Code::kOk: return "OK";
    case Code::kInvalidArgument: return "InvalidArgument";
    case Code::kNotFound: return "NotFound";
    case Code::kUnavailable: return "Unavailable";
    case Code::kUnauthenticated: return "Unauthenticated";
    case Code::kPermissionDenied: return "PermissionDenied";
    case Code::kFailedPrecondition: return "FailedPrecondition";
    case Code::kDataLoss: return "DataLoss";
    case Code::kResourceExhausted: return "ResourceExhausted";
    case Code::kDeadlineExceeded: return "DeadlineExceeded";
    case Code::kCancelled: return "Cancelled";
    case Code::kIoError: return "IoError";
    case Code::kInternal: return "Internal";
  }
  return "Unknown";
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string out(CodeName(code_));
  out += ": ";
  out += message_;
  return out;
}

Status Status::Annotate(std::string_view context) const {
  if (ok()) return *this;
  std::string m(context);
  m += ": ";
  m += message_;
  return Status(code_, std::move(m));
}

Status ErrnoStatus(int err, std::string_view context) {
  char buf[128];
  // GNU strerror_r returns a pointer that may or may not be buf.
  const char* text = strerror_r(err, buf, sizeof buf);
  std::string m(context);
  m += ": ";
  m += text;
  switch (err) {
    case ENOENT: return NotFound(std::move(m));
    case ENOSPC:
    case EDQUOT: return ResourceExhausted(std::move(m));
    case EACCES:
    case EPERM: return PermissionDenied(std::move(m));
    default: return IoError(std::move(m));
  }
}

int StatusToErrno(const Status& status) {
  switch (status.code()) {
    case Code::kOk: return 0;
    case Code::kNotFound: return ENOENT;
    case Code::kInvalidArgument: return ENOENT;  // a path that cannot name a model
    case Code::kPermissionDenied:
    case Code::kUnauthenticated: return EACCES;
    case Code::kResourceExhausted: return ENOSPC;
    case Code::kDeadlineExceeded: return ETIMEDOUT;
    case Code::kCancelled: return EIO;
    default: return EIO;
  }
}

}  // namespace modelfs
