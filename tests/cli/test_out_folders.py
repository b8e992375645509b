"""The four bugs a new user found (wrong results or lost data), each pinned by a test written before its fix.

1. ``defend --out DIR`` into a folder holding an earlier run, without ``--resume``, silently
   overwrote it and left the old seed files beside the new ones.
2. ``prune(scores, 0.999)`` on 300 samples kept none (rounding defeated the ``[0, 1)`` guard).
3. ``report.json`` misstated a user's attack (``"steps": 10`` for ``PGD(0.1, steps=5)``).
4. ``resume=True`` reused seeds computed with other attack settings (only eps and norm were compared).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import attacks
import defenses
from defenses.seed_results import SEEDS_DIR
from defenses import cli

import conftest

CLI_TINY = [*conftest.CLI_TINY, "--recipes", "none", "random"]


def user_data(n: int = 150, seed: int = 0):
    """Two well separated Gaussian blobs in 2-D with integer labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    X = torch.randn(n, 2, generator=g) + 2.0 * (y.float() - 0.5).unsqueeze(1)
    return X, y


def run_user(attack, out=None, **changes):
    options = dict(model=lambda seed: nn.Linear(2, 2), attack=attack, recipes=["none", "random"], references=(),
                   fractions=[0.1], seeds=1, epochs=1, lr=0.05, batch_size=32, progress=False, out=out)
    return defenses.run(user_data(), **{**options, **changes})


# ---------------------------------------------------------------- 1. --out reuse

def test_defend_refuses_a_used_out_folder_without_resume_or_overwrite_and_leaves_it_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["defend", *CLI_TINY, "--seeds", "2", "--out", str(out)]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli.main(["defend", *CLI_TINY, "--seeds", "1", "--epochs", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"robust-infl defend: error: out: {out} holds an earlier run")
    assert "--resume" in err and "--overwrite" in err and err.count("\n") == 1
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_the_old_run_and_removes_its_seed_files(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["defend", *CLI_TINY, "--seeds", "2", "--out", str(out)]) == 0
    assert cli.main(["defend", *CLI_TINY, "--seeds", "1", "--epochs", "2", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in (out / SEEDS_DIR).iterdir()) == ["seed_0.json"]
    assert json.loads((out / "report.json").read_text())["config"]["epochs"] == 2


def test_run_refuses_a_used_out_folder(tmp_path):
    run_user(attacks.FGSM(0.1, bounds=None), out=tmp_path)
    with pytest.raises(ValueError, match=r"^out: .* holds an earlier run .*resume=True.*overwrite=True"):
        run_user(attacks.FGSM(0.1, bounds=None), out=tmp_path)
    with pytest.raises(ValueError, match=r"^overwrite: cannot be combined with resume"):
        run_user(attacks.FGSM(0.1, bounds=None), out=tmp_path, resume=True, overwrite=True)


# ---------------------------------------------------------------- 2. empty prune

@pytest.mark.parametrize("select", [
    lambda s: defenses.prune(s, 0.999),
    lambda s: defenses.reweight(s, "hard", fraction=0.999),
    lambda s: defenses.reweight(s, "smooth", fraction=0.999),
], ids=["prune", "reweight-hard", "reweight-smooth"])
def test_a_fraction_that_rounds_to_every_sample_is_refused(select):
    scores = torch.randn(300)
    with pytest.raises(ValueError, match=r"^fraction: 0.999 of 300 samples selects all 300 of them"):
        select(scores)
    assert int(defenses.prune(scores, 0.998).sum()) == 1  # just below: one sample kept


def test_relabel_keeps_every_sample_even_at_a_fraction_that_flags_all():
    labels, predictions = torch.zeros(300, dtype=torch.long), torch.ones(300, dtype=torch.long)
    new_labels, flagged = defenses.relabel(torch.randn(300), labels, predictions, 0.999)
    assert new_labels.shape == (300,) and bool(flagged.all()) and bool((new_labels == 1).all())


def test_run_refuses_such_a_fraction_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"^fractions: 0.999 of 98 training samples selects all 98"):
        run_user(attacks.FGSM(0.1, bounds=None), fractions=[0.999], model=lambda seed: 1 / 0)


# ---------------------------------------------------------------- 3. the attack as given in the report

def test_the_report_records_a_user_attack_exactly_as_given():
    pgd = attacks.PGD(0.1, steps=5, random_start=False, bounds=None, restarts=2, seed=3)
    config = run_user(pgd)["config"]
    assert config["steps"] == 5 and config["eps"] == 0.1 and config["norm"] == "linf"
    assert config["attack_settings"] == {"class": "attacks.pgd.PGD", "eps": 0.1, "alpha": 0.05, "steps": 5,
                                         "norm": "linf", "random_start": False, "restarts": 2, "bounds": None,
                                         "seed": 3}


def test_the_report_shows_only_the_parameters_an_attack_uses():
    config = run_user(attacks.FGSM(0.1, bounds=None))["config"]
    assert config["steps"] is None and config["eps"] == 0.1
    named = defenses.run("moons", model="logreg", attack="fgsm", recipes=["none"], seeds=1, epochs=1, n_train=40,
                         n_val=20, n_test=20, progress=False)["config"]
    assert named["steps"] is None and named["attack_settings"]["class"] == "attacks.fgsm.FGSM"


# ---------------------------------------------------------------- 4. resume compares every setting

@pytest.mark.parametrize("changed, field", [
    (attacks.PGD(0.1, steps=3, bounds=None), "attack_settings"),
    (attacks.PGD(0.1, steps=5, random_start=False, bounds=None), "attack_settings"),
    (attacks.PGD(0.1, steps=5, bounds=(-10.0, 10.0)), "attack_settings"),
], ids=["steps", "random_start", "bounds"])
def test_resume_refuses_seeds_computed_with_other_attack_settings(tmp_path, changed, field):
    run_user(attacks.PGD(0.1, steps=5, bounds=None), out=tmp_path)
    with pytest.raises(ValueError, match=rf"^resume: .*seed_0.json was written by a run with other settings "
                                         rf"\(differs in .*{field}"):
        run_user(changed, out=tmp_path, resume=True)
    run_user(attacks.PGD(0.1, steps=5, bounds=None), out=tmp_path, resume=True)  # the same settings resume


def test_resume_refuses_seeds_computed_with_another_trainer_or_model(tmp_path):
    run_user(attacks.FGSM(0.1, bounds=None), out=tmp_path, trainer=defenses.ERM(epochs=1, lr=0.05, batch_size=32))
    with pytest.raises(ValueError, match=r"differs in trainer_settings"):
        run_user(attacks.FGSM(0.1, bounds=None), out=tmp_path, resume=True,
                 trainer=defenses.ERM(epochs=1, lr=0.05, batch_size=32, weight_decay=0.1))
    with pytest.raises(ValueError, match=r"differs in .*trainer_settings"):
        run_user(attacks.FGSM(0.1, bounds=None), out=tmp_path, resume=True,
                 trainer=defenses.ERM(epochs=1, lr=0.05, batch_size=32, lr_schedule="cosine"))
    with pytest.raises(ValueError, match=r"differs in .*model_hash"):
        run_user(attacks.FGSM(0.1, bounds=None), out=tmp_path, resume=True,
                 trainer=defenses.ERM(epochs=1, lr=0.05, batch_size=32),
                 model=lambda seed: nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)))


def test_attack_settings_tell_plain_function_attacks_apart():
    def make(eps):
        def attack(model, x, y):
            return x + 0 * eps
        return attack

    settings = attacks.attack_settings
    assert settings(make(0.1)) == settings(make(0.1)) != settings(make(0.2))
    assert settings(make(0.1))["class"] == "function"
    import functools

    def shift(model, x, y, amount):
        return x + 0 * amount

    assert settings(functools.partial(shift, amount=1)) != settings(functools.partial(shift, amount=2))
