// run.mjs: load a GGUF with node-llama-cpp (CPU only, mmap) and generate greedily.
//
// Usage:
//   node scripts/llama/run.mjs MODEL_PATH [--tokens N] [--prompt TEXT] [--context N] [--threads N]
//
// --threads defaults to 1: ggml's worker threads spin-wait at every barrier, and on a small VM
// with CPU steal (or with a FUSE daemon competing for cores) 2 threads were erratic (0.8 s to
// 8 s for the same run); 1 thread is steady and fast enough for the test models.
//
// Prints one JSON line to stdout:
//   {"text": "...", "tokens": [ids...], "load_ms": ..., "first_token_ms": ..., "total_ms": ...}
// load_ms is loadModel() (mmap + tensor setup); first_token_ms is from the start of prompt
// evaluation to the first sampled token; total_ms is the whole run after getLlama().
// Decoding is greedy (temperature 0), so two runs on the same file print the same text and
// tokens. Exactly N tokens are generated; end-of-generation tokens do not stop the loop.
// llama.cpp logs (warnings and errors) go to stderr. Exit status 1 with a message on failure.
// Install the dependency first with scripts/llama/install.

import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const kDefaultPrompt = "The quick brown fox";

function usage(message) {
    if (message) process.stderr.write(`run.mjs: ${message}\n`);
    process.stderr.write("usage: node scripts/llama/run.mjs MODEL_PATH [--tokens N] [--prompt TEXT] [--context N] [--threads N]\n");
    process.exit(2);
}

function parseArgs(argv) {
    const args = {modelPath: null, tokens: 16, prompt: kDefaultPrompt, context: 256, threads: 1};
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        const value = () => {
            if (i + 1 >= argv.length) usage(`${a} needs a value`);
            return argv[++i];
        };
        if (a === "--tokens") args.tokens = Number.parseInt(value(), 10);
        else if (a === "--prompt") args.prompt = value();
        else if (a === "--context") args.context = Number.parseInt(value(), 10);
        else if (a === "--threads") args.threads = Number.parseInt(value(), 10);
        else if (a === "-h" || a === "--help") usage();
        else if (a.startsWith("--")) usage(`unknown option ${a}`);
        else if (args.modelPath === null) args.modelPath = a;
        else usage(`unexpected argument ${a}`);
    }
    if (args.modelPath === null) usage("MODEL_PATH is required");
    if (!(args.tokens >= 1)) usage("--tokens must be a positive integer");
    if (!(args.context >= 16)) usage("--context must be >= 16");
    if (!(args.threads >= 1)) usage("--threads must be >= 1");
    return args;
}

async function main() {
    const args = parseArgs(process.argv.slice(2));
    const t0 = performance.now();
    const llama = await getLlama({
        gpu: false,
        build: "never",          // never try to compile llama.cpp (no toolchain/network needed)
        usePrebuiltBinaries: true,
        skipDownload: true,
        progressLogs: false,
        // The default (max(cores, 4)) oversubscribes small machines; ggml threads spin-wait,
        // which made a 1 MiB model take ~2 s per token on 2 cores.
        maxThreads: args.threads,
        logLevel: LlamaLogLevel.warn,
        logger: (level, message) => process.stderr.write(`[llama ${level}] ${message}\n`),
    });
    const tLoad = performance.now();
    const model = await llama.loadModel({modelPath: args.modelPath, useMmap: true, gpuLayers: 0});
    const loadMs = performance.now() - tLoad;
    const context = await model.createContext({
        contextSize: args.context,
        batchSize: args.context,
        threads: args.threads,
    });
    const sequence = context.getSequence();

    const prompt = model.tokenize(args.prompt);
    if (prompt.length + args.tokens > args.context) usage("prompt + --tokens exceed --context");
    const tGen = performance.now();
    let firstTokenMs = null;
    const out = [];
    for await (const token of sequence.evaluate(prompt, {temperature: 0, yieldEogToken: true})) {
        if (firstTokenMs === null) firstTokenMs = performance.now() - tGen;
        out.push(token);
        if (out.length >= args.tokens) break;
    }
    const text = model.detokenize(out);
    const totalMs = performance.now() - t0;
    process.stdout.write(JSON.stringify({
        text,
        tokens: out,
        load_ms: Math.round(loadMs),
        first_token_ms: Math.round(firstTokenMs),
        total_ms: Math.round(totalMs),
    }) + "\n");
    await context.dispose();
    await model.dispose();
    await llama.dispose();
}

main().catch((err) => {
    process.stderr.write(`run.mjs: ${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
});
