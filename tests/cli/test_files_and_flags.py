"""The command line's files and flags: one run per output folder, tamper-evident results, a full disk
naming the flag and the file after the printed results, paths and flags refused before any compute with
one line naming the flag (the rows of the second new-user campaign about the command line and files)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest
import torch

from defenses import cli
from robust_infl.io import LOCK_FILE
from robust_infl.store import ChunkStore

from conftest import CLI_TINY as TINY
from test_campaign import _run_cli, files, no_compute  # noqa: F401 - fixtures shared with the first campaign

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
POISON = ["--data", "digits", "--model", "mlp", "--n-train", "100", "--n-val", "40", "--n-test", "40", "--epochs", "1",
          "--no-progress", "--poison", "badnets"]


@pytest.fixture
def paths(files):
    """The first campaign's paths plus a store, a link to nowhere, a pipe, and weights of booleans / meta tensors."""
    ChunkStore(files / "store", identity={"method": "ip"}, n_rows=4, arrays={"scores": ()}, dtype="float32",
               chunk_size=4)
    (files / "dangling").symlink_to(files / "nowhere")
    os.mkfifo(files / "fifo")
    torch.save({"linear.weight": torch.ones(1, 2, dtype=torch.bool), "linear.bias": torch.ones(1, dtype=torch.bool)},
               files / "bool.pt")
    torch.save({"linear.weight": torch.empty(1, 2, device="meta"), "linear.bias": torch.empty(1, device="meta")},
               files / "meta.pt")
    return files


FILE_ROWS = [
    # (id, argv with {tmp}, message regex on stderr); every row exits 2 before any compute
    ("score --store <a store> without --resume",
     ["score", *TINY, "--store", "{tmp}/store", "--out", "{tmp}/s.npy"],
     r"score: error: store: .*store already holds a store \(manifest.json\); pass resume=True \(--resume\)"),
    ("attack --eps 1e308", ["attack", *TINY, "--eps", "1e308"],
     r"attack: error: eps: must be at most 1e\+30 \(perturbed float32 inputs overflow beyond it\), got 1e\+308"),
    ("defend --out ''", ["defend", *TINY, "--out", ""], r"defend: error: out: expected a folder path, got ''"),
    ("defend --out <name too long>", ["defend", *TINY, "--out", "{tmp}/" + "a" * 300],
     r"defend: error: out: the name 'a+\.\.\.a+' is longer than the file system allows \(300 bytes, at most \d+\)"),
    ("score --out <name too long>", ["score", *TINY, "--out", "{tmp}/" + "a" * 300 + ".npy"],
     r"score: error: out: the name .* is longer than the file system allows"),
    ("defend --out <dangling link>", ["defend", *TINY, "--out", "{tmp}/dangling"],
     r"defend: error: out: cannot write '.*dangling': '.*dangling' is a symbolic link to '.*nowhere', which does "
     r"not exist"),
    ("attack --weights /dev/null", ["attack", *TINY, "--weights", "/dev/null"],
     r"attack: error: weights: '/dev/null' is not a regular file \(a device, pipe or socket\)"),
    ("attack --weights <a FIFO>", ["attack", *TINY, "--weights", "{tmp}/fifo"],
     r"attack: error: weights: '.*fifo' is not a regular file"),
    ("attack --weights <booleans>", ["attack", *TINY, "--weights", "{tmp}/bool.pt"],
     r"attack: error: weights: '.*bool.pt' holds 'linear.weight' as torch.bool, the model expects torch.float32"),
    ("attack --weights <meta tensors>", ["attack", *TINY, "--weights", "{tmp}/meta.pt"],
     r"attack: error: weights: '.*meta.pt' holds tensors without data \(device 'meta'\) in 'linear.weight'"),
    ("defend --fraction 0.01 on 40 samples", ["defend", *TINY, "--fraction", "0.01", "--out", "{tmp}/d"],
     r"defend: error: fraction: 0.01 of 40 training samples selects none of them .*; use at least 0.0125"),
    ("defend --poison-rate 0", ["defend", *POISON, "--poison-rate", "0", "--out", "{tmp}/d"],
     r"defend: error: poison-rate: must be a finite number in \(0, 1\), got 0.0"),
    ("defend --eval-attacks autoattack on tabular data", ["defend", *TINY, "--eval-attacks", "autoattack",
                                                          "--out", "{tmp}/d"],
     r"defend: error: eval-attacks: 'autoattack' runs AutoAttack's code, which clips to \[0, 1\]; this data has "
     r"bounds None"),
    # flags that would be silently ignored: one rule
    ("score --chunk-size without --store", ["score", *TINY, "--chunk-size", "512", "--out", "{tmp}/s.npy"],
     r"score: error: chunk-size: only used with --store \(or under torchrun\); drop --chunk-size"),
    ("score --damping with --method ip", ["score", *TINY, "--damping", "0.1", "--out", "{tmp}/s.npy"],
     r"score: error: damping: only used by --method if-exact, if-cg, if-lissa, ekfac, kfac; drop --damping"),
    ("defend --damping with --method ip", ["defend", *TINY, "--damping", "0.1", "--out", "{tmp}/d"],
     r"defend: error: damping: only used by --method if-exact"),
    ("score --objective utility --attack autoattack", ["score", *TINY, "--objective", "utility", "--attack",
                                                       "autoattack", "--out", "{tmp}/s.npy"],
     r"score: error: attack: only used with --objective robust; drop --attack"),
    ("defend --poison-rate without --poison", ["defend", *TINY, "--poison-rate", "0.1", "--out", "{tmp}/d"],
     r"defend: error: poison-rate: only used with --poison; drop --poison-rate"),
    ("defend --ensemble with --poison", ["defend", *POISON, "--ensemble", "2", "--out", "{tmp}/d"],
     r"defend: error: ensemble: only used without --poison"),
    ("defend --budget without --poison", ["defend", *TINY, "--budget", "0.1", "--out", "{tmp}/d"],
     r"defend: error: budget: only used with --poison"),
    ("defend --poison with --fraction", ["defend", *POISON, "--fraction", "0.1", "--out", "{tmp}/d"],
     r"defend: error: fraction: only used without --poison \(its budget is --budget\)"),
    ("defend --temperature with --mode prune", ["defend", *TINY, "--temperature", "2", "--out", "{tmp}/d"],
     r"defend: error: temperature: only used with --mode reweight --scheme smooth"),
    ("score --checkpoints without tracin", ["score", *TINY, "--checkpoints", "{tmp}/nan.pt", "--out", "{tmp}/s.npy"],
     r"score: error: checkpoints: only used by --method tracin; drop --checkpoints"),
]


@pytest.mark.parametrize("case, argv, message", FILE_ROWS, ids=[row[0] for row in FILE_ROWS])
def test_cli_refuses_bad_paths_and_idle_flags_before_any_compute(case, argv, message, paths, no_compute, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(paths)
    argv = [a.replace("{tmp}", str(paths)) for a in argv]
    assert _run_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not (paths / "report.json").exists()


HOLD = ("import sys, time; from robust_infl.io import lock_folder\n"
        "with lock_folder(sys.argv[1], 'out'):\n    print('held', flush=True); time.sleep(120)\n")


def holder(folder: Path) -> subprocess.Popen:
    """Another process holding the lock of ``folder`` until killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_folder_and_the_process(tmp_path, no_compute, capsys):
    process = holder(tmp_path / "run")
    try:
        for argv in (["defend", *TINY, "--out", str(tmp_path / "run")],
                     ["defend", *TINY, "--resume", "--out", str(tmp_path / "run")],
                     ["defend", *TINY, "--poison", "badnets", "--out", str(tmp_path / "run")],
                     ["demo", "--quick", "--no-progress", "--out", str(tmp_path / "run")],
                     ["score", *TINY, "--store", str(tmp_path / "run"), "--out", str(tmp_path / "s.npy")]):
            assert _run_cli(argv) == 2
            err = capsys.readouterr().err
            assert re.fullmatch(rf"robust-infl {argv[0]}: error: (out|store): '.*run' is in use by another run, "
                                rf"process {process.pid} \(.*\); wait for it to finish or use another folder\n",
                                err), err
    finally:
        process.kill()
        process.wait()


def test_the_stale_lock_of_a_killed_run_is_reported_on_one_line_and_taken_over(tmp_path, capsys):
    process = holder(tmp_path / "run")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (tmp_path / "run" / LOCK_FILE).exists()
    assert cli.main(["defend", *TINY, "--seeds", "1", "--recipes", "none", "--references", "--eval-attacks",
                     "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert re.fullmatch(rf"robust-infl defend: warning: out: '.*run' held the lock of process {process.pid} .*, "
                        r"which ended without releasing it \(killed\?\); taken over\n", err), err
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def fake_scores(monkeypatch):
    """Scoring without training or computing: known scores, so that only the file handling runs."""
    def score(args, splits, defaults, eps, norm, objective):
        model = cli.model_factory(args.model, splits)(0)
        return 0, model, torch.arange(len(splits.train[1]), dtype=torch.float32)
    monkeypatch.setattr(cli, "_score", score)


def test_score_on_a_full_disk_prints_the_ranking_names_the_flag_and_leaves_no_half_pair(tmp_path, monkeypatch,
                                                                                       capsys):
    fake_scores(monkeypatch)
    out = tmp_path / "s.npy"
    assert cli.main(["score", *TINY, "--out", str(out)]) == 0
    before = np.load(out), np.load(tmp_path / "s_rows.npy")
    real_save, calls = np.save, []

    def full_at_the_second(handle, array, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(handle, array, **kwargs)

    monkeypatch.setattr(np, "save", full_at_the_second)
    capsys.readouterr()
    assert cli.main(["score", *TINY, "--seed", "1", "--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert "harm on robust (ip) of 40 training samples" in printed.out and "rank" in printed.out
    assert re.fullmatch(r"robust-infl score: error: out: cannot write '.*s_rows.npy' \(No space left on device; the "
                        r"files written before it are complete and kept\)\n", printed.err), printed.err
    monkeypatch.setattr(np, "save", real_save)
    np.testing.assert_array_equal(np.load(out), before[0])  # neither file of the pair was replaced alone
    np.testing.assert_array_equal(np.load(tmp_path / "s_rows.npy"), before[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npy", "s_rows.npy"]


def test_attack_on_a_full_disk_prints_the_table_then_names_the_flag(tmp_path, monkeypatch, capsys):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    assert cli.main(["attack", *TINY, "--save-weights", str(tmp_path / "w.pt")]) == 2
    printed = capsys.readouterr()
    assert "| (clean) |" in printed.out and "| pgd |" in printed.out
    assert re.fullmatch(r"robust-infl attack: error: save-weights: cannot write '.*w.pt' \(No space left on device; "
                        r".*\)\n", printed.err), printed.err
    assert list(tmp_path.iterdir()) == []


def test_defend_on_a_full_disk_names_the_flag_and_keeps_what_fits_for_resume(tmp_path, monkeypatch, capsys):
    argv = ["defend", *TINY, "--seeds", "1", "--recipes", "none", "--references", "--eval-attacks",
            "--out", str(tmp_path / "d")]

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_space)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"robust-infl defend: error: out: cannot write '.*d/robust_vs_cost.png' \(No space left on "
                        r"device; the files written before it are complete and kept\)\n", err), err
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["report.json", "report.md", "seeds"]
    monkeypatch.undo()
    assert cli.main([*argv, "--resume"]) == 0  # the seed computed before the disk filled up is reused
    assert (tmp_path / "d" / "robust_vs_cost.png").exists()


def test_a_forged_seed_file_or_store_chunk_is_refused_on_resume_naming_the_file(tmp_path, capsys):
    out = tmp_path / "d"
    argv = ["defend", *TINY, "--seeds", "1", "--recipes", "none", "--references", "--eval-attacks", "--out", str(out)]
    assert cli.main(argv) == 0
    seed_file = out / "seeds" / "seed_0.json"
    record = json.loads(seed_file.read_text())
    record["results"]["runs"][0]["robust_acc_adaptive"] = 0.99
    seed_file.write_text(json.dumps(record, indent=2))
    capsys.readouterr()
    assert cli.main([*argv, "--resume"]) == 2
    assert re.fullmatch(r"robust-infl defend: error: resume: .*seed_0.json was changed after it was written .*\n",
                        capsys.readouterr().err)
    store = tmp_path / "st"
    score = ["score", *TINY, "--store", str(store), "--out", str(tmp_path / "s.npy")]
    assert cli.main(score) == 0
    chunk = store / "scores_000000.npy"
    values = np.load(chunk)
    values[3] = 1e6
    np.save(chunk, values)
    capsys.readouterr()
    assert cli.main([*score, "--resume"]) == 2
    assert re.fullmatch(r"robust-infl score: error: store: '.*scores_000000.npy' was changed after it was written "
                        r".*\n", capsys.readouterr().err)


def test_score_store_on_a_full_disk_names_the_flag_and_the_chunk(tmp_path, monkeypatch, capsys):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np.lib.format, "open_memmap", no_space)
    assert cli.main(["score", *TINY, "--store", str(tmp_path / "st"), "--out", str(tmp_path / "s.npy")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"robust-infl score: error: store: cannot write '.*st/scores_000000.npy' \(No space left on "
                        r"device; the files written before it are complete and kept\)\n", err), err
    assert not (tmp_path / "s.npy").exists() and not (tmp_path / "st" / LOCK_FILE).exists()
