"""The ``robust-infl`` command line: ``defend``, ``score``, ``attack``, ``explain``, ``scan`` and ``demo``.

Run ``robust-infl <command> --help`` for every flag. User errors print one line on stderr and exit
with status 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

import attacks
import defenses
import robust_infl
from attacks.registry import ATTACK_NAMES, make_attack
from defenses.backdoor_scan import DEFAULT_SCAN_BUDGET
from defenses.config import POISON_ATTACKS, PoisoningConfig, PoisonSpec, RunConfig, help_texts
from defenses.demo import run_demo
from defenses.attribution import chosen_inputs, explain, read_inputs, write_explanation
from defenses.plan import EmptyBudgetWarning
from defenses.recipes import DEFAULT_RECIPES, ENSEMBLE_OPTION, available_recipes, get_recipe
from defenses.registry import TRAINER_NAMES, make_trainer
from defenses.report import render_markdown
from defenses.scan_report import load_scan_data, prepare_scan_folder, statistic_line, write_scan_report
from defenses.selection import check_budget
from defenses.timing import timed
from robust_infl.distributed import (SHARDED_METHODS, broadcast_module_state, init_process_group_from_env,
                                     rank_and_world_size, sharded_influence)
from robust_infl.io import (atomic_save_npys, atomic_save_tensor, check_output_file, check_output_folder, held_output,
                            lock_folder, output_errors, safe_load)
from robust_infl.methods.hessian import check_exact_size
from robust_infl.registry import (DATASET_NAMES, MODEL_NAMES, OBJECTIVE_NAMES, USER_DATA_DEFAULTS, data_defaults,
                                  load_splits, make_objective, model_factory)
from robust_infl.store import check_store_folder
from attacks.validation import SEED_MAX, check_device, check_fraction, check_int, check_number, check_seed
from robust_infl.inputs import resolve_param_names

__all__ = ["main", "build_parser"]

PROG = "robust-infl"
CHECKPOINT_METHODS = ("tracin",)  # methods that need checkpoints of the scored model's training run
DAMPED_METHODS = ("if-exact", "if-cg", "if-lissa", "ekfac", "kfac")  # methods that take --damping
THIRD_PARTY_MODULES = r"(?!(robust_infl|attacks|defenses|experiments)(\.|$))"
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, FloatingPointError)


def _members_value(text: str) -> int:
    """argparse type of ``--ensemble``: a number of models, at least 1 (the error names the flag)."""
    try:
        return check_int(int(text), "ensemble", minimum=1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}") from None


def _seed_value(text: str) -> int:
    """argparse type of ``--seed``: the API's seed rule (:func:`attacks.validation.check_seed`; the error
    names the flag)."""
    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {SEED_MAX}], got {text}") from None


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse with usage errors reported on one line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("data, model and threat model")
    group.add_argument("--data", choices=DATASET_NAMES, default="mnist",
                       help="data set (default: %(default)s; fashion-mnist needs `make setup` or its IDX files)")
    group.add_argument("--model", choices=MODEL_NAMES, default=None,
                       help="reference model (default per data set: (fashion-)mnist cnn, digits/moons mlp, adult logreg)")
    group.add_argument("--eps", type=float, default=None,
                       help="attack budget (default per data set: images 0.1 linf, tabular 0.5 l2)")
    group.add_argument("--norm", choices=("linf", "l2"), default=None,
                       help="attack norm (default per data set: images linf, tabular l2)")
    group.add_argument("--steps", type=int, default=None, help="attack steps for pgd (default 10)")
    group.add_argument("--n-train", type=int, default=None, help="training split size (default per data set)")
    group.add_argument("--n-val", type=int, default=None, help="validation split size (default per data set)")
    group.add_argument("--n-test", type=int, default=None, help="test split size (default per data set)")
    train = common.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=None, help="training epochs (default per data set)")
    train.add_argument("--lr", type=float, default=None, help="learning rate (default per data set)")
    train.add_argument("--batch-size", type=int, default=None, help="training batch size (default per data set)")
    train.add_argument("--train-steps", type=int, default=5,
                       help="PGD steps inside adversarial trainers (default: %(default)s)")
    other = common.add_argument_group("output")
    other.add_argument("--no-progress", action="store_true",
                       help="hide the progress bar (shown only when stderr is a terminal)")
    other.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return common


def _weights_options() -> argparse.ArgumentParser:
    """``--weights`` / ``--save-weights`` of the commands that work on one model (score, attack)."""
    parent = argparse.ArgumentParser(add_help=False)
    weights = parent.add_argument_group("model weights")
    weights.add_argument("--weights", default=None, metavar="PATH",
                         help="use the model weights in PATH (a state dict saved with torch.save or --save-weights) "
                              "instead of training; read with torch.load(weights_only=True): files carrying "
                              "pickled code are refused")
    weights.add_argument("--save-weights", default=None, metavar="PATH",
                         help="save the model's state dict to PATH (written atomically)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``robust-infl`` with its five subcommands."""
    parser = _OneLineErrorParser(prog=PROG, description=(
        "Find the training samples that make a model easier to attack, prune or down-weight them, "
        "retrain, attack again and compare with honest baselines."))
    parser.add_argument("--debug", dest="debug_all", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineErrorParser)
    common = _common_options()
    one_model = [common, _weights_options()]
    methods = robust_infl.available_methods()

    defend = commands.add_parser(
        "defend", parents=[common], help="run the defence and its baselines over seeds, write the report",
        description="Split, train, attack, score on the validation split, prune / reweight, retrain and\n"
                    "re-attack (adaptive and transfer), beside adversarial-training references (fast-at,\n"
                    "pgd-at, trades) with their measured cost; writes report.json, report.md,\n"
                    "robust_vs_cost.png and, with several fractions, robust_vs_fraction.png. Which row\n"
                    "wins where is measured in experiments/RESULTS.md (section defense_references).",
        epilog="recipes (--recipes):\n" + "\n".join(
            f"  {name}\n      {get_recipe(name).description}" for name in available_recipes())
        + "\n\nreferences (--references; with --trainer erm, all three by default):\n"
          "  fast-at\n      FGSM adversarial training from a uniform random start, step 1.25 eps (Wong et al. 2020)\n"
          "  pgd-at\n      PGD adversarial training (Madry et al. 2018), --train-steps steps\n"
          "  trades\n      TRADES (Zhang et al. 2019), beta 6, --train-steps steps\n"
          "Pick a recipe only where it beats a reference of equal or lower cost; the report's last line names\n"
          "the row to pick, and experiments/RESULTS.md (section defense_references) holds the benchmark.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    defend.add_argument("--attack", choices=ATTACK_NAMES, default="pgd", help="attack (default: %(default)s)")
    defend.add_argument("--method", choices=[m for m in methods if m not in CHECKPOINT_METHODS], default="ip",
                        help="influence method (default: %(default)s; tracin needs checkpoints of the model it "
                             "scores, which defend trains itself: use score --checkpoints)")
    _add_parameter_flags(defend, damping_default=None)
    defend.add_argument("--ensemble", type=_members_value, default=None, metavar="N",
                        help="score with N models trained on random halves of the training split (TRAK's recipe) "
                             "instead of the base model; their training counts in the row's cost (default: the "
                             "base model alone)")
    defend.add_argument("--fraction", type=float, nargs="+", default=[0.05], metavar="F",
                        help="budget(s): share of training samples pruned / down-weighted (default: 0.05)")
    defend.add_argument("--mode", choices=("prune", "reweight"), default="prune",
                        help="prune (train on the kept samples) or reweight (default: %(default)s)")
    defend.add_argument("--scheme", choices=("smooth", "hard"), default="smooth",
                        help="reweighting scheme for --mode reweight (default: %(default)s)")
    defend.add_argument("--temperature", type=float, default=1.0,
                        help="temperature of the smooth scheme (default: %(default)s)")
    defend.add_argument("--retrain", choices=("scratch", "finetune"), default="scratch",
                        help="retrain defended models from scratch or fine-tune the base model (default: %(default)s)")
    defend.add_argument("--trainer", choices=TRAINER_NAMES, default="erm",
                        help="training: erm, fast-at (FGSM from a random start, Wong et al. 2020), pgd-at "
                             "(Madry), trades, or ART's art-pgd-at / art-trades (default: %(default)s); with erm "
                             "the report adds fast-at, pgd-at and trades as references")
    defend.add_argument("--recipes", nargs="+", choices=tuple(dict.fromkeys(available_recipes() + _poison_recipes())),
                        default=None, metavar="R", help=f"defence and baselines to run, from "
                                                        f"{', '.join(available_recipes())} (default: "
                                                        f"{' '.join(DEFAULT_RECIPES)})")
    defend.add_argument("--references", nargs="*", default=None, metavar="T", choices=("fast-at", "pgd-at", "trades"),
                        help="adversarial-training reference rows trained on the same data and schedule, from "
                             "fast-at, pgd-at, trades (default: all three with --trainer erm; an adversarial "
                             "trainer is its own reference; give the flag alone for none)")
    defend.add_argument("--eval-attacks", nargs="*", default=None, metavar="A", choices=ATTACK_NAMES,
                        help=f"evaluation suite besides --attack, from {', '.join(ATTACK_NAMES)} (default: apgd-ce "
                             "apgd-t on images in [0, 1], none on tabular data; give the flag alone for none); "
                             "per-attack results and the worst case go in the report")
    defend.add_argument("--eval-subset", type=int, default=200,
                        help="the suite runs on the first N test points of each seed (default: %(default)s)")
    defend.add_argument("--seeds", type=int, default=3, help="number of seeds 0..N-1 (default: %(default)s)")
    defend.add_argument("--out", default="runs/defend", help="output folder (default: %(default)s)")
    defend.add_argument("--resume", action="store_true",
                        help="reuse the per-seed results already in --out (after a crash, or to add seeds); "
                             "results written with other settings are refused")
    defend.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run in --out (without it, or --resume, a used folder is refused)")
    defend.add_argument("--bounds", nargs="+", default=None, metavar="B",
                        help="input range of the attack and the adversarial trainers: auto, none (unbounded) or "
                             "LOW HIGH (default: auto, the data set's)")
    defend.add_argument("--eval-batch-size", type=int, default=256,
                        help=f"{help_texts(RunConfig)['eval_batch_size']} (default: %(default)s)")
    _poison_options(defend)

    score = commands.add_parser(
        "score", parents=one_model, help="train a model and save every training sample's harm score",
        description="Train the model, score every training sample's harm on an objective over the validation "
                    "split, save the scores as .npy and print the most harmful samples.")
    score.add_argument("--objective", choices=OBJECTIVE_NAMES, default="robust",
                       help="utility (loss), robust (adversarial loss), dp (demographic parity), "
                            "eop (equal opportunity) (default: %(default)s)")
    score.add_argument("--attack", choices=ATTACK_NAMES, default="pgd",
                       help="attack of the robust objective (default: %(default)s)")
    score.add_argument("--method", choices=methods, default="ip", help="influence method (default: %(default)s)")
    score.add_argument("--checkpoints", nargs="+", default=None, metavar="PATH",
                       help="state-dict files of the model during training, for --method tracin (read with "
                            "torch.load(weights_only=True)); the learning rate of each is --lr")
    _add_parameter_flags(score, damping_default=0.0)
    score.add_argument("--trainer", choices=TRAINER_NAMES, default="erm", help="training (default: %(default)s)")
    score.add_argument("--seed", type=_seed_value, default=0,
                       help="seed of split, training and scoring (default: 0)")
    score.add_argument("--top", type=int, default=10, help="how many of the most harmful to print (default: 10)")
    score.add_argument("--out", required=True,
                       help="where to save the scores (a .npy file); the data set row of each training sample "
                            "is saved beside it as <name>_rows.npy")
    scale = score.add_argument_group("scale (see the documentation's Scale page, docs/scale.md)")
    scale.add_argument("--store", default=None, metavar="DIR",
                       help="write the scores chunk by chunk into a resumable on-disk store in DIR")
    scale.add_argument("--resume", action="store_true",
                       help="continue the store in --store after a crash (same data, model and options)")
    scale.add_argument("--chunk-size", type=int, default=None,
                       help="training samples per store chunk and shard unit, a multiple of 256 (default 4096)")
    scale.add_argument("--device", default=None,
                       help="where to score: cpu, cuda, cuda:1 (default: cpu); under torchrun with cuda each "
                            "process takes the GPU of its LOCAL_RANK")

    attack = commands.add_parser(
        "attack", parents=one_model, help="train a model and print its clean and robust test accuracy",
        description="Train the model and evaluate it on the test split under one or more attacks.")
    attack.add_argument("--attack", choices=ATTACK_NAMES, nargs="+", default=["pgd"],
                        help="attack(s) to run (default: pgd)")
    attack.add_argument("--trainer", choices=TRAINER_NAMES, default="erm", help="training (default: %(default)s)")
    attack.add_argument("--seed", type=_seed_value, default=0,
                        help="seed of split, training and attacks (default: 0)")

    _explain_parser(commands, one_model, methods)
    _scan_parser(commands, one_model)

    demo = commands.add_parser(
        "demo", help="the README demo: evasion (MNIST subset + small CNN + PGD, Adult + logistic regression) "
                     "and a backdoor (poisoned MNIST subset)",
        description="Evasion: run the defence and the adversarial-training references (fast-at, pgd-at, trades) "
                    "on the MNIST subset (small CNN, PGD linf eps 0.1, 10 steps) and on Adult (logistic "
                    "regression, PGD L2 eps 0.5, unbounded features). Backdoor: poison 5% of the MNIST subset "
                    "with BadNets into class 0, then run remove_poisons with 10 triggered inputs known and "
                    "without evidence beside ART's activation clustering and lowest loss. Print the tables with "
                    "each row's cost, and say which row to pick and why.")
    demo.add_argument("--out", default="runs/demo",
                      help="output folder, one subfolder per part; the demo replaces only its own earlier run "
                           "there and refuses a folder holding other runs (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="tiny sizes and one seed (a smoke test)")
    demo.add_argument("--no-progress", action="store_true",
                      help="hide the progress bar (shown only when stderr is a terminal)")
    demo.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.command_parsers = commands.choices  # for check_flag_rules: each command's defaults
    return parser


def _add_parameter_flags(parser, damping_default: Optional[float]) -> None:
    """``--params`` and ``--damping``, the scoring options of the commands that score (``defend``, ``score``,
    ``explain``); ``damping_default`` None leaves the method's own default to the configuration."""
    parser.add_argument("--params", nargs="+", default=None, metavar="NAME",
                        help="score only these parameters (e.g. the last layer for if-exact, which takes at most "
                             "5,000); default: all trainable ones")
    parser.add_argument("--damping", type=float, default=damping_default,
                        help=f"damping lambda of the Hessian methods {' / '.join(DAMPED_METHODS)} (default: 0)")


def _explain_parser(commands, parents: list, methods: tuple) -> None:
    """``explain``: the training samples behind a model's adversarial failures (:func:`defenses.explain`)."""
    explain_cmd = commands.add_parser(
        "explain", parents=parents, help="find the training samples most responsible for adversarial failures",
        description="Train the model (or load --weights), attack the chosen test inputs, keep those the attack "
                    "flips, and score every training sample's harm on the loss at their adversarial points (held "
                    "fixed). Writes explanation.json, explanation.md and, for images, explanation.png in --out, "
                    "with the measured per-example LDS of the method (how far to trust the ranking; "
                    "experiments/RESULTS.md, section lds).")
    chosen = explain_cmd.add_argument_group("inputs to explain (one of)").add_mutually_exclusive_group(required=True)
    chosen.add_argument("--index", type=int, nargs="+", default=None, metavar="I",
                        help="rows of the test split (seeded by --seed)")
    chosen.add_argument("--inputs", default=None, metavar="FILE.npz",
                        help="a .npz of X (floats shaped like the data's samples) and y (true labels), "
                             "written with numpy.savez(path, X=..., y=...)")
    explain_cmd.add_argument("--attack", choices=ATTACK_NAMES, default="pgd", help="attack (default: %(default)s)")
    explain_cmd.add_argument("--method", choices=[m for m in methods if m not in CHECKPOINT_METHODS], default="ip",
                             help="influence method (default: %(default)s; the methods with per-target matrices, e.g. "
                                  "ip, trak, ekfac, datainf, rank per input, the others over the set)")
    _add_parameter_flags(explain_cmd, damping_default=0.0)
    explain_cmd.add_argument("--top", type=int, default=10,
                             help="training samples listed per input (default: %(default)s)")
    explain_cmd.add_argument("--trainer", choices=TRAINER_NAMES, default="erm", help="training (default: %(default)s)")
    explain_cmd.add_argument("--seed", type=_seed_value, default=0,
                             help="seed of split, training, attack and scoring (default: 0)")
    explain_cmd.add_argument("--out", default="runs/explain",
                             help="output folder; its explanation.* files are replaced (default: %(default)s)")


def _scan_parser(commands, one_model: list) -> None:
    """``scan``: a trained model and its training data -> the backdoor verdict, the report and the kept indices."""
    scan = commands.add_parser(
        "scan", parents=one_model, help="scan training data for a backdoor (trigger unknown): verdict, report, "
                                        "the most suspicious samples and the indices to keep",
        description="Scan a training set for backdoor poisons without knowing the trigger "
                    "(defenses.scan_backdoor), using a small clean trusted set: the validation split of --data, "
                    "or --trusted FILE.npz beside --train FILE.npz. The model scanned is --weights (a state dict "
                    "of --model trained on the training data); the scan itself uses only its architecture, so "
                    "without --weights none is trained (unless --save-weights asks for one). Writes "
                    "scan.json, scan.md, scan_scores.npy and, for images, scan_grid.png into --out; --remove "
                    "writes the training indices to keep. When nothing is found, nothing is flagged and every "
                    "index is kept. The verdict's statistic and threshold: defenses.scan_backdoor; its calibration on "
                    "clean data: experiments/RESULTS.md (section scan_calibration).")
    files = scan.add_argument_group("your own data (instead of --data)")
    files.add_argument("--train", default=None, metavar="FILE.npz",
                       help="the training data to scan: a .npz of X (float; images (N, C, H, W) in [0, 1]) and y "
                            "(class indices), numpy.savez(path, X=X, y=y); needs --trusted and --model")
    files.add_argument("--trusted", default=None, metavar="FILE.npz",
                       help="clean trusted samples of the same classes (e.g. a held-out validation split), a .npz "
                            "of X, y; with --data the trusted set is the validation split")
    scan.add_argument("--trainer", choices=TRAINER_NAMES, default="erm",
                      help="the model's training (default: %(default)s): the schedule the scan's cost is stated "
                           "over, and the training of the model --save-weights writes; the scan's own models train "
                           "plainly with its learning rate and batch size")
    scan.add_argument("--budget", type=float, default=DEFAULT_SCAN_BUDGET,
                      help="the most the scan may flag, a share of the training samples in (0, 1) (default: "
                           "%(default)s)")
    scan.add_argument("--seed", type=_seed_value, default=0,
                      help="seed of the split (--data), training and the scan (default: 0)")
    scan.add_argument("--top", type=int, default=16,
                      help="how many of the most suspicious samples to print and show in the grid (default: "
                           "%(default)s; scan.json lists every flagged sample)")
    scan.add_argument("--out", default="runs/scan", help="output folder (default: %(default)s)")
    scan.add_argument("--overwrite", action="store_true",
                      help="replace an earlier scan in --out (without it, a folder holding one is refused)")
    scan.add_argument("--remove", default=None, metavar="FILE",
                      help="write the training indices to KEEP (0-based positions in the training data, ascending, "
                           "one per line: numpy.loadtxt(FILE, dtype=int)); every index when nothing is found")


def _poison_recipes() -> tuple:
    return available_recipes("poisoning")


def _poison_options(defend: argparse.ArgumentParser) -> None:
    """``defend``'s backdoor-poisoning flags (with ``--poison``, ``defend`` runs ``defenses.run_poisoning``)."""
    group = defend.add_argument_group(
        "backdoor poisoning (with --poison, --recipes takes the poisoning recipes, all by default: "
        + ", ".join(_poison_recipes()) + ")")
    spec = help_texts(PoisonSpec)
    group.add_argument("--poison", choices=POISON_ATTACKS, default=None,
                       help=f"poison every seed's training split with {spec['attack']}")
    group.add_argument("--poison-rate", type=float, default=0.05, help="share poisoned (default: %(default)s)")
    group.add_argument("--target-class", type=int, default=0, help="the backdoor's target class (default: 0)")
    group.add_argument("--evidence", type=int, nargs="+", default=[50], metavar="K",
                       help="evidence sizes: K triggered validation inputs with true labels (default: 50)")
    group.add_argument("--budget", type=float, default=None,
                       help="share removed by every recipe (default: twice --poison-rate)")
    group.add_argument("--patch-size", type=int, default=3, help=f"{spec['patch_size']} (default: %(default)s)")
    group.add_argument("--clean-label-eps", type=float, default=0.3,
                       help=f"{spec['clean_label_eps']} (default: %(default)s)")
    group.add_argument("--clean-label-steps", type=int, default=20,
                       help=f"{spec['clean_label_steps']} (default: %(default)s)")
    for flag, name in (("--sig-delta", "sig_delta"), ("--sig-test-delta", "sig_test_delta"),
                       ("--wanet-s", "wanet_s"), ("--wanet-noise-ratio", "wanet_noise_ratio")):
        group.add_argument(flag, type=float, default=getattr(PoisonSpec, name),
                           help=f"{spec[name]} (default: %(default).3g)")
    group.add_argument("--robust-n", type=int, default=500,
                       help="evasion robust accuracy on the first N test inputs (default: %(default)s)")


# Where each option of defenses.run / defenses.run_poisoning comes from on the command line: the field of
# RunConfig / PoisoningConfig -> the defend flags it is read from, and the field of PoisonSpec -> its flag
# (tests/cli/test_config_flags.py keeps these, the configurations and the parser in step).
DEFEND_FLAGS = {
    "data": ("--data",), "model": ("--model",), "attack": ("--attack",), "eps": ("--eps",), "norm": ("--norm",),
    "steps": ("--steps",), "bounds": ("--bounds",), "trainer": ("--trainer",), "seeds": ("--seeds",),
    "epochs": ("--epochs",), "lr": ("--lr",), "batch_size": ("--batch-size",), "train_steps": ("--train-steps",),
    "n_train": ("--n-train",), "n_val": ("--n-val",), "n_test": ("--n-test",),
    "eval_batch_size": ("--eval-batch-size",), "out": ("--out",), "resume": ("--resume",),
    "overwrite": ("--overwrite",), "progress": ("--no-progress",), "method": ("--method",),
    "method_options": ("--params", "--damping", "--ensemble"), "fractions": ("--fraction",), "mode": ("--mode",),
    "scheme": ("--scheme",), "temperature": ("--temperature",), "retrain": ("--retrain",), "recipes": ("--recipes",),
    "references": ("--references",), "eval_attacks": ("--eval-attacks",), "eval_subset": ("--eval-subset",),
    "poison": ("--poison",),
}
POISON_FLAGS = {
    "attack": "--poison", "rate": "--poison-rate", "target_class": "--target-class", "evidence": "--evidence",
    "budget": "--budget", "patch_size": "--patch-size", "clean_label_eps": "--clean-label-eps",
    "clean_label_steps": "--clean-label-steps", "sig_delta": "--sig-delta", "sig_test_delta": "--sig-test-delta",
    "wanet_s": "--wanet-s", "wanet_noise_ratio": "--wanet-noise-ratio", "robust_n": "--robust-n",
}
DEFEND_ONLY_FLAGS = ("--help", "--debug")  # flags of the command itself, not options of a run


def _bounds_option(values: Optional[list]):
    """``bounds`` from ``--bounds``: ``auto`` (also when not given), ``none`` or two numbers ``LOW HIGH``."""
    if values is None or values == ["auto"]:
        return "auto"
    if values == ["none"]:
        return None
    try:
        low, high = (float(v) for v in values)
    except ValueError:
        raise ValueError(f"bounds: must be auto, none or two numbers LOW HIGH, got {' '.join(values)}") from None
    return low, high


def _flag_value(args, flag: str):
    return getattr(args, flag[2:].replace("-", "_"))


def _defend_options(args, config_class) -> dict:
    """The options of ``config_class`` (:class:`RunConfig` or :class:`PoisoningConfig`) from ``defend``'s flags."""
    converted = {
        "method_options": {k: v for k, v in (("params", args.params), ("damping", args.damping),
                                             (ENSEMBLE_OPTION, args.ensemble)) if v is not None}
        or None,
        "fractions": args.fraction, "progress": not args.no_progress, "bounds": _bounds_option(args.bounds),
        "references": "auto" if args.references is None else args.references,
        "eval_attacks": "auto" if args.eval_attacks is None else args.eval_attacks,
        "poison": {field: (tuple(value) if isinstance(value, list) else value) for field, value in
                   ((field, _flag_value(args, flag)) for field, flag in POISON_FLAGS.items())},
    }
    options = {}
    for field in (f.name for f in dataclasses.fields(config_class)):
        value = converted[field] if field in converted else _flag_value(args, DEFEND_FLAGS[field][0])
        if not (field == "recipes" and value is None):  # the pipeline's own default recipes
            options[field] = value
    return options


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# The one rule for flags that act only together with others: a flag given a value other than its default
# where it has no effect is refused (exit 2, one line naming it), before any compute.
# (commands, flag, applies(args), where it is used)
FLAG_RULES = (
    (("score",), "chunk-size", lambda a: a.store is not None or _world_size() > 1, "with --store (or under torchrun)"),
    (("score", "defend", "explain"), "damping", lambda a: a.method in DAMPED_METHODS, f"by --method {', '.join(DAMPED_METHODS)}"),
    (("score",), "attack", lambda a: a.objective == "robust", "with --objective robust"),
    (("score",), "checkpoints", lambda a: a.method in CHECKPOINT_METHODS,
     f"by --method {', '.join(CHECKPOINT_METHODS)}"),
    (("defend",), "poison-rate", lambda a: a.poison is not None, "with --poison"),
    (("defend",), "target-class", lambda a: a.poison is not None, "with --poison"),
    (("defend",), "evidence", lambda a: a.poison is not None, "with --poison"),
    (("defend",), "budget", lambda a: a.poison is not None, "with --poison"),
    (("defend",), "ensemble", lambda a: a.poison is None, "without --poison (the poisoning recipes score by themselves)"),
    (("defend",), "method", lambda a: a.poison is None, "without --poison (the poisoning recipes score by themselves)"),
    (("defend",), "fraction", lambda a: a.poison is None, "without --poison (its budget is --budget)"),
    (("defend",), "mode", lambda a: a.poison is None, "without --poison"),
    (("defend",), "retrain", lambda a: a.poison is None, "without --poison"),
    (("defend",), "scheme", lambda a: a.mode == "reweight", "with --mode reweight"),
    (("defend",), "temperature", lambda a: a.mode == "reweight" and a.scheme == "smooth",
     "with --mode reweight --scheme smooth"),
    (("scan",), "trusted", lambda a: a.train is not None, "with --train (with --data, the validation split)"),
    (("scan",), "data", lambda a: a.train is None, "without --train"),
    *((("scan",), flag, lambda a: a.train is None, "with --data") for flag in ("n-train", "n-val", "n-test")),
    *((("scan",), flag, lambda a: a.trainer != "erm", "by an adversarial --trainer")
      for flag in ("eps", "norm", "train-steps")),
    (("scan",), "steps", lambda a: False, "by attacks; scan runs none"),
)
# API argument names in the library's messages -> the flag that sets them, where the two differ.
FLAG_OF = {"defend": {"rate": "poison-rate", "fractions": "fraction", "target_class": "target-class",
                      "eval_attacks": "eval-attacks", "eval_subset": "eval-subset"}}


def check_flag_rules(args, command_parser: argparse.ArgumentParser) -> None:
    """``ValueError`` naming the first flag of ``args`` given where it has no effect (:data:`FLAG_RULES`)."""
    for commands, flag, applies, where in FLAG_RULES:
        dest = flag.replace("-", "_")
        if args.command in commands and getattr(args, dest) != command_parser.get_default(dest) and not applies(args):
            raise ValueError(f"{flag}: only used {where}; drop --{flag}")


def _flag_named(message: str, command: str) -> str:
    """``message`` with its leading API argument name replaced by the flag that sets it (:data:`FLAG_OF`)."""
    match = re.match(r"([a-z_]+): ", message)
    if match and match.group(1) in FLAG_OF.get(command, {}):
        return FLAG_OF[command][match.group(1)] + message[match.end(1):]
    return message


def _setup(args):
    """Splits (seed ``args.seed``), data defaults and the resolved threat model for score / attack."""
    defaults = data_defaults(args.data)
    splits = load_splits(args.data, args.seed, args.n_train, args.n_val, args.n_test)
    eps = defaults.eps if args.eps is None else args.eps
    norm = args.norm or defaults.norm
    steps = defaults.steps if args.steps is None else args.steps
    return splits, defaults, eps, norm, steps


def _trainer(args, splits, defaults, eps, norm, progress: bool = False):
    """The trainer of score / attack / scan from the training flags (the data set's defaults where not given)."""
    def pick(value, default):
        return default if value is None else value

    return make_trainer(args.trainer, epochs=pick(args.epochs, defaults.epochs), lr=pick(args.lr, defaults.lr),
                        batch_size=pick(args.batch_size, defaults.batch_size), eps=eps, norm=norm,
                        bounds=splits.bounds, train_steps=args.train_steps, progress=progress)


def _train(args, splits, defaults, eps, norm, trainer=None):
    """The model of score / attack / scan: trained with ``trainer`` (default: :func:`_trainer`'s; seed
    ``args.seed``), or loaded from ``--weights``."""
    name = args.model or defaults.model
    model = model_factory(name, splits)(args.seed)
    if args.weights is not None:
        model = _load_weights(model, args.weights, name)
    else:
        trainer = trainer or _trainer(args, splits, defaults, eps, norm)
        model = trainer.fit(model, splits.train, seed=args.seed, val=splits.val)
    return model


def _save_weights(args, model) -> None:
    """Save the model's state dict to ``--save-weights`` (when given), a failed write naming the flag."""
    if args.save_weights is not None:
        with output_errors("save-weights"):
            atomic_save_tensor(args.save_weights, model.state_dict())


def _load_weights(model, path, name: str):
    """``model`` with the state dict read safely from ``path`` (ValueError naming ``weights`` on a mismatch)."""
    state = safe_load(path, name="weights")
    if not isinstance(state, dict):
        raise ValueError(f"weights: {path!r} does not hold a state dict, got {type(state).__name__}")
    expected = model.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.is_meta:
            raise ValueError(f"weights: {path!r} holds tensors without data (device 'meta') in {key!r}; save the "
                             "state dict of a model whose weights are materialised")
        wanted = expected.get(key)
        if isinstance(wanted, torch.Tensor) and value.is_floating_point() != wanted.is_floating_point():
            raise ValueError(f"weights: {path!r} holds {key!r} as {value.dtype}, the model expects {wanted.dtype}")
        if value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise ValueError(f"weights: {path!r} holds {bad} NaN or infinite value(s) in {key!r}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise ValueError(f"weights: {path!r} does not fit model {name!r} on this data ({detail[:300]})") from None
    return model.eval()


def _cmd_defend(args) -> int:
    start = time.perf_counter()
    if args.poison is None:
        report = defenses.run(**_defend_options(args, RunConfig))
        plots = "robust_vs_cost.png"
    else:
        report = defenses.run_poisoning(**_defend_options(args, PoisoningConfig))
        plots = "asr_by_recipe.png"
    print(render_markdown(report))
    print(f"wrote {Path(args.out) / 'report.json'}, report.md and {plots} in {time.perf_counter() - start:.0f} s")
    return 0


def _cmd_score(args) -> int:
    out = Path(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"out: must end in .npy, got {args.out!r}")
    if args.top < 0:
        raise ValueError(f"top: must be >= 0, got {args.top}")
    if args.resume and args.store is None:
        raise ValueError("resume: needs a store to resume from; pass --store DIR")
    _check_score_options(args)
    if args.store is not None and _rank() == 0:  # under torchrun, rank 0 creates the store
        check_store_folder(args.store, args.resume)
    splits, defaults, eps, norm, steps = _setup(args)
    _check_scored_params(args, splits, defaults)
    if args.objective in ("dp", "eop") and not splits.has_sensitive:
        raise ValueError(f"objective: {args.objective} needs a sensitive attribute; {args.data} has none "
                         "(use --data adult or moons)")
    attack = make_attack(args.attack, eps=eps, norm=norm, steps=steps, bounds=splits.bounds, seed=args.seed) \
        if args.objective == "robust" else None
    objective = make_objective(args.objective, attack)
    holding = lock_folder(args.store, "store") if args.store is not None and _rank() == 0 else nullcontext()
    with holding, (output_errors("store", args.store) if args.store is not None else nullcontext()):
        rank, model, scores = _score(args, splits, defaults, eps, norm, objective)
    if rank != 0:
        return 0
    rows = splits.train_index
    order = scores.argsort(descending=True, stable=True)[: args.top]
    print(f"harm on {args.objective} ({args.method}) of {len(scores)} training samples; larger = more harmful")
    print(f"{'rank':>4}  {'index':>6}  {'row':>6}  {'label':>5}  {'harm':>12}")
    for rank, index in enumerate(order.tolist(), start=1):
        print(f"{rank:>4}  {index:>6}  {int(rows[index]):>6}  {int(splits.train[1][index]):>5}  "
              f"{float(scores[index]):>12.4g}")
    with output_errors("out"):  # after the ranking is printed; both files replaced together or neither
        atomic_save_npys({out: scores, rows_path(out): rows})
    print(f"saved {out} (scores, in training-split order: 'index') and {rows_path(out)} (the data set row of each "
          "training sample: 'row')")
    _save_weights(args, model)
    return 0


def rows_path(out: Path) -> Path:
    """Where ``score`` saves the data set row of each training sample, beside the scores ``out``."""
    return out.with_name(f"{out.stem}_rows.npy")


SCORE_BATCH_SIZE = 256  # robust_infl.influence's default batch_size, used by score


def _check_score_options(args) -> None:
    """The checks of ``score`` that need no data: output paths, device, store chunking, tracin's checkpoints."""
    check_number(args.damping, "damping", minimum=0)
    check_output_file(args.out, "out")
    check_output_file(rows_path(Path(args.out)), "out")
    if args.store is not None:
        check_output_folder(args.store, "store")
    if args.save_weights is not None:
        check_output_file(args.save_weights, "save-weights")
    if args.device is not None:
        check_device(args.device)
    sharded = args.store is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if sharded and args.method not in SHARDED_METHODS:
        raise ValueError(f"method: --store and torchrun score with {', '.join(SHARDED_METHODS)}, got {args.method!r}")
    if args.chunk_size is not None and (args.chunk_size <= 0 or args.chunk_size % SCORE_BATCH_SIZE):
        raise ValueError(f"chunk-size: must be a positive multiple of {SCORE_BATCH_SIZE} (the scoring batch size; "
                         f"--batch-size is the training batch size), got {args.chunk_size}")
    if args.method in CHECKPOINT_METHODS and not args.checkpoints:
        raise ValueError(f"checkpoints: --method {args.method} needs --checkpoints PATH ... (state dicts of the model "
                         "saved during training)")


def _check_scored_params(args, splits, defaults) -> None:
    """Before training: the ``--params`` names exist, and ``if-exact`` scores at most its parameter limit."""
    model = model_factory(args.model or defaults.model, splits)(args.seed)
    if args.method == "if-exact":
        check_exact_size(model, args.params)
    else:
        resolve_param_names(model, args.params)


def _score(args, splits, defaults, eps, norm, objective):
    """``(rank, model, scores)``: train, then score in one process, or sharded over torchrun's processes
    and / or into a resumable store (``robust_infl.distributed.sharded_influence``)."""
    started_group = init_process_group_from_env(args.device)
    try:
        rank, world_size = rank_and_world_size()
        if rank != 0:
            args.no_progress = True
        model = _train(args, splits, defaults, eps, norm)
        options = dict(objective=objective, method=args.method,
                       options=robust_infl.ScoringOptions(seed=args.seed, device=args.device, damping=args.damping,
                                                          progress=not args.no_progress, params=args.params))
        if args.store is None and world_size == 1:
            extra = {} if not args.checkpoints else dict(checkpoints=args.checkpoints, lrs=args.lr or defaults.lr)
            return rank, model, robust_infl.influence(model, splits.train[:2], splits.val, **options, **extra)
        broadcast_module_state(model)
        return rank, model, sharded_influence(model, splits.train[:2], splits.val, store=args.store,
                                              resume=args.resume, chunk_size=args.chunk_size, **options)
    finally:
        if started_group:
            dist.destroy_process_group()


def _cmd_attack(args) -> int:
    if args.save_weights is not None:
        check_output_file(args.save_weights, "save-weights")
    splits, defaults, eps, norm, steps = _setup(args)
    built = {name: make_attack(name, eps=eps, norm=norm, steps=steps, bounds=splits.bounds, seed=args.seed)
             for name in dict.fromkeys(args.attack)}
    model = _train(args, splits, defaults, eps, norm)
    results = attacks.evaluate(model, splits.test, built, progress=not args.no_progress)
    print(f"{args.data} / {args.model or defaults.model} / trainer {args.trainer}; test n={results['n']}")
    for name, attack in built.items():
        used = {key: getattr(attack, key) for key in ("eps", "norm", "steps", "bounds") if hasattr(attack, key)}
        print(f"  {name}: " + (", ".join(f"{k}={v}" for k, v in used.items()) or "no budget (closed form)"))
    print("| attack | robust acc | attack success |\n|---|---|---|")
    print(f"| (clean) | {100 * results['clean_acc']:.1f} | – |")
    for name in built:
        print(f"| {name} | {100 * results[name]['robust_acc']:.1f} | {100 * results[name]['asr']:.1f} |")
    if len(built) > 1:
        print(f"| worst case | {100 * results['worst_case_robust_acc']:.1f} | – |")
    _save_weights(args, model)  # after the table is printed
    return 0


def _cmd_explain(args) -> int:
    if args.top < 1:
        raise ValueError(f"top: must be >= 1, got {args.top}")
    check_number(args.damping, "damping", minimum=0)
    check_output_folder(args.out, "out")
    if args.save_weights is not None:
        check_output_file(args.save_weights, "save-weights")
    given = read_inputs(args.inputs) if args.inputs is not None else None
    splits, defaults, eps, norm, steps = _setup(args)
    X, y = chosen_inputs(splits.test, args.index, given, splits.num_classes)
    _check_scored_params(args, splits, defaults)
    attack = make_attack(args.attack, eps=eps, norm=norm, steps=steps, bounds=splits.bounds, seed=args.seed)
    model = _train(args, splits, defaults, eps, norm)
    try:
        explanation = explain(model, splits.train[:2], X, y, attack=attack, method=args.method, top=args.top,
                              seed=args.seed, progress=not args.no_progress, ids=args.index, damping=args.damping,
                              params=args.params)
    except ValueError as err:  # the inputs' error names the flag that chose them
        if args.index is None or not str(err).startswith("inputs:"):
            raise
        raise ValueError("index:" + str(err)[len("inputs:"):]) from err
    with held_output(args.out) as out:
        paths = write_explanation(explanation, out)
    print(explanation.to_markdown())
    print(f"wrote {', '.join(str(path) for path in paths.values())}")
    _save_weights(args, model)
    return 0


def _scan_setup(args):
    """``(splits, defaults, eps, norm, described)`` of ``scan``: the built-in data set (its validation split is
    the trusted set) or the user's ``--train`` / ``--trusted`` files, and the data's description."""
    if args.train is None:
        splits, defaults, eps, norm, _ = _setup(args)
        described = (f"{args.data}, {len(splits.train[1])} training samples (seed {args.seed}'s split), trusted: its "
                     f"{len(splits.val[1])}-sample validation split")
        return splits, defaults, eps, norm, described
    if args.trusted is None:
        raise ValueError("trusted: required with --train: clean samples of the same classes (e.g. a held-out "
                         "validation split) as a .npz of X, y")
    if args.model is None:
        raise ValueError(f"model: required with --train, one of {', '.join(MODEL_NAMES)} (cnn for images "
                         "(N, C, H, W))")
    splits = load_scan_data(args.train, args.trusted)
    defaults = USER_DATA_DEFAULTS
    described = (f"{args.train}, {len(splits.train[1])} training samples; trusted: {args.trusted}, "
                 f"{len(splits.val[1])} samples")
    eps = defaults.eps if args.eps is None else args.eps
    return splits, defaults, eps, args.norm or defaults.norm, described


def _cmd_scan(args) -> int:
    start = time.perf_counter()
    check_fraction(args.budget, "budget")
    check_int(args.top, "top", minimum=0)
    for path, flag in ((args.remove, "remove"), (args.save_weights, "save-weights")):
        if path is not None:
            check_output_file(path, flag)
    progress = not args.no_progress
    with held_output(args.out) as folder:
        splits, defaults, eps, norm, described = _scan_setup(args)
        check_budget(len(splits.train[1]), args.budget, "budget", "training samples", allow_none=False)
        name = args.model or defaults.model
        trainer = _trainer(args, splits, defaults, eps, norm, progress=progress)
        factory = model_factory(name, splits)  # a model that cannot take the data is refused before the folder
        given = _train(args, splits, defaults, eps, norm) if args.weights is not None else None  # checked first
        prepare_scan_folder(folder, args.overwrite)
        seconds, trained_here = None, args.weights is None and args.save_weights is not None
        if given is not None:
            model, made = given, f"{name}, weights {args.weights}"
        elif trained_here:  # a model is wanted (--save-weights): train it, and time the scan against it
            model, seconds = timed(_train, args, splits, defaults, eps, norm, trainer)
            made = (f"{name}, none given (--weights): trained here with {args.trainer} ({trainer.epochs} epochs, "
                    f"seed {args.seed}) for --save-weights")
        else:  # the scan trains its own two models and takes only the architecture: no model is trained
            model = factory(args.seed)
            made = (f"{name}, none given (--weights): the scan uses only the architecture, so none was trained; "
                    f"the cost is over an estimated {args.trainer} training of {trainer.epochs} epochs")
        result = defenses.scan_backdoor(model, splits.train[:2], splits.val[:2], seed=args.seed, progress=progress,
                                        budget=args.budget, trainer=trainer,
                                        training_seconds=None if seconds is None else seconds["wall"])
        context = {"data": {"summary": described, "train": args.train or args.data, "trusted": args.trusted,
                            "n_train": len(splits.train[1]), "n_trusted": len(splits.val[1]),
                            "input_shape": list(splits.input_shape), "num_classes": splits.num_classes},
                   "model": {"summary": made, "name": name, "weights": args.weights,
                             "trained_here": trained_here, "trainer": args.trainer, "seed": args.seed}}
        record = write_scan_report(result, splits.train, folder, top=args.top, remove=args.remove, context=context,
                                   rows=splits.train_index if args.train is None else None)
    _print_scan(record, args.top)
    files = record["files"]
    written = ", ".join(f for f in ("scan.json", files["markdown"], files["scores"], files["grid"]) if f)
    print(f"wrote {written} in {folder} in {time.perf_counter() - start:.0f} s"
          + (" (no image grid: the samples are not images)" if files.get("grid_note") else ""))
    if args.remove is not None:
        print(f"kept training indices ({record['verdict']['n_kept']} of {record['verdict']['n_train']}, one per "
              f"line) in {args.remove}")
    _save_weights(args, model)
    return 0


def _print_scan(record: dict, top: int) -> None:
    """The verdict of a scan and its most suspicious samples on stdout."""
    verdict = record["verdict"]
    print(f"data: {record['data']['summary']}")
    print(f"model: {record['model']['summary']}")
    if verdict["found"]:
        print(f"verdict: BACKDOOR FOUND, suspected target class {verdict['target_class']}: {verdict['n_flagged']} of "
              f"{verdict['n_train']} training samples flagged (budget {100 * verdict['budget']:.3g}%)")
        entries, heading = record["flagged"], "flagged, most suspicious first"
    else:
        print(f"verdict: no backdoor found; nothing flagged, all {verdict['n_train']} training samples kept")
        entries, heading = record["highest_scores"], "highest scores (none flagged)"
    print(f"  {statistic_line(verdict)}")
    if entries[:top]:
        print(f"{heading}; larger = more suspicious")
        rows = "row" in entries[0]
        print(f"{'rank':>4}  {'index':>6}  " + (f"{'row':>6}  " if rows else "") + f"{'label':>5}  {'score':>10}")
        for entry in entries[:top]:
            print(f"{entry['rank']:>4}  {entry['index']:>6}  " + (f"{entry['row']:>6}  " if rows else "")
                  + f"{entry['label']:>5}  {entry['score']:>10.4g}")


def _cmd_demo(args) -> int:
    run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    return 0


COMMANDS = {"defend": _cmd_defend, "score": _cmd_score, "attack": _cmd_attack, "explain": _cmd_explain,
            "scan": _cmd_scan, "demo": _cmd_demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``robust-infl``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            if not (args.debug or args.debug_all):  # third-party deprecation notices are not the user's business
                for category in (FutureWarning, DeprecationWarning):
                    warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY_MODULES)
                warnings.showwarning = lambda message, category, *rest, **kw: print(
                    f"{PROG} {args.command}: warning: {message}", file=sys.stderr)
            warnings.simplefilter("error", EmptyBudgetWarning)  # a budget selecting nothing is refused
            check_flag_rules(args, parser.command_parsers[args.command])
            return COMMANDS[args.command](args)
    except USER_ERRORS as err:
        if args.debug or args.debug_all:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"{PROG} {args.command}: error: {_flag_named(message, args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug or args.debug_all:
            raise
        print(f"{PROG} {args.command}: interrupted (files already written are complete)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
