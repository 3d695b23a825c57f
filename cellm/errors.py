"""One error hierarchy for the whole library.

Every error derives from :class:`CellmError` and also from the matching stdlib type, so callers can
catch either ``cellm.errors.FormatError`` or plain ``ValueError``. Messages carry the bad value and
the limit it broke; wrap lower-level exceptions with ``raise ... from exc``.
"""

from __future__ import annotations


class CellmError(Exception):
    """Root of every error raised by cellm."""


class FormatError(CellmError, ValueError):
    """A .cellm file (or another container) is malformed: bad magic, bounds, alignment, dtype..."""


class QuantizationError(CellmError, ValueError):
    """A tensor cannot be quantized with the requested scheme (shape, NaN/Inf, block size...)."""


class ProfileError(CellmError, ValueError):
    """A profile file is invalid, a rule matches nothing, or a 2-D weight has no rule."""


class SourceError(CellmError, ValueError):
    """A checkpoint source cannot be resolved or read (pickle-only weights, bad config, bad GGUF)."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """A checkpoint source does not exist locally / in the cache (or the Hub is unreachable)."""


class ConfigError(CellmError, ValueError):
    """A model config is missing keys, has inconsistent values or an unsupported architecture."""


class ValidationError(CellmError, ValueError):
    """A .cellm file failed structural, semantic or numeric validation."""


class ModelRuntimeError(CellmError, RuntimeError):
    """The inference runtime cannot run this artifact (architecture, missing tokenizer, context)."""


class SamplingError(CellmError, ValueError):
    """Invalid sampling / generation parameters."""


class EvalError(CellmError, ValueError):
    """Evaluation cannot be run (corpus too short, mismatched vocabularies...)."""


class GateFailed(CellmError, RuntimeError):
    """A quality gate failed; ``verdict`` holds the per-metric results."""

    def __init__(self, message: str, verdict: object = None):
        super().__init__(message)
        self.verdict = verdict


class ExportError(CellmError, ValueError):
    """ONNX export cannot map a dtype / architecture, or the output directory is not empty."""


class RegistryError(CellmError, RuntimeError):
    """Registry operation failed."""


class RegistryNotFound(RegistryError, LookupError):
    """Unknown artifact name, version or channel."""


class IntegrityError(RegistryError):
    """A blob or file does not match its recorded sha256 / size (tampering or corruption)."""


class VersionExistsError(RegistryError, FileExistsError):
    """Publishing over an existing immutable version."""


class UnsafePublishError(RegistryError, PermissionError):
    """Publishing without a passing gate verdict (and without an explicit, recorded force)."""


class InvalidNameError(RegistryError, ValueError):
    """An artifact name, version, channel or reference breaks the allowed pattern (or has `/`, `..`)."""


class ManifestError(RegistryError, ValueError):
    """A registry manifest is missing, not JSON, or lacks / mistypes required keys."""
