"""GGUF -> Hugging Face layout: dequantize, rename, undo the ``1 + w`` norm offset, rebuild config/tokenizer.

Only ``general.architecture == "gemma3"`` is accepted. Every tensor is dequantized with
``gguf.quants.dequantize`` and written as F32 safetensors (so the dequantized values are kept
exactly), tensor by tensor and in row chunks, so memory stays around one chunk plus the largest
non-embedding tensor. Name map (llama.cpp -> transformers)::

    token_embd                 -> model.embed_tokens          output_norm       -> model.norm
    blk.N.attn_{q,k,v,output}  -> model.layers.N.self_attn.{q,k,v,o}_proj
    blk.N.attn_{q,k}_norm      -> ...self_attn.{q,k}_norm     blk.N.attn_norm   -> ...input_layernorm
    blk.N.post_attention_norm  -> ...post_attention_layernorm blk.N.ffn_norm    -> ...pre_feedforward_layernorm
    blk.N.post_ffw_norm        -> ...post_feedforward_layernorm
    blk.N.ffn_{gate,up,down}   -> ...mlp.{gate,up,down}_proj  output            -> lm_head (untied only)

GGUF stores Gemma norms as ``1 + w``; HF stores ``w``, so 1 is subtracted from every norm. Gemma
needs no Q/K permutation. The GGUF lacks the local RoPE base and the layer pattern: 10000 and
5 sliding + 1 full are used (as transformers' GGUF loader does through the Gemma3 config defaults).

The metadata parser is our own (``gguf.GGUFReader`` takes ~30 s on a 262k-token vocabulary; this one
well under a second) and bounds-checks every count against the file size.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from cellm.config import FULL, SLIDING, GemmaTextConfig, RopeSpec
from cellm.errors import ConfigError, SourceError
from cellm.names import expected_tensors
from cellm.sources.gguf_tokenizer import tokenizer_json_from_vocab
from cellm.sources.safetensors_io import StreamingWriter, write_file_atomic

SUPPORTED_ARCHITECTURES = ("gemma3",)
GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
CHUNK_ELEMS = 1 << 23  # rows per dequantization chunk ~= 32 MiB of float32

_LAYER_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_MAP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")

# GGUF value types: struct format for scalars
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: int
    shape: tuple[int, ...]  # numpy order (rows first), i.e. GGUF dims reversed
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise SourceError(
                f"{self.path}: GGUF truncated or corrupt reading {what} at offset {self.pos} "
                f"(needs {n} bytes, file has {self.size})"
            )

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str) -> Any:
        if vtype == STRING:
            return self.string(what)
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype], what)
        if vtype == ARRAY:
            sub = self.unpack("<I", what)
            count = self.unpack("<Q", what)
            if sub == STRING:
                self.need(count * 8, what)
                return [self.string(what) for _ in range(count)]
            if sub in _NP:
                width = np.dtype(_NP[sub]).itemsize
                self.need(count * width, what)
                arr = np.frombuffer(self.buf, dtype=_NP[sub], count=count, offset=self.pos).copy()
                self.pos += count * width
                return [bool(x) for x in arr] if sub == 7 else arr.tolist()
            if sub == ARRAY:
                self.need(count * 12, what)
                return [self.value(ARRAY, what) for _ in range(count)]
            raise SourceError(f"{self.path}: unknown GGUF array element type {sub} in {what}")
        raise SourceError(f"{self.path}: unknown GGUF value type {vtype} in {what}")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF v2/v3 header: metadata dict and tensor table (absolute offsets, bounds-checked)."""
    import gguf  # for the quantization block sizes

    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise SourceError(f"cannot open GGUF {path}: {exc}") from exc
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 24:
            raise SourceError(f"{path}: not a GGUF file ({size} bytes)")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            cur = _Cursor(mm, path)
            if bytes(mm[:4]) != GGUF_MAGIC:
                raise SourceError(f"{path}: bad GGUF magic {bytes(mm[:4])!r}, expected {GGUF_MAGIC!r}")
            cur.pos = 4
            version = cur.unpack("<I", "version")
            if version not in (2, 3):
                raise SourceError(f"{path}: GGUF version {version} unsupported; supported: 2, 3")
            n_tensors = cur.unpack("<Q", "tensor count")
            n_kv = cur.unpack("<Q", "kv count")
            if n_tensors > size // 24 or n_kv > size // 12:
                raise SourceError(f"{path}: GGUF counts tensors={n_tensors} kv={n_kv} exceed the file size {size}")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string("metadata key")
                vtype = cur.unpack("<I", key)
                meta[key] = cur.value(vtype, key)
            infos = []
            for _ in range(n_tensors):
                name = cur.string("tensor name")
                nd = cur.unpack("<I", name)
                if nd > 8:
                    raise SourceError(f"{path}: tensor {name!r} has {nd} dimensions (max 8)")
                dims = [cur.unpack("<Q", name) for _ in range(nd)]
                qtype = cur.unpack("<I", name)
                off = cur.unpack("<Q", name)
                infos.append((name, tuple(reversed(dims)), qtype, off))
            align = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
            if align <= 0 or align & (align - 1):
                raise SourceError(f"{path}: general.alignment={align} must be a power of two")
            data_start = cur.pos + (-cur.pos % align)
        finally:
            mm.close()
    tensors: dict[str, GGUFTensor] = {}
    for name, shape, qtype, off in infos:
        try:
            block, tsize = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        except (ValueError, KeyError) as exc:
            raise SourceError(f"{path}: tensor {name!r} has unknown GGML type {qtype}") from exc
        n_el = int(np.prod(shape, dtype=np.int64))
        if shape and shape[-1] % block:
            raise SourceError(f"{path}: tensor {name!r} row length {shape[-1]} not a multiple of block {block}")
        nbytes = n_el // block * tsize
        if data_start + off + nbytes > size:
            raise SourceError(
                f"{path}: tensor {name!r} [{data_start + off}, {data_start + off + nbytes}) exceeds the file ({size} bytes)"
            )
        if name in tensors:
            raise SourceError(f"{path}: duplicate tensor name {name!r}")
        tensors[name] = GGUFTensor(name, qtype, shape, data_start + off, nbytes)
    return GGUFFile(path, meta, tensors)


def hf_name(gguf_name: str) -> str | None:
    """The transformers name for a llama.cpp Gemma-3 tensor name (None if unknown)."""
    m = _BLK.match(gguf_name)
    if m:
        part = _LAYER_MAP.get(m.group(2))
        return None if part is None else f"model.layers.{int(m.group(1))}.{part}.weight"
    if gguf_name.endswith(".weight") and gguf_name[: -len(".weight")] in _TOP_MAP:
        return _TOP_MAP[gguf_name[: -len(".weight")]] + ".weight"
    return None


def is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def architecture(gf: GGUFFile) -> str:
    arch = gf.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise SourceError(
            f"GGUF architecture {arch!r} unsupported; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            f"({gf.path})"
        )
    return str(arch)


def config_from_gguf(gf: GGUFFile) -> GemmaTextConfig:
    """A GemmaTextConfig from the GGUF metadata (+ the Gemma-3 defaults the GGUF lacks)."""
    arch = architecture(gf)
    m = gf.metadata

    def get(key: str, default: Any = None) -> Any:
        v = m.get(f"{arch}.{key}", default)
        if v is None:
            raise SourceError(f"{gf.path}: GGUF metadata lacks {arch}.{key}")
        return v

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    n_layers = int(get("block_count"))
    head_dim = int(get("attention.key_length", hidden // max(heads, 1)))
    emb = gf.tensors.get("token_embd.weight")
    tokens = m.get("tokenizer.ggml.tokens")
    vocab = emb.shape[0] if emb is not None else len(tokens or [])
    eps = float(f"{float(get('attention.layer_norm_rms_epsilon', 1e-6)):.7g}")  # stored as f32
    factor = 1.0
    if str(m.get(f"{arch}.rope.scaling.type", "none")) == "linear":
        factor = float(m.get(f"{arch}.rope.scaling.factor", 1.0))
    eos = int(m.get("tokenizer.ggml.eos_token_id", 1))
    eos_ids = [eos]
    if tokens and "<end_of_turn>" in tokens[:1024]:
        eot = tokens.index("<end_of_turn>")
        if eot != eos:
            eos_ids.append(eot)
    # Gemma-3 27B (62 layers) scales queries by hidden/heads; the others by head_dim (llama.cpp does the same)
    qpas = hidden // heads if n_layers == 62 else head_dim
    try:
        return GemmaTextConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=eps,
            rope_global=RopeSpec(float(get("rope.freq_base", 1_000_000.0)), factor),
            rope_local=RopeSpec(10_000.0),
            sliding_window=int(get("attention.sliding_window", 512)),
            layer_types=tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n_layers)),
            query_pre_attn_scalar=float(qpas),
            max_position_embeddings=int(get("context_length", 32768)),
            bos_token_id=int(m.get("tokenizer.ggml.bos_token_id", 2)),
            eos_token_ids=tuple(eos_ids),
            pad_token_id=int(m.get("tokenizer.ggml.padding_token_id", 0)),
            tie_word_embeddings="output.weight" not in gf.tensors,
        )
    except (TypeError, ValueError) as exc:
        raise SourceError(f"{gf.path}: GGUF metadata does not describe a valid Gemma-3 config: {exc}") from exc


def tokenizer_from_gguf(gf: GGUFFile) -> dict[str, Any]:
    m = gf.metadata
    model = m.get("tokenizer.ggml.model")
    if model != "llama":
        raise SourceError(
            f"{gf.path}: GGUF tokenizer model {model!r} unsupported; supported: 'llama' (SentencePiece)"
        )
    tokens = m.get("tokenizer.ggml.tokens")
    if not tokens:
        raise SourceError(f"{gf.path}: GGUF has no tokenizer.ggml.tokens")
    types = m.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    return tokenizer_json_from_vocab(
        tokens,
        types,
        bos_id=int(m.get("tokenizer.ggml.bos_token_id", 2)),
        unk_id=int(m.get("tokenizer.ggml.unknown_token_id", 3)),
        add_bos=bool(m.get("tokenizer.ggml.add_bos_token", True)),
    )


def _pread(fd: int, offset: int, nbytes: int) -> np.ndarray:
    buf = np.empty(nbytes, dtype=np.uint8)
    view, done = memoryview(buf), 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise SourceError(f"unexpected end of GGUF file at offset {offset + done}")
        done += got
    return buf


def dequantize_rows(fd: int, t: GGUFTensor, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of tensor ``t`` (first numpy axis; a 1-D tensor is one row) as float32."""
    import gguf

    qtype = gguf.GGMLQuantizationType(t.qtype)
    shape2 = (int(np.prod(t.shape[:-1], dtype=np.int64)), t.shape[-1]) if len(t.shape) > 1 else (1, t.shape[0])
    row_bytes = t.nbytes // shape2[0]
    raw = _pread(fd, t.offset + r0 * row_bytes, (r1 - r0) * row_bytes).reshape(r1 - r0, row_bytes)
    out = np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(r1 - r0, shape2[1])
    return out


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress=None) -> dict[str, Any]:
    """Write an HF-layout checkpoint for a Gemma-3 GGUF into ``out_dir`` (created, must be empty).

    Files: ``config.json`` (transformers-5 style), ``model.safetensors`` (F32), ``tokenizer.json``,
    ``tokenizer_config.json``, ``generation_config.json``. Deterministic: the same GGUF gives the same
    bytes. Returns a summary dict (tensor count, per-GGML-type counts).
    """
    import gguf

    gf = read_gguf(gguf_path)
    architecture(gf)
    cfg = config_from_gguf(gf)
    expected = expected_tensors(cfg)
    mapping: dict[str, GGUFTensor] = {}
    for name, t in gf.tensors.items():
        hn = hf_name(name)
        if hn is None:
            raise SourceError(f"{gf.path}: GGUF tensor {name!r} has no Gemma-3 mapping")
        if hn not in expected:
            raise SourceError(f"{gf.path}: GGUF tensor {name!r} -> {hn!r} not expected for this config")
        if tuple(t.shape) != expected[hn]:
            raise SourceError(
                f"{gf.path}: GGUF tensor {name!r} has shape {list(t.shape)}; config expects {list(expected[hn])}"
            )
        mapping[hn] = t
    missing = sorted(set(expected) - set(mapping))
    if missing:
        raise SourceError(f"{gf.path}: GGUF lacks {len(missing)} Gemma-3 tensors, e.g. {missing[0]!r}")
    tok = tokenizer_from_gguf(gf)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SourceError(f"GGUF conversion target {out} is not empty")
    specs = {n: ("F32", tuple(t.shape)) for n, t in mapping.items()}
    writer = StreamingWriter(out / "model.safetensors", specs)
    types: dict[str, int] = {}
    fd = os.open(gf.path, os.O_RDONLY)
    try:
        for i, name in enumerate(writer.names):
            t = mapping[name]
            qname = gguf.GGMLQuantizationType(t.qtype).name
            types[qname] = types.get(qname, 0) + 1
            rows = t.shape[0] if len(t.shape) > 1 else 1
            step = max(1, CHUNK_ELEMS // max(1, t.shape[-1]))
            for r0 in range(0, rows, step):
                block = dequantize_rows(fd, t, r0, min(rows, r0 + step))
                if is_norm(name):
                    block = block - np.float32(1.0)
                if len(t.shape) == 1:
                    block = block.reshape(t.shape)
                writer.write(name, block)
            if progress is not None:
                progress(i + 1, len(writer.names), name)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        os.close(fd)

    def dump(obj: Any) -> bytes:
        return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()

    try:
        hf_cfg = cfg.to_hf_dict(5)
    except ConfigError as exc:
        raise SourceError(str(exc)) from exc
    write_file_atomic(out / "config.json", dump(hf_cfg))
    write_file_atomic(out / "tokenizer.json", json.dumps(tok, ensure_ascii=False, separators=(",", ":")).encode())
    toks = tok["model"]["vocab"]
    inv = {v: k for k, v in toks.items()}
    m = gf.metadata
    tok_cfg = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": bool(m.get("tokenizer.ggml.add_bos_token", True)),
        "add_eos_token": bool(m.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": inv.get(cfg.bos_token_id),
        "eos_token": inv.get(int(m.get("tokenizer.ggml.eos_token_id", 1))),
        "pad_token": inv.get(cfg.pad_token_id),
        "unk_token": inv.get(int(m.get("tokenizer.ggml.unknown_token_id", 3))),
        "padding_side": "left",
        "model_max_length": cfg.max_position_embeddings,
    }
    write_file_atomic(out / "tokenizer_config.json", dump(tok_cfg))
    gen = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids),
        "pad_token_id": cfg.pad_token_id,
    }
    write_file_atomic(out / "generation_config.json", dump(gen))
    return {"tensors": len(mapping), "ggml_types": dict(sorted(types.items())), "architecture": "gemma3"}


GGUF_BUILDER_VERSION = 1


def open_gguf(path: str | os.PathLike, spec: str | None = None):
    """Open a ``.gguf`` file as a Checkpoint: converted once into ``<cache>/gguf/<sha256>/``."""
    from cellm.sources.cache import cache_root, cached_sha256, file_lock, install_build, remove_stale_staging, verify_build
    from cellm.sources.checkpoint import Checkpoint

    src = Path(path)
    if not src.is_file():
        raise SourceError(f"GGUF file {src} does not exist")
    gf = read_gguf(src)
    architecture(gf)  # fail fast, before hashing
    digest = cached_sha256(src)
    root = cache_root() / "gguf"
    target = root / digest
    if not (target.is_dir() and not verify_build(target, builder_version=GGUF_BUILDER_VERSION)):
        with file_lock(root / f".{digest}.lock"):
            if not (target.is_dir() and not verify_build(target, builder_version=GGUF_BUILDER_VERSION)):
                remove_stale_staging(root, digest)
                staging = root / f".{digest}.build-{os.getpid()}"
                import shutil

                try:
                    summary = convert_gguf(src, staging)
                    install_build(
                        staging,
                        target,
                        {
                            "name": src.stem,
                            "builder_version": GGUF_BUILDER_VERSION,
                            "source": {"gguf_sha256": digest, "gguf_size": src.stat().st_size},
                            "conversion": summary,
                        },
                    )
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
    build = json.loads((target / "BUILD.json").read_text())
    return Checkpoint(
        target,
        name=src.stem,
        provenance={
            "spec": spec or str(src),
            "repo": str(gf.metadata.get("general.name") or src.name),
            "revision": None,
            "commit": None,
            "gguf_sha256": digest,
        },
        known_hashes=build.get("files"),
    )
