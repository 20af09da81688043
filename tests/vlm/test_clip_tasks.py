import math

import pytest
import torch
import torch.nn.functional as F
from dual_fixtures import tiny_dual

from vislora import ConfigError
from vislora.tasks.clip import (
    class_prompts,
    contrastive_loss,
    retrieval_recall,
    same_label,
    sample_shots,
    sigmoid_loss,
    text_classifier,
)


def embeddings(n, dim=8, seed=0):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_infonce_is_clips_symmetric_cross_entropy():
    images, texts, scale = embeddings(5), embeddings(5, seed=1), torch.tensor(10.0)
    logits = (scale * images @ texts.T).tolist()
    by_hand = 0.0
    for i in range(5):  # CLIP's pseudo-code, one row and one column at a time
        row = logits[i]
        column = [logits[j][i] for j in range(5)]
        by_hand -= math.log(math.exp(row[i]) / sum(math.exp(v) for v in row)) / 10
        by_hand -= math.log(math.exp(column[i]) / sum(math.exp(v) for v in column)) / 10
    assert contrastive_loss(images, texts, scale).item() == pytest.approx(by_hand, rel=1e-5)
    eye = torch.eye(5, dtype=torch.bool)
    assert contrastive_loss(images, texts, scale, eye).item() == pytest.approx(by_hand, rel=1e-5)


def test_same_class_captions_are_positives_not_negatives():
    positives = same_label(torch.tensor([0, 1, 0]))
    assert positives.tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    assert same_label(torch.tensor([0, -1, 0])) is None  # unlabelled: the diagonal
    images, texts, scale = embeddings(3), embeddings(3, seed=1), torch.tensor(5.0)
    log_rows = F.log_softmax(scale * images @ texts.T, dim=1)  # image -> text
    log_cols = F.log_softmax(scale * texts @ images.T, dim=1)  # text -> image
    spread = [[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]]
    per_image = [-sum(w * log_rows[i, j] for j, w in enumerate(spread[i])) for i in range(3)]
    per_text = [-sum(w * log_cols[j, i] for i, w in enumerate(spread[j])) for j in range(3)]
    expected = (sum(per_image) / 3 + sum(per_text) / 3) / 2
    loss = contrastive_loss(images, texts, scale, positives)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(contrastive_loss(images, texts, scale).item(), rel=1e-3)


def test_sigmoid_loss_matches_the_siglip_sum():
    images, texts = embeddings(4), embeddings(4, seed=2)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    total = 0.0
    for i in range(4):
        for j in range(4):
            z = 1.0 if i == j else -1.0
            total -= math.log(1 / (1 + math.exp(-z * (10 * float(images[i] @ texts[j]) - 3))))
    assert sigmoid_loss(images, texts, scale, bias).item() == pytest.approx(total / 4, rel=1e-5)


def test_retrieval_recall_both_directions_with_two_captions_per_image():
    images = torch.eye(3)  # [3 images, dim 3]
    # captions 0, 1 describe image 0; 2 image 1; 3 image 2. Caption 3 points at image 1 instead (a miss at r@1)
    texts = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [0, 0.8, 0.6]])
    result = retrieval_recall(images, texts, [0, 0, 1, 2], ks=(1, 2))
    # image->text: image 0 -> caption 0 (hit), image 1 -> caption 2 (hit), image 2 -> caption 3 (hit: only one > 0)
    assert result.image_to_text == {1: 1.0, 2: 1.0}
    # text->image: captions 0, 1, 2 find their image first; caption 3 ranks image 1 (0.8) above image 2 (0.6)
    assert result.text_to_image == {1: 0.75, 2: 1.0}
    assert result.metrics()["t2i_r@1"] == 0.75
    with pytest.raises(ConfigError, match=r"text_image has 3 entries for 4 captions"):
        retrieval_recall(images, texts, [0, 1, 2])


def test_prompt_ensemble_is_the_renormalised_mean_of_prompt_embeddings():
    model = tiny_dual()
    templates = ["a photo of a {}", "a picture of the {}"]
    classifier = text_classifier(model, ["red", "blue"], templates)
    with torch.no_grad():
        for row, name in zip(classifier, ["red", "blue"], strict=True):
            prompts = model.embed_texts([t.format(name) for t in templates])
            torch.testing.assert_close(row.detach(), F.normalize(prompts.mean(0), dim=0))


def test_class_names_without_a_usable_prompt_are_errors():
    model = tiny_dual(max_length=7)
    with pytest.raises(ConfigError, match=r"class name '  ' is empty"):
        class_prompts(["red", "  "], ["a photo of a {}"], model.tokenizer)
    with pytest.raises(ConfigError, match=r"exactly one '\{\}'"):
        class_prompts(["red"], ["a photo"], model.tokenizer)
    long_name = "red green blue red green blue"
    with pytest.raises(ConfigError, match=r"class 'red green blue red green blue' has no usable prompt: all 1 "
                                          r"prompts are longer than the text encoder's 7 tokens"):
        class_prompts(["red", long_name], ["a photo of a {}"], model.tokenizer)
    # a template that still fits keeps the class usable; the long one is dropped
    assert class_prompts(["green blue"], ["{} .", "a photo of the picture of a {}"], model.tokenizer) == [
        ["green blue ."]]


def test_shots_are_k_per_class_and_seeded():
    labels = [0, 1, 2] * 10
    picked = sample_shots(labels, 4, seed=3)
    assert sorted(labels[i] for i in picked) == [0] * 4 + [1] * 4 + [2] * 4
    assert picked == sample_shots(labels, 4, seed=3) != sample_shots(labels, 4, seed=4)
    with pytest.raises(ConfigError, match=r"16-shot sampling needs 16 images per class; classes \{0: 10, 1: 10, 2: 10"):
        sample_shots(labels, 16)
