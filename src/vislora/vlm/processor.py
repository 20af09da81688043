"""Text in, token ids out: prompts with their image tokens, answer-only labels for training, left-padded prompts for
generation.

A `PromptLayout` says how one family writes a prompt (where the image tokens go, the chat template) and ends an
answer; `VlmProcessor` applies it to batches. Training sequences are prompt + answer with labels -100 on every
prompt, image and padding token, so the loss is on answer tokens only:

    input_ids = [prompt (image tokens inside)] [answer] [end] [pad ...]
    labels    = [-100 ...                    ] [answer] [end] [-100 ...]

A sequence over `max_length` loses answer tokens from its end (a VisloraWarning counts them); a prompt alone over the
limit is refused, since cutting it would cut the image or the question.

Beyond prompt and answer, a layout says which token ends an answer, what further inputs a batch needs (PaliGemma's
`token_type_ids`), how its model takes pixels (Idefics3: one image per prompt on a second axis), and what its model's
own `generate` does to a prompt (BLIP's cuts the last prompt token and sets the end and pad tokens itself);
`LayoutBase` holds what most families share. The families' layouts are in `vislora.vlm.layouts`.
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
    """How a family turns a question into prompt ids and an answer into answer ids, and what else its model takes."""

    def prompt(self, tokenizer: Any, question: str) -> list[int]: ...

    def answer(self, tokenizer: Any, answer: str) -> list[int]: ...

    def end_id(self, tokenizer: Any) -> int: ...

    def extra(self, answer: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def images(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def tail(self, tokenizer: Any) -> list[int]: ...

    def end_kwargs(self, pad_id: int, end_id: int) -> dict[str, Any]: ...


class LayoutBase:
    """What most families share: an answer ends with the tokenizer's end token, the model takes input_ids,
    attention_mask and (B, C, H, W) pixel_values, and its `generate` takes the prompt and the end and pad tokens as
    given."""

    def end_id(self, tokenizer: Any) -> int:
        """The token that ends an answer (and stops generation)."""
        return int(tokenizer.eos_token_id)

    def extra(self, answer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Further model inputs of a batch whose answer tokens are `answer` (B, T) bool (all False for prompts)."""
        return {}

    def images(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's image inputs from a (B, C, H, W) batch, one image per prompt."""
        return {"pixel_values": pixel_values}

    def tail(self, tokenizer: Any) -> list[int]:
        """Tokens after a generation prompt that the model's `generate` cuts off again (none)."""
        return []

    def end_kwargs(self, pad_id: int, end_id: int) -> dict[str, Any]:
        """The pad and end tokens as `generate` arguments (a model whose generate sets them itself takes none)."""
        return {"pad_token_id": pad_id, "eos_token_id": end_id}


@dataclass(frozen=True)
class ChatLayout(LayoutBase):
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
        return [*tokenizer(answer, add_special_tokens=False)["input_ids"], self.end_id(tokenizer)]


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
        """The token that ends an answer."""
        return self.layout.end_id(self.tokenizer)

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
        """input_ids, attention_mask and labels (-100 outside the answers), right-padded, and the layout's extra
        inputs; answers cut at `max_length` are counted in a VisloraWarning."""
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
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                **self.layout.extra(labels != IGNORE)}

    def prompt_batch(self, questions: Sequence[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask of the prompts, left-padded (generation appends on the right), and the
        layout's extra inputs."""
        tail = self.layout.tail(self.tokenizer)
        prompts = [self.prompt_ids(q) + tail for q in questions]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt):] = torch.tensor(prompt)
            attention[i, width - len(prompt):] = 1
        return {"input_ids": input_ids, "attention_mask": attention,
                **self.layout.extra(torch.zeros_like(input_ids, dtype=torch.bool))}

    def image_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's image inputs (keyword arguments) from a (B, C, H, W) batch with one image per prompt."""
        return self.layout.images(pixel_values)

    def new_tokens(self, generated: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """The token ids generated after prompts `prompt_width` wide (`generate`'s output holds the prompt first,
        less the tail its model cuts off)."""
        return generated[:, prompt_width - len(self.layout.tail(self.tokenizer)):]

    def decode(self, generated: torch.Tensor, prompt_width: int) -> list[str]:
        """The text generated after prompts `prompt_width` wide (`generate`'s output holds the prompt first)."""
        return [text.strip() for text in self.tokenizer.batch_decode(self.new_tokens(generated, prompt_width),
                                                                     skip_special_tokens=True)]

    def generation_kwargs(self) -> dict[str, Any]:
        """Arguments every `generate` call needs: pad and end tokens, and the image token never generated."""
        kwargs: dict[str, Any] = self.layout.end_kwargs(self.pad_token_id, self.eos_token_id)
        if self.image_token_id is not None:
            kwargs["suppress_tokens"] = [self.image_token_id]
        return kwargs
