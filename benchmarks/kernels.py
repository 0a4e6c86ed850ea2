#!/usr/bin/env python
"""Benchmark rlhfzoo.kernels against eager PyTorch and peer implementations.

Run from the repository root::

    .venv/bin/python benchmarks/kernels.py            # CPU cases (+ GPU cases if CUDA)
    .venv/bin/python benchmarks/kernels.py --quick    # fewer repetitions

Writes ``benchmarks/results/kernels-cpu.md`` and ``kernels-cpu.json`` (or
``kernels-gpu.*`` when run on a CUDA machine; both sections are always in
the file, the GPU one says when it was not measured).

Cases
-----
CPU, per-token log-probs, logits ``[2, 512, 128256]`` (fp32 and bf16):
  * forward time as a ratio to one read pass over the logits
    (``logits.amax(-1)``), for eager ``torch.log_softmax(logits, -1).gather``,
    rlhfzoo, and TRL's ``selective_log_softmax`` when installed;
  * peak memory of forward + backward beyond the logits and their gradient,
    as a % of the logits' size.
CPU, fused LM head + log-probs, N=4096 tokens, H=512, V=32000:
  * forward+backward time and peak memory vs eager
    (``F.linear`` -> ``log_softmax`` -> ``gather``), and torch's
    ``F.linear_cross_entropy`` (reference and chunked) when available.
GPU (only when CUDA is available): ``[8, 2048, 128256]`` bf16 forward as a %
  of copy bandwidth, forward+backward vs TRL / Liger, fused linear
  N=16384, H=4096, V=128256 TFLOP/s.

Methods
-------
* Time: all contenders of a case run interleaved, repeated; the table shows
  the minimum (least disturbed by other load) and the median.  The load
  average of the machine is recorded.
* CPU memory: each measurement runs in a fresh subprocess.  After the inputs
  are allocated and written (without large temporaries), the kernel's peak
  RSS counter is reset (``echo 5 > /proc/self/clear_refs``), forward and
  backward run, and ``VmHWM - VmRSS(before)`` is the peak extra memory; the
  gradient's own size is then subtracted where stated.  Without
  ``clear_refs`` it falls back to ``ru_maxrss`` minus the RSS before.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

LOGITS_SHAPE = (2, 512, 128256)
LINEAR_CPU = dict(N=4096, H=512, V=32000)
GPU_LOGITS_SHAPE = (8, 2048, 128256)
LINEAR_GPU = dict(N=16384, H=4096, V=128256)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------
# peers (never reimplemented: a missing package is reported as such)

def peer_trl():
    try:
        from trl.trainer.utils import selective_log_softmax
    except Exception:
        return None
    return selective_log_softmax


def peer_liger():
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy, liger_fused_linear_cross_entropy
    except Exception:
        return None
    return liger_cross_entropy, liger_fused_linear_cross_entropy


def logprob_impls(device: str) -> dict:
    import rlhfzoo.kernels as K

    impls = {
        "eager": lambda x, t: torch.log_softmax(x, -1).gather(-1, t.unsqueeze(-1)).squeeze(-1),
        "rlhfzoo": lambda x, t: K.logprobs(x, t),
    }
    trl = peer_trl()
    if trl is not None:
        impls["trl selective_log_softmax"] = trl
    liger = peer_liger()
    if liger is not None and device == "cuda":
        ce = liger[0]
        impls["liger cross_entropy (-lp)"] = lambda x, t: -ce(x.flatten(0, -2), t.flatten(), reduction="none")
    return impls


def peer_status(device: str) -> dict:
    return {
        "trl selective_log_softmax": "installed" if peer_trl() else "not installed",
        "liger-kernel": ("installed" if device == "cuda" else "installed (CUDA only, skipped on CPU)")
        if peer_liger() else "not installed",
        "torch F.linear_cross_entropy": "available" if hasattr(F, "linear_cross_entropy") else "not in this torch",
    }


# ----------------------------------------------------------------------------
# helpers

def fill_normal_(x: torch.Tensor, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    """Fill in place, row block by row block (no full-size fp32 temporary)."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    flat = x.view(-1, x.shape[-1])
    step = max(1, (1 << 24) // x.shape[-1])
    for i in range(0, flat.shape[0], step):
        blk = flat[i : i + step]
        blk.copy_(torch.randn(blk.shape, generator=g, device=x.device).mul_(scale))
    return x


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, reps: int, device: str = "cpu") -> dict:
    """min / median seconds per callable, contenders interleaved.

    Also the median over repetitions of each contender's time divided by the
    first contender's time in the same repetition (``paired_ratio``): on a
    shared machine that cancels slow changes of the background load better
    than a ratio of minima.
    """
    times = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        f()
    sync(device)
    for _ in range(reps):
        for k, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    first = next(iter(times.values()))
    return {k: {"min_s": min(v), "median_s": statistics.median(v),
                "paired_ratio": statistics.median(a / b for a, b in zip(v, first))} for k, v in times.items()}


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


# ----------------------------------------------------------------------------
# memory measurement (child process)

def _mem_child(spec: dict) -> dict:
    torch.manual_seed(0)
    dtype = DTYPES[spec["dtype"]]
    case, impl = spec["case"], spec["impl"]
    if case == "logprobs":
        x = fill_normal_(torch.empty(spec["shape"], dtype=dtype)).requires_grad_(True)
        t = torch.randint(0, x.shape[-1], x.shape[:-1])
        fn = logprob_impls("cpu")[impl]
        run = lambda: fn(x, t).sum().backward()  # noqa: E731
        input_bytes = x.numel() * x.element_size()
        grad_bytes = input_bytes
    else:
        N, H, V = spec["N"], spec["H"], spec["V"]
        h = fill_normal_(torch.empty(N, H, dtype=dtype), 1.0).requires_grad_(True)
        w = fill_normal_(torch.empty(V, H, dtype=dtype), 0.05, seed=1).requires_grad_(True)
        t = torch.randint(0, V, (N,))
        fn = linear_impls()[impl]
        run = lambda: fn(h, w, t).sum().backward()  # noqa: E731
        input_bytes = (h.numel() + w.numel()) * h.element_size()
        grad_bytes = input_bytes
    import rlhfzoo.kernels  # noqa: F401  (import cost outside the measurement)

    # warm-up on a tiny problem so lazily created state is not counted
    if case == "logprobs":
        xs = torch.randn(2, 64, dtype=dtype, requires_grad=True)
        logprob_impls("cpu")[impl](xs, torch.zeros(2, dtype=torch.long)).sum().backward()
    # ... and compile the fused CPU passes that large inputs take (a one-off per process)
    from rlhfzoo.kernels import _compiled

    V = spec["shape"][-1] if case == "logprobs" else spec["V"]
    xs = torch.zeros(_compiled.MIN_ELEMENTS // V + 1, V, dtype=dtype)
    _compiled.sum_exp(xs, 1.0)
    rows = torch.zeros(xs.shape[0])
    _compiled.logprob_grad_(xs.float(), rows, rows, 1.0, xs.float())
    del xs, rows
    before = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss"
    run()
    if method == "ru_maxrss":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    else:
        peak = _status_kb("VmHWM")
    return {"peak_extra_bytes": peak - before, "grad_bytes": grad_bytes, "input_bytes": input_bytes,
            "method": method}


def measure_memory(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_mem-child", json.dumps(spec)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"rc={res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# CPU cases

def linear_impls() -> dict:
    import rlhfzoo.kernels as K

    impls = {
        "eager": lambda h, w, t: torch.log_softmax(F.linear(h, w).float(), -1).gather(-1, t[:, None]).squeeze(-1),
        "rlhfzoo": lambda h, w, t: K.linear_logprobs(h, w, t),
    }
    if hasattr(F, "linear_cross_entropy"):
        impls["torch linear_cross_entropy (ref)"] = lambda h, w, t: -F.linear_cross_entropy(h, w, t, reduction="none")
        if hasattr(torch.nn, "LinearCrossEntropyOptions"):
            opts = torch.nn.LinearCrossEntropyOptions()
            impls["torch linear_cross_entropy (chunked)"] = lambda h, w, t: -F.linear_cross_entropy(
                h, w, t, reduction="none", options=opts)
    liger = peer_liger()
    if liger is not None and torch.cuda.is_available():
        flce = liger[1]
        impls["liger fused_linear_cross_entropy"] = lambda h, w, t: -flce(h, w, t, reduction="none")
    return impls


def cpu_logprobs(reps: int) -> list[dict]:
    rows = []
    for name, dtype in DTYPES.items():
        x = fill_normal_(torch.empty(LOGITS_SHAPE, dtype=dtype))
        t = torch.randint(0, x.shape[-1], x.shape[:-1])
        impls = logprob_impls("cpu")
        fns = {"read pass (amax)": lambda: x.amax(-1)}
        fns.update({k: (lambda f=f: f(x, t)) for k, f in impls.items()})
        with torch.no_grad():
            fwd = time_interleaved(fns, reps)
        xg = x.detach().requires_grad_(True)
        fb = time_interleaved({k: (lambda f=f: f(xg, t).sum().backward()) for k, f in impls.items()},
                              max(2, reps // 2))
        base = fwd["read pass (amax)"]["min_s"]
        for k in fns:
            row = {"dtype": name, "impl": k, "fwd_ms_min": fwd[k]["min_s"] * 1e3,
                   "fwd_ms_median": fwd[k]["median_s"] * 1e3, "fwd_ratio_to_read": fwd[k]["min_s"] / base,
                   "fwd_ratio_to_read_paired": fwd[k]["paired_ratio"]}
            if k in impls:
                row["fwd_bwd_ms_min"] = fb[k]["min_s"] * 1e3
                mem = measure_memory({"case": "logprobs", "impl": k, "dtype": name, "shape": list(LOGITS_SHAPE)})
                if "error" in mem:
                    row["mem_error"] = mem["error"]
                else:
                    row["mem_overhead_pct"] = 100.0 * (mem["peak_extra_bytes"] - mem["grad_bytes"]) / mem["input_bytes"]
                    row["mem_method"] = mem["method"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del x, xg
    return rows


def cpu_linear(reps: int) -> list[dict]:
    N, H, V = LINEAR_CPU["N"], LINEAR_CPU["H"], LINEAR_CPU["V"]
    h = fill_normal_(torch.empty(N, H), 1.0).requires_grad_(True)
    w = fill_normal_(torch.empty(V, H), 0.05, seed=1).requires_grad_(True)
    t = torch.randint(0, V, (N,))
    impls = linear_impls()

    def step(f):
        h.grad = w.grad = None
        f(h, w, t).sum().backward()

    times = time_interleaved({k: (lambda f=f: step(f)) for k, f in impls.items()}, reps)
    # sanity: every contender computes the same log-probs
    with torch.no_grad():
        ref = impls["eager"](h, w, t)
        agree = {k: float((f(h, w, t) - ref).abs().max()) for k, f in impls.items()}
    rows = []
    for k in impls:
        mem = measure_memory({"case": "linear", "impl": k, "dtype": "fp32", **LINEAR_CPU})
        rows.append({"impl": k, "fwd_bwd_ms_min": times[k]["min_s"] * 1e3,
                     "fwd_bwd_ms_median": times[k]["median_s"] * 1e3,
                     "time_vs_eager_paired_median": times[k]["paired_ratio"],
                     "max_abs_diff_vs_eager": agree[k], **{f"mem_{a}": b for a, b in mem.items()}})
    eager_t = rows[0]["fwd_bwd_ms_min"]
    eager_m = rows[0].get("mem_peak_extra_bytes")
    for r in rows:
        r["time_vs_eager"] = r["fwd_bwd_ms_min"] / eager_t
        if eager_m and "mem_peak_extra_bytes" in r:
            r["peak_mem_pct_of_eager"] = 100.0 * r["mem_peak_extra_bytes"] / eager_m
        print(json.dumps(r), flush=True)
    return rows


# ----------------------------------------------------------------------------
# GPU cases (run only when CUDA is available)

def gpu_cases(reps: int) -> dict:
    out = {}
    dev = "cuda"
    x = fill_normal_(torch.empty(GPU_LOGITS_SHAPE, dtype=torch.bfloat16, device=dev))
    t = torch.randint(0, x.shape[-1], x.shape[:-1], device=dev)
    nbytes = x.numel() * x.element_size()
    impls = logprob_impls(dev)
    with torch.no_grad():
        tm = time_interleaved({"copy": lambda: x.clone(), **{k: (lambda f=f: f(x, t)) for k, f in impls.items()}},
                              reps, dev)
    copy_bw = 2 * nbytes / tm["copy"]["min_s"]
    out["logprobs_fwd"] = {k: {"ms": v["min_s"] * 1e3, "read_GBps": nbytes / v["min_s"] / 1e9,
                               "pct_of_copy_bw": 100 * (nbytes / v["min_s"]) / copy_bw}
                           for k, v in tm.items() if k != "copy"}
    out["copy_GBps"] = copy_bw / 1e9
    xg = x.detach().requires_grad_(True)
    fb = time_interleaved({k: (lambda f=f: f(xg, t).sum().backward()) for k, f in impls.items()}, reps, dev)
    out["logprobs_fwd_bwd_ms"] = {k: v["min_s"] * 1e3 for k, v in fb.items()}
    del x, xg
    torch.cuda.empty_cache()
    N, H, V = LINEAR_GPU["N"], LINEAR_GPU["H"], LINEAR_GPU["V"]
    h = (torch.randn(N, H, device=dev) * 1.0).bfloat16().requires_grad_(True)
    w = (torch.randn(V, H, device=dev) * 0.02).bfloat16().requires_grad_(True)
    tt = torch.randint(0, V, (N,), device=dev)
    flops = 6 * N * H * V  # fwd GEMM + 2 bwd GEMMs (our recompute not counted)
    res = {}
    for k, f in linear_impls().items():
        if k == "eager" or "ref" in k:
            continue
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

        def step(f=f):
            h.grad = w.grad = None
            f(h, w, tt).sum().backward()

        tm = time_interleaved({k: step}, max(3, reps // 2), dev)[k]
        res[k] = {"ms": tm["min_s"] * 1e3, "TFLOPs_6NHV": flops / tm["min_s"] / 1e12,
                  "peak_extra_GiB": (torch.cuda.max_memory_allocated() - base) / 2**30}
    out["fused_linear"] = res
    return out


# ----------------------------------------------------------------------------
# report

def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def write_report(info: dict, cpu_lp: list, cpu_lin: list, gpu: dict | None, path_md: Path) -> None:
    L = []
    L.append("# rlhfzoo.kernels benchmark")
    L.append("")
    L.append(f"- date: {info['date']}")
    L.append(f"- machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, triton {info['triton']}, "
             f"python {info['python']}")
    L.append(f"- load average before / after: {info['load_before']} / {info['load_after']} "
             f"(other processes were {'sharing' if max(info['load_before'] + info['load_after']) > info['cores'] else 'not dominating'} the cores)")
    L.append(f"- command: `{info['command']}`")
    L.append("- peers: " + "; ".join(f"{k}: {v}" for k, v in info["peers"].items()))
    L.append("")
    L.append(f"## CPU: per-token log-probs, logits {list(LOGITS_SHAPE)}")
    L.append("")
    L.append("Forward time is the minimum over interleaved repetitions (median in brackets).  The ratio to one "
             "read pass `logits.amax(-1)` is given as min/min and as the median of the per-repetition ratios "
             "(each contender timed right after the read pass; steadier when the machine is shared).  Memory is "
             "the peak RSS during forward+backward beyond the logits and their gradient (fresh subprocess per "
             "cell), as a % of the logits' size.")
    L.append("")
    L.append("| dtype | implementation | fwd ms (median) | fwd / read pass: min/min, paired median | fwd+bwd ms | "
             "extra peak mem % of logits |")
    L.append("|---|---|---|---|---|---|")
    for r in cpu_lp:
        mem = fmt(r.get("mem_overhead_pct"), ".1f") if "mem_error" not in r else "error: " + r["mem_error"]
        L.append(f"| {r['dtype']} | {r['impl']} | {r['fwd_ms_min']:.1f} ({r['fwd_ms_median']:.1f}) | "
                 f"{r['fwd_ratio_to_read']:.2f}x, {r['fwd_ratio_to_read_paired']:.2f}x | "
                 f"{fmt(r.get('fwd_bwd_ms_min'), '.1f')} | {mem} |")
    L.append("")
    L.append("Targets: forward <= 2.5x (fp32) / 2x (bf16) the read pass; memory <= 10%.")
    L.append("")
    N, H, V = LINEAR_CPU["N"], LINEAR_CPU["H"], LINEAR_CPU["V"]
    L.append(f"## CPU: fused LM head + log-probs, N={N}, H={H}, V={V}, fp32")
    L.append("")
    L.append("Forward+backward (w.r.t. hidden and weight).  Peak memory is the RSS high-water mark above the "
             "inputs during forward+backward (includes the gradients of hidden and weight).")
    L.append("")
    L.append("Time vs eager is given as min/min and as the median of the per-repetition ratios (paired).")
    L.append("")
    L.append("| implementation | fwd+bwd ms (median) | time vs eager: min/min, paired median | peak extra MiB | peak mem % of eager | max abs diff vs eager |")
    L.append("|---|---|---|---|---|---|")
    for r in cpu_lin:
        pm = r.get("mem_peak_extra_bytes")
        L.append(f"| {r['impl']} | {r['fwd_bwd_ms_min']:.0f} ({r['fwd_bwd_ms_median']:.0f}) | {r['time_vs_eager']:.2f}x, "
                 f"{r['time_vs_eager_paired_median']:.2f}x | "
                 f"{fmt(pm / 2**20 if pm is not None else None, '.0f')} | {fmt(r.get('peak_mem_pct_of_eager'), '.1f')}% | "
                 f"{r['max_abs_diff_vs_eager']:.1e} |")
    L.append("")
    L.append("Targets: time no worse than eager; peak memory <= 25% of eager's.")
    L.append("")
    L.append("## GPU")
    L.append("")
    if gpu is None:
        L.append("**GPU figures were not measured**: no CUDA device was available in this run.  The script contains "
                 f"the GPU cases ({list(GPU_LOGITS_SHAPE)} bf16 forward as a % of copy bandwidth; forward+backward vs "
                 f"TRL / Liger; fused linear N={LINEAR_GPU['N']}, H={LINEAR_GPU['H']}, V={LINEAR_GPU['V']} TFLOP/s) "
                 "and runs them when `torch.cuda.is_available()`.")
    else:
        L.append(f"Device: {info.get('gpu')}; copy bandwidth {gpu['copy_GBps']:.0f} GB/s")
        L.append("")
        L.append("| implementation | fwd ms | read GB/s | % of copy bw | fwd+bwd ms |")
        L.append("|---|---|---|---|---|")
        for k, v in gpu["logprobs_fwd"].items():
            L.append(f"| {k} | {v['ms']:.2f} | {v['read_GBps']:.0f} | {v['pct_of_copy_bw']:.0f}% | "
                     f"{fmt(gpu['logprobs_fwd_bwd_ms'].get(k), '.2f')} |")
        L.append("")
        L.append("| fused linear | fwd+bwd ms | TFLOP/s (6NHV) | peak extra GiB |")
        L.append("|---|---|---|---|")
        for k, v in gpu["fused_linear"].items():
            L.append(f"| {k} | {v['ms']:.1f} | {v['TFLOPs_6NHV']:.0f} | {v['peak_extra_GiB']:.2f} |")
    L.append("")
    path_md.write_text("\n".join(L) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--out", default=str(RESULTS), help="results directory")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--_mem-child", dest="mem_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem_child:
        print(json.dumps(_mem_child(json.loads(args.mem_child))))
        return
    reps = 5 if args.quick else 15
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "triton": triton_version,
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "load_before": [round(v, 2) for v in os.getloadavg()],
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, REPO)] +
                            [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "peers": peer_status("cuda" if torch.cuda.is_available() else "cpu"),
    }
    cpu_lp = [] if args.skip_cpu else cpu_logprobs(reps)
    cpu_lin = [] if args.skip_cpu else cpu_linear(3 if args.quick else 7)
    gpu = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        gpu = gpu_cases(reps)
    info["load_after"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "kernels-gpu" if gpu is not None else "kernels-cpu"
    (out / f"{stem}.json").write_text(json.dumps({"info": info, "cpu_logprobs": cpu_lp, "cpu_linear": cpu_lin,
                                                  "gpu": gpu}, indent=2) + "\n")
    write_report(info, cpu_lp, cpu_lin, gpu, out / f"{stem}.md")
    print(f"wrote {out / (stem + '.md')}")


if __name__ == "__main__":
    main()
