"""Zero-shot evaluation: task files of six benchmark layouts, scored by comparing the
log-likelihoods a language model gives candidate continuations."""

from moeut_dist.zeroshot.scorer import (
    ContinuationScore,
    LogitsFn,
    TaskResult,
    evaluate_task,
    model_logits,
    score_continuations,
)
from moeut_dist.zeroshot.tasks import (
    TASKS,
    Item,
    Task,
    TaskFormatError,
    builtin_sample,
    get_task,
    read_task_file,
)

__all__ = [
    "TASKS",
    "ContinuationScore",
    "Item",
    "LogitsFn",
    "Task",
    "TaskFormatError",
    "TaskResult",
    "builtin_sample",
    "evaluate_task",
    "get_task",
    "model_logits",
    "read_task_file",
    "score_continuations",
]
