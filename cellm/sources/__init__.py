"""Checkpoint sources: the embedded default ``gemma-3-270m``, ``hf://org/name[@rev]``, a local
HF-layout directory, a ``.gguf`` file. See docs/SOURCES.md."""
