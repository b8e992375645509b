"""The error table of docs/reliability.md, row by row: each bad input gets a ValueError / TypeError whose message
names the argument first (and, for unknown names, lists the valid ones).

Each case id starts with the table row it backs (``nan-``, ``dtype-``, ``labels-``, ``single-class-``,
``empty-``, ``fraction-``, ``eps-``, ``name-``, ``sensitive-``, ``path-``, ``output-``, ``device-``, ``seed-``,
``index-``, ``budget-``). The rows about models
(train mode, NaN outputs) are in ``tests/robust_infl/test_model_modes_and_nan.py``, files in ``tests/robust_infl/test_file_safety.py``,
the command line in ``tests/cli/test_errors.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import attacks
import defenses
import robust_infl as ri
from attacks.registry import make_attack
from defenses.pipeline import seeded_split
from defenses.registry import make_trainer
from robust_infl.datasets import load_dataset
from robust_infl.registry import make_objective, model_factory
from robust_infl.io import safe_load
from robust_infl.models import MLP
from defenses.poison_removal import remove_poisons

G = torch.Generator().manual_seed(0)
X, Y = torch.rand(10, 4, generator=G), torch.randint(0, 3, (10,), generator=G)
XT, YT = torch.rand(6, 4, generator=G), torch.randint(0, 3, (6,), generator=G)
S = torch.tensor([0, 1, 0, 1, 1, 0])
METHOD_NAMES = ", ".join(ri.available_methods())


def model(n_outputs: int = 3) -> MLP:
    torch.manual_seed(0)
    return MLP(4, n_outputs, hidden=(5,))


def influence(train=(X, Y), target=(XT, YT), n_outputs=3, **options):
    options.setdefault("objective", ri.Utility())
    return ri.influence(model(n_outputs), train, target, progress=False, **options)


def erm():
    return defenses.ERM(epochs=1, lr=0.01, batch_size=4, progress=False)


def fit(train, **options):
    return erm().fit(model(), train, **options)


def run(data="moons", **options):
    settings = dict(model="logreg", attack="fgsm", seeds=1, epochs=1, n_train=40, n_val=20, n_test=20,
                    recipes=["none"], progress=False)
    return defenses.run(data, **{**settings, **options})


class DictModel(nn.Module):
    """A model returning a dict of outputs (as Hugging Face models do)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.linear(x)}


def on_meta(m: nn.Module) -> nn.Module:
    return m.to("meta")


def hook(indices):
    train, val = (X, Y), (XT, YT)
    return defenses.SelectionWeights(model(), train, val, attacks.FGSM(0.1), recipe="random", fraction=0.2)(indices)


G200 = torch.Generator().manual_seed(1)
X200, Y200 = torch.rand(200, 1, 4, 4, generator=G200), torch.randint(0, 3, (200,), generator=G200)


def with_value(t: torch.Tensor, index: int, value) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[index] = value
    return t


CASES = {
    # NaN / inf values
    "nan-influence-train": (lambda: influence(train=(with_value(X, 5, float("nan")), Y)),
                            ValueError, r"^train: X contains 1 NaN or infinite value"),
    "nan-influence-target": (lambda: influence(target=(with_value(XT, 0, float("inf")), YT)),
                             ValueError, r"^target: X contains 1 NaN or infinite value"),
    "nan-attack-input": (lambda: attacks.PGD(0.1)(model(), with_value(X, 3, float("nan")), Y),
                         ValueError, r"^x: contains 1 NaN or infinite value"),
    "nan-trainer-data": (lambda: fit((with_value(X, 2, -float("inf")), Y)),
                         ValueError, r"^train: X contains 1 NaN or infinite value"),
    "nan-trainer-weights": (lambda: fit((X, Y), weights=with_value(torch.ones(10), 1, float("nan"))),
                            ValueError, r"^weights: must be finite and >= 0"),
    "nan-prune-scores": (lambda: defenses.prune(torch.tensor([1.0, float("nan")]), 0.5),
                         ValueError, r"^scores: contains NaN or infinite values"),
    # wrong dtypes
    "dtype-influence-bool-x": (lambda: influence(train=(X > 0.5, Y)),
                               TypeError, r"^train: X must be floating-point .* got torch.bool"),
    "dtype-influence-float-labels": (lambda: influence(train=(X, Y + 0.5)),
                                     ValueError, r"^train: labels must be integer class indices"),
    "dtype-influence-strings": (lambda: influence(train=([["a"] * 4] * 10, Y)),
                                TypeError, r"^train: cannot be converted to a tensor"),
    "dtype-attack-int-x": (lambda: attacks.FGSM(0.1)(model(), (X * 255).long(), Y),
                           TypeError, r"^x: must be floating-point \(integer data: X.float\(\), 8-bit images: "
                                     r"X.float\(\) / 255\), got torch.int64"),
    "dtype-influence-int-x": (lambda: influence(train=((X * 255).long(), Y)),
                              TypeError, r"^train: X must be floating-point \(integer data: .*got torch.int64"),
    "dtype-evaluate-int-x": (lambda: attacks.evaluate(model(), ((X * 255).long(), Y), {}, progress=False),
                             TypeError, r"^data: X must be floating-point \(integer data: .*got torch.int64"),
    "dtype-attack-float-y": (lambda: attacks.FGSM(0.1)(model(), X, Y.float()),
                             TypeError, r"^y: must hold integer class labels, got torch.float32"),
    "dtype-trainer-int-x": (lambda: fit(((X * 255).long(), Y)),
                            TypeError, r"^train: X must be floating-point \(integer data: .*got torch.int64"),
    "dtype-prune-complex": (lambda: defenses.prune(torch.ones(3, dtype=torch.complex64), 0.1),
                            TypeError, r"^scores: must be real numbers"),
    # labels out of range
    "labels-influence": (lambda: influence(train=(X, with_value(Y, 4, 3))),
                         ValueError, r"^train: labels must lie in \[0, 2\] for a model with 3 output\(s\), got values in"),
    "labels-influence-binary": (lambda: influence(target=(XT, torch.full((6,), 2)), n_outputs=1, train=(X, Y % 2)),
                                ValueError, r"^target: labels must lie in \[0, 1\] for a model with 1 output"),
    "labels-attack": (lambda: attacks.PGD(0.1)(model(), X, with_value(Y, 0, -1)),
                      ValueError, r"^y: labels must lie in \[0, 3\)"),
    "labels-trainer": (lambda: fit((X, with_value(Y, 9, 7))),
                       ValueError, r"^train: labels must lie in \[0, 2\] for a model with 3 output\(s\)"),
    "labels-evaluate": (lambda: attacks.evaluate(model(), (X, Y + 10), {}, progress=False),
                        ValueError, r"^data: labels must lie in \[0, 2\] for a model with 3 output\(s\), got values in \[10, 12\]"),
    "labels-evaluate-target-class": (lambda: attacks.evaluate(model(), (X, Y), {}, target_class=99, progress=False),
                                     ValueError, r"^target_class: must be in \[0, 2\], got 99"),
    "labels-relabel": (lambda: defenses.relabel(torch.rand(10), torch.arange(10), torch.rand(10, 3), 0.1),
                       ValueError, r"^predictions: outputs of 3 classes cannot relabel labels that reach class 9"),
    # a single class
    "single-class-defence": (lambda: run((X, torch.zeros(10, dtype=torch.long)), model=lambda seed: model(2),
                                         bounds=None, eps=0.1, norm="l2"),
                             ValueError, r"^data: the training split of seed 0 holds a single class \(\[0\]\)"),
    "single-class-fairness-group": (lambda: influence(target=(XT, YT % 2, torch.zeros(6)), train=(X, Y % 2),
                                                      n_outputs=2, objective=ri.DemographicParity()),
                                    ValueError, r"^target: DemographicParity needs both groups s=0 and s=1"),
    # empty splits
    "empty-influence-train": (lambda: influence(train=(X[:0], Y[:0])), ValueError, r"^train: is empty \(0 samples\)"),
    "empty-influence-target": (lambda: influence(target=(XT[:0], YT[:0])), ValueError, r"^target: is empty"),
    "empty-trainer": (lambda: fit((X[:0], Y[:0])), ValueError, r"^train: is empty \(0 samples\)$"),
    "empty-trainer-dataset": (lambda: fit(TensorDataset(X[:0], Y[:0])), ValueError, r"^train: is empty \(0 samples\)$"),
    "empty-evaluate": (lambda: attacks.evaluate(model(), (X[:0], Y[:0]), {}, progress=False),
                       ValueError, r"^data: is empty \(0 samples\)$"),
    "empty-accuracy": (lambda: attacks.accuracy(model(), X[:0], Y[:0]), ValueError, r"^X: is empty \(0 samples\)$"),
    "empty-prune": (lambda: defenses.prune(torch.ones(0), 0.1), ValueError, r"^scores: must be a non-empty"),
    "empty-split-sizes": (lambda: load_dataset("moons", seed=0, n_val=0), ValueError, r"^n_val: must be a positive"),
    "empty-seeded-split": (lambda: seeded_split((X[:3], Y[:3]), seed=0),
                           ValueError, r"^data: cannot split 3 samples into train / validation"),
    # fraction outside [0, 1)
    "fraction-prune-one": (lambda: defenses.prune(torch.ones(5), 1.0), ValueError, r"^fraction: must be a finite number in \[0, 1\), got 1.0"),
    "fraction-prune-negative": (lambda: defenses.prune(torch.ones(5), -0.1), ValueError, r"^fraction: must be a finite number in \[0, 1\)"),
    "fraction-reweight": (lambda: defenses.reweight(torch.ones(5), fraction=1.5), ValueError, r"^fraction: must be a finite number in"),
    "fraction-defence": (lambda: run(fractions=[1.5]), ValueError, r"^fractions: every fraction must be in \(0, 1\)"),
    "fraction-reweight-w-max": (lambda: defenses.reweight(torch.rand(5), fraction=0.2, w_max=1e300),
                                ValueError, r"^w_max: must be a finite number in \(0, 3.4028\d*e\+38\], got 1e\+300"),
    # eps <= 0
    "eps-pgd-zero": (lambda: attacks.PGD(0.0), ValueError, r"^eps: must be a finite number > 0, got 0.0"),
    "eps-fgsm-negative": (lambda: attacks.FGSM(-1), ValueError, r"^eps: must be a finite number > 0, got -1"),
    "eps-autoattack-zero": (lambda: attacks.AutoAttack(0), ValueError, r"^eps: must be a finite number > 0"),
    "eps-trainer": (lambda: defenses.PGDAT(eps=0, epochs=1, lr=0.1, batch_size=4), ValueError, r"^eps: must be a finite number > 0"),
    "eps-factory": (lambda: make_attack("pgd", eps=-0.1), ValueError, r"^eps: must be a finite number > 0"),
    "eps-defence": (lambda: run(eps=-1.0), ValueError, r"^eps: must be a finite number > 0"),
    # unknown method / attack / norm / data names: the message lists the valid ones
    "name-method": (lambda: influence(method="magic"), ValueError,
                    rf"^method: unknown method 'magic'; valid names are {METHOD_NAMES}$"),
    "name-attack": (lambda: make_attack("cw", eps=0.1), ValueError,
                    r"^attack: unknown name 'cw'; valid names are fgsm, pgd, linear, autoattack, apgd-ce, apgd-t$"),
    "name-attack-torchattacks": (lambda: attacks.TorchAttacks("Magic"), ValueError,
                                 r"^name: unknown torchattacks attack 'Magic'; valid names are: .*PGD"),
    "name-norm-attack": (lambda: attacks.PGD(0.1, norm="l1"), ValueError, r"^norm: must be one of linf, l2, got 'l1'"),
    "name-norm-defence": (lambda: run(norm="l1"), ValueError, r"^norm: must be one of linf, l2, got 'l1'"),
    "name-data-defence": (lambda: run("cifar10"), ValueError,
                          r"^data: unknown data set 'cifar10'; valid names are mnist, mnist-full, fashion-mnist, fashion-mnist-full, digits, adult, moons"),
    "name-data-loader": (lambda: load_dataset("cifar10", seed=0), ValueError, r"^data: unknown data set 'cifar10'; valid"),
    "name-model": (lambda: model_factory("resnet", None), ValueError, r"^model: unknown name 'resnet'; valid names are"),
    "name-trainer": (lambda: make_trainer("free-at", epochs=1, lr=0.1, batch_size=4), ValueError,
                     r"^trainer: unknown name 'free-at'; valid names are erm, fast-at, pgd-at, trades, art-pgd-at, art-trades"),
    "name-objective": (lambda: make_objective("accuracy"), ValueError,
                       r"^objective: unknown name 'accuracy'; valid names are utility, robust, dp, eop"),
    "name-recipe": (lambda: run(recipes=["magic"]), ValueError, r"^recipes: unknown recipe 'magic'; valid names are none"),
    # sensitive attribute of the wrong length or values
    "sensitive-length": (lambda: influence(target=(XT, YT % 2, S[:5]), train=(X, Y % 2), n_outputs=2,
                                           objective=ri.DemographicParity()),
                         ValueError, r"^target: s must have shape \(6,\), got \(5,\)"),
    "sensitive-values": (lambda: influence(target=(XT, YT % 2, S * 2), train=(X, Y % 2), n_outputs=2,
                                           objective=ri.EqualOpportunity()),
                         ValueError, r"^target: the sensitive attribute s must take values in \{0, 1\}"),
    "sensitive-missing": (lambda: influence(target=(XT, YT % 2), train=(X, Y % 2), n_outputs=2,
                                            objective=ri.DemographicParity()),
                          ValueError, r"^target: DemographicParity needs a sensitive attribute"),
    # missing paths
    "path-tracin-checkpoint": (lambda: influence(method="tracin", checkpoints=["/nonexistent/ckpt.pt"]),
                               ValueError, r"^checkpoints: checkpoint 0: no such file: '/nonexistent/ckpt.pt'"),
    "path-safe-load": (lambda: safe_load("/nonexistent/weights.pt", name="weights"),
                       ValueError, r"^weights: no such file: '/nonexistent/weights.pt'"),
    # what the model returns, where model and data live
    "output-evaluate-dict": (lambda: attacks.evaluate(DictModel(), (X, Y), {}, progress=False),
                             ValueError, r"^model: must return a tensor of logits, got dict"),
    "device-influence-meta": (lambda: influence(device="meta"), ValueError, r"^device: 'meta' holds no data"),
    "device-influence-meta-x": (lambda: influence(train=(X.to("meta"), Y)),
                                ValueError, r"^train: X is on the meta device \(it holds no data\)"),
    "device-evaluate-meta-x": (lambda: attacks.evaluate(model(), (X.to("meta"), Y), {}, progress=False),
                               ValueError, r"^data: X is on the meta device"),
    "device-influence-meta-model": (lambda: ri.influence(on_meta(model()), (X, Y), (XT, YT), objective=ri.Utility(),
                                                         progress=False),
                                    ValueError, r"^model: its parameters are on the meta device \(they hold no data\)"),
    "device-evaluate-meta-model": (lambda: attacks.evaluate(on_meta(model()), (X, Y), {}, progress=False),
                                   ValueError, r"^model: its parameters are on the meta device"),
    "device-attack-meta-model": (lambda: attacks.PGD(0.1)(on_meta(model()), X, Y),
                                 ValueError, r"^model: its parameters are on the meta device"),
    "device-trainer-meta-model": (lambda: erm().fit(on_meta(model()), (X, Y)),
                                  ValueError, r"^model: its parameters are on the meta device"),
    # seeds: one range everywhere
    "seed-trainer-huge": (lambda: fit((X, Y), seed=2**70),
                          ValueError, r"^seed: must be in \[0, 4294967295\], got 1180591620717411303424$"),
    "seed-pgd-negative": (lambda: attacks.PGD(0.1, seed=-1), ValueError, r"^seed: must be in \[0, 4294967295\], got -1$"),
    "seed-influence": (lambda: influence(seed=2**32), ValueError, r"^seed: must be in \[0, 4294967295\]"),
    # the selection hook's indices
    "index-hook-n": (lambda: hook(torch.tensor([3, 10])), ValueError,
                     r"^indices: must be training-sample indices in \[0, 10\), got values in \[3, 10\]"),
    "index-hook-negative": (lambda: hook([-1]), ValueError, r"^indices: must be training-sample indices in \[0, 10\)"),
    "index-hook-float": (lambda: hook(torch.tensor([0.5])), TypeError, r"^indices: must be integers, got torch.float32"),
    # budgets that round to zero samples
    "budget-poison-rate": (lambda: attacks.poison((X200, Y200), attacks.Trigger.patch((1, 4, 4), size=2),
                                                  target_class=0, rate=0.001, seed=0),
                           ValueError, r"^rate: 0.001 of 200 samples plants round\(rate \* n\) = 0 poisons; "
                                       r"use a rate >= 0.005"),
    "budget-remove-poisons": (lambda: remove_poisons(model(), (X200.flatten(1)[:, :4], Y200), None, trainer=erm(),
                                                     budget=0.002),
                              ValueError, r"^budget: 0.002 of 200 training samples removes none of them"),
}


if not torch.backends.mps.is_available():  # on a Mac with Metal, device="mps" is valid
    CASES["device-influence-mps"] = (lambda: influence(device="mps"), ValueError,
                                     r"^device: 'mps' needs Apple's Metal GPU, but torch sees none here")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_a_clear_error_naming_the_argument(case):
    call, error, message = CASES[case]
    with pytest.raises(error, match=message) as info:
        call()
    assert type(info.value) is error
    assert "\n" not in str(info.value)


def test_every_row_of_the_table_is_covered():
    rows = {case.split("-")[0] for case in CASES}
    assert rows == {"nan", "dtype", "labels", "single", "empty", "fraction", "eps", "name", "sensitive", "path",
                    "output", "device", "seed", "index", "budget"}
