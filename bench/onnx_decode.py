"""ONNX exports of the real Gemma-3 270M side by side with onnxruntime-genai's builder int4 export.

For each of our exports (profiles int8-v1, mixed-int4, mixed-int4-gemma3, int4-g32, int4-g32-gptq-sym,
int4-g64-gptq-sym by default, accuracy_level 4) and
the builder's ``-p int4 -e cpu`` export of the same checkpoint, in ONE run:

* bytes on disk (model.onnx + external data; tokenizer files excluded),
* prefill time and decode tokens/s with 2 intra-op threads, measured with the SAME harness for all
  (onnxruntime-genai Model/Generator, greedy, max_length 1024 — the builder's windowed cache needs
  >= 512 — one model loaded at a time, models interleaved; decode tokens/s = 1 / median step time,
  best of ``--reps``: robust on a shared, loaded machine), plus our own engine's decode tokens/s;
  "vs builder" is the median over reps of the PAIRED ratio (this export's decode tok/s / the builder's
  in the same rep, measured seconds apart), with its min-max range: machine drift cancels in the pair,
* mean next-token KL / top-1 agreement / perplexity ratio against the unquantized float32 model on
  the eval corpus (``corpus_kl``: cellm.eval's windows and metrics, the first ``--kl-windows``
  windows, reference statistics from the eval cache; every candidate is run through
  onnxruntime-genai, so the builder export is scored the same way).

The builder needs help on transformers-5 configs: it gets a copy of the checkpoint folder whose
config.json uses the flat transformers-4 keys, and runs under a shim that re-flattens what
transformers 5's AutoConfig turns back into ``rope_parameters`` (see ``BUILDER_SHIM``).

    python bench/onnx_decode.py [--work DIR] [--profiles int8-v1,mixed-int4,int4-g32,int4-g32+r] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BUILDER_SHIM = r"""
import runpy, sys
import transformers
_orig = transformers.AutoConfig.from_pretrained
def _flat(*a, **k):
    c = _orig(*a, **k)
    rp = getattr(c, "rope_parameters", None)
    if isinstance(rp, dict) and "full_attention" in rp:
        full = rp["full_attention"]
        c.rope_theta = full["rope_theta"]
        c.rope_local_base_freq = rp.get("sliding_attention", {}).get("rope_theta", 10000.0)
        c.rope_parameters = dict(full)
    return c
transformers.AutoConfig.from_pretrained = _flat
sys.argv = ["builder"] + sys.argv[1:]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.name.startswith("model.onnx"))


def parse_spec(spec: str) -> tuple[str, int, bool]:
    """``PROFILE`` (level 4), ``PROFILE+r`` (level 4 + int8_residual) or ``PROFILE@1`` (level 1)."""
    if spec.endswith("+r"):
        return spec[:-2], 4, True
    if spec.endswith("@1"):
        return spec[:-2], 1, False
    return spec, 4, False


def spec_label(spec: str) -> str:
    profile, level, residual = parse_spec(spec)
    tag = Path(profile).stem if profile.endswith(".toml") else profile
    return tag + (" +int8-residual" if residual else " (level 1)" if level == 1 else "")


def build_ours(ckpt: Path, work: Path, spec: str) -> Path:
    from cellm.convert import convert
    from cellm.onnx_export import export_onnx

    profile, level, residual = parse_spec(spec)
    tag = Path(profile).stem if profile.endswith(".toml") else profile  # a shipped name or a profile TOML path
    art = work / f"g270-{tag}.cellm"
    out = work / f"g270-{tag}{'-r' if residual else '-l1' if level == 1 else ''}-onnx"
    if not art.exists():
        log(f"convert {profile}")
        convert(str(ckpt), profile, out=art)
    if not (out / "model.onnx").exists():
        log(f"export {spec}")
        export_onnx(art, out, accuracy_level=level, int8_residual=residual, force=True)
    return out


def build_builder(ckpt: Path, work: Path) -> Path:
    from cellm.config import GemmaTextConfig

    out = work / "builder-int4"
    if (out / "model.onnx").exists():
        return out
    ck4 = work / "ckpt-t4"
    ck4.mkdir(exist_ok=True)
    for f in ckpt.iterdir():
        if f.name != "config.json" and f.is_file() and not (ck4 / f.name).exists():
            os.symlink(f.resolve(), ck4 / f.name)
    raw = json.loads((ckpt / "config.json").read_text())
    (ck4 / "config.json").write_text(json.dumps(GemmaTextConfig.from_hf(raw).to_hf_dict(style=4), indent=1))
    log("onnxruntime-genai builder -p int4 -e cpu (a few minutes)")
    with open(work / "builder.log", "w") as logf:
        subprocess.run([sys.executable, "-c", BUILDER_SHIM, "-i", str(ck4), "-o", str(out), "-p", "int4", "-e", "cpu",
                        "-c", str(work / "builder-cache")], check=True, stdout=logf, stderr=subprocess.STDOUT)
    return out


def set_threads(d: Path, threads: int) -> None:
    p = d / "genai_config.json"
    cfg = json.loads(p.read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    cfg["model"]["decoder"]["session_options"]["inter_op_num_threads"] = 1
    p.write_text(json.dumps(cfg, indent=2))


class GenaiLM:
    """An onnxruntime-genai model as a ``CausalLM`` (for cellm.eval): a state is a Generator."""

    def __init__(self, d: Path, config, max_length: int = 1024):
        import onnxruntime_genai as og

        self.og, self.model, self.config, self.max_length = og, og.Model(str(d)), config, max_length

    def new_state(self):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length)
        return self.og.Generator(self.model, params)

    def forward(self, ids, gen):
        gen.append_tokens([int(x) for x in np.asarray(ids).reshape(-1)])
        return np.asarray(gen.get_output("logits"), dtype=np.float32)[0]


def genai_speed(model, prompt: list[int], n: int) -> tuple[float, float]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=1024, min_length=len(prompt) + n + 1)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    t1 = time.perf_counter()
    steps = []
    for _ in range(n):
        a = time.perf_counter()
        gen.generate_next_token()
        steps.append(time.perf_counter() - a)
    return t1 - t0, 1.0 / float(np.median(steps))


def engine_speed(m, prompt: list[int], n: int) -> float:
    st = m.new_state()
    lg = m.forward(np.array(prompt), st, last_only=True)
    steps = []
    for _ in range(n):
        a = time.perf_counter()
        lg = m.forward(np.array([int(lg[-1].argmax())]), st, last_only=True)
        steps.append(time.perf_counter() - a)
    return 1.0 / float(np.median(steps))


def corpus_kl(cand, ckpt: Path, tok, n_windows: int, threads: int) -> dict:
    """Mean next-token KL / top-1 / perplexity ratio vs the float32 reference on the eval corpus.

    Same definitions and windows as ``cellm.eval.evaluate`` (``<bos>`` + 511 corpus tokens per window,
    KL on the reference's top-256 + tail bucket), scored on the first ``n_windows`` windows. The
    reference statistics come from the eval cache (``cellm eval`` computes them once per checkpoint);
    missing, they are computed here with the numpy runtime (slow).
    """
    import importlib
    import math

    from cellm.eval import data, metrics, reference
    from cellm.eval.runner import teacher_forced
    from cellm.runtime import load_model

    ev = importlib.import_module("cellm.eval.evaluate")
    _, ref_id, _ = ev._resolve(str(ckpt))
    text, csha = data.read_text(None, data.DEFAULT_CORPUS)
    ptext, psha = data.read_text(None, data.DEFAULT_PROMPTS)
    ids = tok.encode(text, add_bos=False)
    windows = data.corpus_windows(ids, tok.bos_id, ev.DEFAULT_WINDOW)
    key = reference.cache_key(ref=ref_id, corpus=csha, prompts=psha, window=ev.DEFAULT_WINDOW, k=ev.DEFAULT_TOP_K,
                              gen=ev.DEFAULT_GEN_TOKENS, max_tokens=None)
    stats = reference.load(reference.cache_dir(), key)
    windows = windows[:n_windows]
    if stats is None:
        log("reference statistics not cached: computing them with the numpy runtime (float32)")
        stats = reference.compute(load_model(str(ckpt), threads=threads), windows, [], k=ev.DEFAULT_TOP_K,
                                  gen_tokens=0, stop_ids=[1], key=key)
    kl, top1, tlp, off = [], [], [], [0]

    def consume(lp: np.ndarray, tgt: np.ndarray) -> None:
        a, b = off[0], off[0] + len(tgt)
        kl.append(metrics.kl_topk(stats.top_idx[a:b], stats.top_lp[a:b], lp))
        top1.append(np.argmax(lp, axis=-1) == stats.top_idx[a:b, 0])
        tlp.append(np.take_along_axis(lp, tgt[:, None], -1)[:, 0])
        off[0] = b

    teacher_forced(cand, windows, consume)
    n = off[0]
    nll_c = -np.concatenate(tlp).astype(np.float64)
    nll_r = -stats.target_lp[:n].astype(np.float64)
    return {"kl": float(np.concatenate(kl).mean()), "top1": float(np.concatenate(top1).mean()),
            "ppl_ratio": float(math.exp(nll_c.mean() - nll_r.mean())), "tokens": n}


def _ratio_cell(r: dict) -> str:
    if "ratio" not in r:
        return "–"
    lo, hi = r["ratio_range"]
    return f"{r['ratio']:.2f}× [{lo:.2f}-{hi:.2f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=None, help="HF-layout checkpoint dir (default: the embedded 270M)")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "cellm" / "bench" / "onnx"))
    ap.add_argument("--profiles", default="int8-v1,mixed-int4,mixed-int4-gemma3,int4-g32,int4-g32-gptq-sym,int4-g64-gptq-sym",
                    help="comma-separated shipped profile names or profile TOML paths; suffix +r = export with "
                         "--int8-residual, @1 = accuracy level 1 (default: level 4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-kl", action="store_true")
    ap.add_argument("--kl-windows", type=int, default=8, help="corpus windows of 512 tokens scored for KL")
    ap.add_argument("--no-builder", action="store_true")
    args = ap.parse_args(argv)

    import onnxruntime_genai as og

    from cellm.config import GemmaTextConfig
    from cellm.onnx_export import load_ort_model
    from cellm.runtime.tokenizer import Tokenizer

    if args.source:
        ckpt = Path(args.source)
    else:
        from cellm.sources.default_model import ensure_default_checkpoint

        ckpt = Path(ensure_default_checkpoint())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = GemmaTextConfig.from_hf(json.loads((ckpt / "config.json").read_text()))
    rows: dict[str, dict] = {}
    for prof in [p for p in args.profiles.split(",") if p]:
        rows[f"cellm {spec_label(prof)}"] = {"dir": build_ours(ckpt, work, prof), "ours": True}
    if not args.no_builder:
        rows["builder int4 (-p int4 -e cpu)"] = {"dir": build_builder(ckpt, work), "ours": False}
    for r in rows.values():
        set_threads(r["dir"], args.threads)
        r["bytes"] = model_bytes(r["dir"])

    tok = Tokenizer.for_artifact(ckpt)
    prompt = tok.encode("The capital of France is", add_bos=True)
    log(f"speed: {len(prompt)}-token prompt, {args.decode_tokens} decode tokens, {args.reps} interleaved reps")
    for rep in range(args.reps):  # one model in memory at a time (the f16-embedding exports are large)
        order = list(rows.items())
        for k, r in (order if rep % 2 == 0 else order[::-1]):  # alternate the order: no position bias
            model = og.Model(str(r["dir"]))
            genai_speed(model, prompt, 4)  # warm-up
            pf, tps = genai_speed(model, prompt, args.decode_tokens)
            del model
            r.setdefault("prefill", []).append(pf)
            r.setdefault("decode", []).append(tps)
            if r["ours"]:
                eng = load_ort_model(r["dir"], threads=args.threads)
                engine_speed(eng, prompt, 4)
                r.setdefault("engine", []).append(engine_speed(eng, prompt, args.decode_tokens))
                del eng
            log(f"  rep {rep} {k}: prefill {1000 * pf:.1f} ms, decode {tps:.1f} tok/s")
    if not args.no_kl:
        for k, r in rows.items():
            log(f"KL {k}")
            r.update(corpus_kl(GenaiLM(r["dir"], cfg), ckpt, tok, args.kl_windows, args.threads))

    base = rows.get("builder int4 (-p int4 -e cpu)")
    lines = [f"| export | MB on disk | prefill ms ({len(prompt)} tok) | decode tok/s (genai) | vs builder | decode tok/s (cellm engine) "
             "| mean KL | top-1 | ppl ratio |", "|---|---|---|---|---|---|---|---|---|"]
    result = {}
    for k, r in rows.items():
        dec = max(r["decode"])
        if base:  # paired per-rep ratios: each rep runs every model back to back
            ratios = [a / b for a, b in zip(r["decode"], base["decode"])]
            r["ratio"], r["ratio_range"] = float(np.median(ratios)), (min(ratios), max(ratios))
        eng = f"{max(r['engine']):.1f}" if "engine" in r else "–"
        kl = f"{r['kl']:.4f}" if "kl" in r else "–"
        t1 = f"{r['top1']:.3f}" if "top1" in r else "–"
        pr = f"{r['ppl_ratio']:.3f}" if "ppl_ratio" in r else "–"
        lines.append(f"| {k} | {r['bytes'] / 1e6:.1f} | {1000 * min(r['prefill']):.1f} | {dec:.1f} | {_ratio_cell(r)} | {eng} "
                     f"| {kl} | {t1} | {pr} |")
        result[k] = {x: (str(v) if isinstance(v, Path) else v) for x, v in r.items()}
    if base and "kl" in base:
        dom = [k for k, r in rows.items() if r["ours"] and r["bytes"] <= base["bytes"]
               and r["ratio"] >= 1.0 and r.get("kl", 9e9) < base["kl"]]
        target = [k for k, r in rows.items() if r["ours"] and r.get("kl", 9e9) <= 0.05
                  and r["ratio"] >= 1.2]
        lines.append("")
        lines.append(f"dominates the builder (bytes <=, median paired decode ratio >= 1.0x, KL <): {', '.join(dom) or 'none'}")
        lines.append(f"target (KL <= 0.05 and median paired decode ratio >= 1.2x): {', '.join(target) or 'none'}")
    lines.append(f"\nthreads={args.threads}, load average at end: {os.getloadavg()[0]:.1f} "
                 f"(decode: best of {args.reps} interleaved reps, ratio: median of paired per-rep ratios [min-max]; KL over {rows[next(iter(rows))].get('tokens', '?')} tokens)")
    table = "\n".join(lines)
    print(table)
    (work / "onnx_decode.md").write_text(table + "\n")
    (work / "onnx_decode.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
