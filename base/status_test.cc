#include "base/status.h"

#include <gtest/gtest.h>

#include <cerrno>

namespace modelfs {
namespace {

StatusOr<int> Half(int x) {
  if (x % 2) return InvalidArgument("odd");
  return x / 2;
}

Status UseHalf(int x, int* out) {
  ASSIGN_OR_RETURN(int h, Half(x));
  *out = h;
  return Status::Ok();
}

TEST(StatusTest, ErrnoMapsToCodesAndBack) {
  EXPECT_EQ(ErrnoStatus(ENOENT, "open x").code(), Code::kNotFound);
  EXPECT_EQ(ErrnoStatus(ENOSPC, "write").code(), Code::kResourceExhausted);
  EXPECT_EQ(StatusToErrno(ErrnoStatus(ENOSPC, "write")), ENOSPC);
  EXPECT_EQ(StatusToErrno(DataLoss("bad")), EIO);
  EXPECT_NE(ErrnoStatus(ENOENT, "open x").message().find("open x"), std::string::npos);
}

TEST(StatusTest, AssignOrReturnPropagates) {
  int out = 0;
  EXPECT_TRUE(UseHalf(4, &out).ok());
  EXPECT_EQ(out, 2);
  Status s = UseHalf(3, &out);
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_EQ(s.Annotate("ctx").message(), "ctx: odd");
}

}  // namespace
}  // namespace modelfs
