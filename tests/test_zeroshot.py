"""Zero-shot task readers and the candidate scorer, against stub models of known log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from moeut_dist.zeroshot import (
    TASKS,
    Item,
    TaskFormatError,
    builtin_sample,
    evaluate_task,
    get_task,
    read_task_file,
    score_continuations,
)

VOCAB = 128


class CharEncoder:
    """One token per ASCII character; 0 is the end-of-document id."""

    eod_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(character) for character in text]


def preferring(character: str, strength: float = 5.0):
    """A stub model whose next-token logits favour one character everywhere."""

    def logits(tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*tokens.shape, VOCAB)
        out[..., ord(character)] = strength
        return out

    return logits


def repeating(tokens: torch.Tensor) -> torch.Tensor:
    """A stub model that predicts each token to be followed by itself."""
    return torch.nn.functional.one_hot(tokens, VOCAB).float() * 5


@pytest.mark.parametrize(
    ("task", "count", "context", "candidate", "gold"),
    [
        ("lambada", 5, "Mara kept", "key", 0),
        ("blimp", 5, "", "The cats on the porch are sleeping.", 0),
        ("piqa", 4, "Question: Keep a cut apple", "Brush the cut side with lemon juice.", 0),
        ("hellaswag", 4, "A man stands at a grill", "flips the burgers", 0),
        ("arc_easy", 4, "Question: Which of these is a source of light?\nAnswer:", "a mirror", 1),
        ("cbt", 3, "There was once a miller", "fisherman all the way home .", 0),
    ],
)
def test_each_reader_parses_its_builtin_sample(task, count, context, candidate, gold):
    items = read_task_file(task, builtin_sample(task))
    assert len(items) == count
    assert items[0].context.startswith(context)
    assert items[0].candidates[0].startswith(candidate)
    assert items[0].gold == gold
    for item in items:
        assert 0 <= item.gold < len(item.candidates)
        assert all(candidate and candidate == candidate.strip() for candidate in item.candidates)


def test_readers_convert_the_layout_details():
    lambada = read_task_file("lambada", builtin_sample("lambada"))[0]
    assert lambada.context.endswith("she reached for the") and lambada.candidates == ("key",)
    hellaswag = read_task_file("hellaswag", builtin_sample("hellaswag"))
    assert hellaswag[1].gold == 1  # given as the string "1"
    arc = read_task_file("arc_easy", builtin_sample("arc_easy"))
    assert arc[2].candidates == ("boils", "evaporates", "freezes") and arc[2].gold == 2  # AI2
    cbt = read_task_file("cbt", builtin_sample("cbt"))[0]
    assert cbt.context.endswith("basket of fish . The cat followed the")
    assert len(cbt.candidates) == 4 and cbt.candidates[1] == "river all the way home ."


@pytest.mark.parametrize(
    ("task", "bad_line", "problem"),
    [
        ("lambada", '{"txt": "a b"}', "missing field 'text'"),
        ("blimp", '{"sentence_good": "A.", "sentence_bad": 3}', "'sentence_bad' is int"),
        ("piqa", '{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}', "'label' is 2"),
        ("hellaswag", '{"ctx": "c", "endings": [], "label": 0}', "'endings' must be"),
        (
            "arc_easy",
            '{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "B"}',
            "answerKey 'B'",
        ),
        (
            "cbt",
            '{"sentences": ["s"], "question": "no blank", "options": ["a"], "answer": "a"}',
            "placeholder XXXXX",
        ),
        ("cbt", "[1, 2]", "expected a JSON object"),
        ("blimp", '{"sentence_good": "A.", "sentence_bad": " "}', "a candidate is empty"),
        ("piqa", '{"goal": "unterminated', "invalid JSON"),
    ],
)
def test_a_malformed_line_is_named_by_file_and_line(tmp_path, task, bad_line, problem):
    path = tmp_path / f"{task}.jsonl"
    good_line = builtin_sample(task).read_text().splitlines()[0]
    path.write_text(f"{good_line}\n\n{bad_line}\n")
    with pytest.raises(TaskFormatError, match=rf"{path}:3: {task}: .*{problem}"):
        read_task_file(task, path)


def test_unknown_task_and_missing_file_are_refused(tmp_path):
    with pytest.raises(KeyError, match="unknown task 'squad'"):
        get_task("squad")
    with pytest.raises(FileNotFoundError, match="piqa task file"):
        read_task_file("piqa", tmp_path / "absent.jsonl")


def test_scores_sum_the_continuation_log_probs():
    uniform = lambda tokens: torch.zeros(*tokens.shape, VOCAB)
    scores = score_continuations(uniform, [([1, 2], [3]), ([1], [4, 5, 6])], batch_size=2)
    assert [score.tokens for score in scores] == [1, 3]
    assert scores[0].logprob == pytest.approx(-math.log(VOCAB))
    assert scores[1].logprob == pytest.approx(-3 * math.log(VOCAB))


def test_scores_read_the_positions_that_predict_the_continuation():
    encode = CharEncoder().encode
    requests = [(encode("zzb"), encode("bbb")), (encode("zza"), encode("bbb"))]
    first, second = score_continuations(repeating, requests, batch_size=1)
    assert first.greedy and not second.greedy
    assert first.logprob > second.logprob


def test_batching_and_padding_do_not_change_scores():
    encode = CharEncoder().encode
    requests = [(encode("a" * n), encode("ab" * (5 - n))) for n in range(1, 5)]
    one_by_one = score_continuations(repeating, requests, batch_size=1)
    assert score_continuations(repeating, requests, batch_size=3) == one_by_one


@pytest.mark.parametrize("task", ["blimp", "piqa", "hellaswag", "arc_easy", "cbt"])
def test_the_scorer_picks_the_candidate_the_model_prefers(task):
    items = [Item("context", ("xxxx", "yyyy", "zzzz"), gold) for gold in (0, 1, 2)]
    result = evaluate_task(get_task(task), items, preferring("y"), CharEncoder())
    assert result.items == 3
    assert result.metrics == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(1 / 3)}


def test_acc_norm_removes_the_preference_for_short_candidates():
    # 'x' is likely and 'q' is not: the long candidate has the lower sum but the higher mean.
    items = [Item("context", ("xxxxxxq", "q"), 0)]
    result = evaluate_task(TASKS["hellaswag"], items, preferring("x"), CharEncoder())
    assert result.metrics == {"acc": 0.0, "acc_norm": 1.0}


def test_cloze_accuracy_is_greedy_exact_match_and_ppl_that_of_the_target():
    items = [Item("the last word is", ("xx",), 0), Item("and then", ("xy",), 0)]
    result = evaluate_task(TASKS["lambada"], items, preferring("x"), CharEncoder())
    log_p_x = torch.tensor([5.0] + [0.0] * (VOCAB - 1)).log_softmax(0)
    expected_ppl = math.exp(-(3 * log_p_x[0] + log_p_x[1]).item() / 4)
    assert result.metrics == {"acc": 0.5, "ppl": pytest.approx(expected_ppl)}


def test_an_empty_context_is_scored_after_the_end_of_document_id():
    seen = []

    def recording(tokens):
        seen.append(tokens.clone())
        return torch.zeros(*tokens.shape, VOCAB)

    evaluate_task(TASKS["blimp"], [Item("", ("ab", "ba"), 0)], recording, CharEncoder())
    assert seen[0][:, 0].tolist() == [CharEncoder.eod_id] * 2
