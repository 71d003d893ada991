#include "manifest/layout.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

namespace modelfs::manifest {
namespace {

Descriptor Blob(std::string_view type_suffix, uint8_t id) {
  Descriptor d;
  d.media_type =
      std::string(type_suffix.find('/') == std::string_view::npos ? "application/vnd.ollama.image."
                                                                  : "") +
      std::string(type_suffix);
  Digest::Bytes b{};
  b[0] = id;
  d.digest = Digest(b);
  d.size = id;
  return d;
}

Manifest With(std::vector<Descriptor> layers) {
  Manifest m;
  m.config = Blob("application/vnd.docker.container.image.v1+json", 0);
  m.layers = std::move(layers);
  return m;
}

std::vector<std::string> Names(const std::vector<ModelFile>& files) {
  std::vector<std::string> out;
  for (const ModelFile& f : files) out.push_back(f.name);
  return out;
}

TEST(LayoutTest, NamesEveryKnownLayer) {
  std::vector<ModelFile> files =
      ModelFiles(With({Blob("model", 1), Blob("projector", 2), Blob("adapter", 3),
                       Blob("template", 4), Blob("system", 5), Blob("params", 6),
                       Blob("license", 7), Blob("messages", 8), Blob("draft", 9)}));
  EXPECT_EQ(Names(files), (std::vector<std::string>{"config.json", "model.gguf", "projector.gguf",
                                                    "adapter.gguf", "template", "system", "params",
                                                    "license", "messages", "draft.gguf"}));
  EXPECT_EQ(files[0].blob.size, 0u);  // the config descriptor
  EXPECT_EQ(files[1].blob.size, 1u);
  EXPECT_EQ(files[9].blob.size, 9u);
}

TEST(LayoutTest, NumbersRepeatedLicenses) {
  std::vector<ModelFile> files = ModelFiles(
      With({Blob("license", 1), Blob("model", 2), Blob("license", 3), Blob("license", 4)}));
  EXPECT_EQ(Names(files), (std::vector<std::string>{"config.json", "license", "model.gguf",
                                                    "license.2", "license.3"}));
  EXPECT_EQ(files[1].blob.size, 1u);
  EXPECT_EQ(files[3].blob.size, 3u);
  EXPECT_EQ(files[4].blob.size, 4u);
}

TEST(LayoutTest, NumbersDuplicateModels) {
  EXPECT_EQ(Names(ModelFiles(With({Blob("model", 1), Blob("model", 2)}))),
            (std::vector<std::string>{"config.json", "model.gguf", "model.gguf.2"}));
}

TEST(LayoutTest, SkipsUnknownTypes) {
  std::vector<ModelFile> files = ModelFiles(
      With({Blob("tensor", 1), Blob("model", 2), Blob("embed", 3), Blob("json", 4),
            Blob("application/octet-stream", 5), Blob("application/vnd.ollama.image.", 6),
            Blob("application/vnd.ollama.image.model+x", 7), Blob("x/vnd.ollama.image.model", 8)}));
  EXPECT_EQ(Names(files), (std::vector<std::string>{"config.json", "model.gguf"}));
  EXPECT_EQ(files[1].blob.size, 2u);
}

TEST(LayoutTest, PromptBecomesTemplateOnlyWithoutTemplate) {
  EXPECT_EQ(Names(ModelFiles(With({Blob("prompt", 1), Blob("model", 2)}))),
            (std::vector<std::string>{"config.json", "template", "model.gguf"}));
  std::vector<ModelFile> files = ModelFiles(With({Blob("prompt", 1), Blob("template", 2)}));
  EXPECT_EQ(Names(files), (std::vector<std::string>{"config.json", "template"}));
  EXPECT_EQ(files[1].blob.size, 2u);  // the template layer, not the prompt
}

TEST(LayoutTest, EmptyManifestHasOnlyConfig) {
  EXPECT_EQ(Names(ModelFiles(With({}))), (std::vector<std::string>{"config.json"}));
}

TEST(LayoutTest, NamesAreUniqueAndRecognized) {
  std::vector<Descriptor> layers;
  for (int i = 0; i < 300; ++i) {
    static constexpr std::string_view kTypes[] = {"model", "license", "prompt", "params", "x"};
    layers.push_back(Blob(kTypes[i % 5], static_cast<uint8_t>(i)));
  }
  std::vector<std::string> names = Names(ModelFiles(With(layers)));
  std::vector<std::string> sorted = names;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(std::adjacent_find(sorted.begin(), sorted.end()), sorted.end());
  EXPECT_EQ(names.size(), 1u + 240u);
  for (const std::string& n : names) EXPECT_TRUE(IsModelFileName(n)) << n;
}

TEST(LayoutTest, RecognizesModelFileNames) {
  for (std::string_view n :
       {"manifest.json", "config.json", "model.gguf", "projector.gguf", "adapter.gguf",
        "draft.gguf", "template", "system", "params", "license", "messages", "license.2",
        "license.17", "model.gguf.2", "template.4096"}) {
    EXPECT_TRUE(IsModelFileName(n)) << n;
  }
  for (std::string_view n : {"",
                             "model",
                             "gguf",
                             "llama3.2",
                             "license.",
                             "license.1",
                             "license.0",
                             "license.02",
                             "license.4097",
                             "license.99999",
                             "license.x",
                             "license.2.2",
                             "licenses",
                             "License",
                             "manifest.json.2",
                             "config.json.2",
                             "prompt",
                             "..",
                             ".",
                             "model.gguf/"}) {
    EXPECT_FALSE(IsModelFileName(n)) << n;
  }
}

}  // namespace
}  // namespace modelfs::manifest
