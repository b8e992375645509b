"""Per-seed results of a defence run, saved as each seed completes, so that a crashed run can resume.

``<out>/seeds/seed_<k>.json`` holds the base model's metrics and every recipe's row for seed ``k``,
with the settings that produced them (the run's configuration without the seed list, the bounds,
the evaluation settings and a fingerprint of the seed's data splits). Each file is written
atomically (:mod:`robust_infl.io`), so a file that exists is complete, and carries the SHA-256 of its
content (``sha256``): a file changed by hand (a forged number, rows deleted) is refused on load with a
``ValueError`` naming it, as is one whose accuracies are not numbers in [0, 1] or whose numbers are not
finite. A resumed run reuses a seed's file only if its settings equal the current ones; otherwise it
refuses with a ``ValueError`` that lists the settings that differ. The settings cover the attack (its class and every parameter,
:func:`attacks.attack_settings`), the bounds, the trainer (every parameter), the schedule, the data
and the model (the hash of a given module's weights, or a factory's architecture). A plain
function used as an attack is identified by its name, the hash of its code and constants and the
plain values (numbers, strings) it closes over; objects it closes over only by their type.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from robust_infl.io import PathLike, atomic_write_json, check_output_folder, json_safe
from robust_infl.store import data_hash

__all__ = ["SeedResults", "SEEDS_DIR", "FORMAT_VERSION", "RUN_FILES", "run_files", "prepare_out_folder", "run_seeds",
           "record_checksum", "read_seed_file"]

SEEDS_DIR = "seeds"
FORMAT_VERSION = 2  # 2: rows carry the suite, attack success and training cost
RUN_FILES = ("report.json", "report.md", "robust_vs_fraction.png", "robust_vs_cost.png",
             "asr_by_recipe.png")  # what write_report and the poisoning report write
# Result keys holding a share in [0, 1] (accuracies and attack success rates), checked on load.
SHARE_KEY = re.compile(r"^(.*_)?(acc|asr|precision|recall|auroc)(_.*)?$")


def run_files(folder: Path) -> list:
    """The files of an earlier run in ``folder``: its reports and plots (:data:`RUN_FILES`) and per-seed files."""
    return [folder / name for name in RUN_FILES if (folder / name).exists()] + sorted(
        (folder / SEEDS_DIR).glob("seed_*.json"))


def prepare_out_folder(out: PathLike, *, resume: bool, overwrite: bool) -> Path:
    """Check the output folder of a run before any compute, and clear an earlier run's files if asked.

    ``out`` must be a writable folder (created if missing). A folder that holds an earlier run (its
    report or per-seed files) is refused with a ``ValueError`` naming ``out`` unless ``resume``
    (reuse its seeds) or ``overwrite`` (its report and seed files are deleted now, so none of them
    can be mistaken for part of the new run). Temporary files left by a run killed while writing are
    removed. Call it holding the folder's lock (:func:`robust_infl.io.lock_folder`).
    """
    if resume and overwrite:
        raise ValueError("overwrite: cannot be combined with resume (resume reuses the folder's seeds, "
                         "overwrite deletes them); pass one of them")
    folder = check_output_folder(out, "out")
    earlier = run_files(folder)
    if earlier and not resume:
        if not overwrite:
            shown = ", ".join(str(p.relative_to(folder)) for p in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
            raise ValueError(f"out: {folder} holds an earlier run ({shown}); pass resume=True (--resume) to "
                             "continue it, overwrite=True (--overwrite) to replace it, or another folder")
        for path in earlier:
            path.unlink()
    for name in RUN_FILES:
        for stray in folder.glob(f".{name}.*.tmp"):
            stray.unlink(missing_ok=True)
    for stray in (folder / SEEDS_DIR).glob(".seed_*.json.*.tmp"):
        stray.unlink(missing_ok=True)
    return folder


def _normalised(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists, non-finite floats as None)."""
    return json.loads(json.dumps(json_safe(value), sort_keys=True))


def record_checksum(record: Mapping[str, Any]) -> str:
    """SHA-256 of a per-seed record without its ``sha256`` entry (canonical JSON: sorted keys, no spaces)."""
    content = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
                          .encode("utf-8")).hexdigest()


def _check_values(value: Any, path: Path, key: str = "") -> None:
    """``ValueError`` naming ``path`` when a number is not finite, or a share (``*_acc``, ``asr*``, ...) is
    not a number in [0, 1] (None, a non-finite value saved as null, passes)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_values(v, path, str(k))
    elif isinstance(value, list):
        for v in value:
            _check_values(v, path, key)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"resume: {path} holds {key} = {value}, not a finite number; delete it to recompute that seed")
    elif SHARE_KEY.match(key) and value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
        raise ValueError(f"resume: {path} holds {key} = {value!r}, expected a number in [0, 1]; delete it to "
                         "recompute that seed")


def read_seed_file(path: PathLike) -> dict:
    """The record of a per-seed result file, after checking that it is complete JSON, that its numbers are
    finite and its shares (accuracies, attack success) in [0, 1], and that it matches its ``sha256``;
    ``ValueError`` naming ``resume`` and the file otherwise."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"resume: {path} is not a complete per-seed result file ({err}); delete it to "
                         "recompute that seed, or use another out folder") from None
    if not isinstance(saved, dict):
        raise ValueError(f"resume: {path} is not a per-seed result file; use another out folder")
    _check_values(saved.get("results"), path)
    if "sha256" not in saved:
        raise ValueError(f"resume: {path} carries no checksum (sha256); it was not written by this version: "
                         "delete it to recompute that seed")
    if saved["sha256"] != record_checksum(saved):
        raise ValueError(f"resume: {path} was changed after it was written (its content does not match its "
                         "sha256: a number edited or rows deleted); delete it to recompute that seed")
    return saved


class SeedResults:
    """The per-seed result files of one run in ``out_dir / "seeds"``.

    Args:
        out_dir: the run's output folder.
        settings: JSON-serialisable settings shared by every seed (what the results depend on).
    """

    def __init__(self, out_dir: PathLike, settings: Mapping[str, Any]):
        self.directory = Path(out_dir) / SEEDS_DIR
        self.settings = _normalised(dict(settings))

    def path(self, seed: int) -> Path:
        """The result file of ``seed``."""
        return self.directory / f"seed_{seed}.json"

    def _key(self, data_fingerprint: str) -> dict:
        return {**self.settings, "data_hash": data_fingerprint}

    def load(self, seed: int, data_fingerprint: str) -> Optional[dict]:
        """The saved results of ``seed`` (``{"base": {...}, "runs": [...]}``), or None if there are none.

        Raises ``ValueError`` naming ``resume`` when the file was written with other settings.
        """
        path = self.path(seed)
        if not path.exists():
            return None
        saved = read_seed_file(path)
        if saved.get("format_version") != FORMAT_VERSION or not isinstance(saved.get("settings"), dict):
            raise ValueError(f"resume: {path} is not a per-seed result file of this version; use another out folder")
        wanted = self._key(data_fingerprint)
        differing = sorted(k for k in set(saved["settings"]) | set(wanted) if saved["settings"].get(k) != wanted.get(k))
        if differing:
            raise ValueError(f"resume: {path} was written by a run with other settings (differs in "
                             f"{', '.join(differing)}); use another out folder or resume=False")
        return saved["results"]

    def save(self, seed: int, data_fingerprint: str, results: Mapping[str, Any]) -> Path:
        """Write the results of ``seed`` atomically; returns the file."""
        record = _normalised({"format_version": FORMAT_VERSION, "seed": seed,
                              "settings": self._key(data_fingerprint), "results": dict(results)})
        return atomic_write_json(self.path(seed), {**record, "sha256": record_checksum(record)})


def run_seeds(seeds: Sequence[int], splits_for: Callable, compute: Callable, *, saved: Optional[SeedResults],
              resume: bool, on_reused: Callable[[int], None], extend: Optional[Callable] = None) -> list:
    """The per-seed loop of a run: each seed's results, in order, from ``compute(seed, splits)``, or with
    ``resume`` the ones ``saved`` holds for that seed and its data (``on_reused(seed)`` is called then).

    Computed results are saved (``saved.save``) as each seed completes, keyed by a fingerprint of
    the seed's splits (:func:`robust_infl.store.data_hash`), so a crashed run loses at most one seed.
    ``extend(seed, splits, saved_results)``, where given, completes reused results that lack some of the
    run's parts (the poisoning pipeline's recipes): it returns the completed results, saved in their place,
    or None when nothing is missing.
    """
    results = []
    for seed in seeds:
        splits = splits_for(seed)
        fingerprint = None if saved is None else data_hash(splits.train, splits.val, splits.test)
        done = saved.load(seed, fingerprint) if resume else None
        if done is None:
            done = compute(seed, splits)
            if saved is not None:
                saved.save(seed, fingerprint, done)
        else:
            extended = None if extend is None else extend(seed, splits, done)
            if extended is None:
                on_reused(seed)
            else:
                done = extended
                saved.save(seed, fingerprint, done)
        results.append(done)
    return results
