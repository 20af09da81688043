"""Freeing a thread's OpenMP team: found in torch's runtime, and torch keeps computing the same afterwards."""

import threading
from pathlib import Path

import pytest
import torch

from vislora.serve import openmp


def test_the_team_of_a_thread_is_freed_and_made_again_on_its_next_op():
    if not list((Path(torch.__file__).parent / "lib").glob("libgomp*.so*")):
        pytest.skip("this torch build ships no GNU OpenMP runtime")
    x = torch.randn(512, 512)
    before = x @ x  # a parallel region: this thread now owns a team
    assert openmp.release_team() is True
    torch.testing.assert_close(x @ x, before, rtol=0, atol=0)
    results = []
    thread = threading.Thread(target=lambda: results.append((openmp.release_team(), x @ x)))
    thread.start()
    thread.join()
    assert results[0][0] is True
    torch.testing.assert_close(results[0][1], before, rtol=0, atol=0)
