import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from synthetic_images import corrupt_png
from vislora.data import (
    DataError,
    GenerativeDataset,
    GenerativeExample,
    InputSpec,
    SampleTransform,
    build_transform,
    collate_generative,
    read_generative,
)


def png(path: Path, seed: int = 0, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- formats
def test_coco_captions_give_one_example_per_image_with_all_captions(tmp_path):
    png(tmp_path / "img" / "a.png"), png(tmp_path / "img" / "b.png", 1)
    coco = {"images": [{"id": 7, "file_name": "a.png"}, {"id": 3, "file_name": "b.png"}],
            "annotations": [{"image_id": 3, "caption": "a cat "}, {"image_id": 7, "caption": "a dog"},
                            {"image_id": 7, "caption": "a brown dog"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    examples = read_generative(tmp_path / "captions.json", "captioning", image_root=tmp_path / "img")
    assert examples == [
        GenerativeExample((tmp_path / "img" / "a.png").absolute(), None, ("a dog", "a brown dog"),
                          "captions.json images[0] (id 7)"),
        GenerativeExample((tmp_path / "img" / "b.png").absolute(), None, ("a cat",),
                          "captions.json images[1] (id 3)"),
    ]
    assert read_generative(tmp_path / "captions.json", "captioning", limit=1)[0].image == tmp_path / "a.png"


def test_llava_conversations_give_one_example_per_turn_pair_without_the_image_tag(tmp_path):
    data = [
        {"id": "1", "image": "x/1.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the car?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "How many wheels?"}, {"from": "gpt", "value": "Four."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "3", "image": "x/3.png", "conversations": [
            {"from": "user", "value": "Describe it.\n<image>"}, {"from": "assistant", "value": "A tree."}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(data))
    examples = read_generative(tmp_path / "llava.json", "vqa")
    assert [(e.image.name, e.question, e.answers, e.where) for e in examples] == [
        ("1.png", "What colour is the car?", ("Red.",), "llava.json [0] turn 0"),
        ("1.png", "How many wheels?", ("Four.",), "llava.json [0] turn 2"),
        ("3.png", "Describe it.", ("A tree.",), "llava.json [2] turn 0"),
    ]


def test_vqa_jsonl_and_csv_rows_with_one_or_several_answers(tmp_path):
    jsonl(tmp_path / "vqa.jsonl", [
        {"image": "a.png", "question": "What is it?", "answer": "a cat"},
        {"image": "b.png", "question": "How many?", "answers": ["2", "two", "2"]},
        {"image": "c.png", "question": "Colour?", "answer": "red",
         "answers": [{"answer": "blue"}, {"answer": "red"}]},  # VQA v2 records; "answer" goes first
    ])
    examples = read_generative(tmp_path / "vqa.jsonl", "vqa")
    assert [(e.question, e.answers, e.where) for e in examples] == [
        ("What is it?", ("a cat",), "vqa.jsonl line 1"),
        ("How many?", ("2", "two", "2"), "vqa.jsonl line 2"),
        ("Colour?", ("red", "blue"), "vqa.jsonl line 3"),
    ]
    assert examples[0].image == (tmp_path / "a.png").absolute()

    (tmp_path / "vqa.csv").write_text('image,question,answers\nsub/a.png,"Is it, really?",yes|yes | no\n'
                                      'b.png,Why?,"[""because"", ""so""]"\n')
    rows = read_generative(tmp_path / "vqa.csv", "vqa")
    assert [(e.image.name, e.question, e.answers, e.where) for e in rows] == [
        ("a.png", "Is it, really?", ("yes", "yes", "no"), "vqa.csv line 2"),
        ("b.png", "Why?", ("because", "so"), "vqa.csv line 3"),
    ]


def test_captioning_rows_have_no_question(tmp_path):
    (tmp_path / "caps.csv").write_text("image,captions\na.png,a dog|a puppy\n")
    jsonl(tmp_path / "caps.jsonl", [{"image": "a.png", "caption": "a dog", "license": "cc-by"}])
    assert read_generative(tmp_path / "caps.csv", "captioning")[0].answers == ("a dog", "a puppy")
    (example,) = read_generative(tmp_path / "caps.jsonl", "captioning")
    assert example.question is None and example.answers == ("a dog",)


# ---------------------------------------------------------------------------------------------- errors
def test_a_malformed_line_is_named(tmp_path):
    jsonl(tmp_path / "vqa.jsonl", [{"image": "a.png", "question": "q", "answer": "a"}, '{"image": "b.png",'])
    with pytest.raises(DataError, match=r"vqa\.jsonl line 2 is not valid JSON"):
        read_generative(tmp_path / "vqa.jsonl", "vqa")
    (tmp_path / "bad.json").write_text('{"images": [\n{"id": 1,}]}')
    with pytest.raises(DataError, match=r"bad\.json line 2 column 10 is not valid JSON"):
        read_generative(tmp_path / "bad.json", "captioning")
    (tmp_path / "coco.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                                    "annotations": [{"image_id": 2, "caption": "x"}]}))
    with pytest.raises(DataError, match=r"annotations\[0\]: image_id 2 is not the id of any entry"):
        read_generative(tmp_path / "coco.json", "captioning")
    (tmp_path / "turns.json").write_text(json.dumps([{"image": "a.png", "conversations": [
        {"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]}]))
    with pytest.raises(DataError, match=r"turns\.json \[0\] turn 1: a second human turn"):
        read_generative(tmp_path / "turns.json", "vqa")


def test_a_missing_column_names_the_columns_and_the_fix(tmp_path):
    jsonl(tmp_path / "vqa.jsonl", [{"image": "a.png", "question": "q", "label": "x"}])
    with pytest.raises(DataError) as error:
        read_generative(tmp_path / "vqa.jsonl", "vqa")
    assert "has no column answer or answers (columns: image, question, label)" in str(error.value)
    (tmp_path / "caps.csv").write_text("path,caption\na.png,a dog\n")
    with pytest.raises(DataError, match=r"has no column image \(columns: path, caption\)"):
        read_generative(tmp_path / "caps.csv", "captioning")


def test_a_file_of_the_other_kind_is_refused_naming_the_kind_to_use(tmp_path):
    jsonl(tmp_path / "vqa.jsonl", [{"image": "a.png", "question": "q", "answer": "a"}])
    with pytest.raises(DataError) as error:
        read_generative(tmp_path / "vqa.jsonl", "captioning")
    assert "columns image, question, answer" in str(error.value) and "kind 'vqa'" in str(error.value)
    (tmp_path / "caps.csv").write_text("image,caption\na.png,a dog\n")
    with pytest.raises(DataError, match=r"columns image, caption: a caption per image .* kind 'captioning'"):
        read_generative(tmp_path / "caps.csv", "vqa")
    (tmp_path / "coco.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match=r"COCO captions JSON .* kind 'captioning'"):
        read_generative(tmp_path / "coco.json", "vqa")
    with pytest.raises(DataError, match="unknown generative data kind 'caption'"):
        read_generative(tmp_path / "coco.json", "caption")


def test_an_empty_question_is_refused_naming_where(tmp_path):
    jsonl(tmp_path / "vqa.jsonl", [{"image": "a.png", "question": "q", "answer": "a"},
                                   {"image": "b.png", "question": "  ", "answer": "b"}])
    with pytest.raises(DataError, match=r"vqa\.jsonl line 2: empty question \(1 in all\)"):
        read_generative(tmp_path / "vqa.jsonl", "vqa")
    assert len(read_generative(tmp_path / "vqa.jsonl", "vqa", limit=1)) == 1  # the bad row is past the limit


# ---------------------------------------------------------------------------------------------- dataset
def test_dataset_gives_pixels_question_and_answers_and_collates(tmp_path):
    png(tmp_path / "a.png", size=20), png(tmp_path / "b.png", 1, size=12)
    jsonl(tmp_path / "vqa.jsonl", [{"image": "a.png", "question": "q1", "answers": ["x", "y"]},
                                   {"image": "b.png", "question": "q2", "answer": "z"}])
    dataset = GenerativeDataset(read_generative(tmp_path / "vqa.jsonl", "vqa"),
                                build_transform(InputSpec(16), train=False))
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 16, 16)
    assert (item["question"], item["answer"], item["answers"], item["index"]) == ("q1", "x", ["x", "y"], 0)
    batch = next(iter(DataLoader(dataset, batch_size=2, collate_fn=collate_generative)))
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["question"] == ["q1", "q2"] and batch["answer"] == ["x", "z"]
    assert batch["answers"] == [["x", "y"], ["z"]] and batch["index"].tolist() == [0, 1]
    assert batch["index"].dtype == torch.long

    seeded = GenerativeDataset(dataset.examples, SampleTransform(build_transform(InputSpec(16), train=True), seed=3))
    assert torch.equal(seeded[1]["pixel_values"], seeded[1]["pixel_values"])  # seeded per index


def test_a_missing_or_corrupt_image_names_the_file_and_example(tmp_path):
    corrupt_png(tmp_path / "broken.png")
    jsonl(tmp_path / "vqa.jsonl", [{"image": "gone.png", "question": "q", "answer": "a"},
                                   {"image": "broken.png", "question": "q", "answer": "a"}])
    dataset = GenerativeDataset(read_generative(tmp_path / "vqa.jsonl", "vqa"), build_transform(InputSpec(16), False))
    with pytest.raises(DataError) as missing:
        dataset[0]
    assert f"vqa.jsonl line 1: image {tmp_path / 'gone.png'} does not exist" in str(missing.value)
    assert "vislora data check" in str(missing.value)
    with pytest.raises(DataError) as corrupt:
        dataset[1]
    assert f"vqa.jsonl line 2: image {tmp_path / 'broken.png'} cannot be decoded" in str(corrupt.value)
    assert "vislora data check" in str(corrupt.value)
