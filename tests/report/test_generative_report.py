"""The generative report section and model card rendered from a comparison in hand (no model)."""

from __future__ import annotations

import base64
import io

from PIL import Image

from vislora.evaluate.generative import GenerativeComparison, GenerativeRow
from vislora.report.generative import generative_html, generative_markdown, thumbnail_tag


def comparison(image: str) -> GenerativeComparison:
    rows = [GenerativeRow(0, image, None, ["a red shoe", "a shoe"], "a shoe\non a <table>", "a red shoe", 0.5, 2.0),
            GenerativeRow(1, "gone.png", None, ["a bag"], "", "a bag", 0.0, 1.0)]
    return GenerativeComparison(task="captioning", data="val.json", prompt="describe the image briefly .",
                                base={"cider": 0.25, "bleu4": 0.1}, adapted={"cider": 1.5, "bleu4": 0.4}, rows=rows,
                                examples=[0, 1], settings={"max_new_tokens": 8, "num_beams": 2})


def test_html_section_embeds_a_thumbnail_and_escapes_the_outputs(tmp_path):
    path = tmp_path / "shoe.png"
    Image.new("RGB", (400, 200), (200, 10, 10)).save(path)
    html = "\n".join(generative_html(comparison(str(path))))
    assert "<td>CIDEr</td><td>0.2500</td><td>1.5000</td><td>+1.2500</td>" in html
    assert "a shoe\non a &lt;table&gt;" in html and "<i>(empty)</i>" in html  # escaped; an empty output is named
    assert "beam search (2 beams), at most 8 new tokens" in html
    assert "gone.png (unreadable)" in html  # a sample image deleted since the evaluation
    data = html.split("data:image/png;base64,")[1].split("'")[0]
    thumbnail = Image.open(io.BytesIO(base64.b64decode(data)))
    assert thumbnail.size == (160, 80) and thumbnail.getpixel((5, 5)) == (200, 10, 10)


def test_card_section_keeps_one_table_row_per_example():
    text = generative_markdown(comparison("shoe.png"))
    assert "| CIDEr | 0.2500 | 1.5000 | +1.2500 |" in text and "| BLEU-4 | 0.1000 | 0.4000 | +0.3000 |" in text
    assert "| shoe.png | a red shoe / a shoe | a shoe on a <table> | a red shoe |" in text
    assert "| gone.png | a bag | (empty) | a bag |" in text
    assert thumbnail_tag("missing.png").endswith("(unreadable)</span>")
