"""Friction of a new user's first hour: the trainers and ``evaluate`` take what ``influence``
takes, streaming a Dataset; defaults for the trainers; BatchNorm with a last batch of one; progress
bars only on a terminal."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import attacks
import defenses
import robust_infl

from defenses.report import without_timing

from conftest import square_blobs


class CountingDataset(Dataset):
    """A map-style Dataset of (x, y) that records which items were read."""

    def __init__(self, X, y):
        self.X, self.y, self.reads = X, y, []

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        self.reads.append(i)
        return self.X[i], self.y[i]


def weights_of(model):
    return [t.clone() for t in model.state_dict().values()]


@pytest.mark.parametrize("trainer", [defenses.ERM(epochs=2, batch_size=8, progress=False),
                                     defenses.PGDAT(eps=0.05, steps=2, epochs=1, batch_size=8, progress=False),
                                     defenses.TRADES(eps=0.05, steps=2, epochs=1, batch_size=8, progress=False)],
                         ids=["erm", "pgd-at", "trades"])
def test_trainers_take_tensors_numpy_datasets_and_loaders_with_identical_results(trainer):
    X, y = square_blobs(50, seed=1)
    weights = torch.rand(len(X), generator=torch.Generator().manual_seed(0))
    reference = weights_of(trainer.fit(nn.Linear(2, 2), (X, y), weights=weights, seed=3))
    streamed = CountingDataset(X, y)
    for data in ((X.numpy(), y.numpy()), TensorDataset(X, y), streamed,
                 DataLoader(CountingDataset(X, y), batch_size=5, shuffle=True)):
        model = trainer.fit(nn.Linear(2, 2), data, weights=weights, seed=3)
        assert all(torch.equal(a, b) for a, b in zip(weights_of(model), reference))
    # streamed: one probe item, then every item once per epoch, in batches (never the whole set at once)
    assert len(streamed.reads) == 1 + trainer.epochs * len(X)


def test_a_streamed_dataset_with_bad_labels_is_refused_naming_train():
    X, y = square_blobs(50, seed=1)
    with pytest.raises(ValueError, match=r"^train: labels must lie in \[0, 1\]"):
        defenses.ERM(epochs=1, batch_size=8, progress=False).fit(nn.Linear(2, 2), CountingDataset(X, y * 2))


def test_evaluate_and_influence_take_numpy_and_loaders_with_identical_results():
    X, y = square_blobs(50, seed=1)
    model = defenses.ERM(epochs=2, batch_size=8, progress=False).fit(nn.Linear(2, 2), (X, y))
    pgd = {"pgd": attacks.PGD(0.1, steps=3, bounds=None)}
    reference = attacks.evaluate(model, (X, y), pgd, batch_size=10, progress=False)
    assert attacks.evaluate(model, (X.numpy(), y.numpy()), pgd, batch_size=10, progress=False) == reference
    loader = DataLoader(TensorDataset(X, y), batch_size=10)
    assert attacks.evaluate(model, loader, pgd, progress=False) == reference
    objective = robust_infl.Robust(attacks.FGSM(0.1, bounds=None))
    scores = robust_infl.influence(model, (X, y), (X, y), objective=objective, progress=False)
    for train, target in ((DataLoader(TensorDataset(X, y), batch_size=7), TensorDataset(X, y)),
                          ((X, y), DataLoader(TensorDataset(X, y), batch_size=7))):
        assert torch.equal(robust_infl.influence(model, train, target, objective=objective, progress=False), scores)


def test_trainers_have_defaults():
    erm = defenses.ERM()
    assert (erm.epochs, erm.lr, erm.batch_size, erm.retrain) == (10, 1e-3, 64, "scratch")
    assert defenses.PGDAT(eps=0.1).epochs == defenses.TRADES(eps=0.1).epochs == 10


def test_batchnorm_with_a_last_batch_of_one_sample_trains():
    X, y = square_blobs(17, seed=1)
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    trained = defenses.ERM(epochs=2, batch_size=8, progress=False).fit(model, (X, y))  # batches 8, 9 (not 8, 8, 1)
    assert not trained.training and int(trained[1].num_batches_tracked) == 4
    plain = defenses.ERM(epochs=1, batch_size=8, progress=False)
    from defenses.trainers import batch_slices

    assert batch_slices(17, 8, merge_single=True) == [(0, 8), (8, 17)]
    assert batch_slices(17, 8, merge_single=False) == [(0, 8), (8, 16), (16, 17)]  # models without BatchNorm
    assert plain.fit(nn.Linear(2, 2), (X, y)) is not None


def test_progress_bars_only_on_a_terminal(capsys, monkeypatch):
    X, y = square_blobs(100, seed=1)
    options = dict(model=lambda seed: nn.Linear(2, 2), attack=attacks.FGSM(0.1), recipes=["none", "influence"],
                   seeds=1, epochs=1)
    defenses.run((X, y), progress=True, **options)
    assert capsys.readouterr().err == ""  # not a terminal: no bars in logs
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    defenses.run((X, y), progress=True, **options)
    err = capsys.readouterr().err
    assert "defence" in err and "ERM" not in err and "evaluate" not in err  # one top-level bar, nothing nested


# ---------------------------------------------------------------- one rule for dtype: float data in the model's dtype

def _moons(n=200):
    from sklearn.datasets import make_moons

    return make_moons(n, noise=0.1, random_state=0)  # numpy float64 X, int64 y: scikit-learn's default


def test_numpy_float64_data_is_converted_to_the_models_dtype_alike_everywhere():
    X64, y = _moons()
    X32, y32 = torch.from_numpy(X64).float(), torch.from_numpy(y)
    torch.manual_seed(0)
    linear = nn.Linear(2, 2)
    fgsm = {"fgsm": attacks.FGSM(0.1, bounds=None)}
    assert attacks.evaluate(linear, (X64, y), fgsm, progress=False) == \
        attacks.evaluate(linear, (X32, y32), fgsm, progress=False)
    assert attacks.accuracy(linear, torch.from_numpy(X64), y32) == attacks.accuracy(linear, X32, y32)
    erm = defenses.ERM(epochs=2, batch_size=16, progress=False)
    reference = weights_of(erm.fit(nn.Linear(2, 2), (X32, y32), seed=1))
    for data in ((X64, y), (torch.from_numpy(X64), y32), (X32.half(), y32)):
        trained = weights_of(erm.fit(nn.Linear(2, 2), data, seed=1))
        if data[0].dtype == torch.float16:  # rounded to half precision first: close, not equal
            assert all(torch.allclose(a, b, atol=1e-2) for a, b in zip(trained, reference))
        else:
            assert all(torch.equal(a, b) for a, b in zip(trained, reference))
    scores = robust_infl.influence(linear, (X32, y32), (X32[:20], y32[:20]), objective=robust_infl.Utility(),
                                   progress=False)
    assert torch.equal(robust_infl.influence(linear, (X64, y), (X64[:20], y[:20]), objective=robust_infl.Utility(),
                                             progress=False), scores)


def test_defence_run_takes_numpy_arrays_like_tensors():
    X64, y = _moons()
    options = dict(model=lambda seed: nn.Linear(2, 2), attack=attacks.FGSM(0.1, bounds=None), recipes=["none"],
                   seeds=1, epochs=1, progress=False)
    from_numpy = defenses.run((X64, y), **options)
    from_tensors = defenses.run((torch.from_numpy(X64).float(), torch.from_numpy(y)), **options)
    assert without_timing(from_numpy["per_seed"]) == without_timing(from_tensors["per_seed"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("attack", [attacks.PGD(0.1, steps=3), attacks.FGSM(0.1)], ids=["pgd", "fgsm"])
def test_attacks_compute_in_the_models_dtype_and_return_the_inputs_dtype(attack, dtype):
    X, y = square_blobs(30, seed=2)
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    x = X.to(dtype)
    x_adv = attack(model, x, y)
    assert x_adv.dtype == dtype and x_adv.shape == x.shape
    assert torch.equal(x_adv, attack(model, x.float(), y).to(dtype))


def test_evaluate_takes_an_attack_returning_another_float_dtype():
    X, y = square_blobs(30, seed=2)
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    pgd = attacks.PGD(0.1, steps=3)

    def pgd64(m, x, y):
        return pgd(m, x, y).double()

    results, adv = attacks.evaluate(model, (X, y), {"pgd": pgd, "pgd64": pgd64}, progress=False, return_adv=True)
    assert results["pgd"] == results["pgd64"] and adv["pgd64"].dtype == torch.float32


def test_huge_weights_train_like_their_normalised_values():
    X, y = square_blobs(40, seed=1)
    erm = defenses.ERM(epochs=2, batch_size=8, progress=False)
    reference = weights_of(erm.fit(nn.Linear(2, 2), (X, y), weights=torch.ones(40), seed=0))
    for weights in (torch.full((40,), 3e38), torch.full((40,), 1e300, dtype=torch.float64)):
        trained = weights_of(erm.fit(nn.Linear(2, 2), (X, y), weights=weights, seed=0))
        assert all(torch.equal(a, b) for a, b in zip(trained, reference))
