"""`cellm generate FILE --prompt ...`: stream a continuation from a .cellm file (or a source)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with the numpy runtime (or onnxruntime)")
    p.add_argument("model", help=".cellm file, source spec / HF dir, or (onnxruntime) an ONNX export dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the Gemma chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--engine", choices=("numpy", "onnxruntime"), default="numpy")
    p.add_argument("--threads", type=int, default=None, help="BLAS threads (numpy engine)")
    p.add_argument("--max-context", type=int, default=None, help="refuse prompts longer than this")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cellm.runtime import load_model
    from cellm.runtime.generate import generate_text
    from cellm.runtime.sampling import SamplingParams
    from cellm.runtime.tokenizer import Tokenizer

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )
    if args.engine == "onnxruntime":
        from cellm.onnx_export.engine import load_ort_model

        model = load_ort_model(args.model, threads=args.threads)
        d = Path(args.model)
        tok = Tokenizer.for_artifact(d if d.is_dir() else d.parent)
        if args.max_context:
            model.max_context = args.max_context
    else:
        tok = Tokenizer.for_artifact(args.model)
        model = load_model(args.model, threads=args.threads, max_context=args.max_context)

    def out(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    if not args.chat:
        out(args.prompt)
    _, res = generate_text(model, tok, args.prompt, params, chat=args.chat, on_text=out)
    sys.stdout.write("\n")
    print(
        f"[{len(res.prompt_ids)} prompt tokens: prefill {res.prefill_tps:.1f} tok/s; "
        f"{len(res.new_ids)} new tokens: decode {res.decode_tps:.1f} tok/s; stop: {res.stop_reason}]",
        file=sys.stderr,
    )
    return 0
