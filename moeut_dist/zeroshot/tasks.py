"""Zero-shot task files: one reader per benchmark layout, each converting a JSONL record into a
common `Item` (a context, candidate continuations, the index of the right one).

Fields read, per task (everything else in a record is ignored):

- `lambada`: `text`. The context is the text up to its last space, the single candidate its
  last word (the LAMBADA-OpenAI JSONL layout).
- `blimp`: `sentence_good`, `sentence_bad`. No context: the whole sentences are compared, the
  good one is right.
- `piqa`: `goal`, `sol1`, `sol2`, `label` (0 or 1). Context "Question: {goal}\\nAnswer:". The
  original release keeps labels in a separate `.lst` file; merge them into the records first.
- `hellaswag`: `ctx`, `endings` (a list), `label` (an index, as a number or a digit string).
- `arc_easy`: `question`, `choices` {`text`: [...], `label`: [...]}, `answerKey` (the Hugging
  Face layout), or AI2's own layout with `question` {`stem`, `choices`: [{`text`, `label`}]}.
  Context "Question: {question}\\nAnswer:".
- `cbt`: `sentences` (a list), `question` (holding the `XXXXX` placeholder), `options`,
  `answer`. The context is the sentences and the question up to the placeholder; a candidate
  is an option followed by the rest of the question, so the candidates are compared on the
  same text after the blank.

Every candidate starts a new word after its context: the scorer tokenises the two separately,
so the context's tokens are the same for every candidate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Any, Literal

CBT_PLACEHOLDER = "XXXXX"


class TaskFormatError(ValueError):
    """A task file that does not have the expected layout; the message names file:line."""


class _BadRecord(ValueError):
    """A record without the fields its task needs; the caller adds the file and line."""


@dataclass(frozen=True)
class Item:
    context: str  # may be empty
    candidates: tuple[str, ...]
    gold: int  # index into candidates
    source: str = ""  # "file:line" of the record, for error messages


@dataclass(frozen=True)
class Task:
    name: str
    read_record: Callable[[dict[str, Any]], Item]
    # "choice": pick the most likely candidate; "cloze": greedy exact match of one target.
    scoring: Literal["choice", "cloze"]


def _field(record: dict[str, Any], name: str, kind: type | UnionType) -> Any:
    if name not in record:
        raise _BadRecord(f"missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind):
        expected = getattr(kind, "__name__", str(kind))
        raise _BadRecord(f"field {name!r} is {type(value).__name__}, expected {expected}")
    return value


def _strings(record: dict[str, Any], name: str) -> list[str]:
    values = _field(record, name, list)
    if not values or not all(isinstance(value, str) for value in values):
        raise _BadRecord(f"field {name!r} must be a non-empty list of strings")
    return values


def _index(value: Any, n_candidates: int, name: str) -> int:
    """A gold index given as a number or a digit string, checked against the candidates."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_candidates:
        raise _BadRecord(f"field {name!r} is {value!r}, not an index below {n_candidates}")
    return value


def _question_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _lambada(record: dict[str, Any]) -> Item:
    context, _, target = _field(record, "text", str).strip().rpartition(" ")
    if not context or not target:
        raise _BadRecord("field 'text' has no space before its last word")
    return Item(context, (target,), 0)


def _blimp(record: dict[str, Any]) -> Item:
    good, bad = _field(record, "sentence_good", str), _field(record, "sentence_bad", str)
    return Item("", (good, bad), 0)


def _piqa(record: dict[str, Any]) -> Item:
    solutions = (_field(record, "sol1", str), _field(record, "sol2", str))
    gold = _index(_field(record, "label", int | str), 2, "label")
    return Item(_question_prompt(_field(record, "goal", str)), solutions, gold)


def _hellaswag(record: dict[str, Any]) -> Item:
    endings = _strings(record, "endings")
    gold = _index(_field(record, "label", int | str), len(endings), "label")
    return Item(_field(record, "ctx", str), tuple(endings), gold)


def _arc(record: dict[str, Any]) -> Item:
    question = _field(record, "question", str | dict)
    if isinstance(question, dict):  # AI2's layout
        stem = _field(question, "stem", str)
        choices = _field(question, "choices", list)
        if not all(isinstance(choice, dict) for choice in choices):
            raise _BadRecord("field 'choices' must be a list of {text, label} objects")
        texts = [_field(choice, "text", str) for choice in choices]
        labels = [_field(choice, "label", str) for choice in choices]
    else:
        stem = question
        choices = _field(record, "choices", dict)
        texts, labels = _strings(choices, "text"), _strings(choices, "label")
    if len(texts) != len(labels):
        raise _BadRecord(f"the choices have {len(texts)} texts but {len(labels)} labels")
    answer = _field(record, "answerKey", str)
    if answer not in labels:
        raise _BadRecord(f"answerKey {answer!r} is not one of the choice labels {labels}")
    return Item(_question_prompt(stem), tuple(texts), labels.index(answer))


def _cbt(record: dict[str, Any]) -> Item:
    sentences = _strings(record, "sentences")
    question = _field(record, "question", str)
    options = _strings(record, "options")
    answer = _field(record, "answer", str)
    if question.count(CBT_PLACEHOLDER) != 1:
        raise _BadRecord(f"field 'question' must hold the placeholder {CBT_PLACEHOLDER} once")
    if answer not in options:
        raise _BadRecord(f"answer {answer!r} is not one of the options")
    before, after = question.split(CBT_PLACEHOLDER)
    context = " ".join([*sentences, before.strip()]).strip()
    candidates = tuple(f"{option} {after.strip()}".strip() for option in options)
    return Item(context, candidates, options.index(answer))


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("lambada", _lambada, "cloze"),
        Task("blimp", _blimp, "choice"),
        Task("piqa", _piqa, "choice"),
        Task("hellaswag", _hellaswag, "choice"),
        Task("arc_easy", _arc, "choice"),
        Task("cbt", _cbt, "choice"),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks are {sorted(TASKS)}")
    return TASKS[name]


def read_task_file(task_name: str, path: str | Path) -> list[Item]:
    """The items of a JSONL task file (blank lines skipped); raises `TaskFormatError` naming
    file:line at the first record that does not fit the task's layout."""
    task = get_task(task_name)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{task_name} task file {path} not found")
    items = []
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(replace(_parse_line(task, line), source=f"{path}:{line_number}"))
            except _BadRecord as error:
                raise TaskFormatError(f"{path}:{line_number}: {task_name}: {error}") from None
    if not items:
        raise TaskFormatError(f"{path}: no {task_name} records")
    return items


def _parse_line(task: Task, line: bytes) -> Item:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise _BadRecord("not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise _BadRecord(f"invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")
    item = task.read_record(record)
    if not all(candidate.strip() for candidate in item.candidates):
        raise _BadRecord("a candidate is empty")
    return item


def builtin_sample(task_name: str) -> Path:
    """The small hand-written sample file shipped for a task (for smoke tests, not scores)."""
    get_task(task_name)
    return Path(str(resources.files(__package__) / "samples" / f"{task_name}.jsonl"))
