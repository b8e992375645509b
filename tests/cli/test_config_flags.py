"""The ``defend`` flags and the typed configurations of the two pipelines stay in step: every field of
RunConfig, PoisoningConfig and PoisonSpec is read from a flag, every flag feeds a field, and the flags
give the configurations' defaults."""

from __future__ import annotations

import dataclasses

import pytest

import defenses
from defenses.cli import DEFEND_FLAGS, DEFEND_ONLY_FLAGS, POISON_FLAGS, _defend_options, build_parser
from defenses.config import PoisoningConfig, PoisonSpec, RunConfig, SharedConfig, help_texts


def _defend_parser():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    return commands.choices["defend"]


def _names(config_class) -> set:
    return {f.name for f in dataclasses.fields(config_class)}


def test_every_field_has_a_flag_and_every_flag_a_field():
    flags = {flag for action in _defend_parser()._actions for flag in action.option_strings if flag.startswith("--")}
    assert set(DEFEND_FLAGS) == _names(RunConfig) | _names(PoisoningConfig)
    assert set(POISON_FLAGS) == _names(PoisonSpec)
    mapped = {flag for names in DEFEND_FLAGS.values() for flag in names} | set(POISON_FLAGS.values())
    assert mapped | set(DEFEND_ONLY_FLAGS) == flags
    assert not mapped & set(DEFEND_ONLY_FLAGS)


@pytest.mark.parametrize("config_class", [RunConfig, PoisoningConfig, PoisonSpec])
def test_every_field_is_documented(config_class):
    texts = help_texts(config_class)
    assert list(texts) == [f.name for f in dataclasses.fields(config_class)]
    assert all(isinstance(text, str) and len(text) > 10 for text in texts.values())


def test_the_flags_give_the_configurations_defaults():
    parser = _defend_parser()
    args = parser.parse_args([])
    run = RunConfig(**_defend_options(args, RunConfig))
    differs = {f.name for f in dataclasses.fields(RunConfig) if getattr(run, f.name) != getattr(RunConfig(), f.name)}
    # the command line's own defaults: a folder to write to and the budget as a list
    assert differs == {"out", "fractions"} and run.fractions == [0.05] and run.out == "runs/defend"
    poisoning = PoisoningConfig(**_defend_options(parser.parse_args(["--poison", "badnets"]), PoisoningConfig))
    assert PoisonSpec.of(poisoning.poison) == PoisonSpec() and poisoning.recipes is None
    shared = [f.name for f in dataclasses.fields(SharedConfig) if f.name != "out"]
    assert all(getattr(poisoning, name) == getattr(run, name) for name in shared)


def test_flags_reach_the_options():
    args = _defend_parser().parse_args(["--fraction", "0.1", "0.2", "--params", "fc.weight", "--damping", "0.5",
                                        "--bounds", "none", "--no-progress", "--eval-batch-size", "64",
                                        "--recipes", "none", "random", "--ensemble", "3"])
    options = _defend_options(args, RunConfig)
    assert options["fractions"] == [0.1, 0.2] and options["method_options"] == {"params": ["fc.weight"],
                                                                                 "damping": 0.5, "ensemble": 3}
    assert options["bounds"] is None and options["progress"] is False and options["eval_batch_size"] == 64
    assert options["recipes"] == ["none", "random"]
    args = _defend_parser().parse_args(["--poison", "clean-label", "--poison-rate", "0.01", "--evidence", "10", "50",
                                        "--patch-size", "2", "--robust-n", "100", "--bounds", "0", "1"])
    options = _defend_options(args, PoisoningConfig)
    assert PoisonSpec.of(options["poison"]) == PoisonSpec(attack="clean-label", rate=0.01, evidence=(10, 50),
                                                          patch_size=2, robust_n=100)
    assert options["bounds"] == (0.0, 1.0)
    with pytest.raises(ValueError, match="bounds: must be auto, none or two numbers"):
        _defend_options(_defend_parser().parse_args(["--bounds", "0"]), RunConfig)


def test_an_unknown_option_names_itself_and_poison_points_to_the_poisoning_pipeline():
    with pytest.raises(TypeError, match=r"^epoch: not an option of defenses.run; valid are data, model"):
        defenses.run("moons", epoch=3)
    with pytest.raises(TypeError, match=r"poison: not an option of defenses.run; the poisoning pipeline is "
                                        r"defenses.run_poisoning"):
        defenses.run("moons", poison="badnets")
    with pytest.raises(TypeError, match=r"^fractions: not an option of defenses.run_poisoning"):
        defenses.run_poisoning("digits", fractions=[0.1])
