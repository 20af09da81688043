"""Text in, token ids out: prompts with their image tokens, answer-only labels for training, left-padded prompts for
generation.

A `PromptLayout` says how one family writes a prompt (where the image tokens go, the chat template) and ends an
answer; `VlmProcessor` applies it to batches. Training sequences are prompt + answer with labels -100 on every
prompt, image and padding token, so the loss is on answer tokens only:

    input_ids = [prompt (image tokens inside)] [answer] [end] [pad ...]
    labels    = [-100 ...                    ] [answer] [end] [-100 ...]

A sequence over `max_length` loses answer tokens from its end (a VisloraWarning counts them); a prompt alone over the
limit is refused, since cutting it would cut the image or the question.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from vislora.errors import DataError, VisloraWarning

IGNORE = -100  # label of a token the loss skips


class PromptLayout(Protocol):
    """How a family turns a question into prompt ids and an answer into answer ids."""

    def prompt(self, tokenizer: Any, question: str) -> list[int]: ...

    def answer(self, tokenizer: Any, answer: str) -> list[int]: ...


@dataclass(frozen=True)
class ChatLayout:
    """The tokenizer's chat template around one user turn that holds the image tokens, a newline and the question
    (LLaVA-style); the answer ends with the end-of-turn token. Without a chat template: `image\\nquestion\\n`."""

    image_token: str
    image_tokens: int
    system: str | None = None

    def prompt(self, tokenizer: Any, question: str) -> list[int]:
        content = self.image_token * self.image_tokens + "\n" + question
        if not getattr(tokenizer, "chat_template", None):
            return tokenizer(content + "\n", add_special_tokens=False)["input_ids"]
        messages = [{"role": "user", "content": content}]
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer(self, tokenizer: Any, answer: str) -> list[int]:
        return [*tokenizer(answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


class VlmProcessor:
    """Batches of questions (and answers) for one VLM: `train_batch` for the loss, `prompt_batch` for generate.

    `max_length` bounds prompt + answer in training and the prompt in generation (a server's prompt limit).
    """

    def __init__(self, tokenizer: Any, layout: PromptLayout, max_length: int = 512,
                 image_token_id: int | None = None) -> None:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.layout = layout
        self.max_length = max_length
        self.image_token_id = image_token_id

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def prompt_ids(self, question: str) -> list[int]:
        """The prompt of one question; DataError for an empty question or one over `max_length`."""
        if not question or not question.strip():
            raise DataError("the question (prompt) is empty; give the text to answer, e.g. 'What is this item?' "
                            "(captioning runs use task.prompt)")
        ids = self.layout.prompt(self.tokenizer, question)
        if len(ids) > self.max_length:
            raise DataError(f"the prompt is {len(ids)} tokens (image tokens included), over the limit of "
                            f"{self.max_length}; shorten the question or raise max_length")
        return ids

    def train_batch(self, questions: Sequence[str], answers: Sequence[str]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and labels (-100 outside the answers), right-padded; answers cut at
        `max_length` are counted in a VisloraWarning."""
        if len(questions) != len(answers):
            raise DataError(f"{len(questions)} questions but {len(answers)} answers; give one answer per question")
        rows, cut = [], []
        for question, answer in zip(questions, answers, strict=True):
            if not answer or not answer.strip():
                raise DataError(f"empty answer to {question!r}: every training example needs answer text "
                                "(`vislora data check` lists them)")
            prompt = self.prompt_ids(question)
            reply = self.layout.answer(self.tokenizer, answer)
            room = self.max_length - len(prompt)
            if len(reply) > room:
                cut.append(len(reply) - room)
                reply = reply[:room]
            rows.append((prompt, reply))
        if cut:
            warnings.warn(f"{len(cut)} of {len(rows)} answers were cut at max_length {self.max_length} (lost "
                          f"{sum(cut)} answer tokens, up to {max(cut)} from one answer); raise max_length or "
                          "shorten the answers", VisloraWarning, stacklevel=2)
        width = max(len(p) + len(r) for p, r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (prompt, reply) in enumerate(rows):
            n = len(prompt) + len(reply)
            input_ids[i, :n] = torch.tensor(prompt + reply)
            labels[i, len(prompt):n] = torch.tensor(reply)
            attention[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def prompt_batch(self, questions: Sequence[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask of the prompts, left-padded (generation appends on the right)."""
        prompts = [self.prompt_ids(q) for q in questions]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt):] = torch.tensor(prompt)
            attention[i, width - len(prompt):] = 1
        return {"input_ids": input_ids, "attention_mask": attention}

    def decode(self, generated: torch.Tensor, prompt_width: int) -> list[str]:
        """The text generated after the prompts (`generate`'s output holds the prompt first)."""
        return [text.strip() for text in self.tokenizer.batch_decode(generated[:, prompt_width:],
                                                                     skip_special_tokens=True)]

    def generation_kwargs(self) -> dict[str, Any]:
        """Arguments every `generate` call needs: pad and end tokens, and the image token never generated."""
        kwargs: dict[str, Any] = {"pad_token_id": self.pad_token_id, "eos_token_id": self.eos_token_id}
        if self.image_token_id is not None:
            kwargs["suppress_tokens"] = [self.image_token_id]
        return kwargs
