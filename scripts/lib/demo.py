"""scripts/demo's body: registry → modelfs mount → read → llama.cpp. See scripts/demo."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import harness  # noqa: E402


def step(text):
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main():
    modelfs = sys.argv[1]
    work = tempfile.mkdtemp(prefix="modelfs-demo-")
    mnt = os.path.join(work, "models")
    cache = os.path.join(work, "cache")
    os.makedirs(mnt)
    proc = None
    try:
        with harness.Registry(os.path.join(work, "registry")) as reg:
            step(f"a local registry at {reg.url}, seeded with a generated 64 MiB llama model")
            gguf = harness.make_gguf(os.path.join(work, "demo.gguf"), 64, seed=42)
            template = os.path.join(work, "template")
            with open(template, "w") as f:
                f.write("{{ .Prompt }}")
            pushed = harness.push_model(reg.url, "demo:64m", {"model": gguf, "template": template})
            print("pushed library/demo:64m, manifest", pushed["manifest_digest"])

            step(f"modelfs mount --registry {reg.url} --cache {cache} {mnt}")
            log = open(os.path.join(work, "modelfs.log"), "wb")
            proc = subprocess.Popen([modelfs, "mount", "-f", "--registry", reg.url, "--cache",
                                     cache, "--part-size", "4M", mnt], stdout=log, stderr=log)
            harness.wait_until(lambda: proc.poll() is not None or os.path.ismount(mnt), 20,
                               "the mount")
            if proc.poll() is not None:
                sys.exit("modelfs failed to mount; see " + log.name)

            step(f"ls -l {mnt}/demo:64m   (sizes from the manifest; nothing fetched yet)")
            subprocess.run(["ls", "-l", os.path.join(mnt, "demo:64m")], check=True)

            model = os.path.join(mnt, "demo:64m", "model.gguf")
            step("llama.cpp (node-llama-cpp) loads the model from the mount, cold cache")
            via_mount = harness.run_llama(model, tokens=16)
            print(f"loaded in {via_mount['load_ms']:.0f} ms, first token after "
                  f"{via_mount['first_token_ms']:.0f} ms: {json.dumps(via_mount['text'])}")

            step("the same model from local disk, for comparison")
            local = harness.run_llama(gguf, tokens=16)
            print(f"from the disk: {json.dumps(local['text'])}")
            if via_mount["tokens"] != local["tokens"]:
                sys.exit("llama.cpp output differs between the mount and the local file")

            step(f"sha256 of {model}")
            got = sha256(model)
            print(f"{got} (mount)\n{sha256(gguf)} (source)")
            if got != sha256(gguf):
                sys.exit("MISMATCH")
            print("identical output. The cache holds:", os.listdir(os.path.join(cache, "blobs")))
    finally:
        if proc is not None:
            subprocess.run(["fusermount3", "-u", "-z", mnt], stderr=subprocess.DEVNULL)
            proc.wait(timeout=20)
        shutil.rmtree(work, ignore_errors=True)
    step("done")


if __name__ == "__main__":
    main()
