"""Real llama.cpp (node-llama-cpp 3.21.1, mmap) loading a model through the mount."""
import os

import harness


def test_llama_loads_through_mount_cold_and_warm(registry, workdir, mount):
    # 64 MiB spans many 4 MiB parts; the output must equal loading the file from local disk.
    gguf = harness.make_gguf(os.path.join(workdir, "llama64.gguf"), 64, seed=5)
    harness.push_model(registry.url, "llama64:test", {"model": gguf})
    local = harness.run_llama(gguf, tokens=12)

    m = mount(args=("--part-size", "4M"))
    cold = harness.run_llama(m.path("llama64:test", "model.gguf"), tokens=12)
    assert cold["tokens"] == local["tokens"]
    assert cold["text"] == local["text"]
    m.unmount()

    m2 = mount(args=("--part-size", "4M"))  # same cache: the blob is already verified there
    warm = harness.run_llama(m2.path("llama64:test", "model.gguf"), tokens=12)
    assert warm["tokens"] == local["tokens"]
