"""Model-driven transforms: what a model without an input spec gets told."""

import pytest
from torch import nn

from vislora.data.transforms import model_input_spec
from vislora.errors import ConfigError


def test_a_model_without_an_input_size_asks_for_one():
    with pytest.raises(ConfigError, match=r"cannot read the input size of a Linear: .*data\.image_size"):
        model_input_spec(nn.Linear(2, 2))
    assert model_input_spec(nn.Linear(2, 2), size=48).size == 48
