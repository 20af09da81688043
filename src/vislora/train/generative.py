"""Captioning and VQA for the trainer: a generative VLM (vislora.vlm) learns to answer about images, with the loss on
the answer tokens only.

The task builds the VLM model.* describes (`model.spec` + `model.lm` composed LLaVA-style, or a whole Hugging Face VLM
in `model.spec`) or takes a prepared `vislora.vlm.Vlm`, adapts the parts adapter.targets names (`lm`, `lm:q`,
`vision`, ...; vislora.vlm.vlm_adapter_config; `adapter.train_connector` trains the connector in full and saves it)
and reads data.train / data.val with vislora.data.generative (COCO captions, VQA JSONL/CSV, LLaVA conversations).
A training sequence is the model's chat template around the image tokens and the question (captioning:
`task.prompt`), then the answer; the loss is the VLM's own LM loss with labels only on the answer:

    input_ids = [chat template(image tokens, question)] [answer] [end of turn] [pad ...]
    labels    = [-100 ...                             ] [answer] [end of turn] [-100 ...]

An example with several references (COCO's five captions) trains on reference `epoch mod count` in each epoch.
Answers cut at `task.max_length` raise one VisloraWarning and are counted in metrics.jsonl (`cut_answers`).
Evaluation is the held-out answer loss (mean over answer tokens) and greedy answers to the first `task.generations`
held-out examples: exact match against any reference for VQA. Caption metrics (CIDEr, ...) are
vislora.evaluate.generative's.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import nn

from vislora.config import AdapterConfig
from vislora.data.generative import GenerativeDataset, read_generative
from vislora.data.transforms import SampleTransform, model_input_spec
from vislora.errors import ConfigError, DataError, VisloraWarning
from vislora.run_config import TOWER_FIELDS, VLM_FIELDS, TrainConfig
from vislora.tasks.classification import eval_batches
from vislora.train.tasks import TrainTask
from vislora.train.view import TrainerView
from vislora.vlm import IGNORE, Vlm, build_vlm, vlm_adapter_config

logger = logging.getLogger(__name__)


class GenerativeTrainData(torch.utils.data.Dataset):
    """A GenerativeDataset as the trainer reads datasets: items carry `image` (the pixel values) and the answer of
    the epoch; a name, no classes, and no resolution check (every image is resized to the VLM's side)."""

    def __init__(self, dataset: GenerativeDataset, name: str) -> None:
        self.dataset = dataset
        self.name = name
        self.classes: list[str] = []

    @property
    def transform(self) -> Any:
        return self.dataset.transform

    @transform.setter
    def transform(self, transform: Any) -> None:
        self.dataset.transform = transform

    @property
    def window(self) -> Any:
        return self.dataset.window

    @window.setter
    def window(self, window: Any) -> None:
        self.dataset.window = window

    def resolutions(self) -> Counter:
        return Counter()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        answers = item["answers"]
        epoch = self.transform.epoch if isinstance(self.transform, SampleTransform) else 0
        answer = answers[epoch % len(answers)] if answers else item["answer"]
        return {"image": item["pixel_values"], "question": item["question"], "answer": answer, "answers": answers,
                "index": index}


def collate_answers(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of GenerativeTrainData items: image [N, C, H, W], question / answer / answers lists, index [N]; no
    image is skipped (a missing or broken one is a DataError naming its line)."""
    return {"image": torch.stack([item["image"] for item in items]),  # [N, C, H, W]
            "question": [item["question"] for item in items], "answer": [item["answer"] for item in items],
            "answers": [item["answers"] for item in items],
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long), "skipped": []}


@dataclass
class GenerativeEvaluation:
    """Held-out results of a captioning / VQA run: answer-token loss; exact match of greedy answers (VQA);
    `samples` holds the greedy answers {index, question, generated, answers}."""

    n: int
    loss: float
    exact_match: float | None = None
    skipped: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        figures = {"loss": self.loss}
        if self.exact_match is not None:
            figures["exact_match"] = self.exact_match
        return figures


class GenerativeTask(TrainTask):
    """A generative VLM answering about images (see the module docstring); `CaptioningTask` and `VqaTask` differ
    only in the data they read and in exact match."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.vlm: Vlm | None = None
        self.prepared = False
        self.cut_answers = 0  # training answers cut at task.max_length so far
        self.warned = False

    # ---------------------------------------------------------------- data
    def open_data(self, source: str, classes: list[str] | None, limit: int | None) -> GenerativeTrainData:
        """The examples of `source` (the first `limit`), images relative to its folder."""
        return GenerativeTrainData(GenerativeDataset(read_generative(source, self.kind, limit=limit), None), source)

    def prepare_data(self, dataset: Any, train: bool) -> GenerativeTrainData:
        """A dataset handed to the Trainer (a GenerativeDataset) wrapped as the trainer reads it."""
        if isinstance(dataset, GenerativeDataset):
            dataset = GenerativeTrainData(dataset, f"{'train' if train else 'val'} data")
        if not isinstance(dataset, GenerativeTrainData):
            raise DataError(f"a {self.kind} run reads generative data (vislora.data.generative.GenerativeDataset), "
                            f"got a {type(dataset).__name__}; give data.train a COCO captions / LLaVA .json or a "
                            ".jsonl/.csv of image, question, answer rows")
        if not len(dataset):
            raise DataError(f"{dataset.name} holds no example; check the file and data.train_limit / val_limit")
        return dataset

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_answers(samples)

    # ---------------------------------------------------------------- model
    def build(self, classes: list[str], base: Any = None) -> tuple[nn.Module, AdapterConfig]:
        """The VLM (model.* or a prepared `Vlm`) and the adapter config of adapter.targets (default: lm)."""
        cfg = self.config
        if base is None:
            vlm = build_vlm(cfg.model.spec, cfg.model.lm, image_size=cfg.data.image_size,
                            connector_hidden=cfg.model.connector_hidden, max_length=cfg.task.max_length,
                            system=cfg.task.system, seed=cfg.run.seed)
        elif isinstance(base, Vlm):
            vlm = base
            if vlm.processor.max_length != cfg.task.max_length:
                raise ConfigError(f"the prepared VLM's processor cuts sequences at {vlm.processor.max_length} tokens "
                                  f"but task.max_length is {cfg.task.max_length}; make them agree")
        else:
            raise ConfigError(f"a {self.kind} run takes a prepared vislora.vlm.Vlm (build_vlm(...)) as its base "
                              f"model, got a {type(base).__name__}")
        vision = self.image_model(vlm.model, vlm)
        side = model_input_spec(vision, cfg.data.image_size).size
        if side != vlm.record.get("image_size", side):
            raise ConfigError(f"the VLM takes {vlm.record['image_size']} px images but data.image_size gives {side} "
                              f"px; set data.image_size: {vlm.record['image_size']}")
        self.vlm, self.prepared = vlm, base is not None
        a = cfg.adapter
        common = a.model_dump(exclude={"targets", "rank", "alpha", "preset", *TOWER_FIELDS, *VLM_FIELDS},
                              exclude_none=True)
        config = vlm_adapter_config(vlm.model, a.targets or ["lm"], rank=a.rank or 8, alpha=a.alpha or 16.0,
                                    part_ranks=a.part_ranks, part_alphas=a.part_alphas,
                                    train_connector=a.train_connector, **common)
        return vlm.model, config

    def image_model(self, base: nn.Module, vlm: Vlm | None = None) -> nn.Module:
        """The vision tower, whose input spec the image transforms follow."""
        return base.get_submodule((vlm or self.vlm).family.path("vision"))

    def backbones(self, base: nn.Module) -> list[nn.Module]:
        return [base]

    # ---------------------------------------------------------------- loss
    def questions(self, batch: dict[str, Any]) -> list[str]:
        """The batch's questions; task.prompt for captions (question None)."""
        return [q if q is not None else self.config.task.prompt for q in batch["question"]]

    def tokens(self, questions: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
        """processor.train_batch; its warning about answers cut at max_length is passed on once per run, later
        cuts are counted (`cut_answers`)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokens = self.vlm.processor.train_batch(questions, answers)
        for caught_warning in caught:
            cut = issubclass(caught_warning.category, VisloraWarning) and "were cut at max_length" in str(
                caught_warning.message)
            if cut and self.warned:
                continue
            self.warned = self.warned or cut
            suffix = "; later cuts are counted in metrics.jsonl (cut_answers)" if cut else ""
            warnings.warn(f"{caught_warning.message}{suffix}", caught_warning.category, stacklevel=3)
        self.cut_answers += cut_rows(tokens["labels"], self.vlm.processor.eos_token_id)
        return tokens

    def forward(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, int]:
        """(mean loss over the batch's answer tokens, answer tokens)."""
        tokens = self.tokens(self.questions(batch), list(batch["answer"]))
        out = model(**{k: v.to(device) for k, v in tokens.items()}, pixel_values=batch["image"].to(device))
        return out.loss.float(), int((tokens["labels"][:, 1:] != IGNORE).sum())

    def loss(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, int]:
        return self.forward(model, batch, device)[0], len(batch["answer"])

    def train_metrics(self) -> dict[str, float]:
        return {"cut_answers": self.cut_answers}

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, trainer: TrainerView) -> GenerativeEvaluation:
        """Answer-token loss over `val_data` and greedy answers to its first task.generations examples, sharded
        across processes and gathered."""
        accelerator, data = trainer.accelerator, trainer.val_data
        indices = list(range(accelerator.process_index, len(data), accelerator.num_processes))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, indices),
                                             batch_size=self.config.optim.batch_size, collate_fn=self.collate,
                                             num_workers=self.config.data.num_workers, generator=torch.Generator())
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in eval_batches(trainer.model, loader, []):
                with accelerator.autocast():
                    loss, tokens = self.forward(trainer.model, batch, accelerator.device)
                total, count = total + loss.item() * tokens, count + tokens
        sums = gather_object([(total, count)])
        total, count = sum(s[0] for s in sums), sum(s[1] for s in sums)
        mine = set(indices)
        first = [i for i in range(min(self.config.task.generations, len(data))) if i in mine]
        samples = sorted(gather_object(self.generate(trainer, first)), key=lambda s: s["index"])
        for sample in samples[:3]:
            logger.info("step %d, held-out example %d: %r -> %r (references %r)", trainer.loop.step, sample["index"],
                        sample["question"], sample["generated"], sample["answers"][:3])
        exact = None
        if self.kind == "vqa" and samples:
            exact = sum(matches(s["generated"], s["answers"]) for s in samples) / len(samples)
        return GenerativeEvaluation(n=len(data), loss=total / max(count, 1), exact_match=exact, samples=samples)

    @torch.no_grad()
    def generate(self, trainer: TrainerView, indices: list[int]) -> list[dict[str, Any]]:
        """Greedy answers of the adapted model to `indices` of val_data."""
        model, processor, data = trainer.adapted, self.vlm.processor, trainer.val_data
        size = self.config.optim.batch_size
        rows = []
        for batch in eval_batches(model, (collate_answers([data[i] for i in indices[s:s + size]])
                                          for s in range(0, len(indices), size)), []):
            prompts = processor.prompt_batch(self.questions(batch))
            device = trainer.accelerator.device
            out = model.generate(**{k: v.to(device) for k, v in prompts.items()},
                                 pixel_values=batch["image"].to(device), do_sample=False, num_beams=1,
                                 max_new_tokens=self.config.task.max_new_tokens, **processor.generation_kwargs())
            texts = processor.decode(out.cpu(), prompts["input_ids"].shape[1])
            rows += [{"index": int(i), "question": q, "generated": t, "answers": a} for i, q, t, a in
                     zip(batch["index"], batch["question"], texts, batch["answers"], strict=True)]
        return rows

    def info(self) -> dict[str, Any]:
        """task.json: the VLM's record (what vislora.runs.load_trained_vlm rebuilds it from) and the prompt."""
        return {**super().info(), "vlm": self.vlm.record, "prompt": self.config.task.prompt,
                "prepared_base": self.prepared}


class CaptioningTask(GenerativeTask):
    """Captions: every image is asked task.prompt; references from COCO captions JSON or image, caption rows."""

    kind = "captioning"


class VqaTask(GenerativeTask):
    """Visual question answering: image, question, answer(s) rows or LLaVA conversations; exact match in eval."""

    kind = "vqa"


def cut_rows(labels: torch.Tensor, eos_token_id: int) -> int:
    """Rows of `labels` [N, T] whose answer lost its end-of-turn token: the answers max_length cut."""
    count = 0
    for row in labels:
        kept = row[row != IGNORE]
        count += int(not len(kept) or int(kept[-1]) != eos_token_id)
    return count


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed: `A sneaker.` and `a  sneaker` match."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def matches(generated: str, answers: list[str]) -> bool:
    """Whether a generated answer equals one of the references (normalize_answer)."""
    return normalize_answer(generated) in {normalize_answer(a) for a in answers}
