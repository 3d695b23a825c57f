"""`cellm export-onnx FILE.cellm -o DIR`: an onnxruntime / onnxruntime-genai model folder."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="export a .cellm file to ONNX (MatMulNBits from the stored bits) + genai_config.json",
    )
    p.add_argument("model", help="the .cellm file")
    p.add_argument("-o", "--output", required=True, help="output directory (created atomically)")
    p.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4),
                   help="MatMulNBits accuracy_level: 4 = int8 activations (fast CPU path, default), 1 = fp32")
    p.add_argument("--int8-residual", action="store_true",
                   help="level 4 only: feed each MatMulNBits an exactly-rounded int8 part of the activations plus "
                        "the remainder: level-1 accuracy from the int8 kernels (measured on the 270M: top-1 100%% vs "
                        "96%% plain level 4) at 0.6-0.7x level 4's decode speed (level 1: ~0.3x)")
    p.add_argument("--context-length", type=int, default=None,
                   help="RoPE table / genai context length (default: max_position_embeddings)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cellm.onnx_export import export_onnx

    out = export_onnx(args.model, args.output, accuracy_level=args.accuracy_level, force=args.force,
                      context_length=args.context_length, int8_residual=args.int8_residual)
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out}/ ({total / 1e6:.1f} MB): model.onnx + model.onnx.data, genai_config.json, tokenizer files")
    return 0
