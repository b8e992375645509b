"""Resumable scoring in the library: finished chunks and stored target quantities are read back, foreign
stores are refused. (The real SIGKILL test runs the command line: tests/cli/test_score_store.py.)"""

from __future__ import annotations

import json

import pytest
import torch

import attacks
import robust_infl as ri
from robust_infl.distributed import sharded_influence
from robust_infl.models import MLP
from robust_infl.store import MANIFEST


def test_resume_reads_finished_chunks_and_the_stored_attack_instead_of_recomputing(tmp_path, fgsm_attack):
    torch.manual_seed(1)
    model = MLP(6, 3, hidden=(8,)).double().eval()
    x, y = torch.randn(70, 6, dtype=torch.float64), torch.randint(0, 3, (70,))
    xt, yt = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
    for options in (dict(aggregate=True), dict(aggregate=False), dict(aggregate=False, projection_dim=12)):
        attack = fgsm_attack(0.1)
        store = tmp_path / str(len(list(tmp_path.iterdir())))
        run = dict(objective=ri.Robust(attack), batch_size=5, chunk_size=10, progress=False, store=store, **options)
        full = sharded_influence(model, (x, y), (xt, yt), **run)
        assert attack._calls == 1
        for chunk in (0, 3, 6):  # as if the run had died before writing them
            (store / f"scores_{chunk:06d}.npy").unlink()
        resumed = sharded_influence(model, (x, y), (xt, yt), resume=True, **run)
        assert torch.equal(resumed, full)
        assert attack._calls == 1  # the attacked targets / objective gradient came from the store
        assert torch.equal(sharded_influence(model, (x, y), (xt, yt), resume=True, **run), full)


def test_resume_refuses_a_store_of_another_model_or_other_options(tmp_path):
    torch.manual_seed(2)
    model = MLP(6, 3, hidden=(8,)).eval()
    x, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    target = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    run = dict(objective=ri.Utility(), batch_size=5, progress=False, store=tmp_path / "s")
    sharded_influence(model, (x, y), target, **run)
    with pytest.raises(ValueError, match="^store: .*already holds a store"):
        sharded_influence(model, (x, y), target, **run)
    with pytest.raises(ValueError, match=r"^store: .*options\.batch_size \(stored 5, now 10\)"):
        sharded_influence(model, (x, y), target, resume=True, **{**run, "batch_size": 10})
    with torch.no_grad():
        model.net[1].weight[0, 0] += 1.0
    with pytest.raises(ValueError, match="^store: .*differs in model_hash"):
        sharded_influence(model, (x, y), target, resume=True, **run)
    with pytest.raises(ValueError, match="^store: .*differs in data_hash"):
        sharded_influence(model, (x + 1, y), target, resume=True, **run)


def test_the_store_identifies_settings_by_the_one_fingerprint_of_the_defence_runs(tmp_path):
    torch.manual_seed(3)
    model = MLP(6, 3, hidden=(8,)).eval()
    x, y = torch.rand(30, 6), torch.randint(0, 3, (30,))
    target = (torch.rand(5, 6), torch.randint(0, 3, (5,)))
    objective = ri.Robust(attacks.PGD(0.1, steps=2))
    run = dict(batch_size=5, progress=False, store=tmp_path / "s")
    sharded_influence(model, (x, y), target, objective=objective, **run)
    stored = json.loads((tmp_path / "s" / MANIFEST).read_text())["options"]["objective"]
    assert stored == json.loads(json.dumps(attacks.plain_value(objective)))  # no memory address in it
    assert stored["attack"]["class"] == "attacks.pgd.PGD" and stored["attack"]["eps"] == 0.1
    sharded_influence(model, (x, y), target, objective=ri.Robust(attacks.PGD(0.1, steps=2)), resume=True, **run)
    with pytest.raises(ValueError, match=r"^store: .*options\.objective\.attack\.eps \(stored 0\.1, now 0\.2\)"):
        sharded_influence(model, (x, y), target, objective=ri.Robust(attacks.PGD(0.2, steps=2)), resume=True, **run)
