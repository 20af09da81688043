"""What the engine hands back: top-k labels, and the refusal of an output that has no class scores."""

import pytest
import torch

from vislora.errors import ServeError
from vislora.serve.records import Label, Output, top_k


def output(logits, classes, adapter="a"):
    return Output(logits, torch.zeros(4), adapter, None, None, classes, 0.0)


def test_top_k_is_the_softmax_best_first():
    logits = torch.tensor([0.0, 2.0, 1.0])
    probs = torch.softmax(logits.double(), dim=-1)
    assert top_k(output(logits, ("x", "y", "z")), 2) == (Label("y", 1, float(probs[1])), Label("z", 2, float(probs[2])))
    assert len(top_k(output(logits, ("x", "y", "z")), 10)) == 3


@pytest.mark.parametrize(("logits", "classes", "adapter", "who"), [
    (None, ("x", "y"), "a", "adapter 'a'"),  # a text embedding, or a dual-encoder adapter without classes
    (torch.zeros(2), None, None, "the base model"),  # a head that names no classes
])
def test_an_output_without_class_scores_is_refused_naming_who(logits, classes, adapter, who):
    with pytest.raises(ServeError, match=f"{who} computed no class scores.*embed instead"):
        top_k(output(logits, classes, adapter), 1)
