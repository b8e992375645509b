"""``robust-infl demo``: where the toolkit loses and where it wins, measured in one run.

1. Evasion (:data:`DEMO_RUNS`): :func:`defenses.run` with the adversarial-training references on the
   MNIST subset (small CNN, PGD linf 0.1) and on Adult (logistic regression, PGD L2 0.5); each
   report's recommendation says which row to pick.
2. Backdoor (:data:`DEMO_BACKDOOR`): BadNets poisons 5% of the MNIST subset into class 0, and
   :func:`defenses.run_poisoning` runs :func:`defenses.remove_poisons` with 10 triggered inputs
   known and without evidence, beside ART's activation clustering, spectral signatures, Anti-Backdoor
   Learning, k-NN label disagreement, the lowest-loss baseline and the evidence alone (fine-tuning on it,
   retraining with it); its
   recommendation (:func:`defenses.report.recommend_poisoned`) is the verdict.

Each part writes its report into its own subfolder of ``out``; ``out/demo.json`` records every run
file the demo wrote with its SHA-256, so that a later demo replaces only its own earlier run. A
folder holding any other run (a report or per-seed file the record does not vouch for) is refused
before any compute. ``out`` is held for the whole demo (:func:`robust_infl.io.held_output`: one run at a time, and a
failed write there names it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from robust_infl.io import PathLike, atomic_write_json, file_sha256, held_output

from .pipeline import run
from .poisoning import run_poisoning
from .report import render_markdown
from .seed_results import run_files

__all__ = ["run_demo", "DEMO_RUNS", "DEMO_QUICK", "DEMO_BACKDOOR", "DEMO_BACKDOOR_QUICK", "RECORD"]

# The demo's settings: sized to finish in <= 10 minutes on 2 CPU cores (all three parts together), with the
# adversarial-training reference rows (PGD-AT and TRADES with 3 steps) and the threat-model attack only
# (the default evaluation suite of ``defend`` adds APGD-CE and targeted APGD-DLR, which cost more per model).
DEMO_RUNS = {
    "mnist": dict(data="mnist", model="cnn", attack="pgd", eps=0.1, norm="linf", steps=10, seeds=3,
                  fractions=[0.05], epochs=5, train_steps=3, eval_attacks=()),
    "adult": dict(data="adult", model="logreg", attack="pgd", eps=0.5, norm="l2", steps=10, seeds=3,
                  fractions=[0.05], train_steps=3, eval_attacks=()),
}
DEMO_QUICK = {
    "mnist": dict(seeds=1, n_train=600, n_val=100, n_test=200, epochs=2, steps=5),
    "adult": dict(seeds=1, n_train=1000, n_val=300, n_test=500, epochs=2),
}
# The backdoor part: plain training on the poisoned MNIST subset, the recommended recipe with and without
# evidence beside the strongest simple references: ART's activation clustering, spectral signatures,
# Anti-Backdoor Learning, k-NN label disagreement, lowest loss and the evidence alone (fine-tuning on it, or
# retraining with it) (the removal budget: twice the poison rate).
DEMO_BACKDOOR = {
    "mnist-backdoor": dict(data="mnist", model="cnn", attack="pgd", eps=0.1, norm="linf", steps=10, seeds=3,
                           epochs=5, recipes=["none", "low-loss", "knn-label", "activation-defence",
                                              "spectral-signature", "abl", "remove-poisons-unknown",
                                              "evidence-finetune", "evidence-retrain", "remove-poisons"],
                           poison=dict(attack="badnets", rate=0.05, target_class=0, evidence=(10,), robust_n=200)),
}
DEMO_BACKDOOR_QUICK = {
    "mnist-backdoor": dict(seeds=1, n_train=600, n_val=100, n_test=200, epochs=2, steps=5),
}
RECORD = "demo.json"  # in ``out``: the run files each part wrote, with their SHA-256


def _read_record(folder: Path) -> dict:
    """``{part: {"finished": bool, "files": {relative path: sha256}}}`` from ``folder / RECORD`` ({} if none)."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    parts = record.get("parts") if isinstance(record, dict) else None
    return parts if isinstance(parts, dict) else {}


def _foreign_run_files(folder: Path, record: dict) -> list:
    """The run files in ``folder`` and its subfolders that the record does not vouch for as the demo's: in a
    finished part, a file listed with the same SHA-256; in an interrupted part, any file of its subfolder."""
    foreign = []
    for place in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        for path in run_files(place):
            name = path.relative_to(folder).as_posix()
            part = record.get(name.split("/")[0])
            if not isinstance(part, dict) or "/" not in name:
                foreign.append(name)
            elif part.get("finished") and part.get("files", {}).get(name) != file_sha256(path):
                foreign.append(name)
    return foreign


def _check_demo_folder(folder: Path) -> None:
    """Check, before any compute, that the demo may write into ``folder`` (checked and held by
    :func:`~robust_infl.io.held_output`): it holds no run but the demo's own earlier one (``ValueError``
    naming ``out``)."""
    foreign = _foreign_run_files(folder, _read_record(folder))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(f"out: {folder} holds other runs ({shown}); the demo replaces only its own earlier run, "
                         "pass another folder")


def _record_part(folder: Path, part: str, finished: bool) -> None:
    record = _read_record(folder)
    files = {p.relative_to(folder).as_posix(): file_sha256(p) for p in run_files(folder / part)} if finished else {}
    record[part] = {"finished": finished, "files": files}
    atomic_write_json(folder / RECORD, {"written_by": "robust-infl demo", "parts": record})


def _run_part(folder: Path, part: str, pipeline: Callable, settings: dict, progress: bool) -> dict:
    """One part of the demo (``pipeline``: :func:`~defenses.run` or :func:`~defenses.run_poisoning`) into
    ``folder / part``, recorded as the demo's (its earlier run there is replaced)."""
    _record_part(folder, part, finished=False)
    report = pipeline(out=folder / part, overwrite=True, progress=progress, **settings)
    _record_part(folder, part, finished=True)
    return report


def run_demo(out: PathLike = "runs/demo", *, quick: bool = False, progress: bool = True,
             echo: Callable[[str], None] = print) -> dict:
    """Run the demo (see the module's docstring) into ``out``, printing through ``echo``; returns its reports
    by part. ``quick``: tiny sizes and one seed (a smoke test)."""
    with held_output(out) as folder:
        _check_demo_folder(folder)
        return _run_parts(folder, quick, progress, echo)


def _run_parts(folder: Path, quick: bool, progress: bool, echo: Callable[[str], None]) -> dict:
    total = time.perf_counter()
    reports, picks = {}, []
    for part, settings in DEMO_RUNS.items():
        start = time.perf_counter()
        reports[part] = _run_part(folder, part, run, {**settings, **(DEMO_QUICK[part] if quick else {})}, progress)
        echo(render_markdown(reports[part]))
        echo(f"[{part}: {time.perf_counter() - start:.0f} s, files in {folder / part}]\n")
        picks.append(f"{part}: {reports[part]['recommendation']['reason']}")
    echo("Which row to pick against evasion (the cheapest within 1 point of the most robust, clean accuracy kept):")
    echo("\n".join(f"  {line}" for line in picks) + "\n")
    for part, settings in DEMO_BACKDOOR.items():
        start = time.perf_counter()
        reports[part] = _run_part(folder, part, run_poisoning,
                                  {**settings, **(DEMO_BACKDOOR_QUICK[part] if quick else {})}, progress)
        echo(render_markdown(reports[part]))
        echo(f"[{part}: {time.perf_counter() - start:.0f} s, files in {folder / part}]\n")
        echo("Which row to pick against the backdoor (the cheapest within 1 point of the lowest attack success, "
             "clean accuracy kept; else the one that removes it at the least clean cost):")
        echo(f"  {part}: {reports[part]['recommendation']['reason']}")
    echo(f"demo finished in {time.perf_counter() - total:.0f} s")
    return reports
