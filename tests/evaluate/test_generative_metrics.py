"""VQA answer normalisation and soft accuracy against worked examples, BLEU-4 and CIDEr against pycocoevalcap and
hand-computed values."""

from __future__ import annotations

import math

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from vislora.errors import DataError
from vislora.evaluate.generative_metrics import (
    caption_scores,
    caption_scores_each,
    caption_tokens,
    normalize_answer,
    vqa_scores,
    vqa_soft_accuracy,
)


@pytest.mark.parametrize(("answer", "expected"), [
    ("Yes.", "yes"), ("\tYes\n", "yes"), ("Two dogs", "2 dogs"), ("none", "0"), ("ten", "10"),
    ("the cat", "cat"), ("An apple", "apple"), ("a", ""),
    ("dont", "don't"), ("isnt", "isn't"), ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"),
    ("yall'd've", "y'all'd've"), ("twas", "'twas"), ("it's", "it's"), ("its", "its"),
    ("1,000", "1000"),  # a thousands separator: every mark is removed, not spaced
    ("3.5", "3.5"), ("end.", "end"),  # a period before a digit is a decimal point
    ("black/white", "black white"), ("left - right", "left right"), ("red, white", "red white"),
    ("what?", "what"), ("(hello)", "hello"), ("T-shirt", "t shirt"),
])
def test_normalize_answer_follows_the_vqa_rules(answer, expected):
    assert normalize_answer(answer) == expected


def test_soft_accuracy_with_ten_answers_averages_the_leave_one_out_subsets():
    # 3 humans said "2": each of them sees 2 others (2/3), the other 7 see 3 (1): (3 * 2/3 + 7) / 10
    assert vqa_soft_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # 1 human: that one sees none (0), the other 9 see 1 (1/3): 9 * 1/3 / 10
    assert vqa_soft_accuracy("Two.", ["two"] + ["3"] * 9) == pytest.approx(0.3)
    assert vqa_soft_accuracy("2", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    assert vqa_soft_accuracy("4", ["2"] * 4 + ["3"] * 6) == 0.0
    # 2 of 10: (2 * 1/3 + 8 * 2/3) / 10
    assert vqa_soft_accuracy("a red car", ["red car", "Red car."] + ["blue"] * 8) == pytest.approx(0.6)


def test_soft_accuracy_with_fewer_answers_counts_them_all():
    assert vqa_soft_accuracy("yes", ["yes", "yes"]) == pytest.approx(2 / 3)
    assert vqa_soft_accuracy("yes", ["yes"]) == pytest.approx(1 / 3)
    assert vqa_soft_accuracy("yes", ["yes"] * 3 + ["no"]) == 1.0


def test_vqa_scores_average_exact_match_and_soft_accuracy():
    scores = vqa_scores(["Two", "no", "a cat"], [["2"] * 3 + ["3"] * 7, ["yes"], ["cat", "dog"]])
    assert scores["exact"] == pytest.approx(2 / 3)  # "no" matches nothing
    assert scores["soft"] == pytest.approx((0.9 + 0 + 1 / 3) / 3)


def test_caption_tokens_drop_punctuation_and_case():
    assert caption_tokens("A red shoe, on a table!") == "a red shoe on a table"
    assert caption_tokens("It's  a (small) T-shirt.") == "it's a small t shirt"


def test_bleu4_of_a_worked_example():
    # 1- to 4-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty): (1/12) ** (1/4)
    scores = caption_scores(["The cat sat on the mat."], [["the cat sat on a mat"]])
    assert scores["bleu4"] == pytest.approx((1 / 12) ** 0.25, abs=1e-6)


def test_identical_captions_score_bleu4_one_and_cider_ten():
    captions = ["a red shoe on the table", "two dogs run in park"]  # no word shared: every n-gram has idf log 2
    scores = caption_scores(captions, [[c] for c in captions])
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["cider"] == pytest.approx(10.0)


def test_scores_equal_pycocoevalcap_on_the_same_tokens():
    predictions = ["a black sneaker on a white floor", "a blue shirt", "two bags on a table", "a dress"]
    references = [["a black shoe on the floor", "black sneaker"], ["a blue t shirt", "blue shirt on a hanger"],
                  ["two bags", "bags on the table"], ["a long red dress", "a dress on a model"]]
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [p] for i, p in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_each = Cider().compute_score(gts, res)
    scores, each = caption_scores_each(predictions, references)
    assert scores["bleu4"] == pytest.approx(bleu[3])
    assert scores["cider"] == pytest.approx(cider)
    assert each["cider"] == pytest.approx(list(cider_each))
    assert 0 < scores["bleu4"] < 1 and scores["cider"] > 0


def test_an_empty_prediction_scores_zero():
    scores = caption_scores(["", "two dogs run in park"], [["a red shoe"], ["two dogs run in park"]])
    assert math.isfinite(scores["cider"]) and scores["bleu4"] < 1


@pytest.mark.parametrize("score", [vqa_scores, caption_scores])
def test_bad_inputs_are_named(score):
    with pytest.raises(DataError, match="no predictions"):
        score([], [])
    with pytest.raises(DataError, match="2 predictions but 1 reference lists"):
        score(["a", "b"], [["a"]])
    with pytest.raises(DataError, match="no reference"):
        score(["a"], [[]])
    with pytest.raises(DataError, match="no reference"):
        score(["a"], ["a"])  # a string, not a list of references
