"""`cellm inspect FILE`: header summary, config, tensor table, bytes per dtype, extensions."""

from __future__ import annotations

import json

from cellm.cli.cmd_convert import HelpFormatter

from cellm.errors import CellmError

_SUMMARY_KEYS = (
    "model_type", "vocab_size", "hidden_dim", "intermediate_size", "num_layers", "num_heads",
    "num_kv_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
    "tie_word_embeddings", "bos_token_id", "eos_token_id",
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show a .cellm file's header, config and tensor table",
        description="Print the header summary (upstream keys and cellm_* provenance), the parsed "
                    "Gemma-3 config, every tensor (dtype, shape, offset, bytes), bytes per dtype and "
                    "the extension dtypes used. Use `cellm validate` to check the file.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="the .cellm file")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from cellm.format import DTYPES, CellmReader

    with CellmReader(args.file) as r:
        h = r.header
        tensors = sorted(r.tensors.values(), key=lambda t: t.offset)
        per_dtype: dict[str, int] = {}
        for t in tensors:
            per_dtype[t.dtype] = per_dtype.get(t.dtype, 0) + t.nbytes
        exts = sorted({t.dtype for t in tensors if t.dtype in DTYPES and DTYPES[t.dtype].is_extension})
        try:
            cfg = r.config
            cfg_d = cfg.to_hf_dict(5)
        except (CellmError, ValueError) as exc:
            cfg_d = {"error": str(exc)}
        summary = {k: h[k] for k in _SUMMARY_KEYS if k in h}
        cellm_keys = {k: v for k, v in h.items() if k.startswith("cellm_") and k != "cellm_schemes"}
        if args.json:
            print(json.dumps({
                "path": str(args.file), "file_size": r.file_size, "header": summary,
                "cellm": cellm_keys, "schemes": h.get("cellm_schemes", {}), "config": cfg_d,
                "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
                             "offset": t.offset, "nbytes": t.nbytes} for t in tensors],
                "bytes_per_dtype": dict(sorted(per_dtype.items())), "extensions": exts,
            }, indent=2))
            return 0
        print(f"{args.file}: {r.file_size:,} bytes, {len(tensors)} tensors, header {r.header_len:,} bytes")
        for k, v in summary.items():
            print(f"  {k:<24} {v}")
        for k, v in cellm_keys.items():
            print(f"  {k:<24} {json.dumps(v)}")
        print("config:")
        for k in ("layer_types", "sliding_window", "query_pre_attn_scalar", "rope_parameters"):
            if k in cfg_d:
                print(f"  {k:<24} {json.dumps(cfg_d[k])}")
        if "error" in cfg_d:
            print(f"  error: {cfg_d['error']}")
        schemes = h.get("cellm_schemes", {}) if isinstance(h.get("cellm_schemes"), dict) else {}
        w = max([len(t.name) for t in tensors] + [6])
        print(f"{'tensor':<{w}}  {'dtype':<7} {'shape':<14} {'offset':>12} {'bytes':>12}  scheme")
        for t in tensors:
            print(f"{t.name:<{w}}  {t.dtype:<7} {'x'.join(map(str, t.shape)):<14} {t.offset:>12,} "
                  f"{t.nbytes:>12,}  {schemes.get(t.name, '')}")
        print("bytes per dtype:")
        for d, nb in sorted(per_dtype.items()):
            print(f"  {d:<8} {nb:>14,}")
        print(f"extensions: {', '.join(exts) if exts else 'none (cellm v1 dtypes only)'}")
    return 0
