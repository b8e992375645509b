"""Attribution of an adversarial failure: the training samples most responsible for a model's attacked inputs.

:func:`explain` attacks the given test inputs, keeps those whose prediction the attack flips, and scores
every training sample's harm on the loss at those adversarial points, held fixed (the ``Robust``
objective with the attack's points fixed, Danskin): ``harm > 0`` predicts that removing the sample
lowers that loss. :func:`lds_reference` reads the measured per-example linear datamodeling score of a
method from the benchmark's data file (``defenses/lds_reference.json``, written by ``experiments/lds.py``),
so a reader knows how far to trust the ranking. :func:`write_explanation` writes ``explanation.json``,
``explanation.md`` and, for image data, ``explanation.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from attacks.base import attack_settings, check_attack_output, predict
from attacks.inputs import as_data, to_model
from attacks.plumbing import default_loss_fn, frozen_in_eval
from attacks.registry import make_attack
from attacks.validation import check_bool, check_int, check_labels, check_model, check_output_shape, check_seed
from robust_infl import ScoringOptions, Utility, available_methods, influence
from robust_infl.inputs import call_attack
from robust_infl.io import PathLike, atomic_write, atomic_write_json, atomic_write_text
from robust_infl.methods import check_method_options, per_target_methods
from robust_infl.options import scoring_options

__all__ = ["explain", "Explanation", "lds_reference", "write_explanation", "read_inputs", "chosen_inputs",
           "LDS_REFERENCE_FILE"]

LDS_REFERENCE_FILE = "lds_reference.json"  # package data of ``defenses``, written by experiments/lds.py
DEFAULT_EPS, DEFAULT_NORM, DEFAULT_STEPS = 0.1, "linf", 10  # a named attack's threat model (the image default)
PLOTTED_INPUTS, PLOTTED_SAMPLES = 4, 8  # the PNG shows at most this many inputs and training samples each
DROP_REASONS = {"misclassified": "misclassified before the attack (nothing to flip)",
                "robust": "the attack did not flip it (still correct at this budget)"}


@dataclass(frozen=True)
class Explanation:
    """What :func:`explain` found; :meth:`to_dict` is its JSON form, :meth:`to_markdown` its report.

    Attributes:
        method: the influence method used.
        attack: the attack's settings (:func:`attacks.attack_settings`).
        explained: one dict per input the attack flips: ``input`` (its id: see ``ids``), ``label``,
            ``clean_prediction``, ``adversarial_prediction``, ``adversarial_loss`` and ``top``, a list of
            ``{"index", "label", "harm"}`` (training samples, most harmful first), or None where the
            method gives only one score over the set (see ``per_input``).
        dropped: one dict per input not explained: ``input``, ``label``, ``clean_prediction``,
            ``adversarial_prediction`` and ``reason``.
        aggregate: the top training samples on the mean adversarial loss over every explained input.
        per_input: whether the method scores each input's own loss (``aggregate=False``: the methods of
            :func:`robust_infl.methods.per_target_methods`).
        scores: ``(n_train, n_explained)`` harms on each explained input's adversarial loss, or None
            (``per_input`` False).
        aggregate_scores: ``(n_train,)`` harms on the mean adversarial loss of the explained inputs.
        trust: the measured per-example LDS of ``method`` on the robust objective (:func:`lds_reference`),
            or ``{"measured": False, "reason": ...}``.
        inputs, adversarial: the explained inputs, clean and attacked (for the plot).
        train_inputs, train_labels: the training data scored (for the plot).
    """

    method: str
    attack: dict
    explained: list
    dropped: list
    aggregate: list
    per_input: bool
    scores: Optional[Tensor]
    aggregate_scores: Tensor
    trust: dict
    inputs: Tensor = dataclasses.field(repr=False)
    adversarial: Tensor = dataclasses.field(repr=False)
    train_inputs: Tensor = dataclasses.field(repr=False)
    train_labels: Tensor = dataclasses.field(repr=False)

    def to_dict(self) -> dict:
        """The explanation as plain JSON data (no tensors)."""
        return {"method": self.method, "attack": self.attack, "objective": OBJECTIVE_TEXT,
                "per_input": self.per_input, "n_train": int(self.aggregate_scores.shape[0]),
                "explained": self.explained, "dropped": self.dropped, "aggregate": self.aggregate,
                "trust": self.trust}

    def to_markdown(self) -> str:
        """The explanation as a Markdown report: how far to trust it, the dropped inputs, one table per input."""
        n = len(self.explained) + len(self.dropped)
        lines = ["# Training samples behind the adversarial failures", "",
                 f"Method `{self.method}`; attack {_attack_text(self.attack)}; objective: {OBJECTIVE_TEXT}. "
                 "harm > 0: removing the sample is predicted to lower that loss (larger = more responsible).", "",
                 f"**How far to trust it:** {trust_text(self.trust)}", "",
                 f"Explained {len(self.explained)} of {n} input(s)."
                 + ("" if is_image(tuple(self.inputs.shape[1:])) else
                    " The inputs are not images: tables only, no picture.")]
        lines += [f"- input {d['input']} (label {d['label']}) dropped: {d['reason']}" for d in self.dropped]
        if not self.per_input and len(self.explained) > 1:
            lines += ["", f"`{self.method}` gives one score per training sample over the set, so the inputs share "
                          "the ranking below; per-input rankings need a method with per-target scores "
                          f"({', '.join(per_target_methods())})."]
        for entry in self.explained:
            lines += ["", f"## Input {entry['input']}: label {entry['label']}, predicted "
                          f"{entry['clean_prediction']} clean, {entry['adversarial_prediction']} attacked "
                          f"(adversarial loss {entry['adversarial_loss']:.4g})"]
            if entry["top"] is not None:
                lines += ["", *_table(entry["top"])]
        if len(self.explained) > 1:
            lines += ["", f"## All {len(self.explained)} explained inputs: harm on their mean adversarial loss", "",
                      *_table(self.aggregate)]
        return "\n".join(lines) + "\n"


OBJECTIVE_TEXT = "loss at the adversarial points (the robust objective, the attack's points held fixed)"


def _table(top: list) -> list:
    rows = ["| rank | training index | label | harm |", "|---|---|---|---|"]
    return rows + [f"| {rank} | {t['index']} | {t['label']} | {t['harm']:.4g} |" for rank, t in enumerate(top, 1)]


def _attack_text(settings: dict) -> str:
    name = settings.get("class", "?").rsplit(".", 1)[-1]
    used = [f"{key} {settings[key]}" for key in ("eps", "norm", "steps") if key in settings]
    return f"{name} ({', '.join(used)})" if used else name


def trust_text(trust: dict) -> str:
    """One sentence on how far to trust the ranking, from :func:`lds_reference`'s entry (or why there is none)."""
    if not trust.get("measured"):
        return f"not measured ({trust.get('reason', 'no benchmark entry')})."
    ci = trust.get("ci")
    interval = f", 95% interval {ci[0]:+.3f} to {ci[1]:+.3f}" if ci else ""
    seeds = f", {trust['seeds']} seeds" if trust.get("seeds") else ""
    cost = (f"; scoring cost {trust['cost_vs_training']:.2g} x one training run"
            if trust.get("cost_vs_training") is not None else "")
    return (f"per-example LDS of `{trust['method']}` on the robust objective {trust['lds']:+.3f}{interval}{seeds}, "
            f"measured on {trust.get('data', '?')} + {trust.get('model', '?')} ({trust.get('source', '?')}){cost}. "
            "LDS is the Spearman correlation between the predicted and the retrained adversarial loss of one "
            "input over random half-subsets: 0 = no better than random, 1 = perfect; the model and data "
            "explained here may differ from those measured.")


def lds_reference(method: str, *, objective: str = "robust", model: Optional[str] = None,
                  lds_file: Optional[PathLike] = None) -> dict:
    """The measured per-example LDS of ``method`` on ``objective`` for one model, from the benchmark's file.

    Args:
        method: the influence method's name.
        objective: ``"robust"`` or ``"utility"``.
        model: the class name of the model explained; among several entries, one measured on that model
            is preferred.
        lds_file: the JSON file to read; None: the package data file ``defenses/lds_reference.json``
            (schema: ``{"protocol", "source", "entries": [{"data", "model", "objective", "method",
            "models", "lds", "ci", "seeds", "cost_vs_training"}]}``).

    Returns:
        The entry (with ``"measured": True`` and the file's ``protocol`` and ``source``), or
        ``{"measured": False, "reason": ...}`` when the file or an entry of ``method`` on ``objective``
        measured with one model (with a finite ``lds``) is missing; no number is ever made up. ``ValueError`` naming ``lds_file``
        when the file is not of that schema.
    """
    if lds_file is None:
        source = resources.files("defenses").joinpath(LDS_REFERENCE_FILE)
        shown = f"defenses/{LDS_REFERENCE_FILE}"
    elif isinstance(lds_file, (str, os.PathLike)):
        source, shown = Path(lds_file), os.fspath(lds_file)
    else:
        raise TypeError(f"lds_file: expected a file path or None, got {type(lds_file).__name__}")
    if not source.is_file():
        return {"measured": False, "reason": f"no benchmark file {shown}; run experiments/lds.py"}
    try:
        table = json.loads(source.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"lds_file: {shown!r} is not JSON ({err})") from None
    entries = table.get("entries") if isinstance(table, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"lds_file: {shown!r} must hold {{'entries': [{{'method', 'objective', 'lds', ...}}]}}")
    found = [e for e in entries if e.get("method") == method and e.get("objective") == objective
             and e.get("models", 1) == 1 and isinstance(e.get("lds"), (int, float)) and math.isfinite(e["lds"])]
    if not found:
        return {"measured": False, "reason": f"no entry for method {method!r} on the {objective} objective "
                                             f"(one model) in {shown}"}
    best = next((e for e in found if model is not None and e.get("model") == model), found[0])
    return {**best, "measured": True, "protocol": table.get("protocol"), "source": table.get("source", shown)}


def _resolve_attack(attack, eps, norm, steps, bounds, seed: int) -> Callable:
    """The attack callable: a name of :data:`attacks.ATTACK_NAMES` built from ``eps``, ``norm``, ``steps`` and
    ``bounds``, or the caller's own callable (then ``eps``, ``norm`` and ``steps`` must be left None)."""
    if isinstance(attack, str):
        return make_attack(attack, eps=DEFAULT_EPS if eps is None else eps, norm=norm or DEFAULT_NORM,
                           steps=DEFAULT_STEPS if steps is None else steps, bounds=bounds, seed=seed)
    if not callable(attack):
        raise TypeError(f"attack: expected a name or a callable attack(model, x, y), got {type(attack).__name__}")
    for name, value in (("eps", eps), ("norm", norm), ("steps", steps)):
        if value is not None:
            raise ValueError(f"{name}: only used with a named attack; your attack object carries its own")
    return attack


def _check_ids(ids, n: int) -> list:
    """``ids`` as a list of ``n`` distinct ints (positions ``0 .. n - 1`` when None); errors name ``ids``."""
    if ids is None:
        return list(range(n))
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
        raise TypeError(f"ids: expected a sequence of integers, got {type(ids).__name__}")
    values = [check_int(i, "ids") for i in ids]
    if len(values) != n or len(set(values)) != n:
        raise ValueError(f"ids: must be {n} distinct integers, one per input, got {values}")
    return values


def _top(order: Tensor, scores: Tensor, labels: Tensor) -> list:
    """``[{"index", "label", "harm"}]`` of the training samples in ``order``."""
    return [{"index": i, "label": int(labels[i]), "harm": float(scores[i])} for i in order.tolist()]


def explain(model: nn.Module, train, inputs, labels, *, attack: Any = "pgd", eps: Optional[float] = None,
            norm: Optional[str] = None, steps: Optional[int] = None, bounds: Any = (0.0, 1.0), method: str = "ip",
            top: int = 10, seed: int = 0, progress: bool = False, ids: Optional[Sequence[int]] = None,
            options: Optional[ScoringOptions] = None,
            lds_file: Optional[PathLike] = None, **keywords: Any) -> Explanation:
    """The training samples most responsible for the adversarial failure of ``inputs``.

    Attacks ``inputs`` (seeded), keeps those the model classifies correctly and the attack flips (the
    others are listed in ``dropped`` with the reason), and scores every training sample's harm on the
    loss at the kept adversarial points, held fixed: per input where ``method`` gives per-target scores
    (``ip``, ``trak``; ``aggregate=False``), and on their mean for every method. Every argument is
    checked before any compute; errors name it.

    Args:
        model: the trained classifier (evaluated in eval mode; its mode is restored after).
        train: its training data, ``(X, y)`` tensors or arrays, a ``Dataset`` or a ``DataLoader`` (read whole).
        inputs: test inputs ``X`` (a batch of samples shaped like the training samples).
        labels: their true labels.
        attack: a name of :data:`attacks.ATTACK_NAMES` (default PGD) or your own callable
            ``attack(model, x, y) -> x_adv``.
        eps, norm, steps: the named attack's budget, norm and steps (default 0.1, linf, 10).
        bounds: the input range of the named attack, ``(low, high)`` or None (unbounded).
        method: the influence method (``robust_infl.available_methods()``).
        top: how many training samples to list per input and for the set (>= 1).
        seed: seeds the attack and the scoring.
        progress: show the scoring's progress bars.
        ids: the integer id reported for each input (distinct; default: its position ``0 .. n - 1``; the
            command line passes the test-split rows).
        options: further scoring options (:class:`robust_infl.ScoringOptions`: ``params``, ``damping``,
            ``batch_size``, ``loss_fn``, ``device``, ...); its ``seed``, ``progress`` and ``aggregate`` are
            set by this function.
        lds_file: the benchmark file read by :func:`lds_reference` (None: the package's own).
        **keywords: scoring options by name (a keyword wins over ``options``) and the method's own
            options, as for :func:`robust_infl.influence`.

    Returns:
        An :class:`Explanation`.
    """
    check_model(model)
    if not isinstance(method, str) or method not in available_methods():
        raise ValueError(f"method: must be one of {', '.join(available_methods())}, got {method!r}")
    top = check_int(top, "top", minimum=1)
    seed = check_seed(seed)
    check_bool(progress, "progress")
    options, method_options = scoring_options(options, keywords)
    check_method_options(method, method_options)
    train_x, train_y = as_data(train, "train", max_fields=3)[:2]
    x, y = as_data((inputs, labels), "inputs", max_fields=2)
    if x.shape[1:] != train_x.shape[1:]:
        raise ValueError(f"inputs: samples of shape {tuple(x.shape[1:])} do not match the training samples' "
                         f"shape {tuple(train_x.shape[1:])}")
    ids = _check_ids(ids, len(x))
    attack_fn = _resolve_attack(attack, eps, norm, steps, bounds, seed)
    per_input = method in per_target_methods()
    scoring = dataclasses.replace(options, seed=seed, progress=progress, aggregate=not per_input)
    trust = lds_reference(method, model=type(model).__name__, lds_file=lds_file)

    with frozen_in_eval(model):
        x_model = to_model(x, model)
        y_model = y.to(x_model.device)
        with torch.no_grad():
            clean_logits = model(x_model)
        check_output_shape(clean_logits, len(x))
        check_labels(y_model, "inputs", clean_logits.shape[1])
        x_adv = call_attack(attack_fn, model, x_model, y_model, seed=seed, name="attack")
        check_attack_output(attack_fn, x_model, x_adv, "attack")
        with torch.no_grad():
            adv_logits = model(x_adv)
            loss_fn = scoring.loss_fn or default_loss_fn(adv_logits.shape[1])
            adv_loss = loss_fn(adv_logits, y_model).cpu()
    clean_pred, adv_pred, y = predict(clean_logits).cpu(), predict(adv_logits).cpu(), y.cpu()
    flipped = (clean_pred == y) & (adv_pred != y)
    dropped = [{"input": ids[i], "label": int(y[i]), "clean_prediction": int(clean_pred[i]),
                "adversarial_prediction": int(adv_pred[i]),
                "reason": DROP_REASONS["misclassified" if clean_pred[i] != y[i] else "robust"]}
               for i in (~flipped).nonzero().flatten().tolist()]
    kept = flipped.nonzero().flatten()
    if len(kept) == 0:
        misclassified = sum(d["reason"] == DROP_REASONS["misclassified"] for d in dropped)
        raise ValueError(f"inputs: the attack flips none of the {len(x)} input(s) ({misclassified} misclassified "
                         f"before the attack, {len(x) - misclassified} still correct after it); nothing to explain")

    target = (x_adv[kept.to(x_adv.device)], y_model[kept.to(x_adv.device)])
    scores = influence(model, (train_x, train_y), target, objective=Utility(), method=method, options=scoring,
                       **method_options).cpu()
    aggregate_scores = scores.mean(dim=1) if per_input else scores
    k = min(top, len(train_x))
    set_order = aggregate_scores.argsort(descending=True, stable=True)[:k]
    if per_input:
        orders = scores.argsort(dim=0, descending=True, stable=True)[:k].T
        tops = [_top(order, column, train_y) for order, column in zip(orders, scores.T)]
    else:
        tops = [_top(set_order, aggregate_scores, train_y) if len(kept) == 1 else None]
    explained = [{"input": ids[i], "label": int(y[i]), "clean_prediction": int(clean_pred[i]),
                  "adversarial_prediction": int(adv_pred[i]), "adversarial_loss": float(adv_loss[i]),
                  "top": tops[j] if per_input else tops[0]} for j, i in enumerate(kept.tolist())]
    return Explanation(method=method, attack=attack_settings(attack_fn), explained=explained, dropped=dropped,
                       aggregate=_top(set_order, aggregate_scores, train_y), per_input=per_input,
                       scores=scores if per_input else None, aggregate_scores=aggregate_scores, trust=trust,
                       inputs=x[kept], adversarial=x_adv[kept.to(x_adv.device)].cpu().to(x.dtype),
                       train_inputs=train_x, train_labels=train_y)


def is_image(sample_shape: tuple) -> bool:
    """Whether samples of ``sample_shape`` are images: ``(H, W)`` or ``(C, H, W)`` with 1 or 3 channels."""
    return len(sample_shape) == 2 or (len(sample_shape) == 3 and sample_shape[0] in (1, 3))


def _picture(sample: Tensor):
    """A sample as what ``imshow`` takes: ``(H, W)`` or ``(H, W, 3)``."""
    sample = sample.detach().cpu().double()
    if sample.ndim == 3:
        sample = sample[0] if sample.shape[0] == 1 else sample.permute(1, 2, 0)
    return sample.numpy()


def plot_explanation(explanation: Explanation, path: PathLike) -> None:
    """The PNG: per explained input (up to four), the clean input and its adversarial version with the
    predicted labels, then the top training samples (up to eight) with their labels and harms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = explanation.explained[:PLOTTED_INPUTS]
    columns = 2 + min(PLOTTED_SAMPLES, len(explanation.aggregate))
    low = float(min(explanation.inputs.min(), explanation.adversarial.min(), explanation.train_inputs.min(), 0))
    high = float(max(explanation.inputs.max(), explanation.adversarial.max(), explanation.train_inputs.max(), 1))
    fig, axes = plt.subplots(len(shown), columns, figsize=(1.3 * columns, 1.6 * len(shown) + 0.4), squeeze=False)
    for row, entry in enumerate(shown):
        ranking = entry["top"] if entry["top"] is not None else explanation.aggregate
        pictures = [(explanation.inputs[row], f"input {entry['input']}\ny={entry['label']} "
                                              f"pred {entry['clean_prediction']}"),
                    (explanation.adversarial[row], f"attacked\npred {entry['adversarial_prediction']}")]
        pictures += [(explanation.train_inputs[t["index"]], f"#{t['index']} y={t['label']}\nharm {t['harm']:.2g}")
                     for t in ranking[:columns - 2]]
        for ax, (sample, title) in zip(axes[row], pictures):
            ax.imshow(_picture(sample), cmap="gray", vmin=low, vmax=high)
            ax.set_title(title, fontsize=7, color="tab:red" if title.startswith("attacked") else "black")
        for ax in axes[row]:
            ax.axis("off")
    scope = "per input" if explanation.per_input or len(explanation.explained) == 1 else "over the set"
    fig.suptitle(f"most harmful training samples ({explanation.method}, {scope})", fontsize=9)
    fig.tight_layout()
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    finally:
        plt.close(fig)


def write_explanation(explanation: Explanation, out: PathLike) -> dict:
    """Write ``explanation.json``, ``explanation.md`` and, for image data, ``explanation.png`` (each atomically)
    into the folder ``out`` (created); non-image data get the tables only. Returns ``{kind: path}``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "explanation.json", "markdown": folder / "explanation.md"}
    atomic_write_json(paths["json"], explanation.to_dict())
    atomic_write_text(paths["markdown"], explanation.to_markdown())
    if is_image(tuple(explanation.inputs.shape[1:])):
        paths["png"] = folder / "explanation.png"
        plot_explanation(explanation, paths["png"])
    return paths


def read_inputs(path: PathLike, name: str = "inputs") -> tuple:
    """``(X, y)`` from a ``.npz`` file holding the arrays ``X`` and ``y`` (``numpy.savez(path, X=..., y=...)``),
    read with ``allow_pickle=False`` and checked (:func:`attacks.as_data`); errors name ``name``."""
    shown = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{name}: no such file: {shown!r}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{name}: cannot read {shown!r} as a .npz file ({err})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{name}: {shown!r} is not a .npz file; save one with numpy.savez(path, X=..., y=...)")
    with data:
        missing = [key for key in ("X", "y") if key not in data.files]
        if missing:
            raise ValueError(f"{name}: {shown!r} holds no array {' or '.join(missing)} (it has "
                             f"{', '.join(data.files) or 'none'}); save it with numpy.savez(path, X=..., y=...)")
        try:
            X, y = data["X"], data["y"]
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            raise ValueError(f"{name}: cannot read the arrays of {shown!r} ({err})") from None
    return as_data((X, y), name, max_fields=2)


def chosen_inputs(test: tuple, index: Optional[list], given: Optional[tuple], num_classes: int) -> tuple:
    """The command line's inputs to explain: rows ``index`` of the test split ``test`` (``ValueError`` naming
    ``index`` when out of range or repeated), or ``given`` (from ``--inputs``), whose samples must have the
    data's shape and whose labels its classes (``ValueError`` naming ``inputs``). Checked before any compute."""
    X, y = test[0], test[1]
    if index is not None:
        outside = [i for i in index if not 0 <= i < len(X)]
        if outside:
            raise ValueError(f"index: must lie in [0, {len(X) - 1}] (the test split has {len(X)} samples), "
                             f"got {outside[0]}")
        if len(set(index)) < len(index):
            raise ValueError(f"index: each test input once, got {' '.join(map(str, index))}")
        rows = torch.tensor(index)
        return X[rows], y[rows]
    gx, gy = given
    if gx.shape[1:] != X.shape[1:]:
        raise ValueError(f"inputs: samples of shape {tuple(gx.shape[1:])} do not match the data's {tuple(X.shape[1:])}")
    check_labels(gy, "inputs", num_classes)
    return gx.to(X.dtype), gy
