// modelfs status [MOUNTPOINT] [--json]: reads MOUNT/.modelfs/status from the running daemon(s).
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "tools/format.h"
#include "tools/ops.h"

namespace modelfs::tools {
namespace {

using Json = nlohmann::json;

// Mountpoints of type fuse.modelfs, from /proc/self/mounts (octal escapes decoded).
std::vector<std::string> ModelfsMounts() {
  std::vector<std::string> out;
  std::ifstream in("/proc/self/mounts");
  std::string dev, dir, type, rest;
  while (in >> dev >> dir >> type && std::getline(in, rest)) {
    if (type != "fuse.modelfs") continue;
    std::string decoded;
    for (size_t i = 0; i < dir.size(); ++i) {
      if (dir[i] == '\\' && i + 3 < dir.size()) {
        decoded += static_cast<char>(std::stoi(dir.substr(i + 1, 3), nullptr, 8));
        i += 3;
      } else {
        decoded += dir[i];
      }
    }
    out.push_back(decoded);
  }
  return out;
}

std::string Percent(uint64_t part, uint64_t whole) {
  if (whole == 0) return "100%";
  return std::to_string(part * 100 / whole) + "%";
}

void PrintHuman(const Json& s) {
  const Json& c = s["cache"];
  uint64_t limit = c.value("limit", uint64_t{0});
  std::cout << s.value("mountpoint", "?") << "  registry " << s.value("registry", "?") << "\ncache "
            << c.value("dir", "?") << "  " << HumanBytes(c.value("bytes_used", uint64_t{0}))
            << " used, limit " << (limit ? HumanBytes(limit) : "none") << "\n";
  const Json& blobs = s["blobs"];
  if (blobs.empty()) {
    std::cout << "no blobs in flight\n";
    return;
  }
  std::vector<std::vector<std::string>> rows = {{"BLOB", "STATE", "PRESENT", "HASHED", "CHUNKS",
                                                 "RATE", "PARTS", "SLOW", "RETRIES", "STALLS",
                                                 "MODELS", "LAST ERROR"}};
  for (const Json& b : blobs) {
    uint64_t size = b.value("size", uint64_t{0}), present = b.value("bytes_present", uint64_t{0});
    std::string digest = b.value("digest", "");
    std::string models;
    for (const Json& m : b["models"]) models += (models.empty() ? "" : ",") + m.get<std::string>();
    uint64_t rate = b.value("rate_bytes_per_s", uint64_t{0});
    // "12/40 verified", with re-fetched bad chunks, or why the chunk digests were dropped.
    std::string chunks = "-";
    if (const Json ch = b.value("chunks", Json::object()); ch.value("total", 0) > 0) {
      chunks = std::to_string(ch.value("verified", 0)) + "/" + std::to_string(ch.value("total", 0));
      if (int r = ch.value("refetched", 0); r > 0) chunks += " " + std::to_string(r) + " bad";
      if (ch.value("distrusted", false)) chunks += " distrusted";
    }
    rows.push_back({digest.substr(digest.find(':') + 1, 12), b.value("state", "?"),
                    HumanBytes(present) + "/" + HumanBytes(size) + " " + Percent(present, size),
                    Percent(b.value("hash_frontier", uint64_t{0}), size), chunks,
                    rate ? HumanBytes(rate) + "/s" : "-",
                    std::to_string(b.value("parts_in_flight", 0)),
                    std::to_string(b.value("slow_refetches", 0)),
                    std::to_string(b.value("retries", 0)), std::to_string(b.value("stalls", 0)),
                    models.empty() ? "-" : models, b.value("last_error", "")});
  }
  std::cout << Table(rows);
}

}  // namespace

int RunStatus(const std::string& mountpoint, bool json) {
  std::vector<std::string> mounts;
  if (!mountpoint.empty())
    mounts.push_back(mountpoint);
  else
    mounts = ModelfsMounts();
  if (mounts.empty()) {
    std::cerr << "modelfs status: no modelfs mount is running\n";
    return 1;
  }
  int rc = 0;
  Json all = Json::array();
  for (size_t i = 0; i < mounts.size(); ++i) {
    std::ifstream in(mounts[i] + "/.modelfs/status");
    std::stringstream text;
    text << in.rdbuf();
    Json s = Json::parse(text.str(), nullptr, false);
    if (!in || s.is_discarded()) {
      std::cerr << "modelfs status: cannot read " << mounts[i]
                << "/.modelfs/status (not a modelfs mount, or too old a daemon)\n";
      rc = 1;
      continue;
    }
    if (json) {
      if (!mountpoint.empty()) {
        std::cout << s.dump(2) << "\n";
        return 0;
      }
      all.push_back(std::move(s));
      continue;
    }
    if (i > 0) std::cout << "\n";
    PrintHuman(s);
  }
  if (json && mountpoint.empty()) std::cout << all.dump(2) << "\n";
  return rc;
}

}  // namespace modelfs::tools
