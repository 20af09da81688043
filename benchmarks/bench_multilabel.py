"""The retail case, measured: multi-label attribute tagging on Fashion-MNIST mosaics, rare attributes apart.

Data (benchmarks/mosaics.py): each image a 2x2 mosaic of 1-4 Fashion-MNIST items; labels are the item classes
present plus coarse attributes (footwear, upper body, full outfit). Three classes (shirt, sandal, bag) are rare:
in at most 2% of the training mosaics. Training items come from Fashion-MNIST's training split, validation and
test items from disjoint halves of its test split.

Tagging, DINOv2 ViT-S/14 (the bundled asset), the same training, validation and test mosaics for both:
- linear probe: the backbone frozen, features computed once, one logistic regression per attribute (L-BFGS, L2,
  the demo's `fit_logistic`);
- LoRA r=8 on q and v plus the head, trained by `vislora train`'s Trainer (task.kind multilabel, BCE) for a few
  hundred steps; the head starts from the probe (LP-FT, as the demo).
Both are scored on the test mosaics: mAP, rare-attribute mAP, micro/macro F1 at thresholds tuned on validation.

Prompted dual encoder: DINOv2 ViT-S/14 + all-MiniLM-L6-v2 joined by 256-d projections, pre-aligned on single
Fashion-MNIST items (training split) with class prompts (towers frozen). Each attribute is scored by its prompts
(task.kind prompted_multilabel): zero-shot (thresholds tuned on validation), then LoRA r=8 on q and v of both
towers, of the image tower only, and of the text tower only, the same steps each.

Search: the test mosaics indexed (vislora.search.build_index) by the pre-aligned base and by the adapter on both
towers; one text query per attribute (its prompt); hit@10 (a relevant mosaic among the top 10: the library's
recall@10) and precision@10 (relevant share of the top 10), and the index build's images/s.

    python benchmarks/bench_multilabel.py             # 2,000 training mosaics, 150 steps a run at 56 px (2 cores)
    python benchmarks/bench_multilabel.py --smoke     # a few steps on small sets, to check the script
    python benchmarks/bench_multilabel.py --skip-dual # tagging only
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vislora.assets import FASHION_MNIST_CLASSES, fashion_mnist_dir, read_fashion_mnist
from vislora.data.datasets import collate, open_dataset
from vislora.data.transforms import build_transform, model_input_spec
from vislora.dual_encoder import build_dual_encoder
from vislora.evaluate.multilabel import MultilabelMetrics, multilabel_metrics, tune_thresholds
from vislora.evaluate.prompted import score_dataset, zero_shot_attributes
from vislora.run_config import TrainConfig
from vislora.runs import read_task
from vislora.search import AdapterIdentity, Embedder, build_index, load_index
from vislora.tasks.multilabel import attribute_scores
from vislora.tasks.prealign import prealign_projections
from vislora.tasks.prompted import prompt_names
from vislora.train.demo import features, fit_logistic
from vislora.train.schedule import parameter_groups
from vislora.train.trainer import Trainer
from vislora.train.vlm import tower_variants

sys.path.insert(0, str(Path(__file__).parent))
from mosaics import RARE, make_mosaics, mosaics

TEMPLATES = ["a photo of a {}.", "a black and white photo of a {}.", "a photo of the {}, a type of clothing."]
NAMES = {"t-shirt/top": "t-shirt", "bag": "handbag", "footwear": "pair of shoes", "upper body": "top",
         "full outfit": "full outfit with shoes"}

RARE_BELOW = 50  # 2% of 2,000 training mosaics is 40 positives


def tagging_config(out: Path, manifests: dict[str, Path], args: argparse.Namespace) -> TrainConfig:
    return TrainConfig.parse({
        "model": {"spec": "asset:dinov2-small"},
        "task": {"kind": "multilabel", "multilabel": {"rare_below": RARE_BELOW}},
        "adapter": {"targets": ["q", "v"], "rank": 8, "alpha": 16},
        "data": {"train": str(manifests["train"]), "val": str(manifests["val"]), "image_size": args.image_size},
        "optim": {"batch_size": args.batch_size, "max_steps": args.steps, "lr_adapter": 3e-3, "lr_head": 1e-3,
                  "warmup_steps": 5},
        "run": {"output_dir": str(out), "seed": args.seed, "progress": False},
    })


def targets(trainer: Trainer, dataset) -> torch.Tensor:
    return torch.stack([trainer.task.attributes.encode(r.labels) for r in dataset.records]).float()


@torch.no_grad()
def model_scores(trainer: Trainer, dataset) -> torch.Tensor:
    """The trained model's attribute scores [images, attributes] on `dataset` (evaluation transform)."""
    dataset.transform = trainer.eval_transform
    model = trainer.adapted.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, collate_fn=collate, generator=torch.Generator())
    return torch.cat([attribute_scores(model(b["image"]).float(), trainer.task.attributes) for b in loader])


def scored(name: str, trainer: Trainer, val_scores: torch.Tensor, val_y: torch.Tensor, test_scores: torch.Tensor,
           test_y: torch.Tensor) -> MultilabelMetrics:
    names = list(trainer.task.attributes.names)
    thresholds = tune_thresholds(val_scores, val_y, names, tuned_on=f"validation ({name})")
    return multilabel_metrics(test_scores, test_y, names, thresholds.values, train_counts=trainer.task.train_counts,
                              rare_below=RARE_BELOW)


def tagging(work: Path, manifests: dict[str, Path], args: argparse.Namespace) -> dict[str, MultilabelMetrics]:
    trainer = Trainer(tagging_config(work / "tagging", manifests, args))
    test = trainer.task.prepare_data(open_dataset(manifests["test"], multilabel=trainer.task.data_format()),
                                     train=False)
    started = time.perf_counter()
    x_train, _ = features(trainer, trainer.train_data)
    x_val, _ = features(trainer, trainer.val_data)
    x_test, _ = features(trainer, test)
    y_train, y_val, y_test = targets(trainer, trainer.train_data), targets(trainer, trainer.val_data), targets(
        trainer, test)
    weight, bias = fit_logistic(x_train, y_train, y_train.shape[1], loss_fn=F.binary_cross_entropy_with_logits)
    probe_seconds = time.perf_counter() - started
    _, head = parameter_groups(trainer.adapted)
    with torch.no_grad():  # LP-FT: the trained head starts where the probe ended
        head[0].copy_(weight)
        head[1].copy_(bias)
    attributes = trainer.task.attributes
    probe = scored("probe", trainer, attribute_scores(x_val @ weight.T + bias, attributes), y_val,
                   attribute_scores(x_test @ weight.T + bias, attributes), y_test)
    result = trainer.fit()
    lora = scored("lora", trainer, model_scores(trainer, trainer.val_data), y_val, model_scores(trainer, test), y_test)
    print(f"\nprobe: {probe_seconds:.0f} s (features + fit); LoRA training: {result.seconds:.0f} s, "
          f"{args.steps} steps of {args.batch_size}; test mosaics: {len(test)}")
    return {"linear probe": probe, "LoRA r=8 (q, v)": lora}


def prompted_config(out: Path, manifests: dict[str, Path], args: argparse.Namespace) -> TrainConfig:
    return TrainConfig.parse({
        "model": {"spec": "asset:dinov2-small", "text": "asset:all-minilm-l6-v2", "embed_dim": 256},
        "task": {"kind": "prompted_multilabel", "templates": TEMPLATES, "class_names": NAMES,
                 "multilabel": {"rare_below": RARE_BELOW}},
        "adapter": {"targets": ["q", "v"], "rank": 8, "alpha": 16},
        "data": {"train": str(manifests["train"]), "val": str(manifests["val"]), "image_size": args.image_size},
        "optim": {"batch_size": args.batch_size, "max_steps": args.steps, "lr_adapter": 1e-3, "lr_head": 1e-3,
                  "warmup_steps": 5},
        "run": {"output_dir": str(out), "seed": args.seed, "progress": False},
    })


def prealigned_dual(args: argparse.Namespace):
    """DINOv2 + MiniLM with projections pre-aligned on single items (one per 2x2 canvas, as in the mosaics)."""
    model = build_dual_encoder("asset:dinov2-small", "asset:all-minilm-l6-v2", embed_dim=256).eval()
    transform = build_transform(model_input_spec(model.vision, args.image_size), train=False)
    items, labels = read_fashion_mnist("train", fashion_mnist_dir())
    canvases, names = mosaics(items, labels, args.pool, max_items=1, seed=args.seed + 99)
    pixels = torch.stack([transform(Image.fromarray(c).convert("RGB")) for c in canvases])
    classes = [NAMES.get(c, c) for c in FASHION_MNIST_CLASSES]
    result = prealign_projections(model, pixels, [FASHION_MNIST_CLASSES.index(n[0]) for n in names], classes,
                                  TEMPLATES)
    print(f"pre-aligned the projections on {args.pool} single items: InfoNCE {result.first_loss:.3f} -> "
          f"{result.last_loss:.3f}")
    return model


def prompted(work: Path, manifests: dict[str, Path], args: argparse.Namespace) -> tuple[dict, dict]:
    """Zero-shot and LoRA on both / one tower, scored on the test mosaics; then the search figures."""
    base = prealigned_dual(args)
    results, seconds, trainers = {}, {}, {}
    for variant, config in tower_variants(prompted_config(work / "prompted", manifests, args)).items():
        trainer = Trainer(config, base_model=copy.deepcopy(base))
        test = prepared_test(trainer, manifests)
        attributes = trainer.task.attributes
        names = prompt_names(list(attributes.names), NAMES)
        if not results:
            _, results["zero-shot"] = zero_shot_attributes(
                base, attributes, trainer.val_data, test, NAMES, TEMPLATES, train_counts=trainer.task.train_counts,
                rare_below=RARE_BELOW)
        started = time.perf_counter()
        trainer.fit()
        seconds[variant] = time.perf_counter() - started
        val_scores = score_dataset(trainer.adapted, trainer.val_data, attributes, names, TEMPLATES)
        test_scores = score_dataset(trainer.adapted, test, attributes, names, TEMPLATES)
        thresholds = tune_thresholds(val_scores.scores, val_scores.targets, attributes.names)
        results[f"LoRA {variant}"] = multilabel_metrics(test_scores.scores, test_scores.targets, attributes.names,
                                                        thresholds.values, train_counts=trainer.task.train_counts,
                                                        rare_below=RARE_BELOW)
        trainers[variant] = (trainer, test, names)
    print("prompted LoRA training seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return results, search(work, *trainers["both"])


def prepared_test(trainer: Trainer, manifests: dict[str, Path]):
    test = trainer.task.prepare_data(open_dataset(manifests["test"], multilabel=trainer.task.data_format()),
                                     train=False)
    test.transform = trainer.eval_transform
    return test


def search(work: Path, trainer: Trainer, test, names: list[str]) -> dict:
    """Index the test mosaics with the base and with the adapter; query each attribute by its first prompt."""
    adapter_dir = trainer.run_dir / "adapter"
    task = read_task(adapter_dir)
    texts = [TEMPLATES[0].format(name) for name in names]
    relevant = [{i for i, r in enumerate(test.records) if attribute in r.labels}
                for attribute in trainer.task.attributes.names]
    figures = {}
    for label, identity in (("base", None), ("LoRA both towers", AdapterIdentity.of_folder(adapter_dir))):
        embedder = Embedder(trainer.adapted, task, str(adapter_dir), identity)
        report = build_index(test, embedder, work / "index" / label.replace(" ", "-"))
        index = load_index(report.path)
        if index.count != len(test):
            raise RuntimeError(f"{len(test) - index.count} test mosaics could not be indexed")
        _, ids = index.search(embedder.texts(texts), 10)  # [queries, 10] row numbers = test indices
        hits = [[int(j) in relevant[q] for j in ids[q]] for q in range(len(texts))]
        figures[label] = {"hit@10": float(np.mean([any(h) for h in hits])),
                          "precision@10": float(np.mean([np.mean(h) for h in hits])),
                          "rare precision@10": float(np.mean([np.mean(h) for q, h in enumerate(hits)
                                                              if trainer.task.attributes.names[q] in RARE])),
                          "images/s": report.images_per_s}
    return figures


def print_prompted(results: dict[str, MultilabelMetrics], figures: dict) -> None:
    print(f"\nprompted dual encoder on the test mosaics:\n{'figure':<12} " + " ".join(f"{n:>18}" for n in results))
    for key, label in (("map", "mAP"), ("rare_map", "rare mAP"), ("micro_f1", "micro F1"), ("macro_f1", "macro F1")):
        print(f"{label:<12} " + " ".join(f"{getattr(m, key):>18.3f}" for m in results.values()))
    print("\nsearch (text -> image, one query per attribute: its first prompt):")
    print(f"{'index':<18} {'hit@10':>8} {'precision@10':>13} {'rare p@10':>10} {'build images/s':>15}")
    for label, f in figures.items():
        print(f"{label:<18} {f['hit@10']:>8.3f} {f['precision@10']:>13.3f} {f['rare precision@10']:>10.3f} "
              f"{f['images/s']:>15.1f}")


def print_tagging(results: dict[str, MultilabelMetrics]) -> None:
    probe, lora = results.values()
    print(f"\n{'attribute':<14} {'train+':>6} {'test+':>6} " + " ".join(f"{name[:16]:>16}" for name in results)
          + f" {'delta AP':>9}")
    for p, q in zip(probe.per_attribute, lora.per_attribute, strict=True):
        flag = " (rare)" if p.rare else ""
        print(f"{p.name + flag:<14} {p.train_positives:>6} {p.positives:>6} {p.ap:>16.3f} {q.ap:>16.3f} "
              f"{100 * (q.ap - p.ap):>+8.1f}")
    print(f"\n{'figure':<22} " + " ".join(f"{name[:16]:>16}" for name in results) + f" {'points':>8}")
    for key, label in (("map", "mAP"), ("rare_map", "rare mAP"), ("micro_f1", "micro F1 (val thr.)"),
                       ("macro_f1", "macro F1 (val thr.)")):
        a, b = getattr(probe, key), getattr(lora, key)
        print(f"{label:<22} {a:>16.3f} {b:>16.3f} {100 * (b - a):>+8.1f}")
    print(f"rare attributes: {', '.join(probe.rare)} (fewer than {RARE_BELOW} training positives)")
    print(f"aims: LoRA >= probe + 5 mAP points: {100 * (lora.map - probe.map):+.1f}; rare AP >= probe + 9 points: "
          f"{100 * (lora.rare_map - probe.rare_map):+.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=2000, help="training mosaics")
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=int, default=2000, help="single items the dual encoder is pre-aligned on")
    parser.add_argument("--skip-dual", action="store_true", help="tagging only: no dual encoder, no search")
    parser.add_argument("--smoke", action="store_true", help="small sets and a few steps")
    args = parser.parse_args()
    if args.smoke:
        args.train, args.val, args.test, args.steps, args.pool = 400, 100, 100, 5, 300
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifests = make_mosaics(work / "mosaics", args.train, args.val, args.test, rare=RARE, seed=args.seed)
        print(f"mosaics: {args.train} train / {args.val} val / {args.test} test at {args.image_size} px, rare: "
              f"{', '.join(RARE)} (2% of training mosaics)")
        print_tagging(tagging(work, manifests, args))
        if not args.skip_dual:
            print_prompted(*prompted(work, manifests, args))
    print(f"\nwall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
