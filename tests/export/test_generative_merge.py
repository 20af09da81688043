"""`vislora merge` of a captioning run: a plain transformers LLaVA folder that loads and generates the adapted
model's tokens in a process that never imports vislora."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tests.vlm.generative_run import PROMPT, captioning_run, reference_tokens, write_images
from typer.testing import CliRunner

from vislora.cli import app
from vislora.errors import ExportError
from vislora.export import merge_adapter
from vislora.runs import load_trained_vlm

TOKENS = 10
PLAIN = r"""
import json, sys
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

out, tokens, images = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
layout = json.load(open(f"{out}/vislora_generation.json"))
model = LlavaForConditionalGeneration.from_pretrained(out).eval()
processor = AutoProcessor.from_pretrained(out)
tokenizer = AutoTokenizer.from_pretrained(out)
text = tokenizer.apply_chat_template(layout["messages"], tokenize=False, add_generation_prompt=True)
answers = []
for image in images:
    inputs = processor(images=Image.open(image).convert("RGB"), text=text, add_special_tokens=False,
                       return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    answers.append({"ids": ids[0, inputs["input_ids"].shape[1]:].tolist(),
                    "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum())})
leaked = sorted(m for m in sys.modules if m == "vislora" or m.startswith("vislora."))
tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
print(json.dumps({"answers": answers, "leaked": leaked, "tied": tied}))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-run")
    adapter, _ = captioning_run(root)
    images = write_images(root / "images", 2)
    adapted, vlm, _ = load_trained_vlm(adapter)
    expected = [reference_tokens(adapted, vlm, image, PROMPT, TOKENS) for image in images]
    with adapted.disabled():
        base = [reference_tokens(adapted, vlm, image, PROMPT, TOKENS) for image in images]
    adapted.unload(merge=False)
    return root, adapter, images, expected, base


def test_merged_vlm_generates_the_adapted_tokens_without_vislora(run, tmp_path):
    _, adapter, images, expected, base = run
    assert expected != base  # the adapter changes the captions, so an unmerged save would show
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", "--adapter", str(adapter), "--out", str(out)])
    assert result.exit_code == 0, repr(result.exception)
    assert "merged model (transformers:LlavaForConditionalGeneration)" in result.output
    layout = json.loads((out / "vislora_generation.json").read_text())
    assert layout["max_abs_diff"] < 1e-4 and layout["reload_max_abs_diff"] < 1e-4
    assert layout["image_tokens"] == 16 and layout["image_size"] == 28 and layout["prompt"] == PROMPT
    assert "<|im_start|>assistant" in layout["prompt_text"] and "LlavaForConditionalGeneration" in (
        out / "README.md").read_text()
    done = subprocess.run([sys.executable, "-c", PLAIN, str(out), str(TOKENS), *map(str, images)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    plain = json.loads(done.stdout.strip().splitlines()[-1])
    assert plain["leaked"] == [] and plain["tied"]
    assert [a["image_tokens"] for a in plain["answers"]] == [16, 16]
    assert [a["ids"] for a in plain["answers"]] == expected


def test_merge_refuses_an_existing_folder_and_a_base_spec(run, tmp_path):
    _, adapter, *_ = run
    (tmp_path / "taken").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        merge_adapter(adapter, tmp_path / "taken")
    with pytest.raises(ExportError, match="drop --base"):
        merge_adapter(adapter, tmp_path / "other", base="hf:somewhere")


def test_merge_refuses_a_connector_transformers_cannot_rebuild(tmp_path):
    adapter, _ = captioning_run(tmp_path / "run", connector_hidden=24)
    with pytest.raises(ExportError, match="connector's hidden width is 24, but transformers' LLaVA builds it at the LM "
                                          "width 48"):
        merge_adapter(adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
