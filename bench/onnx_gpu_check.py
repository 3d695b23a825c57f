"""GPU check for a cellm ONNX export: CUDA provider greedy parity with the CPU path + decode tokens/s.

Runs the same export folder twice with our engine (``cellm.onnx_export.engine``): once on
``CPUExecutionProvider`` and once on ``CUDAExecutionProvider`` (KV buffers on the device, bound
with IOBinding), compares the greedy continuations of a few prompts token by token, and times
decode. Prints one JSON object (and writes it to ``--json`` when given).

    python bench/onnx_gpu_check.py EXPORT_DIR [--tokens 64] [--json out.json]

Exit code 0 = CUDA available and greedy tokens identical, 1 = tokens differ, 3 = no CUDA provider
(records ``onnxruntime.get_available_providers()``; an onnxruntime-gpu wheel is needed). Not run
in CI; see docs/ONNX.md for when it was last run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a village at the edge of a great forest, there lived a girl who",
    "def fibonacci(n):",
]


def greedy(m, ids: list[int], n: int) -> tuple[list[int], float]:
    st = m.new_state()
    lg = m.forward(np.array(ids), st, last_only=True)
    out: list[int] = []
    t = time.perf_counter()
    for _ in range(n):
        tok = int(lg[-1].argmax())
        out.append(tok)
        lg = m.forward(np.array([tok]), st, last_only=True)
    return out, n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="CUDA vs CPU greedy parity for a cellm ONNX export")
    ap.add_argument("export_dir")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from cellm.onnx_export import load_ort_model
    from cellm.runtime.tokenizer import Tokenizer

    report: dict = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                    "export": args.export_dir}
    if "CUDAExecutionProvider" not in report["providers"]:
        report["status"] = "no CUDAExecutionProvider in this onnxruntime build"
        print(json.dumps(report, indent=2))
        return 3
    tok = Tokenizer.for_artifact(args.export_dir)
    cpu = load_ort_model(args.export_dir, threads=2)
    gpu = load_ort_model(args.export_dir, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    report["gpu_session_providers"] = gpu.session.get_providers()
    rows, same = [], True
    for text in PROMPTS:
        ids = tok.encode(text, add_bos=True)
        c, c_tps = greedy(cpu, ids, args.tokens)
        g, g_tps = greedy(gpu, ids, args.tokens)
        first_diff = next((i for i, (a, b) in enumerate(zip(c, g)) if a != b), None)
        same &= first_diff is None
        rows.append({"prompt": text, "identical": first_diff is None, "first_difference": first_diff,
                     "cpu_decode_tps": round(c_tps, 1), "gpu_decode_tps": round(g_tps, 1)})
    report.update(status="ok" if same else "greedy tokens differ", prompts=rows)
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
