"""Artifact names, versions, channels and references (``NAME``, ``NAME:VERSION``, ``NAME@CHANNEL``).

The three grammars are deliberately disjoint so that one flat namespace of OCI tags can hold both
versions and channels without ambiguity:

* name     ``[a-z0-9][a-z0-9._-]{0,127}``                  e.g. ``gemma-3-270m-int8``
* version  ``v?[0-9][a-z0-9.+-]{0,126}``                    e.g. ``0.1.0``, ``2026.11.28-1``, ``0.1.0+abc``
  (always starts with a digit, optionally after ``v``; ``_`` is not allowed so that ``+`` can be
  mapped to ``_`` in OCI tags, which forbid ``+``)
* channel  ``[a-z][a-z0-9-]{0,63}`` not looking like a version e.g. ``latest``, ``stable``, ``canary``

None may contain a path separator or ``..``: names and versions become directory names in the
file store.
"""

from __future__ import annotations

import dataclasses
import re

from cellm.errors import InvalidNameError

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,127}"
VERSION_PATTERN = r"v?[0-9][a-z0-9.+-]{0,126}"
CHANNEL_PATTERN = r"[a-z][a-z0-9-]{0,63}"

_NAME_RE = re.compile(NAME_PATTERN)
_VERSION_RE = re.compile(VERSION_PATTERN)
_CHANNEL_RE = re.compile(CHANNEL_PATTERN)

DEFAULT_CHANNEL = "latest"


def _check(kind: str, value: object, regex: re.Pattern[str], pattern: str) -> str:
    if not isinstance(value, str):
        raise InvalidNameError(f"{kind} must be a string, got {type(value).__name__} {value!r}")
    if "/" in value or "\\" in value or ".." in value:
        raise InvalidNameError(
            f"invalid {kind} {value!r}: path separators and '..' are not allowed "
            f"(allowed pattern: {pattern})"
        )
    if not regex.fullmatch(value):
        raise InvalidNameError(f"invalid {kind} {value!r}: must match {pattern}")
    return value


def validate_name(name: object) -> str:
    return _check("artifact name", name, _NAME_RE, NAME_PATTERN)


def validate_version(version: object) -> str:
    return _check("version", version, _VERSION_RE, VERSION_PATTERN)


def validate_channel(channel: object) -> str:
    _check("channel", channel, _CHANNEL_RE, CHANNEL_PATTERN)
    if is_version(channel):  # e.g. "v1": would be ambiguous with a version tag
        raise InvalidNameError(
            f"invalid channel {channel!r}: looks like a version ({VERSION_PATTERN}); "
            f"channels must match {CHANNEL_PATTERN} and not start with 'v<digit>'"
        )
    return channel  # type: ignore[return-value]


def is_version(value: object) -> bool:
    return isinstance(value, str) and ".." not in value and bool(_VERSION_RE.fullmatch(value))


def is_channel(value: object) -> bool:
    return isinstance(value, str) and bool(_CHANNEL_RE.fullmatch(value)) and not is_version(value)


def version_sort_key(version: str) -> tuple:
    """Natural order: numeric runs compare as numbers (``0.10.0`` after ``0.9.0``)."""
    parts = re.split(r"(\d+)", version.lstrip("v"))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p)


@dataclasses.dataclass(frozen=True)
class Ref:
    """A parsed reference: exactly one of ``version`` / ``channel`` is set."""

    name: str
    version: str | None = None
    channel: str | None = None

    def __str__(self) -> str:
        return f"{self.name}:{self.version}" if self.version else f"{self.name}@{self.channel}"


def parse_ref(ref: str, default_channel: str = DEFAULT_CHANNEL) -> Ref:
    """``NAME`` (→ default channel), ``NAME:VERSION`` or ``NAME@CHANNEL``."""
    if not isinstance(ref, str) or not ref:
        raise InvalidNameError(f"empty or non-string reference {ref!r}; use NAME[:VERSION|@CHANNEL]")
    if ":" in ref and "@" in ref:
        raise InvalidNameError(f"reference {ref!r} has both ':VERSION' and '@CHANNEL'; use one")
    if ":" in ref:
        name, _, version = ref.partition(":")
        return Ref(validate_name(name), version=validate_version(version))
    if "@" in ref:
        name, _, channel = ref.partition("@")
        return Ref(validate_name(name), channel=validate_channel(channel))
    return Ref(validate_name(ref), channel=validate_channel(default_channel))
