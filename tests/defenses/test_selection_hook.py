"""SelectionWeights: a selection recipe's weights in the user's own loop give the pipeline's model."""

import copy

import pytest
import torch

import attacks
from defenses import ERM, DefenceContext, SelectionWeights, per_sample_loss
from defenses.recipes import get_recipe
from robust_infl.models import MLP

from conftest import centred_blobs, flat_params


@pytest.mark.parametrize("recipe, mode", [("influence", "prune"), ("loss", "reweight"), ("random", "prune")])
def test_the_hook_in_a_users_own_loop_gives_the_recipes_model(recipe, mode):
    train, val = centred_blobs(120, seed=0, centres_seed=99), centred_blobs(40, seed=1, centres_seed=99)
    attack = attacks.PGD(0.3, steps=3, norm="l2", bounds=None, seed=0)
    trainer = ERM(epochs=2, lr=0.02, batch_size=16, retrain="finetune", progress=False)
    base = trainer.fit(MLP(5, 3, hidden=(8,)), train, seed=0)
    ctx = DefenceContext(model=base, train=train, val=val, trainer=trainer, attack=attack, seed=4, fraction=0.1,
                         mode=mode, progress=False)
    built_in = get_recipe(recipe).fn(ctx)

    hook = SelectionWeights(base, train, val, attack, recipe=recipe, fraction=0.1, mode=mode, seed=4)
    assert hook.weights.shape == (120,) and torch.isclose(hook.weights.mean(), torch.tensor(1.0))
    if mode == "prune":
        assert int((~hook.keep).sum()) == 12 and bool((hook.weights[~hook.keep] == 0).all())
    model = copy.deepcopy(base)  # the user's own loop, as the built-in trainer runs it
    torch.manual_seed(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    order_generator = torch.Generator().manual_seed(4)
    model.train()
    for _ in range(2):
        order = torch.randperm(120, generator=order_generator)
        for start in range(0, 120, 16):
            idx = order[start:start + 16]
            loss = (hook(idx) * per_sample_loss(model(train[0][idx]), train[1][idx])).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.testing.assert_close(flat_params(model), flat_params(built_in), atol=1e-6, rtol=0)


def test_selection_hook_validation():
    train, val = centred_blobs(30, seed=0, centres_seed=99), centred_blobs(10, seed=1, centres_seed=99)
    model = MLP(5, 3, hidden=(4,))
    with pytest.raises(ValueError, match="^recipe:"):
        SelectionWeights(model, train, val, attacks.FGSM(0.1, bounds=None), recipe="lookahead")
    with pytest.raises(ValueError, match="^mode:"):
        SelectionWeights(model, train, val, attacks.FGSM(0.1, bounds=None), mode="drop")
    with pytest.raises(TypeError, match="^attack:"):
        SelectionWeights(model, train, val, None)
