"""Benchmark against the peer libraries: Captum's TracInCP, dattri and TRAK's traker, at the same answers.

Set-up: the reference SmallCNN (~106k parameters) trained for one epoch on 4,000 MNIST
images, 500 validation images attacked once with PGD (linf 0.1, 10 steps) and shared by every
library, one process. Every library computes the same quantity, the inner products of per-sample
loss gradients (identity Hessian, one checkpoint, learning rate 1); our harm convention is
``-<grad f, grad l_i>`` with ``f`` the MEAN target loss, so a peer's aggregate score (a SUM over
targets) is mapped to ours by ``-score / n_target`` and a peer's train x target matrix by ``-score``
before the Pearson correlation. Timings are the median of ``--repeats`` interleaved repeats.

a. aggregate scores: ours ``robust_infl.influence`` (one forward-mode pass) vs Captum
   ``TracInCP(sample_wise_grads_per_batch=True).influence(aggregate=True)`` and dattri's
   ``TracInAttributor`` (Grad-Dot: one checkpoint, weight 1, no normalisation, projection off).
   dattri has no aggregate mode, so its aggregate scores are the row sums of its matrix: one call
   gives both, and its time is used for a. and b. It recomputes the target gradients for every
   training batch, so it gets the whole training set as one batch (its fastest setting here).
b. the train x target matrix: ours ``robust_infl.distributed.sharded_influence(aggregate=False)``
   (layer-factored per-sample gradients) vs the same peers; ``influence(aggregate=False)``
   (``vmap(grad)``) is shown for reference.
c. self-influence ``||grad l_i||^2``: ours (``influence(method="self")``, per-layer norms from
   activations and output gradients, ``robust_infl.grad_norms``) vs materialising the per-sample
   gradients (the engine's ``vmap(grad)`` ``per_sample_gradients``, then their squared norms);
   Captum's ``self_influence`` is shown for reference.
d. a Hessian-based method against the Hessian-free one on the same aggregate objective: ``"ekfac"``
   (Kronfluence's EK-FAC, its defaults) fitting its factors and scoring (the factor cache cleared
   before every repeat), and scoring again with the fitted factors (what a second objective costs),
   against ``"ip"``. Not the same quantity: the Pearson correlation says how far the curvature moves
   the scores; whether that helps is measured by ``experiments/lds.py``.
e. TRAK: ours ``influence(method="trak", proj_dim=--proj-dim)`` (TRAK's code through the package ``traker``,
   its CPU projector) vs ``TRAKer`` used directly as its documentation shows (``load_checkpoint``,
   ``featurize`` and ``score`` per batch of ``--batch-size``, ``finalize_features``, ``finalize_scores``; float32,
   the same projector seed and dimension, a fresh store folder per repeat). Its scores ``S_ij`` (the rise of
   target ``j``'s margin when sample ``i`` is included) are mapped to our harm on each target's loss by
   ``-(1 - p_j) S_ij``; the aggregate scores are their row means (TRAKer has no aggregate mode: one call gives
   both, its time is used for both). The goal: no slower than ``TRAKer`` (ratio >= 1).

Both wall-clock and process CPU time are measured; on a machine shared with other jobs the CPU
time (with ``--threads 1``) is the steadier measure, and the verdict is given for both.

    PYTHONPATH=. .venv/bin/python experiments/bench_peers.py [--repeats 3] [--threads 1] [--write-results]
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
import os
import tempfile

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars; read by tqdm when it is imported

import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import robust_infl as ri  # noqa: E402
from attacks.registry import make_attack  # noqa: E402
from defenses.registry import make_trainer  # noqa: E402
from experiments._results import parse_benchmark_arguments, scoring_benchmark_parser, write_section  # noqa: E402
from robust_infl.datasets import load_dataset  # noqa: E402
from robust_infl.distributed import sharded_influence  # noqa: E402
from robust_infl.engine import build_problem, per_sample_gradients, train_batches  # noqa: E402
from robust_infl.options import ScoringOptions  # noqa: E402
from robust_infl.methods.ekfac import clear_cache  # noqa: E402
from robust_infl.models import build_model  # noqa: E402
from robust_infl.objectives import cross_entropy_loss  # noqa: E402
from robust_infl.inputs import validate_target  # noqa: E402

TARGETS = {"captum aggregate": 5.0, "dattri aggregate": 3.0, "captum matrix": 1.5, "dattri matrix": 1.5,
           "materialised self": 3.0, "traker matrix": 1.0, "traker aggregate": 1.0}
MIN_PEARSON = 0.9999


def seconds(fn: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    """Wall-clock and process CPU seconds of one call of ``fn``, and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two flattened tensors (in float64)."""
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def build_setting(args):
    """The trained SmallCNN, the training set and the PGD targets, shared by every library."""
    splits = load_dataset("mnist", seed=args.seed, n_train=args.n_train, n_val=args.n_target, n_test=100)
    model = build_model("cnn", splits.input_shape, splits.num_classes, seed=args.seed)
    trainer = make_trainer("erm", epochs=args.epochs, lr=1e-3, batch_size=64, progress=False)
    model = trainer.fit(model, splits.train, seed=args.seed).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    pgd = make_attack("pgd", eps=0.1, norm="linf", steps=10, seed=args.seed)
    x_val, y_val = splits.val[:2]
    x_adv = pgd(model, x_val, y_val)
    return model, splits.train[:2], (x_adv, y_val)


def materialised_self_influence(model, train, target, batch_size: int) -> torch.Tensor:
    """``||grad l_i||^2`` from the formed per-sample gradients (``vmap(grad)``), batch by batch."""
    problem = build_problem(model, train, validate_target(target), ri.Utility(), loss_fn=cross_entropy_loss,
                            param_names=tuple(name for name, _ in model.named_parameters()),
                            device=torch.device("cpu"), options=ScoringOptions(batch_size=batch_size, progress=False))
    out = torch.empty(problem.n_train)
    for start, x, y in train_batches(problem, problem.params):
        out[start : start + x.shape[0]] = per_sample_gradients(problem, problem.params, (x, y)).square().sum(1)
    return out


def captum_tracin(model, train, batch_size):
    """Captum's TracInCP on the model as it is (one checkpoint, learning rate 1)."""
    from captum.influence import TracInCP

    return TracInCP(model, TensorDataset(*train), checkpoints=["current"], checkpoints_load_func=lambda m, path: 1.0,
                    loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=batch_size,
                    sample_wise_grads_per_batch=True)


def dattri_grad_dot(model):
    """dattri's TracInAttributor as Grad-Dot: one checkpoint, weight 1, no normalisation, no projection."""
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    def loss(params, data):
        x, y = data
        return F.cross_entropy(torch.func.functional_call(model, params, x.unsqueeze(0)), y.unsqueeze(0))

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    attributor = TracInAttributor(task=task, weight_list=torch.ones(1), normalized_grad=False, device="cpu")
    attributor.projector_kwargs = None  # the exact inner products (its default projects to 512 dimensions)
    return attributor


def traker_direct(model, train, target, batch_size: int, proj_dim: int, seed: int) -> torch.Tensor:
    """TRAK's own ``TRAKer`` on the CPU (float32, its store in a fresh temporary folder): the ``(n_train,
    n_target)`` scores ``S_ij`` of the model as it is (one checkpoint), batch by batch as its documentation does."""
    from trak import TRAKer

    (x, y), (xt, yt) = train, target
    with tempfile.TemporaryDirectory(prefix="bench-traker-") as folder:
        traker = TRAKer(model=copy.deepcopy(model), task="image_classification", train_set_size=x.shape[0],
                        save_dir=folder, device="cpu", proj_dim=proj_dim, use_half_precision=False,
                        projector_seed=seed, logging_level=logging.WARNING)
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for start in range(0, x.shape[0], batch_size):
            batch = (x[start:start + batch_size], y[start:start + batch_size])
            traker.featurize(batch=batch, num_samples=batch[0].shape[0])
        traker.finalize_features()
        traker.start_scoring_checkpoint("targets", model.state_dict(), model_id=0, num_targets=xt.shape[0])
        for start in range(0, xt.shape[0], batch_size):
            batch = (xt[start:start + batch_size], yt[start:start + batch_size])
            traker.score(batch=batch, num_samples=batch[0].shape[0])
        return torch.from_numpy(np.array(traker.finalize_scores("targets")))


def main() -> None:
    """Run the benchmark; print timings, ratios, correlations and whether each target is met."""
    parser = scoring_benchmark_parser(__doc__, repeats=3)
    parser.add_argument("--epochs", type=int, default=1, help="training epochs of the CNN")
    parser.add_argument("--proj-dim", type=int, default=2048, help="TRAK's projection dimension (TRAKer's default)")
    args = parse_benchmark_arguments(parser)
    warnings.filterwarnings("ignore", category=UserWarning)

    model, train, target = build_setting(args)
    n, m, batch = args.n_train, args.n_target, args.batch_size
    tracin = captum_tracin(model, train, batch)
    grad_dot = dattri_grad_dot(model)
    train_all = DataLoader(TensorDataset(*train), batch_size=n, shuffle=False)
    target_loader = DataLoader(TensorDataset(*target), batch_size=m, shuffle=False)
    common = dict(batch_size=batch, progress=False)

    runs: dict[str, Callable[[], torch.Tensor]] = {
        "ours aggregate": lambda: ri.influence(model, train, target, objective=ri.Utility(), **common),
        "captum aggregate": lambda: -tracin.influence(target, aggregate=True)[0] / m,
        "ours matrix": lambda: sharded_influence(model, train, target, objective=ri.Utility(), aggregate=False, **common),
        "vmap matrix": lambda: ri.influence(model, train, target, objective=ri.Utility(), aggregate=False, **common),
        "captum matrix": lambda: -tracin.influence(target, aggregate=False).T,
        "dattri matrix": lambda: -grad_dot.attribute(train_all, target_loader),
        "ours self": lambda: ri.influence(model, train, target, objective=ri.Utility(), method="self", **common),
        "materialised self": lambda: materialised_self_influence(model, train, target, batch),
        "captum self": lambda: tracin.self_influence(),
        "ekfac fit + score": lambda: (clear_cache(), ri.influence(model, train, target, objective=ri.Utility(),
                                                                  method="ekfac", **common))[1],
        "ekfac, fitted factors": lambda: ri.influence(model, train, target, objective=ri.Utility(), method="ekfac",
                                                      **common),
        "trak matrix": lambda: ri.influence(model, train, target, objective=ri.Utility(), method="trak",
                                            proj_dim=args.proj_dim, seed=args.seed, aggregate=False, **common),
        "traker matrix": lambda: traker_direct(model, train, target, batch, args.proj_dim, args.seed),
        "trak aggregate": lambda: ri.influence(model, train, target, objective=ri.Utility(), method="trak",
                                               proj_dim=args.proj_dim, seed=args.seed, **common),
    }
    walls: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, torch.Tensor] = {}
    for repeat in range(args.repeats):
        for name, run in runs.items():
            wall, cpu, results[name] = seconds(run)
            walls[name].append(wall)
            cpus[name].append(cpu)
        print(f"repeat {repeat + 1}/{args.repeats} (wall / cpu s): "
              + ", ".join(f"{k} {walls[k][-1]:.2f}/{cpus[k][-1]:.2f}" for k in runs), flush=True)
    wall = {name: statistics.median(values) for name, values in walls.items()}
    cpu = {name: statistics.median(values) for name, values in cpus.items()}
    wall["dattri aggregate"], cpu["dattri aggregate"] = wall["dattri matrix"], cpu["dattri matrix"]
    results["dattri aggregate"] = results["dattri matrix"].sum(1) / m
    with torch.no_grad():  # TRAK's margin scores -> harms on each target's loss: -(1 - p_j) S_ij
        p_true = torch.softmax(model(target[0]), dim=1)[torch.arange(m), target[1]]
    results["traker matrix"] = -results["traker matrix"] * (1 - p_true)[None, :]
    wall["traker aggregate"], cpu["traker aggregate"] = wall["traker matrix"], cpu["traker matrix"]
    results["traker aggregate"] = results["traker matrix"].mean(1)

    rows = []
    comparisons = [
        ("a. aggregate", "ours aggregate", "captum aggregate"),
        ("a. aggregate", "ours aggregate", "dattri aggregate"),
        ("b. train x target", "ours matrix", "captum matrix"),
        ("b. train x target", "ours matrix", "dattri matrix"),
        ("c. self-influence", "ours self", "materialised self"),
        ("e. TRAK, train x target", "trak matrix", "traker matrix"),
        ("e. TRAK, aggregate", "trak aggregate", "traker aggregate"),
    ]
    def verdict(ratio: float, target: float, r: float) -> str:
        return "MET" if ratio >= target and r >= MIN_PEARSON else "NOT MET"

    for quantity, ours, peer in comparisons:
        wall_ratio, cpu_ratio = wall[peer] / wall[ours], cpu[peer] / cpu[ours]
        r = pearson(results[ours], results[peer])
        rows.append(
            f"| {quantity} | {wall[ours]:.2f} / {cpu[ours]:.2f} | {peer} | {wall[peer]:.2f} / {cpu[peer]:.2f} | "
            f"{wall_ratio:.1f}x / {cpu_ratio:.1f}x | >= {TARGETS[peer]}x | {r:.6f} | "
            f"{verdict(wall_ratio, TARGETS[peer], r)} / {verdict(cpu_ratio, TARGETS[peer], r)} |"
        )
    reference = [
        ("b. train x target", "ours matrix", "vmap matrix"),
        ("c. self-influence", "ours self", "captum self"),
        ("d. Hessian-based", "ours aggregate", "ekfac fit + score"),
        ("d. Hessian-based", "ours aggregate", "ekfac, fitted factors"),
    ]
    for quantity, ours, other in reference:
        rows.append(f"| {quantity} | {wall[ours]:.2f} / {cpu[ours]:.2f} | {other} (reference) | "
                    f"{wall[other]:.2f} / {cpu[other]:.2f} | {wall[other] / wall[ours]:.1f}x / {cpu[other] / cpu[ours]:.1f}x"
                    f" | - | {pearson(results[ours], results[other]):.6f} | - |")
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        f"SmallCNN ({n_params:,} parameters, {args.epochs} epoch(s) of training), {n:,} MNIST training images, "
        f"{m} PGD targets (linf 0.1, 10 steps), batch {batch}, {torch.get_num_threads()} torch thread(s), "
        f"median of {args.repeats} interleaved repeats; times are wall / process-CPU seconds; a target is met when "
        f"the ratio reaches it and Pearson >= {MIN_PEARSON}",
        "",
        "| quantity | ours (s) | peer | peer (s) | peer / ours | target | Pearson | met (wall / cpu) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"max |ours - captum| / max |captum| on the matrix: "
        f"{float((results['ours matrix'] - results['captum matrix']).abs().max() / results['captum matrix'].abs().max()):.2e}",
        "",
        f"d.: one objective costs {cpu['ekfac fit + score'] / cpu['ours aggregate']:.0f}x ip's CPU time with EK-FAC "
        f"(factors fitted), {cpu['ekfac, fitted factors'] / cpu['ours aggregate']:.0f}x for each further objective "
        f"of the same model; Pearson(ip, ekfac) = {pearson(results['ours aggregate'], results['ekfac fit + score']):.3f}"
        " (whether the curvature helps: the lds section).",
        "",
        f"e.: TRAK with proj_dim {args.proj_dim} (TRAK's CPU projector, float32, damping 0); traker "
        f"{importlib.metadata.version('traker')}; ours / traker time: matrix {wall['trak matrix'] / wall['traker matrix']:.2f}"
        f" wall, {cpu['trak matrix'] / cpu['traker matrix']:.2f} CPU; aggregate "
        f"{wall['trak aggregate'] / wall['traker matrix']:.2f} wall, {cpu['trak aggregate'] / cpu['traker matrix']:.2f} CPU.",
    ]
    print("\n".join(lines))
    if args.write_results:
        write_section("bench_peers", "## Speed against Captum, dattri and traker (experiments/bench_peers.py)\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
