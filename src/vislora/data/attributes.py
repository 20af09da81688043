"""Attribute vocabularies for multi-label data: ordered attribute names, optional groups, multi-hot targets.

An image carries a set of labels (`Record.labels`, e.g. ("cotton", "slim", "striped")). `AttributeSet` fixes the
order of the attributes (one model output per attribute), may sort them into groups (fabric / cut / pattern), and
may make a group single-choice: every image then holds exactly one attribute of that group. Targets are multi-hot:
`encode(("cotton", "striped"))[i] = 1.0` where `names[i]` is one of the labels, 0.0 elsewhere.

    >>> attrs = AttributeSet(("cotton", "silk", "slim", "loose"), groups={"fabric": ("cotton", "silk")},
    ...                      single_choice=("fabric",))
    >>> attrs.encode(("silk", "loose")).tolist()
    [0.0, 1.0, 0.0, 1.0]
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vislora.errors import DataError


def natural_key(text: str) -> tuple:
    """Sort key that puts '2' before '10' and 'size2' before 'size10': runs of digits compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part)


@dataclass(frozen=True)
class AttributeSet:
    """Ordered attribute names; `groups` name subsets of them, `single_choice` the groups with exactly one label per
    image. Invalid sets (duplicate names, a group naming an unknown attribute, an attribute in two groups, an unknown
    single-choice group) raise DataError."""

    names: tuple[str, ...]
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    single_choice: tuple[str, ...] = ()
    _positions: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "groups", {str(g): tuple(str(m) for m in members)
                                            for g, members in self.groups.items()})
        object.__setattr__(self, "single_choice", tuple(self.single_choice))
        if not self.names:
            raise DataError("the attribute list is empty; give task.multilabel.attributes or labelled training data")
        repeated = sorted(n for n, c in Counter(self.names).items() if c > 1)
        if repeated:
            raise DataError(f"attributes {repeated} are listed more than once; each attribute is one model output")
        known = set(self.names)
        owner: dict[str, str] = {}
        for group, members in self.groups.items():
            unknown = [m for m in members if m not in known]
            if unknown:
                raise DataError(f"group {group!r} names {unknown}, which are not attributes ({_preview(self.names)}); "
                                "add them to task.multilabel.attributes or fix the group")
            if not members:
                raise DataError(f"group {group!r} is empty; list its attributes or remove it")
            for member in members:
                if member in owner:
                    raise DataError(f"attribute {member!r} is in groups {owner[member]!r} and {group!r}; an "
                                    "attribute belongs to one group at most")
                owner[member] = group
        object.__setattr__(self, "_positions", {n: i for i, n in enumerate(self.names)})
        missing = [g for g in self.single_choice if g not in self.groups]
        if missing:
            raise DataError(f"single_choice names {missing}, which are not groups (groups: "
                            f"{list(self.groups) or 'none'}); define them under task.multilabel.groups")

    @classmethod
    def from_labels(cls, label_sets: Iterable[Sequence[str]], names: Sequence[str] | None = None,
                    groups: Mapping[str, Sequence[str]] | None = None,
                    single_choice: Sequence[str] = ()) -> AttributeSet:
        """The vocabulary of `label_sets`: `names` when given, else every label seen plus every group member,
        naturally sorted ('2' before '10')."""
        groups = {g: tuple(m) for g, m in (groups or {}).items()}
        if names is None:
            seen = {label for labels in label_sets for label in labels}
            seen |= {m for members in groups.values() for m in members}
            names = sorted(seen, key=natural_key)
        return cls(tuple(names), groups, tuple(single_choice))

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """Position of attribute `name` (its model output); DataError naming the valid names if unknown."""
        try:
            return self._positions[name]
        except KeyError:
            raise DataError(f"{name!r} is not an attribute; valid names: {_preview(self.names)}") from None

    def group_of(self, name: str) -> str | None:
        """The group attribute `name` belongs to, or None."""
        return next((g for g, members in self.groups.items() if name in members), None)

    def group_indices(self) -> dict[str, list[int]]:
        """Output positions of each single-choice group's attributes, in group order."""
        positions = self._positions
        return {g: [positions[m] for m in self.groups[g]] for g in self.single_choice}

    def check(self, labels: Sequence[str], where: str) -> None:
        """Raise DataError (naming `where`, e.g. 'train.csv line 7') for a label that is not an attribute, or a
        single-choice group with no label or more than one."""
        positions = self._positions
        unknown = [label for label in labels if label not in positions]
        if unknown:
            raise DataError(f"{where}: {', '.join(repr(u) for u in unknown)} "
                            f"{'is not an attribute' if len(unknown) == 1 else 'are not attributes'}; valid names: "
                            f"{_preview(self.names)}. Fix the label, or add it to task.multilabel.attributes")
        for group in self.single_choice:
            chosen = [label for label in labels if label in self.groups[group]]
            if len(chosen) != 1:
                raise DataError(f"{where}: single-choice group {group!r} needs exactly one of "
                                f"{list(self.groups[group])}, found {chosen or 'none'}; fix the labels, or drop "
                                f"{group!r} from task.multilabel.single_choice")

    def encode(self, labels: Sequence[str]) -> torch.Tensor:
        """Multi-hot target [attributes]: 1.0 at each label's position."""
        target = torch.zeros(len(self.names))
        positions = self._positions
        for label in labels:
            target[positions[label]] = 1.0
        return target

    def decode(self, target: torch.Tensor) -> tuple[str, ...]:
        """The attributes whose entry of a multi-hot (or boolean) vector [attributes] is set."""
        return tuple(self.names[i] for i in torch.nonzero(target > 0.5 if target.is_floating_point() else target)
                     .flatten().tolist())

    def counts(self, label_sets: Iterable[Sequence[str]]) -> dict[str, int]:
        """Images holding each attribute, in attribute order."""
        counter = Counter(label for labels in label_sets for label in set(labels))
        return {name: counter.get(name, 0) for name in self.names}

    def to_dict(self) -> dict[str, Any]:
        """JSON form (task.json); `AttributeSet.from_dict` reads it back."""
        return {"names": list(self.names), "groups": {g: list(m) for g, m in self.groups.items()},
                "single_choice": list(self.single_choice)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttributeSet:
        return cls(tuple(data["names"]), {g: tuple(m) for g, m in data.get("groups", {}).items()},
                   tuple(data.get("single_choice", ())))


def rare_attributes(counts: Mapping[str, int], below: int) -> list[str]:
    """Attributes with fewer than `below` positives (in `counts` order)."""
    return [name for name, count in counts.items() if count < below]


def _preview(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
