"""The bad-input campaign of a new user, kept as tables: input -> exit status / exception and message.

Every row failed late (after training or scoring) or was explained poorly before its fix. Each must
now fail at the boundary, BEFORE any compute, with one line naming the flag or argument: the
``no_compute`` fixture makes every trainer and every scoring call fail loudly, so a row that still
trains first gets the wrong message.
"""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import attacks
import defenses
import robust_infl
from defenses.report import without_timing
from defenses import cli

from conftest import CLI_TINY
from conftest import square_blobs as blobs

TINY = CLI_TINY
NO_GPU = not torch.cuda.is_available()


@pytest.fixture
def no_compute(monkeypatch):
    """Make every optimisation step and the set-up of every scoring run raise, so that a check that runs
    after training or scoring has begun is caught."""
    import robust_infl.preparation

    def refuse(*args, **kwargs):
        raise AssertionError("compute started before the bad input was refused")

    for optimizer in (torch.optim.Adam, torch.optim.SGD):
        monkeypatch.setattr(optimizer, "step", refuse)
    monkeypatch.setattr(robust_infl.preparation, "build_problem", refuse)


@pytest.fixture
def files(tmp_path):
    """Paths the rows refer to: a plain file, a folder, a weights file with a NaN, an earlier run."""
    plain = tmp_path / "plain.txt"
    plain.write_text("not a folder")
    (tmp_path / "folder.npy").mkdir()
    state = {"linear.weight": torch.zeros(1, 2), "linear.bias": torch.zeros(1)}
    state["linear.weight"][0, 1] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    return tmp_path


def truncated_run(tmp_path):
    """An earlier run of ``defend`` whose seed file was cut short (a disk full, a copy interrupted)."""
    out = tmp_path / "truncated"
    assert cli.main(["defend", *TINY, "--seeds", "1", "--recipes", "none", "--out", str(out)]) == 0
    seed_file = out / "seeds" / "seed_0.json"
    seed_file.write_text(seed_file.read_text()[:40])
    return out


CLI_ROWS = [
    # (id, argv with {tmp} for the temporary folder, expected exit status, message regex on stderr)
    ("defend --out <a file>", ["defend", *TINY, "--out", "{tmp}/plain.txt"], 2,
     r"defend: error: out: '.*plain.txt' is a file, expected a folder"),
    ("defend --out <inside a file>", ["defend", *TINY, "--out", "{tmp}/plain.txt/run"], 2,
     r"defend: error: out: cannot write '.*plain.txt/run': '.*plain.txt' is a file, not a folder"),
    ("demo --out <a file>", ["demo", "--quick", "--no-progress", "--out", "{tmp}/plain.txt"], 2,
     r"demo: error: out: '.*plain.txt' is a file, expected a folder"),
    ("score --out <a file>/s.npy", ["score", *TINY, "--out", "{tmp}/plain.txt/s.npy"], 2,
     r"score: error: out: cannot write '.*plain.txt/s.npy': '.*plain.txt' is a file"),
    ("score --out <a folder>", ["score", *TINY, "--out", "{tmp}/folder.npy"], 2,
     r"score: error: out: '.*folder.npy' is a folder, expected a file path"),
    ("score --store <a file>", ["score", *TINY, "--out", "{tmp}/s.npy", "--store", "{tmp}/plain.txt"], 2,
     r"score: error: store: '.*plain.txt' is a file, expected a folder"),
    ("attack --save-weights <unwritable>", ["attack", *TINY, "--save-weights", "{tmp}/plain.txt/w.pt"], 2,
     r"attack: error: save-weights: cannot write '.*plain.txt/w.pt'"),
    ("attack --seed -1", ["attack", *TINY, "--seed", "-1"], 2,
     r"attack: error: argument --seed: must be an integer in \[0, 4294967295\], got -1"),
    ("score --seed <beyond 2**32>", ["score", *TINY, "--seed", "99999999999999999999", "--out", "{tmp}/s.npy"], 2,
     r"score: error: argument --seed: must be an integer in \[0, 4294967295\], got 99999999999999999999"),
    ("defend --poison-rate <rounding to no poison>", ["defend", "--data", "digits", "--model", "mlp", "--n-train",
                                                      "200", "--n-val", "40", "--n-test", "40", "--poison", "badnets",
                                                      "--poison-rate", "0.001", "--out", "{tmp}/d"], 2,
     r"defend: error: .*0.001 of 200 .*samples .*(plants round\(rate \* n\) = 0 poisons|removes none)"),
    ("defend --fraction 0.999", ["defend", *TINY, "--fraction", "0.999", "--out", "{tmp}/d"], 2,
     r"defend: error: fraction: 0.999 of 40 training samples selects all 40 of them"),
    ("score --chunk-size 100", ["score", *TINY, "--batch-size", "32", "--chunk-size", "100", "--store", "{tmp}/st",
                                "--out", "{tmp}/s.npy"], 2,
     r"score: error: chunk-size: must be a positive multiple of 256 \(the scoring batch size; --batch-size is the "
     r"training batch size\), got 100"),
    ("attack --weights <a folder>", ["attack", *TINY, "--weights", "{tmp}"], 2,
     r"attack: error: weights: '.*' is a folder, expected a file"),
    ("attack --weights <NaN weights>", ["attack", *TINY, "--weights", "{tmp}/nan.pt"], 2,
     r"attack: error: weights: '.*nan.pt' holds 1 NaN or infinite value\(s\) in 'linear.weight'"),
    ("score --method tracin without checkpoints", ["score", *TINY, "--method", "tracin", "--out", "{tmp}/s.npy"], 2,
     r"score: error: checkpoints: --method tracin needs --checkpoints PATH"),
    ("score --checkpoints without tracin", ["score", *TINY, "--checkpoints", "{tmp}/nan.pt", "--out", "{tmp}/s.npy"],
     2, r"score: error: checkpoints: only used by --method tracin"),
    ("score --method if-exact on a big model", ["score", "--data", "digits", "--model", "mlp", "--n-train", "40",
                                                "--n-val", "20", "--n-test", "20", "--method", "if-exact",
                                                "--out", "{tmp}/s.npy"], 2,
     r"score: error: params: method 'if-exact' supports at most 5000 scored parameters, the model has \d+"),
    ("defend --method if-exact on a big model", ["defend", "--data", "digits", "--model", "mlp", "--n-train", "40",
                                                 "--n-val", "20", "--n-test", "20", "--method", "if-exact",
                                                 "--out", "{tmp}/d"], 2,
     r"defend: error: params: method 'if-exact' supports at most 5000 scored parameters"),
    ("defend --ensemble 0", ["defend", *TINY, "--ensemble", "0", "--out", "{tmp}/d"], 2,
     r"defend: error: argument --ensemble: must be an integer >= 1, got 0"),
    ("score --damping -1", ["score", *TINY, "--method", "if-cg", "--damping", "-1", "--out", "{tmp}/s.npy"], 2,
     r"score: error: damping: must be a finite number >= 0, got -1.0"),
    ("defend --damping -1", ["defend", *TINY, "--method", "if-cg", "--damping", "-1", "--out", "{tmp}/d"], 2,
     r"defend: error: damping: must be a finite number >= 0, got -1.0"),
    ("score --params <unknown>", ["score", *TINY, "--params", "head.weight", "--out", "{tmp}/s.npy"], 2,
     r"score: error: params: unknown parameter name\(s\) \['head.weight'\]"),
    ("score --store with a method it cannot shard", ["score", *TINY, "--method", "datainf", "--store", "{tmp}/st",
                                                     "--out", "{tmp}/s.npy"], 2,
     r"score: error: method: --store and torchrun score with ip, self, got 'datainf'"),
    ("defend --method tracin", ["defend", *TINY, "--method", "tracin"], 2,
     r"defend: error: argument --method: invalid choice: 'tracin'"),
    pytest.param("score --device cuda without a GPU", ["score", *TINY, "--device", "cuda", "--out", "{tmp}/s.npy"],
                 2, r"score: error: device: 'cuda' needs a CUDA GPU, but torch sees none here",
                 marks=pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")),
]


def _run_cli(argv) -> tuple:
    try:
        return cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        return exit_.code


@pytest.mark.parametrize("case, argv, status, message", CLI_ROWS,
                         ids=[getattr(r, "values", r)[0] for r in CLI_ROWS])
def test_cli_refuses_bad_input_before_any_compute_with_one_line(case, argv, status, message, files, no_compute,
                                                                capsys):
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    assert _run_cli(argv) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err


def test_a_truncated_seed_file_on_resume_names_the_file(tmp_path, capsys):
    out = truncated_run(tmp_path)
    capsys.readouterr()
    assert cli.main(["defend", *TINY, "--seeds", "1", "--recipes", "none", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"defend: error: resume: .*seeds/seed_0.json is not a complete per-seed result file", err), err


def test_cli_hides_third_party_deprecation_warnings(monkeypatch, capsys):
    def noisy(args):
        warnings.warn_explicit("torch.jit.script is deprecated", FutureWarning, "_script.py", 1,
                               module="torch.jit._script")
        warnings.warn_explicit("old option", DeprecationWarning, "x.py", 1, module="torchattacks.attack")
        return 0

    monkeypatch.setitem(cli.COMMANDS, "attack", noisy)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(["attack", *TINY]) == 0
    assert "Warning" not in capsys.readouterr().err


# ---------------------------------------------------------------- the Python API

def squeezed_binary_model() -> nn.Module:
    """A binary model whose forward squeezes its one logit to shape (n,) (common in user code)."""
    class Squeezed(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 1)

        def forward(self, x):
            return self.linear(x).squeeze(-1)

    return Squeezed()


class OutOfBudget(attacks.Attack):
    """A broken attack: it declares eps 0.1 (linf) and bounds (0, 1) but moves every input by 0.3."""

    def __init__(self):
        self.eps, self.norm, self.bounds = 0.1, "linf", (0.0, 1.0)

    def _perturb(self, model, x, y):
        return x + 0.3


def out_of_bounds(model, x, y):
    """A plain-function attack that declares a budget it keeps but leaves its bounds."""
    return x - x.abs().amax() - 0.05


out_of_bounds.eps, out_of_bounds.norm, out_of_bounds.bounds = 10.0, "linf", (0.0, 1.0)


def float_labels(y):
    return y.float() + 0.5


API_ROWS = [
    # (id, call, exception type, message regex)
    ("ERM.fit: X of the wrong width", lambda: defenses.ERM(epochs=1).fit(nn.Linear(3, 2), blobs()),
     ValueError, r"^train: the model cannot evaluate inputs of shape \(2,\) \(mat1 and mat2"),
    ("ERM.fit: (n,) outputs", lambda: defenses.ERM(epochs=1).fit(squeezed_binary_model(), blobs()),
     ValueError, r"^model: must return logits of shape \(1, C\), got \(1,\) \(a binary model returns one logit as "
                 r"\(n, 1\): do not squeeze it\)"),
    ("PGDAT.fit: (n,) outputs", lambda: defenses.PGDAT(eps=0.1, epochs=1).fit(squeezed_binary_model(), blobs()),
     ValueError, r"^model: must return logits of shape .* do not squeeze it"),
    ("ARTTrainer.fit: X of the wrong width", lambda: defenses.ARTTrainer("madry-pgd", eps=0.1, epochs=1, lr=0.01,
                                                                          batch_size=8).fit(nn.Linear(3, 2), blobs()),
     ValueError, r"^train: the model cannot evaluate inputs of shape \(2,\)"),
    ("ARTTrainer.fit: (n,) outputs", lambda: defenses.ARTTrainer("madry-pgd", eps=0.1, epochs=1, lr=0.01,
                                                                  batch_size=8).fit(squeezed_binary_model(), blobs()),
     ValueError, r"^model: must return logits of shape .* do not squeeze it"),
    ("influence: (n,) outputs", lambda: robust_infl.influence(squeezed_binary_model(), blobs(), blobs(),
                                                              objective=robust_infl.Utility(), progress=False),
     ValueError, r"^model: outputs of shape \(2,\) are incompatible .* do not squeeze it"),
    ("evaluate: (n,) outputs", lambda: attacks.evaluate(squeezed_binary_model(), blobs(), {}, progress=False),
     ValueError, r"^model: must return logits of shape \(40, C\), got \(40,\) .* do not squeeze it"),
    ("PGD: (n,) outputs", lambda: attacks.PGD(0.1)(squeezed_binary_model(), *blobs()),
     ValueError, r"^model: must return logits of shape \(40, C\), got \(40,\) .* do not squeeze it"),
    ("an Attack leaving its budget", lambda: OutOfBudget()(nn.Linear(2, 2), *blobs()),
     ValueError, r"^OutOfBudget: returned points outside its linf budget eps=0.1 \(largest perturbation 0.3"),
    ("evaluate: an attack leaving its bounds", lambda: attacks.evaluate(nn.Linear(2, 2), blobs(),
                                                                        {"bad": out_of_bounds}, progress=False),
     ValueError, r"^attacks: 'bad': returned 80 value\(s\) outside its bounds \[0.0, 1.0\]"),
    pytest.param("influence(device='cuda') without a GPU",
                 lambda: robust_infl.influence(nn.Linear(2, 2), blobs(), blobs(), objective=robust_infl.Utility(),
                                               device="cuda", progress=False),
                 ValueError, r"^device: 'cuda' needs a CUDA GPU", marks=pytest.mark.skipif(not NO_GPU, reason="GPU")),
    ("ERM.fit: non-integer float labels", lambda: defenses.ERM(epochs=1).fit(
        nn.Linear(2, 2), (blobs()[0], float_labels(blobs()[1]))),
     ValueError, r"^train: labels must be integer class indices, got non-integer values"),
    ("influence: non-integer float target labels", lambda: robust_infl.influence(
        nn.Linear(2, 2), blobs(), (blobs()[0], float_labels(blobs()[1])),
        objective=robust_infl.Robust(attacks.FGSM(0.1)), progress=False),
     ValueError, r"^target: labels must be integer class indices, got non-integer values"),
    ("run: non-integer float labels", lambda: defenses.run((blobs(100)[0], float_labels(blobs(100)[1])),
                                                           model=lambda seed: nn.Linear(2, 2), progress=False),
     ValueError, r"^data: labels must be integer class indices, got non-integer values"),
    ("run(out=<a file>)", lambda: defenses.run(blobs(100), model=lambda seed: nn.Linear(2, 2), out=__file__,
                                               progress=False),
     ValueError, r"^out: '.*test_campaign.py' is a file, expected a folder"),
    ("run(method='tracin')", lambda: defenses.run(blobs(100), model=lambda seed: nn.Linear(2, 2), method="tracin",
                                                  progress=False),
     ValueError, r"^method: 'tracin' needs checkpoints of the model it scores"),
    ("run(fractions=[0.999])", lambda: defenses.run(blobs(100), model=lambda seed: nn.Linear(2, 2),
                                                    fractions=[0.999], progress=False),
     ValueError, r"^fractions: 0.999 of 65 training samples selects all 65"),
    ("prune(scores, 0.999)", lambda: defenses.prune(torch.randn(300), 0.999),
     ValueError, r"^fraction: 0.999 of 300 samples selects all 300 of them"),
]


@pytest.mark.parametrize("case, call, error, message", API_ROWS,
                         ids=[getattr(r, "values", r)[0] for r in API_ROWS])
def test_api_refuses_bad_input_at_the_boundary_naming_the_argument(case, call, error, message, no_compute):
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------- accepted alike everywhere

def test_whole_number_float_labels_are_accepted_alike_by_train_target_and_run():
    X, y = blobs()
    trainer = defenses.ERM(epochs=2, batch_size=8, progress=False)
    as_long, as_float = trainer.fit(nn.Linear(2, 2), (X, y)), trainer.fit(nn.Linear(2, 2), (X, y.float()))
    assert all(torch.equal(a, b) for a, b in zip(as_long.state_dict().values(), as_float.state_dict().values()))
    objective = robust_infl.Robust(attacks.FGSM(0.1))
    scores = [robust_infl.influence(as_long, (X, y), (X, labels), objective=objective, progress=False)
              for labels in (y, y.float())]
    assert torch.equal(scores[0], scores[1])
    reports = [defenses.run((torch.cat([X, X]), labels), model=lambda seed: nn.Linear(2, 2), attack=attacks.FGSM(0.1),
                            recipes=["none"], seeds=1, epochs=1, progress=False) for labels in (torch.cat([y, y]),
                                                                                            torch.cat([y, y]).float())]
    assert without_timing(reports[0]["per_seed"]) == without_timing(reports[1]["per_seed"])  # wall times differ


def test_evaluate_with_no_attack_reports_no_robust_number():
    result = attacks.evaluate(nn.Linear(2, 2), blobs(), {}, progress=False)
    assert set(result) == {"n", "clean_acc"}


class _Shifted:
    """``attack``'s points moved by ``shift`` (a tensor like x), declaring ``attack``'s budget (or ``eps``) and bounds."""

    def __init__(self, attack, shift, eps=None):
        self.attack, self.shift = attack, shift
        self.eps, self.norm, self.bounds = attack.eps if eps is None else eps, attack.norm, attack.bounds

    def __call__(self, model, x, y):
        return self.attack(model, x, y) + self.shift


def test_evaluate_accepts_attack_outputs_within_budget_and_bounds_and_refuses_those_beyond():
    torch.manual_seed(0)
    model, (x, y) = nn.Linear(2, 2), blobs()
    for attack in (attacks.PGD(0.1, steps=3), attacks.PGD(0.5, norm="l2", steps=3), attacks.FGSM(0.1)):
        delta = (attack(model, x, y) - x).flatten(1)
        size = delta.abs().amax(dim=1) if attack.norm == "linf" else delta.norm(dim=1)
        assert float(size.max()) <= attack.eps * (1 + 1e-6)  # inside the budget, measured here
        result = attacks.evaluate(model, (x, y), {"a": attack}, progress=False)
        assert result["a"]["robust_acc"] <= result["clean_acc"] and result["a"]["asr"] > 0
        beyond = torch.zeros_like(x)
        i = int(size.argmax())
        beyond[i] = attack.eps * delta[i].sign()  # one point pushed further along its own perturbation, past eps
        with pytest.raises(ValueError, match=f"^attacks: 'a': returned points outside its {attack.norm} budget"):
            attacks.evaluate(model, (x, y), {"a": _Shifted(attack, beyond)}, progress=False)
        outside = torch.zeros_like(x)
        outside[x > 0.5] = 1.0  # past the bounds (0, 1); a declared budget of 10 is not exceeded
        count = int((attack(model, x, y) + outside > 1).sum())
        with pytest.raises(ValueError, match=rf"^attacks: 'a': returned {count} value\(s\) outside its bounds"):
            attacks.evaluate(model, (x, y), {"a": _Shifted(attack, outside, eps=10.0)}, progress=False)


# ---------------------------------------------------------------- the report and the rows of score

def test_identical_paired_differences_show_no_zero_width_interval():
    from defenses.report import paired_difference, render_markdown

    stat = paired_difference([0.5, 0.6], [0.492, 0.592])
    assert stat["ci95"] is None and stat["ci95_note"] == "n/a: identical differences"
    report = defenses.run(blobs(100), model=lambda seed: nn.Linear(2, 2), attack=attacks.FGSM(0.1), references=(),
                          recipes=["none", "random"], fractions=[0.01], seeds=2, epochs=1, progress=False)
    markdown = render_markdown(report)
    assert "± 0.0 [+" not in markdown and "[n/a: identical differences]" in markdown


def test_run_takes_the_bounds_from_the_attack_and_the_report_shows_them():
    X, y = blobs(100)
    from defenses.report import render_markdown

    given = defenses.run((X * 4 - 2, y), model=lambda seed: nn.Linear(2, 2), recipes=["none"], seeds=1, epochs=1,
                         attack=attacks.PGD(0.1, steps=2, bounds=(-2.0, 2.0)), references=(), progress=False)
    assert given["config"]["bounds"] == [-2.0, 2.0]
    assert "Input bounds: [-2.0, 2.0]." in render_markdown(given)
    images = defenses.run((X, y), model=lambda seed: nn.Linear(2, 2), recipes=["none"], seeds=1, epochs=1,
                          attack="pgd", references=(), progress=False)
    assert images["config"]["bounds"] == [0.0, 1.0]  # named attack on data in [0, 1]: the attacks' default
    tabular = defenses.run((X * 4 - 2, y), model=lambda seed: nn.Linear(2, 2), recipes=["none"], seeds=1, epochs=1,
                           attack="pgd", references=(), progress=False)
    assert tabular["config"]["bounds"] is None and "Input bounds: none (unbounded)." in render_markdown(tabular)


def test_score_saves_the_data_set_row_of_every_training_sample(tmp_path, capsys):
    from sklearn.datasets import load_digits

    out = tmp_path / "s.npy"
    assert cli.main(["score", "--data", "digits", "--n-train", "60", "--n-val", "20", "--n-test", "20", "--epochs",
                     "1", "--objective", "utility", "--seed", "3", "--no-progress", "--out", str(out)]) == 0
    rows = np.load(tmp_path / "s_rows.npy")
    scores = np.load(out)
    assert rows.shape == scores.shape == (60,) and len(set(rows.tolist())) == 60
    splits = robust_infl.datasets.load_dataset("digits", seed=3, n_train=60, n_val=20, n_test=20)
    digits = load_digits()
    np.testing.assert_allclose(splits.train[0].reshape(60, -1).numpy(), digits.data[rows] / 16.0, rtol=1e-6)
    assert np.array_equal(splits.train[1].numpy(), digits.target[rows])
    printed = capsys.readouterr().out
    assert "s_rows.npy" in printed and " row " in printed


def test_a_bad_resume_keeps_the_seed_file_it_refused(tmp_path):
    out = truncated_run(tmp_path)
    before = (out / "seeds" / "seed_0.json").read_text()
    with pytest.raises(ValueError, match="^resume: "):
        defenses.run("moons", model="logreg", epochs=1, n_train=40, n_val=20, n_test=20, recipes=["none"], seeds=1,
                     out=out, resume=True, progress=False)
    assert (out / "seeds" / "seed_0.json").read_text() == before
    with pytest.raises(json.JSONDecodeError):
        json.loads(before)


def test_the_no_compute_guard_catches_training_and_scoring(no_compute):
    with pytest.raises(AssertionError, match="compute started"):
        defenses.ERM(epochs=1).fit(nn.Linear(2, 2), blobs())
    with pytest.raises(AssertionError, match="compute started"):
        robust_infl.influence(nn.Linear(2, 2), blobs(), blobs(), objective=robust_infl.Utility(), progress=False)


def test_score_runs_tracin_from_checkpoints_and_if_exact_on_a_parameter_subset(tmp_path):
    weights = tmp_path / "w.pt"
    common = ["score", "--data", "digits", "--model", "mlp", "--n-train", "40", "--n-val", "20", "--n-test", "20",
              "--epochs", "1", "--objective", "utility", "--no-progress"]
    assert cli.main([*common, "--save-weights", str(weights), "--out", str(tmp_path / "ip.npy")]) == 0
    # one checkpoint (the trained model itself) at learning rate 1: TracIn is exactly ip
    assert cli.main([*common, "--weights", str(weights), "--method", "tracin", "--checkpoints", str(weights),
                     "--lr", "1", "--out", str(tmp_path / "tracin.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "tracin.npy"), np.load(tmp_path / "ip.npy"), rtol=1e-5, atol=1e-8)
    assert cli.main([*common, "--weights", str(weights), "--method", "if-exact", "--params", "net.5.weight",
                     "net.5.bias", "--damping", "0.01", "--out", str(tmp_path / "exact.npy")]) == 0
    assert np.isfinite(np.load(tmp_path / "exact.npy")).all()


def test_the_process_exit_status_is_2_with_one_line(tmp_path):
    """The same refusals seen from a shell: status 2 (not 1 with a traceback), one line on stderr."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    commands = [["attack", *TINY, "--seed", "-1"], ["score", *TINY, "--out", str(tmp_path / "d.npy"), "--device",
                                                     "cuda" if NO_GPU else "cuda:99"]]
    started = [subprocess.Popen([sys.executable, "-m", "defenses.cli", *argv], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv in commands]
    for process, message in zip(started, (r"argument --seed: must be an integer in \[0, 4294967295\]", r"error: device: 'cuda")):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 2 and err.count("\n") == 1 and re.search(message, err), err


def test_poisoning_report_shows_a_degenerate_interval_as_such():
    from defenses.report import mean_std, paired_difference, render_markdown

    stat = mean_std([0.5, 0.6])
    entry = {"recipe": "random", "threat": "trigger unknown", "evidence": None,
             **{m: stat for m in ("clean_acc", "asr_backdoor", "precision", "recall", "auroc",
                                  "robust_acc_adaptive", "removed_share")},
             "vs_none": {m: paired_difference([0.5, 0.6], [0.492, 0.592]) for m in ("clean_acc", "asr_backdoor")}}
    report = {"config": {"data": "digits", "model": "mlp", "trainer": "erm", "attack": "pgd", "seeds": [0, 1],
                         "poison": {"attack": "badnets", "rate": 0.05, "target_class": 0, "patch_size": 3,
                                    "budget": 0.1}},
              "summary": [entry]}
    markdown = render_markdown(report)
    assert "+0.8 [n/a: identical differences]" in markdown and "[+0.8, +0.8]" not in markdown
