"""Quality metrics: teacher-forced KL / top-1 / perplexity against a reference, generation checks."""

from cellm.eval.evaluate import EvalReport, evaluate, write_json, write_markdown

__all__ = ["EvalReport", "evaluate", "write_json", "write_markdown"]
