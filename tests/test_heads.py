"""Output heads: element choice, profile sums, task selection, transforms, shape errors."""

from __future__ import annotations

import pytest
import torch

from deepmr_dist.errors import InputError, ModelOutputError
from deepmr_dist.models.heads import OutputHead, parse_tasks


def test_head__profile_sum_task_choice_and_transform():
    profile = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    head = OutputHead(output_index=0, profile_axis=-1, tasks=(2, 0), transform="log1p")
    out = head((profile, torch.zeros(2, 1)), 2)
    expected = torch.log1p(profile.sum(-1)[:, [2, 0]])
    torch.testing.assert_close(out, expected)
    assert OutputHead(transform="sigmoid")(torch.zeros(1, 2), 1).tolist() == [[0.5, 0.5]]


@pytest.mark.parametrize(
    ("head", "raw", "match"),
    [
        (OutputHead(), torch.zeros(2, 3, 4), r"shape \(2, 3, 4\); expected \(batch=2, tasks\)"),
        (OutputHead(), (torch.zeros(2, 1), torch.zeros(2, 1)), "choose one with an output index"),
        (OutputHead(output_index=3), (torch.zeros(2, 1),), "returned 1 outputs"),
        (OutputHead(tasks=(5,)), torch.zeros(2, 3), r"task indices \[5\] out of range"),
    ],
)
def test_head__wrong_output_shape_is_a_model_output_error(head, raw, match):
    with pytest.raises(ModelOutputError, match=match):
        head(raw, 2)


def test_parse_tasks__indices_and_names():
    assert parse_tasks("1,0", ["a", "b"]) == ((1, 0), ("b", "a"))
    assert parse_tasks("b", ["a", "b"]) == ((1,), ("b",))
    assert OutputHead(tasks=(3,)).names(5) == ["task3"]
    with pytest.raises(InputError, match="unknown tasks"):
        parse_tasks("c", ["a", "b"])
    with pytest.raises(InputError, match="--tasks is empty"):
        parse_tasks(" , ", ["a", "b"])
    with pytest.raises(InputError, match=r"task indices \[2\] out of range for the 2 task names \['a', 'b'\]"):
        parse_tasks("0,2", ["a", "b"])
    assert parse_tasks("0,2", None) == ((0, 2), None)


def test_head__bad_transform_or_task_names_are_input_errors():
    with pytest.raises(InputError, match="unknown transform 'exp'; valid: none, sigmoid, log1p"):
        OutputHead(transform="exp")
    with pytest.raises(InputError, match="2 task indices but 1 task names"):
        OutputHead(tasks=(0, 1), task_names=("a",))
