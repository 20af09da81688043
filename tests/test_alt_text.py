"""Alt text (`vislora caption`): one row per image, resumed without duplicates after a crash, a SIGKILL or
unreadable images, and the CLI around it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.vlm.generative_run import PROMPT, captioning_run, write_images
from typer.testing import CliRunner

from vislora.alt_text import AltFile, caption_images, find_images
from vislora.cli import app
from vislora.data.images import load_image
from vislora.data.transforms import build_transform
from vislora.errors import DataError
from vislora.runs import load_trained_vlm

runner = CliRunner()
TOKENS = 5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("alt-run")
    adapter, _ = captioning_run(root)
    model, vlm, _ = load_trained_vlm(adapter)
    return adapter, model, vlm


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def alone(model, vlm, image: Path) -> str:
    """The caption of one image generated on its own (no batch, no padding): the reference for batched rows."""
    pixels = build_transform(vlm.image_spec, train=False)(load_image(image))[None]
    batch = vlm.processor.prompt_batch([PROMPT])
    with torch.no_grad():
        ids = model.generate(**batch, pixel_values=pixels, max_new_tokens=TOKENS, do_sample=False,
                             **vlm.processor.generation_kwargs())
    return vlm.processor.decode(ids, batch["input_ids"].shape[1])[0]


def test_rows_equal_single_image_captions_and_a_rerun_skips_them(run, tmp_path):
    adapter, model, vlm = run
    images = write_images(tmp_path / "photos", 5)
    out = tmp_path / "alt.jsonl"
    first = caption_images(model, vlm, [tmp_path / "photos"], out, adapter=str(adapter), prompt=PROMPT,
                           batch_size=2, max_new_tokens=TOKENS)
    assert (first.captioned, first.skipped, first.errors) == (5, 0, 0)
    written = rows(out)
    assert [r["image"] for r in written] == [str(p) for p in images]
    assert all(r["adapter"] == str(adapter) and r["prompt"] == PROMPT and 0 <= r["tokens"] <= TOKENS
               for r in written)
    assert [r["alt"] for r in written] == [alone(model, vlm, p) for p in images]
    assert len({r["alt"] for r in written}) > 1
    more = write_images(tmp_path / "photos" / "more", 2, seed=1)
    seen = []
    second = caption_images(model, vlm, [tmp_path / "photos"], out, adapter=str(adapter), prompt=PROMPT, batch_size=2,
                            max_new_tokens=TOKENS, progress=lambda done, total: seen.append((done, total)))
    assert (second.captioned, second.skipped) == (2, 5)
    assert seen[0] == (5, 7) and seen[-1] == (7, 7)
    assert [r["image"] for r in rows(out)] == [str(p) for p in [*images, *more]]


def test_unreadable_image_gets_an_error_row_and_is_retried_once_fixed(run, tmp_path):
    _, model, vlm = run
    good = write_images(tmp_path / "photos", 2)
    bad = tmp_path / "photos" / "broken.png"
    bad.write_bytes(b"not a png at all")
    out = tmp_path / "alt.jsonl"
    summary = caption_images(model, vlm, [tmp_path / "photos"], out, adapter="a", prompt=PROMPT, max_new_tokens=2)
    assert (summary.captioned, summary.errors) == (2, 1)
    error = next(r for r in rows(out) if r["image"] == str(bad))
    assert "alt" not in error and "broken.png" in error["error"]
    write_images(tmp_path / "fixed", 1)[0].replace(bad)
    again = caption_images(model, vlm, [tmp_path / "photos"], out, adapter="a", prompt=PROMPT, max_new_tokens=2)
    assert (again.captioned, again.skipped, again.errors) == (1, 2, 0)
    final = rows(out)
    assert sorted(r["image"] for r in final) == sorted(map(str, [*good, bad])) and all("alt" in r for r in final)


def test_a_torn_last_line_is_cut_off_and_the_image_redone(run, tmp_path):
    _, model, vlm = run
    images = write_images(tmp_path / "photos", 3)
    out = tmp_path / "alt.jsonl"
    caption_images(model, vlm, images[:2], out, adapter="a", prompt=PROMPT, max_new_tokens=2)
    whole = out.read_text()
    out.write_text(whole + '{"image": "' + str(images[2]) + '", "alt": "half a cap')  # a write cut by a crash
    summary = caption_images(model, vlm, images, out, adapter="a", prompt=PROMPT, max_new_tokens=2)
    assert (summary.captioned, summary.skipped) == (1, 2)
    assert [r["image"] for r in rows(out)] == list(map(str, images)) and out.read_text().startswith(whole)


def test_another_adapter_or_prompt_and_foreign_lines_are_refused(tmp_path):
    out = tmp_path / "alt.jsonl"
    AltFile(out).append([{"image": "x.png", "alt": "a shoe", "adapter": "a", "prompt": "p", "tokens": 2}])
    with pytest.raises(DataError, match="adapter 'a' with prompt 'p', not adapter 'b'"):
        AltFile(out).check("b", "p")
    with pytest.raises(DataError, match="prompt 'p', not adapter 'a' with prompt 'q'"):
        AltFile(out).check("a", "q")
    out.write_text(out.read_text() + "hello\n" + out.read_text())
    with pytest.raises(DataError, match=r"line 2 of .* is not a caption row"):
        AltFile(out)


def test_a_second_writer_of_the_same_file_is_refused(run, tmp_path):
    _, model, vlm = run
    images = write_images(tmp_path / "photos", 1)
    out = tmp_path / "alt.jsonl"
    with AltFile.locked(out), pytest.raises(DataError, match="another vislora caption is writing"):
        caption_images(model, vlm, images, out, adapter="a", prompt=PROMPT, max_new_tokens=2)
    assert caption_images(model, vlm, images, out, adapter="a", prompt=PROMPT, max_new_tokens=2).captioned == 1


def test_find_images_reads_folders_lists_and_files_once(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/1.png", "a/deep/2.DCM", "a/notes.md", "b.jpg", "scan"):
        (tmp_path / name).write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text("# images\nb.jpg\n\nscan\n")
    found = find_images([tmp_path / "a", listing, tmp_path / "b.jpg"])
    assert found == [tmp_path / "a" / "1.png", tmp_path / "a" / "deep" / "2.DCM", tmp_path / "b.jpg",
                     tmp_path / "scan"]
    with pytest.raises(DataError, match="does not exist"):
        find_images([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        find_images([tmp_path / "empty"])


KILLED = r"""
import sys
from vislora.alt_text import caption_adapter

def progress(done, total):
    print(done, total, flush=True)

caption_adapter(sys.argv[1], [sys.argv[2]], sys.argv[3], batch_size=1, max_new_tokens=3, progress=progress)
"""


def test_sigkill_mid_run_leaves_a_valid_file_and_the_rerun_completes(run, tmp_path):
    adapter, model, vlm = run
    images = write_images(tmp_path / "photos", 12)
    out = tmp_path / "alt.jsonl"
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-c", KILLED, str(adapter), str(tmp_path / "photos"), str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=root)
    try:
        for line in child.stdout:
            if int(line.split()[0]) >= 2:  # two rows written: kill while it works on the next ones
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    data = out.read_text()
    complete = data[:data.rfind("\n") + 1]
    before = [json.loads(line) for line in complete.splitlines()]
    assert 2 <= len(before) < 12 and all("alt" in r for r in before)
    summary = caption_images(model, vlm, [tmp_path / "photos"], out, adapter=str(adapter), prompt=PROMPT,
                             batch_size=4, max_new_tokens=3)
    assert summary.skipped == len(before) and summary.captioned == 12 - len(before)
    assert [r["image"] for r in rows(out)] == list(map(str, images))


def test_cli_captions_a_folder_and_explains_itself(run, tmp_path):
    adapter, *_ = run
    write_images(tmp_path / "photos", 3)
    out = tmp_path / "alt.jsonl"
    result = runner.invoke(app, ["caption", str(tmp_path / "photos"), "--adapter", str(adapter), "--out", str(out),
                                 "--max-new-tokens", "2", "--batch-size", "2"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "3 images captioned, 0 already in" in result.output and len(rows(out)) == 3
    again = runner.invoke(app, ["caption", str(tmp_path / "photos"), "--adapter", str(adapter), "--out", str(out)])
    assert "0 images captioned, 3 already in" in again.output
    help_text = runner.invoke(app, ["caption", "--help"], terminal_width=200).output
    assert "Resumable" in help_text and "vislora caption photos/ --adapter" in help_text and "--beams" in help_text


def test_cli_refuses_a_classifier_adapter_and_an_empty_folder(run, tmp_path):
    adapter, *_ = run
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    (classifier / "task.json").write_text(json.dumps({"task": "classification"}))
    (tmp_path / "photos").mkdir()
    result = runner.invoke(app, ["caption", str(tmp_path / "photos"), "--adapter", str(classifier), "--out", "x"])
    assert "'classification' adapter; alt text needs a generative one" in str(result.exception)
    result = runner.invoke(app, ["caption", str(tmp_path / "photos"), "--adapter", str(adapter), "--out", "x"])
    assert "no images found" in str(result.exception)
