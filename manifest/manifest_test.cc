#include "manifest/manifest.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <string>

namespace modelfs::manifest {
namespace {

// "sha256:" + 64 hex digits derived from n.
std::string Dig(unsigned n) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016x", n);
  return "sha256:" + std::string(buf) + std::string(48, 'a');
}

std::string Desc(std::string_view media_type, const std::string& digest, std::string_view size) {
  return R"({"mediaType":")" + std::string(media_type) + R"(","digest":")" + digest +
         R"(","size":)" + std::string(size) + "}";
}

std::string Layer(unsigned n, std::string_view size = "100") {
  return Desc("application/vnd.ollama.image.model", Dig(n), size);
}

std::string ManifestWith(std::string_view layers, std::string_view media_type = kDockerManifestV2) {
  return R"({"schemaVersion":2,"mediaType":")" + std::string(media_type) + R"(","config":)" +
         Desc("application/vnd.docker.container.image.v1+json", Dig(0), "485") + R"(,"layers":[)" +
         std::string(layers) + "]}";
}

void ExpectInvalid(std::string_view body, std::string_view fragment) {
  StatusOr<Manifest> m = ParseManifest(body);
  ASSERT_FALSE(m.ok()) << "accepted: " << body.substr(0, 200);
  EXPECT_EQ(m.status().code(), Code::kInvalidArgument);
  EXPECT_NE(m.status().message().find(fragment), std::string::npos)
      << "message: " << m.status().message() << " lacks: " << fragment;
}

// A real manifest as registry.ollama.ai serves it (llama3.2:1b, abridged digests changed).
constexpr std::string_view kOllamaManifest = R"({
  "schemaVersion": 2,
  "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
  "config": {
    "mediaType": "application/vnd.docker.container.image.v1+json",
    "digest": "sha256:4f659a1e86d7f5a33c389f7991e7224b7ee6ad0358b53437d54c02d2e1b1118d",
    "size": 485
  },
  "layers": [
    {"mediaType": "application/vnd.ollama.image.model",
     "digest": "sha256:74701a8c35f6c8d9a4b91f3f3497643001d63e0c7a84e085bed452548fa88d45",
     "size": 1321082688},
    {"mediaType": "application/vnd.ollama.image.template",
     "digest": "sha256:966de95ca8a62200913e3f8bfbf84c8494536f1b94b49166851e76644e966396",
     "size": 1429},
    {"mediaType": "application/vnd.ollama.image.license",
     "digest": "sha256:fcc5a6bec9daf9b561a68827b67ab6088e1dba9d1fa2a50d7bbcc8384e0a265d",
     "size": 7711, "from": "/some/path", "name": "x"}
  ],
  "annotations": {"unknown": [1, 2, {"x": null}]}
})";

TEST(ManifestTest, ParsesDockerV2) {
  StatusOr<Manifest> m = ParseManifest(kOllamaManifest);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->media_type, kDockerManifestV2);
  EXPECT_EQ(m->config.media_type, "application/vnd.docker.container.image.v1+json");
  EXPECT_EQ(m->config.digest.Hex(),
            "4f659a1e86d7f5a33c389f7991e7224b7ee6ad0358b53437d54c02d2e1b1118d");
  EXPECT_EQ(m->config.size, 485u);
  ASSERT_EQ(m->layers.size(), 3u);
  EXPECT_EQ(m->layers[0].media_type, "application/vnd.ollama.image.model");
  EXPECT_EQ(m->layers[0].size, 1321082688u);
  EXPECT_EQ(m->layers[2].size, 7711u);
}

TEST(ManifestTest, ParsesOciWithAndWithoutMediaType) {
  StatusOr<Manifest> m = ParseManifest(ManifestWith(Layer(1), kOciManifest));
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->media_type, kOciManifest);

  std::string body = R"({"schemaVersion":2,"config":)" +
                     Desc("application/vnd.oci.image.config.v1+json", Dig(0), "2") +
                     R"(,"layers":[)" + Layer(1) + "]}";
  m = ParseManifest(body);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->media_type, "");
  EXPECT_EQ(m->layers.size(), 1u);
}

TEST(ManifestTest, AcceptsEmptyLayersAndUppercaseDigest) {
  EXPECT_TRUE(ParseManifest(ManifestWith("")).ok());
  StatusOr<Manifest> m =
      ParseManifest(ManifestWith(Desc("x/y", "sha256:" + std::string(64, 'A'), "0")));
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->layers[0].digest.Hex(), std::string(64, 'a'));
}

TEST(ManifestTest, AcceptsSizeAtLimit) {
  StatusOr<Manifest> m = ParseManifest(ManifestWith(Layer(1, "17592186044416")));
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->layers[0].size, kMaxBlobSize);
}

TEST(ManifestTest, RejectsMalformedJson) {
  ExpectInvalid("", "not valid JSON");
  ExpectInvalid("{", "not valid JSON");
  ExpectInvalid(R"({"schemaVersion":2,})", "not valid JSON");
  ExpectInvalid(std::string(kOllamaManifest) + "x", "not valid JSON");
  ExpectInvalid("\"\xff\"", "not valid JSON");
  ExpectInvalid("[]", "is a JSON array, not an object");
  ExpectInvalid("null", "is a JSON null");
  ExpectInvalid("42", "is a JSON number");
}

TEST(ManifestTest, RejectsDeepNesting) {
  ExpectInvalid(std::string(100000, '[') + std::string(100000, ']'), "nests deeper than 64");
  std::string deep =
      R"({"schemaVersion":2,"x":)" + std::string(70, '[') + std::string(70, ']') + "}";
  ExpectInvalid(deep, "nests deeper");
  // Brackets inside strings (even after an escaped quote) do not count.
  std::string quoted = ManifestWith(Desc("a/\\\"" + std::string(100, '['), Dig(1), "1"));
  StatusOr<Manifest> m = ParseManifest(quoted);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->layers[0].media_type, "a/\"" + std::string(100, '['));
}

TEST(ManifestTest, RejectsWrongSchemaVersion) {
  ExpectInvalid(R"({"config":{},"layers":[]})", "schemaVersion: missing");
  ExpectInvalid(R"({"schemaVersion":1})", "schemaVersion: want 2, got 1");
  ExpectInvalid(R"({"schemaVersion":"2"})", "schemaVersion: want 2, got a string");
  ExpectInvalid(R"({"schemaVersion":2.0})", "schemaVersion: want 2, got 2.0");
  ExpectInvalid(R"({"schemaVersion":-2})", "schemaVersion: want 2, got -2");
}

TEST(ManifestTest, RejectsWrongTypes) {
  ExpectInvalid(R"({"schemaVersion":2,"config":[],"layers":[]})",
                "config: must be an object, got array");
  ExpectInvalid(R"({"schemaVersion":2,"config":)" + Desc("a/b", Dig(0), "1") + R"(,"layers":{}})",
                "layers: must be an array, got object");
  ExpectInvalid(ManifestWith(R"("layer")"), "layers[0]: must be an object, got string");
  ExpectInvalid(
      ManifestWith(Layer(1) + R"(,{"mediaType":5,"digest":")" + Dig(2) + R"(","size":1})"),
      "layers[1].mediaType: must be a string, got number");
  ExpectInvalid(ManifestWith(R"({"mediaType":"a/b","digest":7,"size":1})"),
                "layers[0].digest: must be a string, got number");
  ExpectInvalid(ManifestWith(R"({"mediaType":"a/b","digest":")" + Dig(1) +
                             R"(","size":1,"platform":"linux"})"),
                "layers[0].platform: must be an object");
  ExpectInvalid(R"({"schemaVersion":2,"mediaType":[],"config":{},"layers":[]})",
                "mediaType: must be a string");
}

TEST(ManifestTest, RejectsMissingFields) {
  ExpectInvalid(R"({"schemaVersion":2,"layers":[]})", "config: missing");
  ExpectInvalid(R"({"schemaVersion":2,"config":null,"layers":[]})", "config: must be an object");
  ExpectInvalid(R"({"schemaVersion":2,"config":)" + Desc("a/b", Dig(0), "1") + "}",
                "layers: missing");
  ExpectInvalid(ManifestWith(R"({"digest":")" + Dig(1) + R"(","size":1})"),
                "layers[0].mediaType: missing");
  ExpectInvalid(ManifestWith(R"({"mediaType":"a/b","size":1})"), "layers[0].digest: missing");
  ExpectInvalid(ManifestWith(R"({"mediaType":"a/b","digest":")" + Dig(1) + R"("})"),
                "layers[0].size: missing");
}

TEST(ManifestTest, RejectsBadDigests) {
  ExpectInvalid(ManifestWith(Desc("a/b", "sha512:" + std::string(128, 'a'), "1")),
                "layers[0].digest: unsupported digest");
  ExpectInvalid(ManifestWith(Desc("a/b", "sha256:" + std::string(63, 'a'), "1")),
                "layers[0].digest:");
  ExpectInvalid(ManifestWith(Desc("a/b", "sha256:" + std::string(65, 'a'), "1")),
                "layers[0].digest:");
  ExpectInvalid(ManifestWith(Desc("a/b", "sha256:" + std::string(63, 'a') + "g", "1")),
                "layers[0].digest:");
  ExpectInvalid(ManifestWith(Desc("a/b", std::string(64, 'a'), "1")), "layers[0].digest:");
  ExpectInvalid(ManifestWith(Desc("a/b", "", "1")), "layers[0].digest:");
  ExpectInvalid(ManifestWith(Layer(1) + "," + Desc("a/b", "md5:abc", "1")), "layers[1].digest:");
}

TEST(ManifestTest, RejectsBadSizes) {
  ExpectInvalid(ManifestWith(Layer(1, "-1")), "layers[0].size: must not be negative, got -1");
  ExpectInvalid(ManifestWith(Layer(1, "1.5")),
                "layers[0].size: must be an unsigned integer, got 1.5");
  ExpectInvalid(ManifestWith(Layer(1, "1e3")), "layers[0].size: must be an unsigned integer");
  ExpectInvalid(ManifestWith(Layer(1, R"("12")")),
                "layers[0].size: must be an unsigned integer, got a string");
  ExpectInvalid(ManifestWith(Layer(1, "null")), "got a null");
  ExpectInvalid(ManifestWith(Layer(1, "true")), "got a boolean");
  ExpectInvalid(ManifestWith(Layer(1, "17592186044417")),
                "layers[0].size: 17592186044417 exceeds the limit 17592186044416");
  ExpectInvalid(ManifestWith(Layer(1, "9223372036854775808")),  // 2^63
                "layers[0].size: 9223372036854775808 exceeds the limit");
  ExpectInvalid(ManifestWith(Layer(1, "18446744073709551616")),  // 2^64: parsed as a double
                "layers[0].size: 1.8446744073709552e+19 exceeds the limit");
  ExpectInvalid(ManifestWith(Layer(1, "-9223372036854775809")), "layers[0].size:");
  ExpectInvalid(ManifestWith(Layer(1, "1e400")), "not valid JSON");  // overflows a double
  ExpectInvalid(R"({"schemaVersion":2,"config":)" + Desc("a/b", Dig(0), "-5") + R"(,"layers":[]})",
                "config.size: must not be negative");
}

TEST(ManifestTest, RejectsBadMediaTypes) {
  ExpectInvalid(ManifestWith(Desc("", Dig(1), "1")), "layers[0].mediaType: is empty");
  ExpectInvalid(ManifestWith(Desc(std::string(256, 'a'), Dig(1), "1")),
                "layers[0].mediaType: is 256 chars (limit 255)");
  EXPECT_TRUE(ParseManifest(ManifestWith(Desc(std::string(255, 'a'), Dig(1), "1"))).ok());
  ExpectInvalid(ManifestWith(Desc(R"(a\u0000b)", Dig(1), "1")), "non-printable");
  ExpectInvalid(ManifestWith(Desc("caf\xc3\xa9", Dig(1), "1")), "non-printable");
  ExpectInvalid(ManifestWith(Layer(1), kOciIndex), "is an image index, not a manifest");
  ExpectInvalid(ManifestWith(Layer(1), "application/vnd.docker.distribution.manifest.v1+json"),
                "mediaType: unsupported");
}

TEST(ManifestTest, EnforcesLayerLimit) {
  std::string layers;
  for (unsigned i = 0; i < 100000; ++i) {
    if (i) layers += ',';
    layers += Layer(i);
  }
  std::string body = ManifestWith(layers);
  ASSERT_LE(body.size(), kMaxManifestBytes * 4);
  // 100,000 layers is over 4 MiB; check both the byte cap and the layer cap.
  StatusOr<Manifest> m = ParseManifest(body);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("(limit 4194304)"), std::string::npos)
      << m.status().message();

  std::string small;  // 100,000 tiny layers under 4 MiB: rejected by count, not bytes
  for (unsigned i = 0; i < 100000; ++i) small += i ? ",0" : "0";
  ExpectInvalid(ManifestWith(small), "manifest has 100000 layers (limit 4096)");

  std::string at_limit;
  for (unsigned i = 0; i < kMaxLayers; ++i) {
    if (i) at_limit += ',';
    at_limit += Layer(i);
  }
  m = ParseManifest(ManifestWith(at_limit));
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->layers.size(), kMaxLayers);
  ExpectInvalid(ManifestWith(at_limit + "," + Layer(5000)),
                "manifest has 4097 layers (limit 4096)");
}

TEST(ManifestTest, EnforcesByteCap) {
  std::string pad(kMaxManifestBytes, ' ');
  std::string body = std::string(kOllamaManifest);
  std::string at_cap = body + pad.substr(0, kMaxManifestBytes - body.size());
  ASSERT_EQ(at_cap.size(), kMaxManifestBytes);
  EXPECT_TRUE(ParseManifest(at_cap).ok());
  ExpectInvalid(at_cap + " ", "manifest is 4194305 bytes (limit 4194304)");
  EXPECT_FALSE(PickFromIndex(at_cap + " ").ok());
  EXPECT_FALSE(Classify(at_cap + " ", "").ok());
}

TEST(ManifestTest, NeverThrowsOnTruncations) {
  // Every prefix of a valid manifest is an error, never a crash or exception.
  std::string body(kOllamaManifest);
  for (size_t i = 0; i < body.size(); ++i) {
    std::string_view prefix(body.data(), i);
    EXPECT_FALSE(ParseManifest(prefix).ok()) << i;
    (void)PickFromIndex(prefix);
    (void)Classify(prefix, "");
  }
}

TEST(ManifestTest, ClassifiesByContentType) {
  auto kind = [](std::string_view ct) { return Classify("garbage", ct); };
  EXPECT_EQ(*kind(kDockerManifestV2), DocumentKind::kManifest);
  EXPECT_EQ(*kind(kOciManifest), DocumentKind::kManifest);
  EXPECT_EQ(*kind(kOciIndex), DocumentKind::kIndex);
  EXPECT_EQ(*kind(kDockerManifestList), DocumentKind::kIndex);
  EXPECT_EQ(*kind(" Application/VND.oci.image.index.v1+json ; charset=utf-8"),
            DocumentKind::kIndex);
  StatusOr<DocumentKind> v1 = kind("application/vnd.docker.distribution.manifest.v1+prettyjws");
  ASSERT_FALSE(v1.ok());
  EXPECT_NE(v1.status().message().find("schema 1"), std::string::npos);
}

TEST(ManifestTest, ClassifiesByBodyMediaType) {
  EXPECT_EQ(*Classify(kOllamaManifest, "application/json"), DocumentKind::kManifest);
  EXPECT_EQ(*Classify(R"({"mediaType":"application/vnd.oci.image.index.v1+json"})", ""),
            DocumentKind::kIndex);
  StatusOr<DocumentKind> k = Classify(R"({"mediaType":"text/html"})", "text/plain");
  ASSERT_FALSE(k.ok());
  EXPECT_NE(k.status().message().find("mediaType: unsupported text/html"), std::string::npos);
  EXPECT_FALSE(Classify(R"({"mediaType":3})", "").ok());
}

TEST(ManifestTest, ClassifiesByShape) {
  EXPECT_EQ(*Classify(R"({"schemaVersion":2,"manifests":[]})", ""), DocumentKind::kIndex);
  EXPECT_EQ(*Classify(R"({"schemaVersion":2,"layers":[]})", ""), DocumentKind::kManifest);
  EXPECT_FALSE(Classify(R"({"schemaVersion":1,"fsLayers":[]})", "").ok());
  EXPECT_FALSE(Classify(R"({"schemaVersion":2})", "").ok());
  EXPECT_FALSE(Classify("not json", "").ok());
  EXPECT_FALSE(Classify("[]", "application/json").ok());
}

std::string IndexEntry(unsigned n, std::string_view os, std::string_view arch) {
  return R"({"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":")" + Dig(n) +
         R"(","size":500,"platform":{"os":")" + std::string(os) + R"(","architecture":")" +
         std::string(arch) + R"("}})";
}

std::string Index(std::string_view entries, std::string_view media_type = kOciIndex) {
  return R"({"schemaVersion":2,"mediaType":")" + std::string(media_type) + R"(","manifests":[)" +
         std::string(entries) + "]}";
}

TEST(IndexTest, PicksLinuxAmd64) {
  StatusOr<Digest> d =
      PickFromIndex(Index(IndexEntry(1, "linux", "arm64") + "," + IndexEntry(2, "linux", "amd64") +
                          "," + IndexEntry(3, "linux", "amd64")));
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->ToString(), Dig(2));
  d = PickFromIndex(Index(IndexEntry(4, "windows", "amd64") + "," + IndexEntry(5, "linux", "amd64"),
                          kDockerManifestList));
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->ToString(), Dig(5));
}

TEST(IndexTest, PicksOnlyEntry) {
  StatusOr<Digest> d = PickFromIndex(Index(IndexEntry(7, "linux", "arm64")));
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->ToString(), Dig(7));
  // No platform at all, and no top-level mediaType (optional in OCI).
  d = PickFromIndex(R"({"schemaVersion":2,"manifests":[)" + Layer(8) + "]}");
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->ToString(), Dig(8));
}

TEST(IndexTest, NamesPlatformsWhenNoneMatch) {
  StatusOr<Digest> d = PickFromIndex(Index(IndexEntry(1, "linux", "arm64") + "," +
                                           IndexEntry(2, "windows", "amd64") + "," + Layer(3)));
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), Code::kInvalidArgument);
  EXPECT_NE(d.status().message().find("linux/arm64, windows/amd64, ?/?"), std::string::npos)
      << d.status().message();

  std::string many;
  for (unsigned i = 0; i < 20; ++i) many += (i ? "," : "") + IndexEntry(i, "plan9", "mips");
  d = PickFromIndex(Index(many));
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("and 12 more"), std::string::npos) << d.status().message();
}

TEST(IndexTest, RejectsMalformedIndexes) {
  auto expect_invalid = [](const std::string& body, std::string_view fragment) {
    StatusOr<Digest> d = PickFromIndex(body);
    ASSERT_FALSE(d.ok()) << body;
    EXPECT_NE(d.status().message().find(fragment), std::string::npos) << d.status().message();
  };
  expect_invalid(Index(""), "index lists no manifests");
  expect_invalid(R"({"schemaVersion":2})", "manifests: missing");
  expect_invalid(R"({"schemaVersion":2,"manifests":{}})", "manifests: must be an array");
  expect_invalid(R"({"manifests":[]})", "schemaVersion: missing");
  expect_invalid(Index(IndexEntry(1, "linux", "amd64"), kDockerManifestV2),
                 "is an image manifest, not an index");
  expect_invalid(Index(R"({"mediaType":"a/b","digest":"sha256:00","size":1})"),
                 "manifests[0].digest:");
  expect_invalid(Index(IndexEntry(1, "linux", "arm64") + R"(,{"mediaType":"a/b","digest":")" +
                       Dig(2) + R"(","size":1,"platform":{"os":1}})"),
                 "manifests[1].platform.os: must be a string");
  expect_invalid("{", "not valid JSON");
  std::string many;
  for (unsigned i = 0; i < 5000; ++i) many += (i ? "," : "") + std::string("0");
  expect_invalid(Index(many), "index has 5000 manifests (limit 4096)");
}

TEST(ManifestTest, AcceptHeaderListsAllFourTypes) {
  std::string_view accept = AcceptHeader();
  for (std::string_view t : {kDockerManifestV2, kOciManifest, kOciIndex, kDockerManifestList}) {
    EXPECT_NE(accept.find(t), std::string_view::npos) << t;
  }
  EXPECT_EQ(accept.find("Accept"), std::string_view::npos);
  EXPECT_EQ(accept.find('\n'), std::string_view::npos);
}

}  // namespace
}  // namespace modelfs::manifest
