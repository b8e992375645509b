"""attacks.plumbing: per-sample loss, model device / dtype, eval mode, seeded random streams, atomic write."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attacks
import defenses
from attacks.plumbing import (atomic_write, eval_mode, frozen_in_eval, make_generator, model_device, model_dtype,
                              per_sample_loss, seeded)
from robust_infl import io
from robust_infl.objectives import default_loss_fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_sample_loss_is_torchs_unreduced_loss(dtype):
    logits, y = torch.randn(6, 3, dtype=dtype), torch.tensor([0, 1, 2, 2, 1, 0])
    loss = per_sample_loss(logits, y)
    assert loss.dtype == dtype and loss.shape == (6,)
    assert torch.equal(loss, F.cross_entropy(logits, y, reduction="none"))
    one, labels = torch.randn(5, 1, dtype=dtype), torch.tensor([0, 1, 1, 0, 1])
    binary = per_sample_loss(one, labels)
    assert binary.dtype == dtype
    assert torch.equal(binary, F.binary_cross_entropy_with_logits(one[:, 0], labels.to(dtype), reduction="none"))
    assert torch.equal(per_sample_loss(logits, y.int()), loss)  # int32 labels alike


def test_per_sample_loss_is_the_one_function_behind_every_public_name():
    assert attacks.per_sample_loss is per_sample_loss and defenses.per_sample_loss is per_sample_loss
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    assert torch.equal(default_loss_fn(3)(logits, y), per_sample_loss(logits, y))
    with pytest.raises(ValueError, match=r"^model: must return logits of shape \(4, C\), got \(4,\)"):
        per_sample_loss(torch.randn(4), y)


def test_model_device_and_dtype():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")
    assert model_device(nn.ReLU(), torch.device("meta")) == torch.device("meta")
    assert model_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")
    bn = nn.BatchNorm1d(3)
    bn.weight, bn.bias = None, None
    bn.to("meta")
    assert model_device(bn) == torch.device("meta")  # buffers count when there are no parameters
    assert model_dtype(nn.Linear(2, 2).double()) == torch.float64
    assert model_dtype(nn.ReLU()) == torch.float32


def _mixed_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 2)))
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    model[2][0].eval()
    return model


@pytest.mark.parametrize("frozen", [False, True])
def test_eval_mode_restores_every_submodules_own_mode(frozen):
    model = _mixed_model()
    modes = [m.training for m in model.modules()]
    with eval_mode(model, frozen=frozen):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == modes
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model, frozen=frozen):
            raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == modes


def test_frozen_in_eval_restores_requires_grad_and_grads():
    model = _mixed_model()
    model[0].bias.requires_grad_(False)
    model(torch.randn(5, 3)).sum().backward()
    grads = [p.grad for p in model.parameters()]
    requires = [p.requires_grad for p in model.parameters()]
    with frozen_in_eval(model):
        assert not any(p.requires_grad for p in model.parameters())
        for p in model.parameters():
            p.grad = None
    assert [p.requires_grad for p in model.parameters()] == requires
    assert all(a is b for a, b in zip((p.grad for p in model.parameters()), grads))
    with eval_mode(model):  # not frozen: parameters untouched
        assert [p.requires_grad for p in model.parameters()] == requires


def test_seeded_gives_identical_draws_and_leaves_the_global_streams_alone():
    torch.manual_seed(123)
    np.random.seed(123)
    expected_torch, expected_numpy = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    with seeded(5):
        first = (torch.rand(4), np.random.rand(4))
    with seeded(5, torch.device("cpu")):
        second = (torch.rand(4), np.random.rand(4))
    with seeded(6):
        other = torch.rand(4)
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert not torch.equal(first[0], other)
    assert torch.equal(torch.rand(3), expected_torch) and np.array_equal(np.random.rand(3), expected_numpy)


def test_seeded_without_numpy_does_not_touch_numpy_and_restores_on_error():
    np.random.seed(1)
    numpy_draw = np.random.rand(2)
    np.random.seed(1)
    torch.manual_seed(1)
    torch_draw = torch.rand(2)
    torch.manual_seed(1)
    with pytest.raises(KeyError):
        with seeded(9, numpy=False):
            torch.rand(5)
            raise KeyError("x")
    assert torch.equal(torch.rand(2), torch_draw)
    assert np.array_equal(np.random.rand(2), numpy_draw)
    with seeded(2**32 + 3):  # numpy takes the seed modulo 2**32
        big = np.random.rand(2)
    with seeded(3):
        assert np.array_equal(np.random.rand(2), big)


def test_make_generator_is_seeded_and_independent_of_the_global_stream():
    state = torch.random.get_rng_state()
    a, b = make_generator(11), make_generator(11, "cpu")
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    assert torch.equal(torch.rand(5, generator=make_generator(11)), torch.rand(5, generator=torch.Generator().manual_seed(11)))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_atomic_write_creates_replaces_and_keeps_permissions(tmp_path):
    path = tmp_path / "sub" / "out.bin"
    assert atomic_write(path, lambda handle: handle.write(b"one")) == path
    assert path.read_bytes() == b"one"
    os.chmod(path, 0o640)
    atomic_write(path, lambda tmp: tmp.write_bytes(b"two"), by_path=True, durable=False)
    assert path.read_bytes() == b"two" and path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.bin"]


@pytest.mark.parametrize("by_path", [False, True])
def test_atomic_write_leaves_no_partial_file_on_an_exception(tmp_path, by_path):
    path = tmp_path / "scores.npy"

    def failing(target):
        if by_path:
            target.write_bytes(b"half")
        else:
            target.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing, by_path=by_path)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one
    io.atomic_write_text(path, "old")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing, by_path=by_path)
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


def test_io_helpers_are_built_on_the_one_atomic_write(tmp_path):
    assert io.atomic_write is atomic_write
    io.atomic_write_json(tmp_path / "a.json", {"b": float("nan"), "a": (1, 2)})
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": null\n}\n'
    io.atomic_save_npy(tmp_path / "x.npy", torch.arange(3))
    assert np.load(tmp_path / "x.npy").tolist() == [0, 1, 2]


def test_the_settings_fingerprint_is_plain_json_without_memory_addresses():
    marker = object()  # no attributes, not callable: recorded by its repr, whose address differs per process
    assert " at 0x" in repr(marker) and attacks.plain_value(marker) == "<object object>"
    value = {"attack": attacks.PGD(0.1, steps=2), "big": torch.zeros(100), "small": torch.ones(2), "n": (1, 2.5)}
    plain = attacks.plain_value(value)
    assert plain["attack"] == attacks.attack_settings(value["attack"]) and plain["attack"]["steps"] == 2
    assert plain["big"]["shape"] == [100] and plain["small"] == [1.0, 1.0] and plain["n"] == [1, 2.5]
    assert plain == attacks.plain_value({**value, "big": torch.zeros(100)})  # equal settings, equal fingerprints
    assert plain != attacks.plain_value({**value, "big": torch.ones(100)})
