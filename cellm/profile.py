"""Profiles: declarative tensor-selection rules (``cellm/profiles/*.toml``).

A profile is an ordered list of rules; for each tensor of a checkpoint the FIRST rule whose
``pattern`` (a Python regex, full-matched against the Hugging Face tensor name) matches — and whose
optional ``ndim`` equals the tensor's rank — decides the quantization scheme::

    name = "int8-v1"
    description = "..."
    gate_class = "int8"            # which quality-gate thresholds apply: int8 | int4 | f16

    [[rules]]
    pattern = 'model\\.layers\\.\\d+(\\..*)?\\.(self_attn|mlp)\\..*\\.weight'
    ndim = 2                       # optional: only tensors of this rank
    scheme = "i8"                  # a registered scheme name (cellm.quant.schemes)
    note = "decoder projections"   # optional

``Profile.plan(shapes)`` checks the rules against a checkpoint (every rule must match something,
every tensor must be covered, quantized schemes only on 2-D tensors) and returns a :class:`Plan`
with per-tensor schemes and byte counts (including companion ``.qscale``/``.qzero`` tensors).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from cellm.errors import CellmError, ProfileError

GATE_CLASSES = ("int8", "int4", "f16")
_PROFILE_KEYS = {"name", "description", "gate_class", "rules"}
_RULE_KEYS = {"pattern", "scheme", "note", "ndim"}
_UNQUANTIZED_DTYPES = ("f16", "f32", "bf16")


def _get_scheme(name: str):
    from cellm.quant.schemes import get_scheme

    return get_scheme(name)


@dataclasses.dataclass(frozen=True)
class Rule:
    index: int  # 1-based position in the file (what error messages print)
    pattern: str
    scheme: str
    note: str = ""
    ndim: int | None = None

    def matches(self, name: str, shape: tuple[int, ...]) -> bool:
        if self.ndim is not None and len(shape) != self.ndim:
            return False
        return re.fullmatch(self.pattern, name) is not None

    def describe(self) -> str:
        cond = f" ndim={self.ndim}" if self.ndim is not None else ""
        return f"rule {self.index} pattern {self.pattern!r}{cond} -> {self.scheme}"


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    name: str
    shape: tuple[int, ...]
    scheme: str
    dtype: str
    rule: int
    nbytes: int  # main tensor + companions
    specs: tuple  # tuple[TensorSpec, ...] as the scheme lays them out

    @property
    def quantized(self) -> bool:
        return self.dtype not in _UNQUANTIZED_DTYPES


@dataclasses.dataclass(frozen=True)
class Plan:
    profile: str
    entries: tuple[PlanEntry, ...]  # sorted by tensor name

    @property
    def bytes_per_scheme(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.scheme] = out.get(e.scheme, 0) + e.nbytes
        return dict(sorted(out.items()))

    @property
    def tensors_per_scheme(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.scheme] = out.get(e.scheme, 0) + 1
        return dict(sorted(out.items()))

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def schemes(self) -> dict[str, str]:
        """tensor -> scheme for every tensor."""
        return {e.name: e.scheme for e in self.entries}

    def entry(self, name: str) -> PlanEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    def specs(self) -> list:
        return [s for e in self.entries for s in e.specs]

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "tensors": [
                {"name": e.name, "shape": list(e.shape), "scheme": e.scheme, "dtype": e.dtype,
                 "rule": e.rule, "bytes": e.nbytes}
                for e in self.entries
            ],
            "bytes_per_scheme": self.bytes_per_scheme,
            "tensors_per_scheme": self.tensors_per_scheme,
            "total_bytes": self.total_bytes,
        }


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    description: str
    gate_class: str
    rules: tuple[Rule, ...]
    path: str
    content_hash: str  # sha256 of the canonical file bytes (LF line endings)

    def scheme_for(self, name: str, shape: tuple[int, ...]) -> Rule | None:
        for r in self.rules:
            if r.matches(name, shape):
                return r
        return None

    def plan(self, shapes: Mapping[str, tuple[int, ...]]) -> Plan:
        """Assign a scheme to every tensor; raise ProfileError on any rule/coverage problem."""
        used: set[int] = set()
        entries: list[PlanEntry] = []
        uncovered: list[str] = []
        for name in sorted(shapes):
            shape = tuple(int(d) for d in shapes[name])
            rule = self.scheme_for(name, shape)
            if rule is None:
                uncovered.append(f"{name} {list(shape)}")
                continue
            used.add(rule.index)
            scheme = _get_scheme(rule.scheme)
            if scheme.dtype not in _UNQUANTIZED_DTYPES and len(shape) != 2:
                raise ProfileError(
                    f"profile {self.name!r}: {rule.describe()} puts quantized scheme "
                    f"{rule.scheme!r} on {len(shape)}-D tensor {name} {list(shape)}; quantized "
                    f"schemes need 2-D weights (add ndim = 2 to the rule)"
                )
            try:
                specs = tuple(scheme.specs(name, shape))
            except CellmError as exc:
                raise ProfileError(
                    f"profile {self.name!r}: {rule.describe()} cannot lay out {name} "
                    f"{list(shape)}: {exc}"
                ) from exc
            entries.append(
                PlanEntry(
                    name=name, shape=shape, scheme=rule.scheme, dtype=scheme.dtype,
                    rule=rule.index, nbytes=sum(int(s.nbytes) for s in specs), specs=specs,
                )
            )
        if uncovered:
            two_d = [u for u in uncovered if u.count(",") == 1]
            what = "2-D weight" if two_d else "tensor"
            lst = two_d or uncovered
            raise ProfileError(
                f"profile {self.name!r}: {len(lst)} {what}(s) covered by no rule, e.g. "
                f"{', '.join(lst[:3])}; add a rule (a final pattern = '.*' with scheme = \"f16\" "
                f"keeps them unquantized)"
            )
        for r in self.rules:
            if r.index not in used:
                raise ProfileError(
                    f"profile {self.name!r}: {r.describe()} matched nothing "
                    f"(or only tensors an earlier rule already took) among {len(shapes)} tensors"
                )
        return Plan(profile=self.name, entries=tuple(entries))


def profiles_dir() -> Path:
    return Path(str(resources.files("cellm") / "profiles"))


def list_profiles() -> list[str]:
    """Names of the shipped profiles (files under cellm/profiles/)."""
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a shipped profile by name (``int8-v1``) or any profile TOML file by path."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    s = str(name_or_path)
    shipped = profiles_dir() / f"{s}.toml"
    if "/" not in s and not s.endswith(".toml") and shipped.is_file():
        path = shipped
    else:
        path = Path(s)
        if not path.is_file():
            raise ProfileError(
                f"unknown profile {s!r}: not a shipped profile ({', '.join(list_profiles())}) "
                f"and not a file"
            )
    return parse_profile(path.read_bytes(), str(path))


def parse_profile(data: bytes, where: str = "<profile>") -> Profile:
    canonical = data.replace(b"\r\n", b"\n")
    try:
        doc = tomllib.loads(canonical.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{where}: not UTF-8 text ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{where}: invalid TOML: {exc}") from exc
    extra = set(doc) - _PROFILE_KEYS
    if extra:
        raise ProfileError(f"{where}: unknown key(s) {sorted(extra)}; allowed: {sorted(_PROFILE_KEYS)}")
    name = doc.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ProfileError(f"{where}: name={name!r} must be a non-empty [A-Za-z0-9._-] string")
    gate = doc.get("gate_class")
    if gate not in GATE_CLASSES:
        raise ProfileError(f"{where}: gate_class={gate!r} must be one of {list(GATE_CLASSES)}")
    desc = doc.get("description", "")
    if not isinstance(desc, str):
        raise ProfileError(f"{where}: description must be a string, got {desc!r}")
    raw_rules = doc.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise ProfileError(f"{where}: needs at least one [[rules]] table, got {raw_rules!r}")
    rules = tuple(_parse_rule(i + 1, r, where) for i, r in enumerate(raw_rules))
    return Profile(
        name=name, description=desc, gate_class=gate, rules=rules, path=where,
        content_hash=hashlib.sha256(canonical).hexdigest(),
    )


def _parse_rule(index: int, raw: Any, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: rule {index} must be a table, got {raw!r}")
    extra = set(raw) - _RULE_KEYS
    if extra:
        raise ProfileError(f"{where}: rule {index} has unknown key(s) {sorted(extra)}; allowed: {sorted(_RULE_KEYS)}")
    pattern, scheme = raw.get("pattern"), raw.get("scheme")
    if not isinstance(pattern, str) or not pattern:
        raise ProfileError(f"{where}: rule {index} pattern={pattern!r} must be a non-empty string")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ProfileError(f"{where}: rule {index} pattern {pattern!r} is not a valid regex: {exc}") from exc
    if not isinstance(scheme, str):
        raise ProfileError(f"{where}: rule {index} scheme={scheme!r} must be a string")
    try:
        _get_scheme(scheme)
    except (CellmError, KeyError) as exc:
        raise ProfileError(f"{where}: rule {index} uses unknown scheme {scheme!r}: {exc}") from exc
    ndim = raw.get("ndim")
    if ndim is not None and (isinstance(ndim, bool) or not isinstance(ndim, int) or not 1 <= ndim <= 8):
        raise ProfileError(f"{where}: rule {index} ndim={ndim!r} must be an integer in [1, 8]")
    note = raw.get("note", "")
    if not isinstance(note, str):
        raise ProfileError(f"{where}: rule {index} note={note!r} must be a string")
    return Rule(index=index, pattern=pattern, scheme=scheme, note=note, ndim=ndim)
