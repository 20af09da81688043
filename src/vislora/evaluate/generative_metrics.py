"""Scores of generated text: VQA exact match and VQAv2 soft accuracy, captioning BLEU-4 and CIDEr.

VQA answers are normalised with the rules of the official VQA evaluation script (vqaEval.py): punctuation removed
(or turned into a space), a period not followed by a digit removed, lowercased, number words zero..ten (and "none")
written as digits, the articles a/an/the dropped, and contractions written without their apostrophe given it back
("dont" -> "don't"). Unlike the script, which normalises only the questions whose ten human answers disagree, both
the prediction and every reference are always normalised.

Soft accuracy (VQAv2): an answer that k humans gave scores min(k / 3, 1). With exactly 10 reference answers it is
averaged over the 10 subsets of 9 (each human left out in turn), as the official script does:

    soft = 1/10 * sum_i min(#{j != i : ref_j == pred} / 3, 1)

With any other number of references the formula min(#{j : ref_j == pred} / 3, 1) is applied to all of them (so a
single reference scores at most 1/3: use exact match for single-answer data). Exact match is 1 when the normalised
prediction equals any normalised reference.

BLEU-4 and CIDEr (CIDEr-D's parent, as in the COCO caption toolkit) are pycocoevalcap's `Bleu(4)` and `Cider()`,
computed over the whole corpus. The toolkit's PTB tokenizer needs Java, so captions are tokenised here instead:
lowercased, and split into runs of letters and digits (an apostrophe inside a word kept: "don't"), which drops the
punctuation the PTB step drops. CIDEr's document frequencies come from the references of the corpus scored, so it
needs several images (one image alone always scores 0).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from vislora.errors import DataError

# contractions the official script restores, written with their apostrophes; each is found with any one of its
# apostrophes left out ("couldnt've" and "couldn'tve" -> "couldn't've")
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's
there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't
what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's
won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"""
CONTRACTIONS = {word[:i] + word[i + 1:]: word for word in _CONTRACTED.split() for i, c in enumerate(word) if c == "'"}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
_PERIOD = re.compile(r"\.(?!\d)")  # a period that is not a decimal point
_DIGIT_COMMA = re.compile(r"\d,\d")  # a thousands separator: punctuation is then removed, not spaced
_WORD = re.compile(r"\w+(?:'\w+)*")
OFFICIAL_ANSWERS = 10  # VQAv2 collects 10 human answers per question


def normalize_answer(answer: str) -> str:
    """`answer` as the VQA evaluation compares it (see the module docstring): "Two dogs." -> "2 dogs",
    "the  Red,car!" -> "red car", "dont" -> "don't"."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    remove = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # a mark standing beside a space (or any mark in a number like 1,000) goes; one inside a word splits it
        gone = remove or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if gone else " ")
    out = _PERIOD.sub("", out)
    words = [NUMBERS.get(word, word) for word in out.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_soft_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against its human answers, both normalised (see the module docstring)."""
    answer = normalize_answer(prediction)
    said = [normalize_answer(r) == answer for r in references]
    if len(said) != OFFICIAL_ANSWERS:
        return min(sum(said) / 3, 1.0)
    total = sum(said)
    return sum(min((total - own) / 3, 1.0) for own in said) / len(said)  # leave human i out: total - said[i]


def vqa_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"exact": share of predictions equal to one of their references, "soft": mean VQAv2 soft accuracy}, both
    after answer normalisation; `references[i]` are the answers to question i."""
    _check(predictions, references, "answers")
    exact = [normalize_answer(p) in {normalize_answer(r) for r in refs} for p, refs in zip(predictions, references,
                                                                                        strict=True)]
    soft = [vqa_soft_accuracy(p, refs) for p, refs in zip(predictions, references, strict=True)]
    return {"exact": sum(exact) / len(exact), "soft": sum(soft) / len(soft)}


def caption_tokens(text: str) -> str:
    """`text` lowercased and split into words without punctuation, joined by single spaces (the input
    pycocoevalcap's scorers expect from its PTB tokenizer)."""
    return " ".join(_WORD.findall(text.lower()))


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"bleu4", "cider"} of the corpus: pycocoevalcap's Bleu(4) and Cider() on captions tokenised by
    `caption_tokens`; `references[i]` are the reference captions of image i."""
    return caption_scores_each(predictions, references)[0]


def caption_scores_each(predictions: Sequence[str],
                        references: Sequence[Sequence[str]]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(the corpus scores of `caption_scores`, each caption's own: {"bleu4": [...], "cider": [...]})."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    _check(predictions, references, "captions")
    hypotheses = {i: [caption_tokens(p)] for i, p in enumerate(predictions)}
    truths = {i: [caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
    bleu, bleu_each = Bleu(4).compute_score(truths, hypotheses, verbose=0)
    cider, cider_each = Cider().compute_score(truths, hypotheses)
    return ({"bleu4": float(bleu[3]), "cider": float(cider)},
            {"bleu4": [float(s) for s in bleu_each[3]], "cider": [float(s) for s in cider_each]})


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]], what: str) -> None:
    if not predictions:
        raise DataError(f"no predictions to score (0 {what}); give at least one example")
    if len(predictions) != len(references):
        raise DataError(f"{len(predictions)} predictions but {len(references)} reference lists; give one list of "
                        f"reference {what} per prediction, in the same order")
    empty = [i for i, refs in enumerate(references) if isinstance(refs, str) or not [r for r in refs if r.strip()]]
    if empty:
        raise DataError(f"{len(empty)} examples have no reference {what} (first: index {empty[0]}); each needs a "
                        "list (or tuple) of at least one non-empty reference, e.g. ['a red shoe']")
