"""Per-seed results of a defence run, saved as each seed completes, so that a crashed run can resume.

``<out>/seeds/seed_<k>.json`` holds the base model's metrics and every recipe's row for seed ``k``,
with the settings that produced them (the run's configuration without the seed list, the bounds,
the evaluation settings and a fingerprint of the seed's data splits). Each file is written
atomically (:mod:`robust_infl.io`), so a file that exists is complete. A resumed run reuses a seed's
file only if its settings equal the current ones; otherwise it refuses with a ``ValueError`` that
lists the settings that differ. Custom model factories and attack callables are identified by
their names only: change one and resume, and the stale results would be reused, so resume into
a fresh folder instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

from robust_infl.io import PathLike, atomic_write_json, json_safe

__all__ = ["SeedResults", "SEEDS_DIR", "FORMAT_VERSION"]

SEEDS_DIR = "seeds"
FORMAT_VERSION = 2  # 2: rows carry the suite, attack success and training cost


def _normalised(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists, non-finite floats as None)."""
    return json.loads(json.dumps(json_safe(value), sort_keys=True))


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
        saved = json.loads(path.read_text())
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
        record = {"format_version": FORMAT_VERSION, "seed": seed, "settings": self._key(data_fingerprint),
                  "results": dict(results)}
        return atomic_write_json(self.path(seed), record)
