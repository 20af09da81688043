"""Held-out VQA and captions derived from Fashion-MNIST: the LM with an aligned connector only, against the same
plus LoRA on the LM, on the real LLaVA of vislora's bundled assets (DINOv2-S + SmolLM2-135M-Instruct, 56 px images,
16 image tokens).

The data is written to disk in the formats `vislora.data.read_generative` reads and read back with it: PNGs of
Fashion-MNIST items (train images from the train split, test images from the test split, so disjoint), a COCO
captions JSON per split (five templated captions per image, "a photo of a sneaker." ...) and a VQA JSONL per split,
four templated questions per image about the item, its category, whether it is worn on the feet and its use.

Training is vislora's Trainer (vislora.train.trainer), two runs on the same prepared VLM:
  stage 1 (LLaVA's feature alignment): a captioning run whose only stage trains the connector (adapter.
          train_connector), on the train captions; towers frozen. Its connector is then merged into the base model.
  (a)     the VQA test questions answered by that model
  stage 2 a vqa run: LoRA rank r on the LM (q, k, v, o, MLP) on the train questions; connector and towers frozen
  (b)     the same held-out questions answered with the LoRA adapter

(a) and (b) are generated in one routed generate per batch (vislora.evaluate.generative.compare_generative: the
base route is (a), the adapter route is (b)), greedy. Reported: exact match after VQA answer normalisation (aim: (b)
>= (a) + 10 points), VQAv2 soft accuracy, CIDEr and BLEU-4 of the test captions under (a) and (b), the wall time of
every phase and the total. Default sizes keep the run near 10 minutes on 2 quiet CPU cores.

    python benchmarks/bench_vqa.py                 # default sizes
    python benchmarks/bench_vqa.py --quick         # smoke run, 1-2 minutes on quiet cores (figures not meaningful)
    python benchmarks/bench_vqa.py --out runs/fmnist-vqa --json runs/fmnist-vqa/figures.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vislora
from common import bench_vlm
from vislora.assets import read_fashion_mnist
from vislora.data.generative import read_generative
from vislora.evaluate.generative import compare_generative
from vislora.run_config import TrainConfig
from vislora.tasks.generative_metrics import vqa_scores
from vislora.train.trainer import Trainer
from vislora.vlm import Vlm

SEED = 0
VISION, LM, IMAGE_SIZE = "asset:dinov2-small", "asset:smollm2-135m-instruct", 56  # what bench_vlm("smollm2") builds
AIM_POINTS = 10.0  # (b) exact match >= (a) + 10 points
CAPTION_PROMPT = "Describe the image briefly."
# per Fashion-MNIST class: (the item's name, its category, worn on the feet, what it is used for)
ITEMS = (
    ("t-shirt", "clothing", "no", "casual wear"),
    ("trousers", "clothing", "no", "covering the legs"),
    ("pullover", "clothing", "no", "keeping warm"),
    ("dress", "clothing", "no", "dressing up"),
    ("coat", "clothing", "no", "outdoor wear in cold weather"),
    ("sandal", "footwear", "yes", "walking in warm weather"),
    ("shirt", "clothing", "no", "office wear"),
    ("sneaker", "footwear", "yes", "sports and walking"),
    ("bag", "accessory", "no", "carrying things"),
    ("ankle boot", "footwear", "yes", "walking in cold weather"),
)
# question kind -> (phrasings, index of the answer in an ITEMS row)
QUESTIONS = {
    "item": (("What is this item?", "What is shown in the image?"), 0),
    "category": (("Which category is it?", "What category does this item belong to?"), 1),
    "feet": (("Is it worn on the feet?", "Do you wear it on your feet?"), 2),
    "use": (("What is it used for?", "What is this item for?"), 3),
}
CAPTIONS = ("a photo of {a} {noun}.", "a grayscale photo of {a} {noun}.", "{A} {noun} on a black background.",
            "a small picture of {a} {noun}.", "an image showing {a} {noun}.")
NOUNS = {"trousers": "pair of trousers"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=1000,
                        help="train-split images, each with its captions and 4 questions (default: %(default)s)")
    parser.add_argument("--test-images", type=int, default=50,
                        help="test-split images: 4 held-out questions and 5 reference captions each "
                             "(default: %(default)s)")
    parser.add_argument("--align-steps", type=int, default=40,
                        help="stage 1 steps: connector only, on captions (default: %(default)s)")
    parser.add_argument("--lora-steps", type=int, default=60,
                        help="stage 2 steps: LoRA on the LM, on the VQA questions (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="training batch (default: %(default)s)")
    parser.add_argument("--align-lr", type=float, default=2e-3, help="stage 1 learning rate (default: %(default)s)")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="stage 2 learning rate (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r, alpha = 2r (default: %(default)s)")
    parser.add_argument("--eval-batch", type=int, default=16,
                        help="questions per generate call, doubled by the (a)/(b) routes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 64 train / 8 test images, 6 + 6 steps of batch 4")
    parser.add_argument("--out", type=Path, help="write the dataset here and keep it (default: a temporary folder)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write all figures to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_images, args.test_images, args.align_steps, args.lora_steps, args.batch = 64, 8, 6, 6, 4
    for name in ("train_images", "test_images", "align_steps", "lora_steps", "batch", "rank", "eval_batch",
                 "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


# ---------------------------------------------------------------- the dataset
def captions_of(label: int) -> list[str]:
    noun = NOUNS.get(ITEMS[label][0], ITEMS[label][0])
    article = "an" if noun[0] in "aeiou" else "a"
    return [c.format(a=article, A=article.capitalize(), noun=noun) for c in CAPTIONS]


def write_split(folder: Path, split: str, count: int, rng: np.random.Generator) -> dict[str, Path]:
    """`count` items of Fashion-MNIST `split` (equal numbers per class, drawn at random) as PNGs under
    folder/split, with captions_{split}.json (COCO) and vqa_{split}.jsonl; returns the two data files."""
    images, labels = read_fashion_mnist(split)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(ITEMS))]
    chosen = [int(per_class[i % len(ITEMS)][i // len(ITEMS)]) for i in range(count)]
    (folder / split).mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": []}
    rows = []
    for image_id, index in enumerate(chosen):
        name = f"{split}/{index:05d}.png"
        Image.fromarray(images[index]).save(folder / name)
        label = int(labels[index])
        coco["images"].append({"id": image_id, "file_name": name})
        for caption in captions_of(label):
            coco["annotations"].append({"id": len(coco["annotations"]), "image_id": image_id, "caption": caption})
        for phrasings, field in QUESTIONS.values():
            rows.append({"image": name, "question": phrasings[int(rng.integers(len(phrasings)))],
                         "answer": ITEMS[label][field]})
    files = {"captioning": folder / f"captions_{split}.json", "vqa": folder / f"vqa_{split}.jsonl"}
    files["captioning"].write_text(json.dumps(coco))
    files["vqa"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return files


def build_dataset(folder: Path, args: argparse.Namespace) -> dict[str, dict[str, Path]]:
    """split -> kind -> its data file, written under `folder`."""
    rng = np.random.default_rng(SEED)
    return {split: write_split(folder, split, count, rng)
            for split, count in (("train", args.train_images), ("test", args.test_images))}


# ---------------------------------------------------------------- training (vislora's trainer)
def stage_config(folder: Path, name: str, kind: str, data: Path, steps: int, args: argparse.Namespace,
                 stage: dict[str, object]) -> TrainConfig:
    """A TrainConfig on the bundled VLM (given to the Trainer prepared), LoRA rank r on the LM, no augmentation,
    no held-out evaluation (the benchmark scores the test split itself)."""
    return TrainConfig.parse({
        "model": {"spec": VISION, "lm": LM},
        "task": {"kind": kind, "prompt": CAPTION_PROMPT, "generations": 0},
        "adapter": {"targets": ["lm"], "rank": args.rank, "alpha": 2 * args.rank, **stage.get("adapter", {})},
        "data": {"train": str(data), "image_size": IMAGE_SIZE, "augment": {"enabled": False}},
        "optim": {"batch_size": args.batch, "max_steps": steps, "weight_decay": 0.0, **stage.get("optim", {})},
        "stages": stage.get("stages", []),
        "run": {"output_dir": str(folder / name), "progress": False, "resume": False, "seed": SEED},
    })


def fit(config: TrainConfig, vlm: Vlm) -> tuple[vislora.AdaptedModel, list[float]]:
    """(the adapted model, its training losses) of one Trainer run on the prepared `vlm`."""
    trainer = Trainer(config, base_model=vlm)
    result = trainer.fit()
    rows = map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
    return trainer.adapted, [row["loss"] for row in rows if row.get("split") == "train"]


def loss_span(losses: list[float]) -> str:
    if not losses:
        return "no steps"
    k = max(1, len(losses) // 10)
    return f"loss {np.mean(losses[:k]):.3f} -> {np.mean(losses[-k:]):.3f} (first/last {k} steps)"


# ---------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    times: dict[str, float] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp)
        files = build_dataset(folder, args)
        test = {kind: read_generative(path, kind) for kind, path in files["test"].items()}
        times["dataset"] = time.perf_counter() - start
        print(f"dataset in {folder}: {args.train_images} train images ({4 * args.train_images} questions), "
              f"{args.test_images} test images ({len(test['vqa'])} questions), {times['dataset']:.1f} s", flush=True)

        mark = time.perf_counter()
        vlm = bench_vlm("smollm2", IMAGE_SIZE)
        times["build"] = time.perf_counter() - mark
        print(f"VLM built in {times['build']:.1f} s ({vlm.record['image_tokens']} image tokens)", flush=True)

        mark = time.perf_counter()
        align_config = stage_config(folder, "stage1", "captioning", files["train"]["captioning"], args.align_steps,
                                    args, {"adapter": {"train_connector": True}, "optim": {"lr_head": args.align_lr},
                                          "stages": [{"steps": args.align_steps, "train": ["connector"]}]})
        aligned, align = fit(align_config, vlm)
        aligned.unload(merge=True)  # the aligned connector becomes part of the base model; the LM LoRA never trained
        times["stage 1 (connector)"] = time.perf_counter() - mark
        print(f"stage 1, connector on captions: {args.align_steps} steps x {args.batch}, {loss_span(align)}, "
              f"{times['stage 1 (connector)']:.1f} s", flush=True)

        mark = time.perf_counter()
        model, tuned = fit(stage_config(folder, "stage2", "vqa", files["train"]["vqa"], args.lora_steps, args,
                                        {"optim": {"lr_adapter": args.lora_lr}}), vlm)
        adapter = model.adapters[0]
        times["stage 2 (LoRA)"] = time.perf_counter() - mark
        print(f"stage 2, LoRA r={args.rank} on the LM on questions: {args.lora_steps} steps x {args.batch}, "
              f"{loss_span(tuned)}, {times['stage 2 (LoRA)']:.1f} s", flush=True)

        mark = time.perf_counter()
        vqa = compare_generative(model, vlm, test["vqa"], "vqa", adapter=adapter, batch_size=args.eval_batch,
                                 max_new_tokens=12)
        times["eval VQA"] = time.perf_counter() - mark
        mark = time.perf_counter()
        captions = compare_generative(model, vlm, test["captioning"], "captioning", prompt=CAPTION_PROMPT,
                                      adapter=adapter, batch_size=args.eval_batch, max_new_tokens=16)
        times["eval captions"] = time.perf_counter() - mark
    times["total"] = time.perf_counter() - start
    report(args, vqa, captions, times, align, tuned)


def report(args: argparse.Namespace, vqa: object, captions: object, times: dict[str, float], align: list[float],
           tuned: list[float]) -> None:
    by_kind = {}
    for kind, (phrasings, _) in QUESTIONS.items():
        rows = [r for r in vqa.rows if r.question in phrasings]
        by_kind[kind] = {route: 100 * vqa_scores([getattr(r, route) for r in rows], [r.references for r in rows])[
            "exact"] for route in ("base", "adapted")}
    a, b = 100 * vqa.base["exact"], 100 * vqa.adapted["exact"]
    print(f"\nheld-out VQA, {vqa.n} questions on {args.test_images} test images (exact match, normalised):")
    print(f"{'':<28}{'(a) connector':>14}{'(b) + LoRA':>12}")
    print(f"{'exact match %':<28}{a:>14.1f}{b:>12.1f}")
    print(f"{'VQAv2 soft accuracy %':<28}{100 * vqa.base['soft']:>14.1f}{100 * vqa.adapted['soft']:>12.1f}")
    for kind, scores in by_kind.items():
        print(f"{'  ' + kind + ' questions %':<28}{scores['base']:>14.1f}{scores['adapted']:>12.1f}")
    print(f"{'caption CIDEr':<28}{captions.base['cider']:>14.3f}{captions.adapted['cider']:>12.3f}")
    print(f"{'caption BLEU-4':<28}{captions.base['bleu4']:>14.3f}{captions.adapted['bleu4']:>12.3f}")
    for row in vqa.shown()[:3]:
        print(f"  e.g. {row.question!r} -> (a) {row.base!r}, (b) {row.adapted!r}, reference {row.references[0]!r}")
    for row in captions.shown()[:2]:
        print(f"  e.g. caption -> (a) {row.base!r}, (b) {row.adapted!r}")
    gain = b - a
    print(f"\n(b) - (a) = {gain:+.1f} points of exact match (aim >= +{AIM_POINTS:.0f}): "
          f"{'met' if gain >= AIM_POINTS else 'NOT met'}")
    print("wall time (s), " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in times.items())
          + f"; {args.threads} threads")
    if args.json:
        figures = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "platform": platform.platform(), "torch": torch.__version__, "vqa": vqa.to_dict(),
                   "captions": captions.to_dict(), "by_kind": by_kind, "gain_points": gain, "times_s": times,
                   "losses": {"stage1": align, "stage2": tuned}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
