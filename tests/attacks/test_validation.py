"""attacks.validation: every checker's accepted and refused values and its one message format."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import attacks
import defenses
from attacks.inputs import as_inputs, check_dataset_size
from attacks.validation import (check_bool, check_choice, check_device, check_eps,
                                check_finite, check_fraction, check_int, check_labels, check_model, check_norm,
                                check_number, check_output_shape, check_positive, check_seed, integer_labels)

ACCEPTED = [
    (lambda: check_int(3, "n"), 3),
    (lambda: check_int(np.int64(4), "n", minimum=1), 4),
    (lambda: check_int(-5, "n"), -5),
    (lambda: check_int(1, "n", minimum=1, maximum=1), 1),
    (lambda: check_number(2, "x"), 2.0),
    (lambda: check_number(np.float32(0.5), "x", minimum=0, maximum=1), 0.5),
    (lambda: check_number(0, "x", minimum=0), 0.0),
    (lambda: check_positive(1e-9, "lr"), 1e-9),
    (lambda: check_positive(0, "wd", allow_zero=True), 0.0),
    (lambda: check_fraction(0.25, "rate"), 0.25),
    (lambda: check_fraction(0, "fraction", allow_zero=True), 0.0),
    (lambda: check_fraction(1, "alpha", allow_one=True), 1.0),
    (lambda: check_eps(8 / 255), 8 / 255),
    (lambda: check_eps(0, "overshoot", allow_zero=True), 0.0),
    (lambda: check_bool(False, "flag"), False),
    (lambda: check_choice("b", "mode", ("a", "b")), "b"),
    (lambda: check_norm("LINF"), "linf"),
    (lambda: check_norm("l2"), "l2"),
    (lambda: check_seed(0), 0),
    (lambda: check_seed(np.int32(7)), 7),
    (lambda: check_device("cpu"), torch.device("cpu")),
]

REFUSED = [
    (lambda: check_int(2.0, "steps", minimum=1), TypeError, "steps: must be an integer, got float"),
    (lambda: check_int(True, "steps", minimum=1), TypeError, "steps: must be an integer, got bool"),
    (lambda: check_int("3", "steps"), TypeError, "steps: must be an integer, got str"),
    (lambda: check_int(0, "steps", minimum=1), ValueError, "steps: must be >= 1, got 0"),
    (lambda: check_int(11, "k", maximum=10), ValueError, "k: must be <= 10, got 11"),
    (lambda: check_int(9, "size", minimum=1, maximum=8), ValueError, "size: must be in [1, 8], got 9"),
    (lambda: check_number("0.1", "lr"), TypeError, "lr: must be a number, got str"),
    (lambda: check_number(False, "lr"), TypeError, "lr: must be a number, got bool"),
    (lambda: check_number(float("nan"), "value"), ValueError, "value: must be a finite number, got nan"),
    (lambda: check_number(float("inf"), "x", minimum=0), ValueError, "x: must be a finite number >= 0, got inf"),
    (lambda: check_number(-1.0, "damping", minimum=0), ValueError, "damping: must be a finite number >= 0, got -1.0"),
    (lambda: check_number(2, "x", maximum=1, include_maximum=False), ValueError, "x: must be a finite number < 1, got 2"),
    (lambda: check_positive(0, "lr"), ValueError, "lr: must be a finite number > 0, got 0"),
    (lambda: check_positive(-0.1, "wd", allow_zero=True), ValueError, "wd: must be a finite number >= 0, got -0.1"),
    (lambda: check_fraction(1.0, "scale"), ValueError, "scale: must be a finite number in (0, 1), got 1.0"),
    (lambda: check_fraction(0, "rate"), ValueError, "rate: must be a finite number in (0, 1), got 0"),
    (lambda: check_fraction(1.0, "fraction", allow_zero=True), ValueError,
     "fraction: must be a finite number in [0, 1), got 1.0"),
    (lambda: check_fraction(2.0, "mix", allow_zero=True, allow_one=True), ValueError,
     "mix: must be a finite number in [0, 1], got 2.0"),
    (lambda: check_eps(0.0), ValueError, "eps: must be a finite number > 0, got 0.0"),
    (lambda: check_eps(-1), ValueError, "eps: must be a finite number > 0, got -1"),
    (lambda: check_eps(None), TypeError, "eps: must be a number, got NoneType"),
    (lambda: check_bool(1, "per_class"), TypeError, "per_class: must be True or False, got int"),
    (lambda: check_bool(None, "progress"), TypeError, "progress: must be True or False, got NoneType"),
    (lambda: check_choice("c", "mode", ("a", "b")), ValueError, "mode: must be one of a, b, got 'c'"),
    (lambda: check_choice(["a"], "mode", ("a", "b")), ValueError, "mode: must be one of a, b, got ['a']"),
    (lambda: check_norm("l1"), ValueError, "norm: must be one of linf, l2, got 'l1'"),
    (lambda: check_norm(2), ValueError, "norm: must be one of linf, l2, got 2"),
    (lambda: check_seed(-3), ValueError, "seed: must be in [0, 4294967295], got -3"),
    (lambda: check_seed(2**32), ValueError, "seed: must be in [0, 4294967295], got 4294967296"),
    (lambda: check_seed(1.5, "projection_seed"), TypeError, "projection_seed: must be an integer, got float"),
    (lambda: check_device("tpu-of-dreams"), ValueError, "device: must be a valid torch device, got 'tpu-of-dreams'"),
    (lambda: check_model(lambda x: x), TypeError, "model: must be a torch.nn.Module, got function"),
    (lambda: check_output_shape(torch.zeros(4), 4), ValueError,
     "model: must return logits of shape (4, C), got (4,) (a binary model returns one logit as (n, 1): do not squeeze it)"),
    (lambda: check_output_shape([0.0], 1), ValueError, "model: must return a tensor of logits, got list"),
]


@pytest.mark.parametrize("index", range(len(ACCEPTED)))
def test_accepted_values_come_back_in_their_plain_type(index):
    call, expected = ACCEPTED[index]
    value = call()
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("index", range(len(REFUSED)))
def test_refused_values_get_one_message_format(index):
    call, error, message = REFUSED[index]
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error
    assert str(info.value) == message
    assert re.match(r"^\w+: must (be|return) ", str(info.value))


def test_cuda_devices_are_checked_before_any_compute():
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        with pytest.raises(ValueError, match=rf"^device: 'cuda:{count}' does not exist; this machine has {count}"):
            check_device(f"cuda:{count}")
    else:
        with pytest.raises(ValueError, match=r"^device: 'cuda' needs a CUDA GPU, but torch sees none here"):
            check_device("cuda")


def test_check_model_returns_the_model_and_checks_the_batch_device():
    model = nn.Linear(2, 2)
    assert check_model(model) is model
    assert check_model(model, x=torch.zeros(1, 2)) is model
    assert check_model(nn.ReLU(), x=torch.zeros(1, 2, device="meta")) is not None  # no parameters: nothing to compare
    with pytest.raises(ValueError, match=r"^model: its parameters are on cpu but x is on meta$"):
        check_model(model, x=torch.zeros(1, 2, device="meta"))
    check_output_shape(torch.zeros(3, 1), 3)
    check_output_shape(torch.zeros(3, 5), 3)


def test_trainers_accept_the_per_feature_bounds_the_attacks_accept():
    low, high = torch.tensor([0.0, -1.0]), torch.tensor([1.0, 0.5])
    X = torch.stack([torch.rand(32) * 1.0, torch.rand(32) * 1.5 - 1.0], dim=1)
    y = (X[:, 0] > 0.5).long()
    attacks.PGD(0.3, steps=2, bounds=(low, high))  # the attack takes them ...
    trainer = defenses.PGDAT(eps=0.3, steps=2, bounds=(low, high), epochs=1, lr=0.1, batch_size=8, progress=False)
    model = trainer.fit(nn.Linear(2, 2), (X, y), seed=0)  # ... and so does the trainer
    x_adv = trainer.adversarial_points(model, X, y)
    assert bool(((x_adv >= low) & (x_adv <= high)).all())
    assert not torch.equal(x_adv, X)
    with pytest.raises(ValueError, match=r"^bounds: per-feature tensors of shape \(3,\) do not broadcast"):
        defenses.PGDAT(eps=0.3, bounds=(torch.zeros(3), torch.ones(3)), epochs=1, lr=0.1,
                       batch_size=8, progress=False).fit(nn.Linear(2, 2), (X, y))
    with pytest.raises(ValueError, match=r"^bounds: low must be < high, got \(1.0, 0.0\)"):
        defenses.PGDAT(eps=0.3, bounds=(1.0, 0.0), epochs=1, lr=0.1, batch_size=8)


def test_tensor_checks_take_the_value_first_and_name_it_in_the_message():
    assert torch.equal(as_inputs([[1.0, 2.0]], "train"), torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^train: expected tensors or numpy arrays, got str"):
        as_inputs("x", "train")
    with pytest.raises(ValueError, match=r"^target: contains 1 NaN or infinite value\(s\)"):
        check_finite(torch.tensor([0.0, float("nan")]), "target")
    assert integer_labels(torch.tensor([0.0, 2.0]), "y").dtype == torch.int64
    with pytest.raises(ValueError, match=r"^y: labels must be integer class indices"):
        integer_labels(torch.tensor([0.5]), "y")
    check_labels(torch.tensor([0, 1]), "train", 1)
    with pytest.raises(ValueError, match=r"^train: labels must lie in \[0, 1\] for a model with 1 output"):
        check_labels(torch.tensor([0, 2]), "train", 1)
    assert check_dataset_size(torch.utils.data.TensorDataset(torch.zeros(3, 1)), "train") == 3
    with pytest.raises(ValueError, match=r"^val: is empty \(0 samples\)"):
        check_dataset_size([], "val")
    with pytest.raises(TypeError, match=r"^train: a Dataset must define __len__"):
        check_dataset_size(iter([]), "train")
