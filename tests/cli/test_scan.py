"""``robust-infl scan``: a tiny poisoned image set is found (the target class, the poisons flagged, the kept
list without them), a clean one gives "nothing found" and keeps every index, the files are well-formed, and
every bad flag is refused with one line naming it before any compute."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attacks
import defenses
from defenses import cli
from defenses.scan_report import kept_indices, typical_samples
from robust_infl.datasets import load_dataset

from test_campaign import _run_cli, no_compute  # noqa: F401 - the fixture that makes any compute fail

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The npz files of the tests: sklearn's digits (600 training, 200 trusted images), the training set clean
    and with 10% BadNets poisons (a 2x2 corner patch, label 0), and bad files."""
    folder = tmp_path_factory.mktemp("scan-data")
    splits = load_dataset("digits", seed=0, n_train=600, n_val=200, n_test=200)
    (X, y), (Xt, yt) = splits.train, splits.val
    Xp, yp, poisons = attacks.poison((X, y), attacks.Trigger.patch((1, 8, 8), size=2), target_class=0, rate=0.1,
                                     seed=0)
    np.savez(folder / "poisoned.npz", X=Xp.numpy(), y=yp.numpy())
    np.save(folder / "poisons.npy", poisons.numpy())
    np.savez(folder / "clean.npz", X=X.numpy(), y=y.numpy())
    np.savez(folder / "trusted.npz", X=Xt.numpy(), y=yt.numpy())
    X, y = Xt.numpy()[:150], yt.numpy()[:150] % 3
    np.savez(folder / "no_y.npz", X=X)
    np.savez(folder / "uint8.npz", X=(255 * X).astype(np.uint8), y=y)
    np.savez(folder / "negative.npz", X=X, y=y - 1)
    np.savez(folder / "wide.npz", X=np.zeros((10, 1, 9, 9), np.float32), y=np.arange(10) % 3)
    np.savez(folder / "eleven.npz", X=X[:12], y=np.arange(12))
    np.savez(folder / "table.npz", X=np.zeros((20, 4), np.float32), y=np.arange(20) % 2)
    np.save(folder / "plain.npy", X)
    (folder / "notes.txt").write_text("a file")
    torch.save({"weight": torch.zeros(2)}, folder / "other.pt")
    return folder


FILES = ["--train", "{d}/poisoned.npz", "--trusted", "{d}/trusted.npz", "--model", "cnn"]
BAD_ROWS = [
    # (id, argv with {d} (the data folder) and {t} (a fresh folder), message regex after "robust-infl scan: error: ")
    ("train missing", ["--train", "{d}/missing.npz", "--trusted", "{d}/trusted.npz", "--model", "cnn"],
     r"train: no such file: '.*missing.npz'"),
    ("train .npy", ["--train", "{d}/plain.npy", "--trusted", "{d}/trusted.npz", "--model", "cnn"],
     r"train: '.*plain.npy' holds a single array \(.npy\), expected a .npz of X, y"),
    ("train without y", ["--train", "{d}/no_y.npz", "--trusted", "{d}/trusted.npz", "--model", "cnn"],
     r"train: '.*no_y.npz' has no array 'y' \(it holds: X\)"),
    ("train not an archive", ["--train", "{d}/notes.txt", "--trusted", "{d}/trusted.npz", "--model", "cnn"],
     r"train: cannot read '.*notes.txt' as a .npz file"),
    ("train uint8", ["--train", "{d}/uint8.npz", "--trusted", "{d}/trusted.npz", "--model", "cnn"],
     r"train: X must be floating-point \(.*8-bit images: X.float\(\) / 255\)"),
    ("train negative labels", ["--train", "{d}/negative.npz", "--trusted", "{d}/trusted.npz", "--model", "cnn"],
     r"train: y must hold class indices >= 0, got -1"),
    ("train without trusted", ["--train", "{d}/poisoned.npz", "--model", "cnn"], r"trusted: required with --train"),
    ("train without model", ["--train", "{d}/poisoned.npz", "--trusted", "{d}/trusted.npz"],
     r"model: required with --train, one of cnn, mlp, logreg"),
    ("trusted without train", ["--data", "digits", "--trusted", "{d}/trusted.npz"],
     r"trusted: only used with --train \(with --data, the validation split\); drop --trusted"),
    ("trusted other shape", ["--train", "{d}/poisoned.npz", "--trusted", "{d}/wide.npz", "--model", "cnn"],
     r"trusted: samples must have the training samples' shape \(1, 8, 8\), got \(1, 9, 9\)"),
    ("trusted other classes", ["--train", "{d}/poisoned.npz", "--trusted", "{d}/eleven.npz", "--model", "cnn"],
     r"trusted: labels must lie in the training labels' range \[0, 9\], got \[0, 11\]"),
    ("data with train", ["--data", "digits", *FILES], r"data: only used without --train; drop --data"),
    ("n-train with train", [*FILES, "--n-train", "100"], r"n-train: only used with --data; drop --n-train"),
    ("eps with erm", [*FILES, "--eps", "0.2"], r"eps: only used by an adversarial --trainer; drop --eps"),
    ("steps", [*FILES, "--steps", "3"], r"steps: only used by attacks; scan runs none; drop --steps"),
    ("budget 1.5", [*FILES, "--budget", "1.5"], r"budget: must be a finite number in \(0, 1\), got 1.5"),
    ("budget 0", [*FILES, "--budget", "0"], r"budget: must be a finite number in \(0, 1\), got 0.0"),
    ("budget of no sample", [*FILES, "--budget", "0.0005"],
     r"budget: 0.0005 of 600 training samples removes none of them .*; use a budget >= 0.000833"),
    ("top -1", [*FILES, "--top", "-1"], r"top: must be >= 0, got -1"),
    ("seed -1", [*FILES, "--seed", "-1"], r"argument --seed: must be an integer in \[0, 4294967295\], got -1"),
    ("trainer unknown", [*FILES, "--trainer", "sgd"], r"argument --trainer: invalid choice: 'sgd'"),
    ("out a file", [*FILES, "--out", "{d}/notes.txt"], r"out: '.*notes.txt' is a file, expected a folder"),
    ("remove a folder", [*FILES, "--out", "{t}/out", "--remove", "{d}"], r"remove: '.*' is a folder, expected a file"),
    ("save-weights a folder", [*FILES, "--out", "{t}/out", "--save-weights", "{d}"],
     r"save-weights: '.*' is a folder, expected a file"),
    ("weights missing", [*FILES, "--out", "{t}/out", "--weights", "{d}/missing.pt"],
     r"weights: no such file: '.*missing.pt'"),
    ("weights of another model", [*FILES, "--out", "{t}/out", "--weights", "{d}/other.pt"],
     r"weights: '.*other.pt' does not fit model 'cnn' on this data"),
    ("cnn on features", ["--train", "{d}/table.npz", "--trusted", "{d}/table.npz", "--model", "cnn", "--out", "{t}/o"],
     r"model: 'cnn' needs image data, user has samples of shape \(4,\)"),
]


@pytest.mark.parametrize("case, argv, message", BAD_ROWS, ids=[row[0] for row in BAD_ROWS])
def test_bad_input_is_refused_with_one_line_naming_the_flag_before_any_compute(case, argv, message, data, tmp_path,
                                                                              no_compute, monkeypatch, capsys):
    monkeypatch.setattr(defenses, "scan_backdoor", no_compute_scan)
    argv = [a.replace("{d}", str(data)).replace("{t}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert _run_cli(["scan", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.match(r"robust-infl scan: error: " + message, err), err
    assert not list(tmp_path.rglob("scan.*"))


def no_compute_scan(*args, **kwargs):
    raise AssertionError("the scan started before the bad input was refused")


def test_an_earlier_scan_is_kept_unless_overwrite(data, tmp_path, no_compute, monkeypatch, capsys):
    monkeypatch.setattr(defenses, "scan_backdoor", no_compute_scan)
    (tmp_path / "scan.json").write_text("{}")
    argv = ["scan", *[a.replace("{d}", str(data)) for a in FILES], "--out", str(tmp_path)]
    assert _run_cli(argv) == 2
    err = capsys.readouterr().err
    assert re.match(r"robust-infl scan: error: out: '.*' holds an earlier scan \(scan.json\); pass --overwrite", err)
    assert (tmp_path / "scan.json").read_text() == "{}"


def test_kept_indices_and_typical_samples_by_brute_force():
    assert kept_indices(6, torch.tensor([4, 1])).tolist() == [0, 2, 3, 5]
    assert kept_indices(3, torch.empty(0, dtype=torch.int64)).tolist() == [0, 1, 2]
    generator = torch.Generator().manual_seed(0)
    scores, y = torch.randn(40, generator=generator), torch.randint(0, 3, (40,), generator=generator)
    shown, exclude = scores.argsort(descending=True)[:7], torch.tensor([int(scores.argmin())])
    typical = typical_samples(scores, y, shown, exclude)
    used = set()
    for position, index in enumerate(shown.tolist()):
        candidates = [i for i in scores.argsort().tolist() if y[i] == y[index] and i not in shown.tolist()
                      and i not in exclude.tolist() and i not in used]
        assert typical[position] == (candidates[0] if candidates else -1)
        used.add(candidates[0]) if candidates else None


def _scan(data, out, *extra) -> list:
    """The scan of ``data / extra[0]``: an MLP, its schedule that of the scan's known-answer test (the scan's
    models take its learning rate and batch size), 20% budget."""
    return ["scan", "--train", str(data / extra[0]), "--trusted", str(data / "trusted.npz"), "--model", "mlp",
            "--epochs", "5", "--lr", "0.003", "--batch-size", "32", "--budget", "0.2", "--out", str(out), *extra[1:]]


def test_a_poisoned_set_is_found_its_poisons_flagged_and_left_out_of_the_kept_list(data, tmp_path, capsys):
    out, keep = tmp_path / "out", tmp_path / "keep.txt"
    assert cli.main(_scan(data, out, "poisoned.npz", "--remove", str(keep))) == 0
    printed = capsys.readouterr()
    assert printed.err == ""  # no progress bar off a terminal, no warning
    assert re.search(r"verdict: BACKDOOR FOUND, suspected target class 0: \d+ of 600", printed.out)
    assert "none was trained; the cost is over an estimated erm training of 5 epochs" in printed.out
    record = json.loads((out / "scan.json").read_text())
    verdict, poisons = record["verdict"], set(np.load(data / "poisons.npy").tolist())
    assert record["model"]["trained_here"] is False and record["timing"]["vs_training"] > 0  # over the estimate
    assert verdict["found"] and verdict["target_class"] == 0 and verdict["value"] > verdict["threshold"]
    flagged = [entry["index"] for entry in record["flagged"]]
    assert len(flagged) == verdict["n_flagged"] <= 0.2 * 600 and len(set(flagged) & poisons) >= 0.9 * len(poisons)
    assert len(set(flagged) - poisons) <= 0.1 * len(flagged)
    scores = np.load(out / "scan_scores.npy")
    assert scores.shape == (600,)
    assert [entry["score"] for entry in record["flagged"]] == pytest.approx(scores[flagged].tolist())
    assert all(a["score"] >= b["score"] for a, b in zip(record["flagged"], record["flagged"][1:]))
    assert [entry["rank"] for entry in record["flagged"]] == list(range(1, len(flagged) + 1))
    assert all(entry["label"] == 0 for entry in record["flagged"])
    kept = np.loadtxt(keep, dtype=int)
    assert kept.tolist() == sorted(set(range(600)) - set(flagged)) and verdict["n_kept"] == len(kept)
    assert (out / "scan_grid.png").read_bytes()[:8] == PNG_MAGIC
    markdown = (out / "scan.md").read_text()
    assert f"**Backdoor found**: suspected target class 0; {len(flagged)} of 600" in markdown
    assert "(scan_grid.png)" in markdown
    assert f"| 1 | {flagged[0]} | 0 |" in markdown
    assert record["files"] == {"markdown": "scan.md", "scores": "scan_scores.npy", "grid": "scan_grid.png",
                               "remove": str(keep)}


def test_a_clean_set_gives_nothing_found_and_keeps_every_index(data, tmp_path, capsys):
    out, keep = tmp_path / "out", tmp_path / "keep.txt"
    assert cli.main(_scan(data, out, "clean.npz", "--remove", str(keep), "--top", "4")) == 0
    printed = capsys.readouterr().out
    assert "verdict: no backdoor found; nothing flagged, all 600 training samples kept" in printed
    record = json.loads((out / "scan.json").read_text())
    assert not record["verdict"]["found"] and record["verdict"]["value"] <= record["verdict"]["threshold"]
    assert record["flagged"] == [] and record["verdict"]["n_kept"] == 600
    assert len(record["highest_scores"]) == 4  # shown for inspection, none flagged
    assert np.loadtxt(keep, dtype=int).tolist() == list(range(600))
    assert "**No backdoor found**: nothing flagged" in (out / "scan.md").read_text()
    assert (out / "scan_grid.png").read_bytes()[:8] == PNG_MAGIC


def test_given_weights_are_scanned_and_non_image_data_gets_no_grid(tmp_path, capsys):
    weights, tiny = tmp_path / "mlp.pt", ["--data", "moons", "--model", "mlp", "--epochs", "1", "--seed", "3"]
    assert cli.main(["scan", *tiny, "--out", str(tmp_path / "a"), "--save-weights", str(weights), "--top", "2"]) == 0
    assert "trained here" in capsys.readouterr().out and weights.exists()
    assert cli.main(["scan", *tiny, "--out", str(tmp_path / "b"), "--weights", str(weights), "--top", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"model: mlp, weights {weights}" in printed and "trained here" not in printed
    assert "(no image grid: the samples are not images)" in printed
    record = json.loads((tmp_path / "b" / "scan.json").read_text())
    assert record["files"]["grid"] is None and not (tmp_path / "b" / "scan_grid.png").exists()
    assert "No image grid: the samples are not images (shape (2,)" in (tmp_path / "b" / "scan.md").read_text()
    entries = record["flagged"] or record["highest_scores"]
    assert all("row" in entry for entry in entries)  # built-in data: the data set row of each sample


def test_overwrite_replaces_an_earlier_scan(data, tmp_path, capsys):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "scan_grid.png").write_bytes(b"old")
    assert cli.main(["scan", "--data", "moons", "--model", "mlp", "--epochs", "1", "--out", str(out),
                     "--overwrite"]) == 0
    assert not (out / "scan_grid.png").exists() and (out / "scan.json").exists()


@pytest.mark.slow
def test_the_command_end_to_end_in_its_own_process(data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "defenses.cli", *_scan(data, tmp_path / "out", "poisoned.npz",
                                                                          "--remove", str(tmp_path / "keep.txt"))],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "verdict: BACKDOOR FOUND, suspected target class 0" in result.stdout and result.stderr == ""
    flagged = {entry["index"] for entry in json.loads((tmp_path / "out" / "scan.json").read_text())["flagged"]}
    assert set(np.loadtxt(tmp_path / "keep.txt", dtype=int).tolist()) == set(range(600)) - flagged


def test_progress_is_asked_for_unless_no_progress(tmp_path, monkeypatch, capsys):
    """The bar's convention (tqdm ``disable=None``): asked for by default, shown only on a terminal."""
    asked, scan = [], defenses.scan_backdoor

    def recording(*args, **kwargs):
        asked.append((kwargs["progress"], kwargs["trainer"].progress))
        return scan(*args, **kwargs)

    monkeypatch.setattr(defenses, "scan_backdoor", recording)
    tiny = ["scan", "--data", "moons", "--model", "mlp", "--epochs", "1", "--top", "0"]
    assert cli.main([*tiny, "--out", str(tmp_path / "a")]) == 0
    assert cli.main([*tiny, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert asked == [(True, True), (False, False)]
    assert capsys.readouterr().err == ""  # not a terminal: no bar
