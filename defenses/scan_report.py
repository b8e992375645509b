"""The files of a backdoor scan (``robust-infl scan``): its inputs read from ``.npz`` files, its verdict
written as JSON and Markdown, a PNG grid of the most suspicious images, and the kept-index list.

- :func:`load_scan_data`: the training and trusted sets from two ``.npz`` files of ``X``, ``y``
  (read with :func:`robust_infl.io.safe_load_npz`, checked with :func:`attacks.inputs.as_data`).
- :func:`write_scan_report`: ``scan.json`` (:func:`scan_record`), ``scan.md``
  (:func:`render_scan_markdown`), ``scan_scores.npy`` (every training sample's score) and, for image
  data, ``scan_grid.png`` (:func:`plot_suspicious_grid`).
- :func:`kept_indices` / :func:`write_kept_indices`: the training indices a scan keeps (all of them when
  nothing was found), one per line.

The scan itself is :func:`defenses.scan_backdoor`; its result a :class:`~defenses.ScanResult`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from attacks.inputs import as_data
from robust_infl.datasets import Splits
from robust_infl.io import (PathLike, atomic_save_npy, atomic_write, atomic_write_json, atomic_write_text,
                            safe_load_npz)

from .backdoor_scan import ScanResult, check_trusted

__all__ = ["SCAN_FILES", "load_scan_data", "is_image_data", "kept_indices", "typical_samples", "scan_record",
           "statistic_line", "timing_line", "render_scan_markdown", "plot_suspicious_grid", "prepare_scan_folder", "write_scan_report",
           "write_kept_indices"]

# The files a scan writes into its output folder (the grid for image data only).
SCAN_FILES = ("scan.json", "scan.md", "scan_scores.npy", "scan_grid.png")
GRID_COLUMNS = 8  # images per row of the grid


def _labelled(arrays: tuple, name: str) -> tuple:
    """``(X, y)`` checked (:func:`attacks.inputs.as_data`), ``X`` in torch's default dtype, ``y`` 1-D class indices."""
    X, y = as_data(arrays, name, max_fields=2)
    if y.ndim != 1:
        raise ValueError(f"{name}: y must be a 1-D array of class indices, got shape {tuple(y.shape)}")
    if int(y.min()) < 0:
        raise ValueError(f"{name}: y must hold class indices >= 0, got {int(y.min())}")
    return X.to(torch.get_default_dtype()), y.long()


def load_scan_data(train: PathLike, trusted: PathLike) -> Splits:
    """The data of a scan from two ``.npz`` files of ``X`` (floating point; images ``(N, C, H, W)`` in [0, 1])
    and ``y`` (class indices): ``train`` (the data to scan) and ``trusted`` (clean samples of the same
    classes, e.g. a held-out validation split; checked by :func:`~defenses.backdoor_scan.check_trusted`).
    Returns :class:`~robust_infl.datasets.Splits` with ``train``, ``trusted`` as ``val`` and an empty ``test``;
    errors name ``train`` or ``trusted``."""
    train_data = _labelled(safe_load_npz(train, "train"), "train")
    trusted_data = _labelled(safe_load_npz(trusted, "trusted"), "trusted")
    check_trusted(trusted_data, *train_data)
    classes = int(train_data[1].max()) + 1
    if classes < 2:
        raise ValueError("train: y holds a single class; a scan needs at least two")
    empty = (train_data[0][:0], train_data[1][:0])
    return Splits("user", train_data, trusted_data, empty, tuple(train_data[0].shape[1:]), classes, None)


def is_image_data(X: torch.Tensor) -> bool:
    """Whether ``X`` holds images the grid can show: shape ``(N, C, H, W)`` with one or three channels."""
    return X.ndim == 4 and X.shape[1] in (1, 3)


def kept_indices(n: int, flagged: torch.Tensor) -> torch.Tensor:
    """The training indices ``0..n-1`` not in ``flagged``, ascending (all of them when nothing is flagged)."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[flagged.long()] = False
    return keep.nonzero().flatten()


def typical_samples(scores: torch.Tensor, y: torch.Tensor, shown: torch.Tensor,
                    exclude: torch.Tensor) -> torch.Tensor:
    """For each sample of ``shown``, a typical sample of its class: the lowest-scoring samples of that class
    outside ``exclude`` (the j-th shown sample of a class gets the class's j-th lowest); -1 where the class
    has none left."""
    excluded = torch.zeros(len(y), dtype=torch.bool)
    excluded[exclude.long()] = True
    excluded[shown.long()] = True
    order = scores.argsort(stable=True)
    order = order[~excluded[order]]
    labels = y[shown]
    out = torch.full((len(shown),), -1, dtype=torch.int64)
    for position in range(len(shown)):  # over the few shown samples, not the data
        of_class = order[y[order] == labels[position]]
        nth = int((labels[:position] == labels[position]).sum())
        if nth < len(of_class):
            out[position] = of_class[nth]
    return out


def _entries(indices: torch.Tensor, y: torch.Tensor, scores: torch.Tensor, rows: Optional[torch.Tensor]) -> list:
    """``[{rank, index, label, score[, row]}]`` of ``indices``, in their order."""
    columns = {"index": indices.tolist(), "label": y[indices].tolist(), "score": scores[indices].double().tolist()}
    if rows is not None:
        columns["row"] = rows[indices].tolist()
    return [{"rank": rank, **dict(zip(columns, values))} for rank, values in enumerate(zip(*columns.values()), 1)]


def _shown(result: ScanResult, top: int) -> torch.Tensor:
    """The samples the report shows: the flagged ones (at most ``top``), or, when nothing was found, the
    ``top`` highest scores (for inspection; none of them is flagged)."""
    if result.found:
        return result.flagged.long()[:top]
    return result.scores.argsort(descending=True, stable=True)[:top]


def scan_record(result: ScanResult, y: torch.Tensor, *, rows: Optional[torch.Tensor] = None, top: int = 16,
                context: Optional[dict] = None) -> dict:
    """The content of ``scan.json``: ``verdict`` (found, statistic, value, threshold, target class, budget,
    counts), ``flagged`` (every flagged sample, most suspicious first: rank, training index, label, score,
    and its data set ``row`` when ``rows`` is given), ``highest_scores`` (when nothing was found: the
    ``top`` highest scores, none flagged), ``timing`` and the ``context`` entries (data, model, files)."""
    n, flagged = len(y), result.flagged.long()
    record = {
        "verdict": {"found": bool(result.found), "statistic": result.statistic, "value": float(result.value),
                    "threshold": float(result.threshold),
                    "target_class": None if result.target_class is None else int(result.target_class),
                    "budget": float(result.budget), "n_train": n, "n_flagged": len(flagged),
                    "n_kept": n - len(flagged), "statistics": dict(result.statistics)},
        "flagged": _entries(flagged, y, result.scores, rows),
        "timing": dict(result.timing),
    }
    if not result.found:
        record["highest_scores"] = _entries(_shown(result, top), y, result.scores, rows)
    record.update(context or {})
    return record


def _verdict_line(verdict: dict) -> str:
    if verdict["found"]:
        return (f"**Backdoor found**: suspected target class {verdict['target_class']}; {verdict['n_flagged']} of "
                f"{verdict['n_train']} training samples flagged (budget {100 * verdict['budget']:.3g}%).")
    return (f"**No backdoor found**: nothing flagged, all {verdict['n_train']} training samples kept "
            f"(budget {100 * verdict['budget']:.3g}%, unused).")


def statistic_line(verdict: dict) -> str:
    """The verdict's statistic against its threshold, e.g. ``otsu_separation 0.91 > threshold 0.77 ...``."""
    sign = ">" if verdict["found"] else "<="
    return (f"{verdict['statistic']} {verdict['value']:.4g} {sign} threshold {verdict['threshold']:.4g} (calibrated "
            "on clean data; a backdoor is found above it)")


def timing_line(timing: dict) -> str:
    """A scan's timing in words: ``<part> <seconds> s`` for the keys ending in ``_s``, ``<x> x one training run``
    for ``vs_training``; None values left out."""
    parts = [f"{key[:-2].replace('_', ' ')} {value:.3g} s" for key, value in timing.items()
             if key.endswith("_s") and value is not None]
    if timing.get("vs_training") is not None:
        parts.append(f"{timing['vs_training']:.2g}x one training run")
    return ", ".join(parts)


def render_scan_markdown(record: dict, top: int = 16) -> str:
    """``scan.md``: the verdict, its statistic against the threshold, the data and model, and the ``top``
    flagged samples (or, when nothing was found, the highest scores) as a table."""
    verdict = record["verdict"]
    lines = ["# Backdoor scan", "", _verdict_line(verdict), "", f"- statistic: {statistic_line(verdict)}"]
    lines += [f"- {key}: {record[key]['summary']}" for key in ("data", "model") if key in record]
    if timing_line(record.get("timing", {})):
        lines.append(f"- time: {timing_line(record['timing'])}")
    files = record.get("files", {})
    if files.get("remove"):
        lines.append(f"- kept training indices ({verdict['n_kept']}): `{files['remove']}`")
    entries, heading = record["flagged"], "Flagged samples, most suspicious first"
    if not verdict["found"]:
        entries, heading = record.get("highest_scores", []), "Highest scores (none flagged), for inspection"
    if entries:
        shown = entries[:top]
        more = f" ({len(shown)} of {len(entries)}; all in `scan.json`)" if len(entries) > len(shown) else ""
        with_rows = "row" in shown[0]
        lines += ["", f"## {heading}{more}", "",
                  "| rank | index |" + (" row |" if with_rows else "") + " label | score |",
                  "|---:|---:|" + ("---:|" if with_rows else "") + "---:|---:|"]
        lines += [f"| {e['rank']} | {e['index']} |" + (f" {e['row']} |" if with_rows else "")
                  + f" {e['label']} | {e['score']:.4g} |" for e in shown]
    if files.get("grid"):
        lines += ["", f"![the most suspicious images (top row of each band) beside typical images of their class]"
                      f"({files['grid']})"]
    elif files.get("grid_note"):
        lines += ["", files["grid_note"]]
    return "\n".join(lines) + "\n"


def _as_picture(image: torch.Tensor, low: float, high: float) -> np.ndarray:
    """An image ``(C, H, W)`` as what ``imshow`` takes: ``(H, W)`` for one channel, ``(H, W, 3)`` in [0, 1]."""
    picture = ((image.detach().cpu().double() - low) / max(high - low, 1e-12)).clamp(0, 1)
    return picture[0].numpy() if picture.shape[0] == 1 else picture.permute(1, 2, 0).numpy()


def plot_suspicious_grid(X: torch.Tensor, y: torch.Tensor, scores: torch.Tensor, shown: torch.Tensor,
                         typical: torch.Tensor, path: PathLike, title: str) -> None:
    """A PNG grid: bands of up to :data:`GRID_COLUMNS` columns, each band a row of the ``shown`` images (rank,
    training index, label, score) above a row of the ``typical`` image of the same class (-1: none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not is_image_data(X):
        raise ValueError(f"X: the grid shows images (N, C, H, W) with 1 or 3 channels, got shape {tuple(X.shape)}")
    low, high = float(X.min()), float(X.max())
    count = max(len(shown), 1)
    columns = min(GRID_COLUMNS, count)
    bands = -(-count // columns)
    fig, axes = plt.subplots(2 * bands, columns, figsize=(1.5 * columns + 0.8, 3.4 * bands + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for position, (index, other) in enumerate(zip(shown.tolist(), typical.tolist())):
        band, column = divmod(position, columns)
        top, bottom = axes[2 * band, column], axes[2 * band + 1, column]
        top.imshow(_as_picture(X[index], low, high), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        top.set_title(f"#{position + 1} i={index}\ny={int(y[index])} s={float(scores[index]):.3g}", fontsize=7,
                      color="tab:red")
        if other >= 0:
            bottom.imshow(_as_picture(X[other], low, high), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            bottom.set_title(f"typical i={other}\ny={int(y[other])} s={float(scores[other]):.3g}", fontsize=7)
        else:
            bottom.text(0.5, 0.5, "no other\nsample\nof this class", ha="center", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(h_pad=1.5)
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    finally:
        plt.close(fig)


def prepare_scan_folder(folder: Path, overwrite: bool) -> None:
    """Before any compute: ``folder`` holds no earlier scan (:data:`SCAN_FILES`), or, with ``overwrite``, its
    earlier scan's files are deleted now (so that none of them is mistaken for the new scan's);
    ``ValueError`` naming ``out`` otherwise."""
    earlier = [name for name in SCAN_FILES if (folder / name).exists()]
    if earlier and not overwrite:
        raise ValueError(f"out: {str(folder)!r} holds an earlier scan ({', '.join(earlier)}); pass --overwrite to "
                         "replace it, or another folder")
    for name in earlier:
        (folder / name).unlink()


def write_kept_indices(path: PathLike, kept: torch.Tensor) -> Path:
    """The kept training indices, one per line in ascending order (``numpy.loadtxt(path, dtype=int)`` reads
    them back), written atomically."""
    return atomic_write_text(path, "".join(f"{i}\n" for i in kept.tolist()))


def write_scan_report(result: ScanResult, train: Sequence[torch.Tensor], out, *, rows: Optional[torch.Tensor] = None,
                      top: int = 16, context: Optional[dict] = None, remove=None) -> dict:
    """Write the files of a scan of ``train`` (``(X, y)``) into the folder ``out`` (a path): ``scan.json``
    (:func:`~defenses.scan_report.scan_record`), ``scan.md``, ``scan_scores.npy`` (the score of every training
    sample, in training order) and, for images ``(N, C, H, W)`` with 1 or 3 channels, ``scan_grid.png`` (the
    ``top`` most suspicious samples, each above a typical sample of its class:
    :func:`~defenses.scan_report.plot_suspicious_grid`); with ``remove`` (a file path), the kept training
    indices, one per line (:func:`~defenses.scan_report.write_kept_indices`). ``rows``: the data set row of
    each training sample; ``context``: more entries of ``scan.json``. Every file is written atomically.
    Returns the record of ``scan.json``."""
    X, y = train[0], train[1]
    out = Path(out)
    files = {"markdown": "scan.md", "scores": "scan_scores.npy", "grid": None,
             "remove": None if remove is None else str(remove)}
    if remove is not None:
        write_kept_indices(remove, kept_indices(len(y), result.flagged))
    shown = _shown(result, top)
    if is_image_data(X) and len(shown):
        files["grid"] = "scan_grid.png"
        exclude = result.flagged.long() if result.found else shown
        title = (f"most suspicious (flagged, suspected target class {result.target_class}) beside typical images "
                 "of their class" if result.found else "nothing flagged: the highest scores beside typical images "
                                                       "of their class, for inspection")
        plot_suspicious_grid(X, y, result.scores, shown, typical_samples(result.scores, y, shown, exclude),
                             out / files["grid"], title)
    elif not is_image_data(X):
        files["grid_note"] = (f"No image grid: the samples are not images (shape {tuple(X.shape[1:])}; the grid "
                              "shows (C, H, W) with 1 or 3 channels).")
    record = scan_record(result, y, rows=rows, top=top, context={**(context or {}), "files": files})
    atomic_save_npy(out / files["scores"], result.scores)
    atomic_write_text(out / files["markdown"], render_scan_markdown(record, top))
    atomic_write_json(out / "scan.json", record)
    return record
