"""minillm against llama.cpp (F32, with and without flash attention) and transformers, in one run.

Every engine runs the same SmolLM2 weights on the same token ids (News from Nowhere, tokenized
once) with the same number of threads, each measurement in a fresh worker process so that
peak RSS is the engine's own. Rounds alternate the engines (the order rotates each round);
the report gives medians over rounds and the ratios minillm / peer against the targets:

    prompt_512_tps, prompt_2048_tps  last-token logits only (as llama.cpp measures prompts)
    decode_tps                       128 greedy tokens after a 512-token prompt
    score_tps                        2048 tokens in 512-token chunks, NLL of every token
    peak_rss_mb                      the worker's peak resident memory (MB = 10^6 bytes)

and, once per run in a worker of its own, the machine: the CPU model, usable cores, and the
floors at SmolLM2's shapes (minillm.bench.floors: the weight products alone, one GEMV per matrix
for a decode token, 512-row GEMMs for a prompt), to which minillm's decode and prompt rates are
compared too.

Set up once (llama.cpp compiles, 6-15 minutes on 2 cores):

    make bench-env          # .bench-venv with llama-cpp-python; the transformers side uses .venv

Run (OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE slow a current OpenBLAS: unset them here alone):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/compare.py \\
        --out benchmarks/results/compare

The F32 GGUF for llama.cpp is written from minillm's converted file with the gguf package's
writer (Q/K rows permuted back to llama.cpp's interleaved RoPE layout).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from texts import add_text_option, read_chars, text_files

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("minillm", "llama.cpp", "llama.cpp-fa", "transformers")
METRICS = ("prompt_512_tps", "prompt_2048_tps", "decode_tps", "score_tps", "peak_rss_mb")
PROMPTS = (512, 2048)
DECODE_PROMPT, DECODE_TOKENS = 512, 128
SCORE_TOKENS, SCORE_CHUNK = 2048, 512
N_IDS = 2048


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(prompt, decode_step, score, ids) -> dict:
    """One warm-up, then one timed run of each measurement.

    prompt(ids) -> None: fresh state, last-token logits; decode_step(None) starts from a fresh
    512-token prompt and returns the greedy token, decode_step(token) feeds one token and
    returns the next; score(ids) -> None.
    """
    def decode():
        token = decode_step(ids[:DECODE_PROMPT])
        t = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            token = decode_step([token])
        return DECODE_TOKENS / (time.perf_counter() - t)

    decode_step(ids[:64])  # warm-up: page in the weights, start the threads, and leave the
    prompt(ids[:PROMPTS[0]])  # allocator as a 512-token prompt does (the first one is slower)
    out = {f"prompt_{n}_tps": n / timed(lambda n=n: prompt(ids[:n])) for n in PROMPTS}
    out["decode_tps"] = decode()
    out["score_tps"] = SCORE_TOKENS / timed(lambda: score(ids[:SCORE_TOKENS]))
    return out


# --- workers: each runs in its own process (llama.cpp's in the benchmark venv) -------------

def worker_minillm(args, ids):
    import numpy as np

    import minillm
    from minillm.bench import blas_kernel

    model = minillm.load(args.model, backend="numpy")
    state = {}

    def prompt(p):
        model.session().feed(p, logits="last")

    def decode_step(p):
        if len(p) > 1:
            state["s"] = model.session()
        return int(np.argmax(state["s"].feed(p, logits="last")))

    def score(p):
        model.session().nll(p, chunk_size=SCORE_CHUNK)

    out = measure(prompt, decode_step, score, ids)
    if args.long_decode:  # decode with the default window (n_local = 8192) full
        s = model.session()
        s.feed(ids_repeated(ids, 8192), logits="none")
        token, t = 0, time.perf_counter()
        for _ in range(DECODE_TOKENS):
            token = int(np.argmax(s.feed([token], logits="last")))
        out["decode_8k_tps"] = DECODE_TOKENS / (time.perf_counter() - t)
    out["kernel"] = blas_kernel()
    return out


def ids_repeated(ids, n):
    import numpy as np
    return np.resize(np.asarray(ids), n)


def worker_llama(args, ids, flash: bool):
    import ctypes

    import llama_cpp
    import numpy as np

    common = dict(model_path=args.gguf, n_ctx=4096, n_batch=SCORE_CHUNK, n_ubatch=SCORE_CHUNK,
                  n_threads=args.threads, n_threads_batch=args.threads, flash_attn=flash,
                  verbose=False)
    llm = llama_cpp.Llama(**common)
    n_vocab = llm.n_vocab()

    def last_logits():
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                     shape=(n_vocab,))

    def prompt(p):
        llm.reset()
        llm.eval(list(map(int, p)))
        last_logits()

    def decode_step(p):
        if len(p) > 1:
            llm.reset()
        llm.eval(list(map(int, p)))
        return int(np.argmax(last_logits()))

    scorer = {}

    def score(p):
        # a second context that keeps every row of logits, as scoring needs
        if "llm" not in scorer:
            scorer["llm"] = llama_cpp.Llama(**common, logits_all=True)
        s = scorer["llm"]
        s.reset()
        p = list(map(int, p))
        s.eval(p)
        nll_of_logits(s.scores[:len(p) - 1], np.asarray(p[1:]))

    out = measure(prompt, decode_step, score, ids)
    out["kernel"] = "llama.cpp " + llama_cpp.__version__ + (" flash-attn" if flash else "")
    return out


def nll_of_logits(logits, targets):
    """-log softmax(logits)[target] per row, in NumPy (the same work minillm's score does)."""
    import numpy as np
    m = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=-1)) + m[:, 0]
    return lse - logits[np.arange(len(targets)), targets]


def worker_transformers(args, ids):
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    model = LlamaForCausalLM.from_pretrained(args.hf_folder, dtype=torch.float32,
                                             attn_implementation="sdpa").eval()
    state = {}

    def t(p):
        return torch.as_tensor([list(map(int, p))])

    @torch.inference_mode()
    def prompt(p):
        model(t(p), use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def decode_step(p):
        past = None if len(p) > 1 else state["past"]
        out = model(t(p), past_key_values=past, use_cache=True, logits_to_keep=1)
        state["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    @torch.inference_mode()
    def score(p):
        past, prev = None, None
        for a in range(0, len(p), SCORE_CHUNK):
            out = model(t(p[a:a + SCORE_CHUNK]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0] if prev is None else torch.cat([prev, out.logits[0]])
            targets = torch.as_tensor(list(map(int, p[max(a, 1):a + SCORE_CHUNK])))
            rows = logits[:len(targets)]
            torch.log_softmax(rows, dim=-1).gather(1, targets[:, None])
            prev = out.logits[0, -1:]

    out = measure(prompt, decode_step, score, ids)
    out["kernel"] = f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})"
    return out


def worker_floors(args):
    """The CPU and the weight-product floors (minillm.bench.floors), with NumPy's BLAS."""
    import minillm
    from minillm.bench import blas_kernel, floors

    out = floors(minillm.load(args.model, backend="numpy"))
    out["kernel"] = blas_kernel()
    return out


def worker(args) -> None:
    import numpy as np
    ids = np.load(args.ids)
    run = {"floors": lambda: worker_floors(args),
           "minillm": lambda: worker_minillm(args, ids),
           "llama.cpp": lambda: worker_llama(args, ids, flash=False),
           "llama.cpp-fa": lambda: worker_llama(args, ids, flash=True),
           "transformers": lambda: worker_transformers(args, ids)}[args.engine]
    out = run()
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out), flush=True)


# --- preparation (in minillm's environment) -------------------------------------------------

def prepare(args) -> None:
    """Token ids, the F32 GGUF for llama.cpp and the Hugging Face folder for transformers."""
    import numpy as np

    import minillm
    model = minillm.load(args.model, backend="numpy")
    ids_path = Path(args.ids)
    if not ids_path.exists():
        files = text_files(args.text)
        ids = model.tokenizer.encode(read_chars(files, 40000))
        if len(ids) < N_IDS:
            sys.exit(f"compare: {files[0]}... gives only {len(ids)} tokens, {N_IDS} needed")
        np.save(ids_path, np.asarray(ids[:N_IDS], dtype=np.int64))
    if not Path(args.gguf).exists():
        progress(f"writing {args.gguf}")
        write_f32_gguf(model, args.model, args.gguf)
    if not (Path(args.hf_folder) / "model.safetensors").exists():
        progress(f"writing {args.hf_folder}")
        write_hf_folder(args.model, Path(args.hf_folder))


def write_hf_folder(path: str, folder: Path) -> None:
    """config.json + model.safetensors (transformers wants {"format": "pt"} in the metadata)."""
    from safetensors.numpy import save_file

    from minillm.formats.safetensors import SafetensorsFile
    folder.mkdir(parents=True, exist_ok=True)
    f = SafetensorsFile(path)
    save_file({k: f.tensor(k) for k in f.entries}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads(f.metadata["minillm.config"])
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))


def write_f32_gguf(model, path: str, out: str) -> None:
    """An F32 GGUF of the same weights, tokenizer included, for llama.cpp."""
    import gguf
    import numpy as np

    from minillm.formats.gguf import unpermute_qk
    from minillm.formats.safetensors import SafetensorsFile

    cfg = model.config
    f = SafetensorsFile(path)
    w = gguf.GGUFWriter(out, "llama")
    w.add_name("minillm-compare")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_tokenizer(w, model, f.metadata.get("minillm.tokenizer_json"))

    def permute(a, n_head):  # inverse of unpermute_qk: HF rotate-half -> llama.cpp interleaved
        p = a.reshape(n_head, 2, a.shape[0] // n_head // 2, *a.shape[1:])
        out = p.swapaxes(1, 2).reshape(a.shape)
        assert np.array_equal(unpermute_qk(out, n_head), a)
        return out

    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key in f.entries:
        a = np.ascontiguousarray(f.tensor(key), dtype=np.float32)
        if key in names:
            name = names[key]
        else:
            _, _, n, rest = key.split(".", 3)
            part = rest.removesuffix(".weight")
            name = f"blk.{n}.{per_layer[part]}.weight"
            if part == "self_attn.q_proj":
                a = permute(a, cfg.n_heads)
            elif part == "self_attn.k_proj":
                a = permute(a, cfg.n_kv_heads)
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def add_tokenizer(w, model, tokenizer_json: str | None) -> None:
    """Byte-level BPE vocabulary and merges from the file's tokenizer.json."""
    tj = json.loads(tokenizer_json or "{}")
    bpe = tj.get("model", {})
    if bpe.get("type") != "BPE":
        sys.exit("compare: only byte-level BPE tokenizers can be written to the GGUF")
    vocab = sorted(bpe["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    tokens = [tok for tok, _ in vocab]
    for i, t in added.items():
        if i >= len(tokens):
            tokens += [f"[PAD{j}]" for j in range(len(tokens), i)] + [t["content"]]
    types = [3 if i in added and added[i].get("special") else 1 for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if model.config.bos_token_id is not None:
        w.add_bos_token_id(model.config.bos_token_id)
    if model.config.eos_token_id:
        w.add_eos_token_id(model.config.eos_token_id[0])


# --- the run and its report -----------------------------------------------------------------

def progress(msg: str) -> None:
    print(f"compare: {msg}", file=sys.stderr, flush=True)


def run_worker(args, engine: str, long_decode: bool = False) -> dict:
    python = args.llama_python if engine.startswith("llama.cpp") else sys.executable
    threads = str(args.threads)
    env = dict(os.environ, OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads,
               MKL_NUM_THREADS=threads, PYTHONPATH=str(ROOT))
    cmd = [python, __file__, "worker", engine, "--ids", args.ids, "--model",
           args.model, "--gguf", args.gguf, "--hf-folder", args.hf_folder,
           "--threads", threads] + (["--long-decode"] if long_decode else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"compare: the {engine} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main_run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)  # large generated files: git-ignored
    work.mkdir(parents=True, exist_ok=True)
    args.gguf = args.gguf or str(work / "model-f32.gguf")
    args.hf_folder = args.hf_folder or str(work / "hf")
    args.ids = str(work / "ids.npy")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:
            progress(f"warning: {var} is set; it slows a current OpenBLAS (see the docstring)")
    engines = [e for e in ENGINES if e in args.engines]
    if any(e.startswith("llama.cpp") for e in engines) and not Path(args.llama_python).exists():
        sys.exit(f"compare: {args.llama_python} not found: run `make bench-env` first")
    prepare(args)
    t0 = time.perf_counter()
    runs = {e: [] for e in engines}
    log = (out / "runs.jsonl").open("w")
    for r in range(args.rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]  # rotate: alternate
        for engine in order:
            progress(f"round {r + 1}/{args.rounds}: {engine}")
            res = run_worker(args, engine)
            runs[engine].append(res)
            log.write(json.dumps({"round": r + 1, "engine": engine, **res}) + "\n")
            log.flush()
    extra = {}
    if "minillm" in engines:
        progress("minillm: decode with the 8K window full")
        extra = run_worker(args, "minillm", long_decode=True)
        log.write(json.dumps({"round": "long", "engine": "minillm", **extra}) + "\n")
    progress("the machine's floors")
    machine = run_worker(args, "floors")
    log.write(json.dumps({"round": "floors", "engine": "floors", **machine}) + "\n")
    summary = summarize(runs, extra)
    summary["machine"] = machine
    summary.update(threads=args.threads, rounds=args.rounds, seconds=time.perf_counter() - t0,
                   command=" ".join(sys.argv))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(report(summary))


def summarize(runs: dict, extra: dict) -> dict:
    med = {e: {m: statistics.median(r[m] for r in rs) for m in METRICS} for e, rs in runs.items()}
    for e, rs in runs.items():
        med[e]["kernel"] = rs[0]["kernel"]
        med[e]["range"] = {m: [min(r[m] for r in rs), max(r[m] for r in rs)] for m in METRICS}
    if extra:
        med["minillm"]["decode_8k_tps"] = extra["decode_8k_tps"]
    return {"medians": med}


def machine_line(machine: dict) -> str:
    return (f"machine: {machine['cpu']}, {machine['cores']} usable cores, "
            f"{machine['kernel']}; floors at SmolLM2's shapes (weight products alone): "
            f"GEMV {machine['gemv_floor_tps']:.1f} tok/s ({machine['gemv_floor_ms']:.1f} "
            f"ms/token), GEMM {machine['gemm_floor_tps']:.1f} tok/s "
            f"({machine['gemm_floor_gflops']:.0f} GFLOP/s, 512 rows)")


def report(summary: dict) -> str:
    med = summary["medians"]
    engines = list(med)
    machine = summary.get("machine")  # absent from summaries written before the floors
    floor_of = {}
    if machine and machine.get("gemv_floor_tps"):
        floor_of = {"decode_tps": ("GEMV", machine["gemv_floor_tps"]),
                    **{f"prompt_{n}_tps": ("GEMM", machine["gemm_floor_tps"]) for n in PROMPTS}}
    lines = [machine_line(machine), ""] if floor_of else []
    lines += ["| | " + " | ".join(engines) + " |", "|---" * (len(engines) + 1) + "|"]
    for m in METRICS:
        lines.append(f"| {m} | " + " | ".join(f"{med[e][m]:.1f}" for e in engines) + " |")
    lines.append("| kernel | " + " | ".join(med[e]["kernel"] for e in engines) + " |")
    if "minillm" in med:
        mine = med["minillm"]
        head, rule = "| target | minillm | best peer | ratio |", "|---|---|---|---|"
        if floor_of:  # the machine's ceiling beside each target: minillm / its floor
            head, rule = head + " minillm / floor |", rule + "---|"
        lines += ["", head, rule]
        # (metric, the peers it is held against, the ratio aimed at: issue 14's targets)
        targets = [(f"prompt_{n}_tps", [e for e in engines if e != "minillm"], 1.0)
                   for n in PROMPTS]
        targets += [("score_tps", ["transformers"], 1.0), ("decode_tps", ["llama.cpp"], 0.9)]
        for m, peers, aim in targets:
            peers = [p for p in peers if p in med]
            if not peers:
                continue
            best = max(peers, key=lambda p: med[p][m])
            row = (f"| {m} >= {aim:.1f}x {best} | {mine[m]:.1f} | {med[best][m]:.1f} | "
                   f"{mine[m] / med[best][m]:.2f}x |")
            if floor_of:
                name, floor = floor_of.get(m, ("", None))
                row += f" {mine[m] / floor:.2f}x of {name} |" if floor else " |"
            lines.append(row)
        if "decode_8k_tps" in mine:
            lines.append(f"\nminillm decode with the 8K window full: {mine['decode_8k_tps']:.1f} "
                         f"tok/s (after a 512-token prompt: {mine['decode_tps']:.1f})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="run", choices=["run", "worker", "report"])
    p.add_argument("engine", nargs="?", help="worker mode: which engine")
    p.add_argument("--model", default=str(ROOT / "weights" / "smollm2-135m-instruct.safetensors"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--llama-python", default=str(ROOT / ".bench-venv" / "bin" / "python"))
    p.add_argument("--work", default=str(ROOT / "build" / "compare"),
                   help="where the token ids, the F32 GGUF and the HF folder are written")
    p.add_argument("--gguf", default=None, help="default: WORK/model-f32.gguf (written if absent)")
    p.add_argument("--hf-folder", default=None, help="default: WORK/hf (written if absent)")
    p.add_argument("--ids", default=None)
    p.add_argument("--long-decode", action="store_true")
    add_text_option(p)
    args = p.parse_args()
    if args.mode == "worker":
        worker(args)
    elif args.mode == "report":
        print(report(json.loads((Path(args.out) / "summary.json").read_text())))
    else:
        main_run(args)


if __name__ == "__main__":
    main()
