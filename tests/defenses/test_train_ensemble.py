"""defenses.train_ensemble: seeded random subsets, one seeded training per member, the cost counted.

- Each member is exactly ``trainer.fit(model, data[subset], seed=its seed)``; the subsets are distinct sorted
  random halves; the same seed gives the same members, another seed others; ``subset=1`` trains every
  member on all the data under distinct seeds.
- A streamed Dataset gives the same members as the tensors.
- The cost: ``n * subset`` trainings, measured seconds on the CPU clock.
- Bad inputs are refused naming the argument.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import robust_infl as ri
from defenses import ERM, TrainedEnsemble, train_ensemble
from defenses.ensembles import member_seeds

N = 40


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(N, 4, generator=generator, dtype=torch.float64), torch.randint(0, 3, (N,), generator=generator)


def trainer():
    return ERM(epochs=2, batch_size=8, progress=False)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_members_are_seeded_trainings_on_seeded_random_halves(data):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_ensemble(model, data, trainer(), 3, subset=0.5, seed=7)
    assert isinstance(result, TrainedEnsemble) and len(result.models) == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the architecture is not trained
    for index, (member, chosen, seed) in enumerate(zip(result.models, result.subsets, result.seeds)):
        assert chosen.shape == (N // 2,) and torch.equal(chosen, chosen.sort().values)
        assert chosen.unique().numel() == N // 2 and 0 <= int(chosen.min()) and int(chosen.max()) < N
        assert seed == member_seeds(7, index)[0]
        assert same_weights(member, trainer().fit(model, (data[0][chosen], data[1][chosen]), seed=seed))
    assert len({tuple(c.tolist()) for c in result.subsets}) == 3 and len(set(result.seeds)) == 3
    again = train_ensemble(model, data, trainer(), 3, subset=0.5, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(result.subsets, again.subsets))
    assert all(same_weights(a, b) for a, b in zip(result.models, again.models))
    other = train_ensemble(model, data, trainer(), 3, subset=0.5, seed=8)
    assert not any(torch.equal(a, b) for a, b in zip(result.subsets, other.subsets))
    assert isinstance(result.ensemble, ri.Ensemble) and result.ensemble.models == result.models


def test_whole_data_members_differ_only_by_their_seeds(data):
    result = train_ensemble(mlp(), data, trainer(), 2, subset=1)
    assert all(torch.equal(c, torch.arange(N)) for c in result.subsets)
    assert not same_weights(*result.models)
    assert same_weights(result.models[1], trainer().fit(mlp(), data, seed=member_seeds(0, 1)[0]))
    assert result.trainings == 2


class Streamed(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_a_streamed_dataset_gives_the_members_of_the_tensors(data):
    from_tensors = train_ensemble(mlp(), data, trainer(), 2, seed=3)
    from_dataset = train_ensemble(mlp(), Streamed(*data), trainer(), 2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(from_tensors.subsets, from_dataset.subsets))
    assert all(same_weights(a, b) for a, b in zip(from_tensors.models, from_dataset.models))


def test_the_cost_is_counted(data):
    result = train_ensemble(mlp(), data, trainer(), 4, subset=0.25)
    assert result.trainings == 1.0 and result.clock == "cpu"
    assert set(result.seconds) == {"wall", "cpu"} and all(v > 0 for v in result.seconds.values())


def test_bad_inputs_are_refused_naming_the_argument(data):
    with pytest.raises(TypeError, match="^model: must be a torch.nn.Module"):
        train_ensemble("mlp", data, trainer(), 2)
    with pytest.raises(TypeError, match="^trainer: expected a project trainer"):
        train_ensemble(mlp(), data, "erm", 2)
    with pytest.raises(ValueError, match="^trainer: an ensemble's members train from their own initialisations"):
        train_ensemble(mlp(), data, ERM(retrain="finetune", progress=False), 2)
    with pytest.raises(ValueError, match="^n: "):
        train_ensemble(mlp(), data, trainer(), 0)
    for subset in (0, 1.5):
        with pytest.raises(ValueError, match="^subset: "):
            train_ensemble(mlp(), data, trainer(), 2, subset=subset)
    with pytest.raises(ValueError, match="^seed: "):
        train_ensemble(mlp(), data, trainer(), 2, seed=-1)
    with pytest.raises(TypeError, match="^data: "):
        train_ensemble(mlp(), "data", trainer(), 2)


def test_members_given_explicitly_are_those_trainings(data):
    mask = torch.zeros(N, dtype=torch.bool)
    mask[::3] = True
    result = train_ensemble(mlp(), data, trainer(), 2, subsets=[mask, torch.tensor([5, 1, 9, 2])], seeds=[11, 12])
    assert torch.equal(result.subsets[0], torch.arange(0, N, 3)) and torch.equal(result.subsets[1],
                                                                                 torch.tensor([1, 2, 5, 9]))
    assert result.seeds == (11, 12) and result.trainings == (mask.sum().item() + 4) / N
    assert same_weights(result.models[0], trainer().fit(mlp(), (data[0][mask], data[1][mask]), seed=11))
    index = torch.tensor([1, 2, 5, 9])
    assert same_weights(result.models[1], trainer().fit(mlp(), (data[0][index], data[1][index]), seed=12))
    with pytest.raises(ValueError, match="^subsets: give the members' subsets and seeds together"):
        train_ensemble(mlp(), data, trainer(), 1, subsets=[mask])
    with pytest.raises(ValueError, match="^subsets: must be a list of n = 2"):
        train_ensemble(mlp(), data, trainer(), 2, subsets=[mask], seeds=[1, 2])
    with pytest.raises(ValueError, match=r"^subsets: subset 0 must hold indices in \[0, 40\)"):
        train_ensemble(mlp(), data, trainer(), 1, subsets=[torch.tensor([N])], seeds=[1])
    with pytest.raises(ValueError, match="^seeds\\[0\\]: "):
        train_ensemble(mlp(), data, trainer(), 1, subsets=[mask], seeds=[-1])
