"""Quality metrics: teacher-forced KL / top-1 / perplexity against a reference, generation checks."""

from cellm.eval.evaluate import EvalReport, evaluate, write_json, write_markdown
from cellm.eval.shards import EvalPlan, evaluate_shard, merge_eval_shards, plan_eval_shards

__all__ = ["EvalReport", "evaluate", "write_json", "write_markdown",
           "EvalPlan", "plan_eval_shards", "evaluate_shard", "merge_eval_shards"]
