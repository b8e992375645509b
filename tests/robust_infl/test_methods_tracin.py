"""TracIn ("tracin"): one checkpoint with lr 1 is IP; several are the lr-weighted sum of IP at each."""

from __future__ import annotations

import copy

import pytest
import torch

import robust_infl as ri

from conftest import influence_scorer


@pytest.fixture
def mlp_and_data(mlp_problem):
    return mlp_problem(seed=5, n_features=4, n_classes=3, hidden=(6,), n_train=19, n_target=7)


score = influence_scorer(batch_size=8)


def perturbed_states(model, count):
    generator = torch.Generator().manual_seed(11)
    return [{k: v + 0.2 * torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in model.state_dict().items()}
            for _ in range(count)]


def test_one_checkpoint_with_lr_one_is_exactly_ip(mlp_and_data):
    model = mlp_and_data[0]
    ip = score(*mlp_and_data, method="ip")
    tracin = score(*mlp_and_data, method="tracin", checkpoints=[model.state_dict()], lrs=1.0)
    assert torch.equal(tracin, ip)


def test_checkpoints_sum_ip_at_each_checkpoint_weighted_by_lr(mlp_and_data, fgsm_attack, tmp_path):
    model, train, target = mlp_and_data
    objective = ri.Robust(fgsm_attack(0.1))  # the attack must run on each checkpoint's weights
    states, lrs = perturbed_states(model, 3), [0.5, 0.2, 0.1]
    expected = torch.zeros(19, dtype=torch.float64)
    for state, lr in zip(states, lrs):
        at_checkpoint = copy.deepcopy(model)
        at_checkpoint.load_state_dict(state)
        expected += lr * score(at_checkpoint, train, target, objective, method="ip")
    tracin = score(model, train, target, objective, method="tracin", checkpoints=states, lrs=lrs)
    torch.testing.assert_close(tracin, expected)

    paths = []
    for index, state in enumerate(states):
        paths.append(tmp_path / f"checkpoint{index}.pt")
        torch.save(state, paths[-1])
    from_files = score(model, train, target, objective, method="tracin", checkpoints=[str(p) for p in paths[:2]] + [paths[2]],
                       lrs=lrs)
    torch.testing.assert_close(from_files, tracin)


def test_unscored_parameters_come_from_the_checkpoint(mlp_and_data):
    model, train, target = mlp_and_data
    last_layer = ["net.3.weight", "net.3.bias"]
    state = perturbed_states(model, 1)[0]
    at_checkpoint = copy.deepcopy(model)
    at_checkpoint.load_state_dict(state)
    expected = score(at_checkpoint, train, target, method="ip", params=last_layer)
    tracin = score(model, train, target, method="tracin", params=last_layer, checkpoints=[state])
    torch.testing.assert_close(tracin, expected)
    only_scored = {name: state[name] for name in last_layer}  # the first layer then stays the model's own
    expected_mixed = copy.deepcopy(model)
    expected_mixed.load_state_dict({**model.state_dict(), **only_scored})
    torch.testing.assert_close(score(model, train, target, method="tracin", params=last_layer, checkpoints=[only_scored]),
                               score(expected_mixed, train, target, method="ip", params=last_layer))


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({}, ValueError, r"^checkpoints: method 'tracin' needs at least one checkpoint"),
        ({"checkpoints": "model.pt"}, TypeError, r"^checkpoints: must be a list"),
        ({"checkpoints": [{"net.1.weight": torch.zeros(6, 4)}]}, ValueError, r"^checkpoints: checkpoint 0 lacks the scored parameter"),
        ({"checkpoints": ["/nonexistent/ckpt.pt"]}, ValueError, r"^checkpoints: checkpoint 0: no such file"),
        ({"checkpoints": [3]}, TypeError, r"^checkpoints: checkpoint 0 must be a state dict or a file path"),
        ({"checkpoints": "STATES2", "lrs": [0.1]}, ValueError, r"^lrs: has 1 entries but there are 2 checkpoints"),
        ({"checkpoints": "STATES2", "lrs": [0.1, -1.0]}, ValueError, r"^lrs: every learning rate must be a finite number > 0"),
        ({"checkpoints": "STATES2", "lrs": "fast"}, TypeError, r"^lrs: must be a number or a sequence"),
    ],
)
def test_bad_options_are_rejected_by_name(mlp_and_data, options, error, message):
    model = mlp_and_data[0]
    if options.get("checkpoints") == "STATES2":
        options = {**options, "checkpoints": perturbed_states(model, 2)}
    with pytest.raises(error, match=message):
        score(*mlp_and_data, method="tracin", **options)


def test_a_checkpoint_of_another_architecture_is_rejected(mlp_and_data):
    model = mlp_and_data[0]
    wrong_shape = {**model.state_dict(), "net.1.weight": torch.zeros(2, 2, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"^checkpoints: checkpoint 0 has 'net.1.weight' of shape \(2, 2\)"):
        score(*mlp_and_data, method="tracin", checkpoints=[wrong_shape])
