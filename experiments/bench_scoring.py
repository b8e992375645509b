"""Benchmark: time of IP scoring over a training set / time of one no-grad forward pass over it.

IP computes every score as one forward-mode directional derivative (forward-mode AD) of the
per-sample training losses along the objective gradient, so its cost should be a small multiple
of a plain forward pass. Set-up: the reference SmallCNN (~106k parameters), 4,000 random
1x28x28 inputs in [0, 1], batch 500, objective ``Utility`` on 500 random targets. Both timings run
in this one process, interleaved, and the median over repeats is reported; the IP time includes
everything ``robust_infl.influence`` does (validation, the objective gradient on the targets and
the streaming jvp pass). The forward pass runs over the same pieces the engine uses
(``robust_infl.engine.piece_size``: at most ``CPU_PIECE`` samples on CPU), so neither side gets a
cache advantage. ``--data fashion-mnist`` times the same on real images: the training split of
Fashion-MNIST (``--n-train`` images) and targets from its validation split, in its own RESULTS.md section.

    PYTHONPATH=. .venv/bin/python experiments/bench_scoring.py [--repeats 5] [--data fashion-mnist] [--write-results]
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from attacks.plumbing import make_generator
import robust_infl as ri
from experiments._results import parse_benchmark_arguments, scoring_benchmark_parser, write_section
from robust_infl import engine
from robust_infl.datasets import load_dataset
from robust_infl.models import SmallCNN
from robust_infl.objectives import default_loss_fn
from robust_infl.inputs import validate_target
from robust_infl.options import ScoringOptions

TARGET_RATIO = 3.5


def seconds(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_pass(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """One no-grad forward pass over ``x`` in batches."""
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            model(x[start : start + batch_size])


def main() -> None:
    """Run the benchmark and print the timings, the ratio and whether the target is met."""
    parser = scoring_benchmark_parser(__doc__, repeats=5)
    parser.add_argument("--data", choices=("random", "fashion-mnist"), default="random",
                        help="random inputs (default) or Fashion-MNIST's images (training split; validation targets)")
    args = parse_benchmark_arguments(parser)

    generator = make_generator(args.seed)
    torch.manual_seed(args.seed)
    model = SmallCNN().eval()
    if args.data == "random":
        x = torch.rand(args.n_train, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (args.n_train,), generator=generator)
        target = (torch.rand(args.n_target, 1, 28, 28, generator=generator), torch.randint(0, 10, (args.n_target,), generator=generator))
    else:
        splits = load_dataset(args.data, seed=args.seed, n_train=args.n_train, n_val=args.n_target, n_test=1)
        (x, y), target = splits.train, splits.val
    n_params = sum(p.numel() for p in model.parameters())

    def ip() -> torch.Tensor:
        return ri.influence(model, (x, y), target, objective=ri.Utility(), batch_size=args.batch_size, progress=False)

    problem = engine.build_problem(
        model, (x, y), validate_target(target), ri.Utility(), loss_fn=default_loss_fn(10),
        param_names=tuple(n for n, _ in model.named_parameters()), device=torch.device("cpu"),
        options=ScoringOptions(batch_size=args.batch_size, progress=False),
    )
    gradient = engine.objective_gradient(problem, problem.params)

    piece = engine.piece_size(problem)
    warm_up = {"forward": seconds(lambda: forward_pass(model, x, piece)), "ip": seconds(ip)}
    forward_times, ip_times, gradient_times, jvp_times = [], [], [], []
    for _ in range(args.repeats):
        forward_times.append(seconds(lambda: forward_pass(model, x, piece)))
        ip_times.append(seconds(ip))
        gradient_times.append(seconds(lambda: engine.objective_gradient(problem, problem.params)))
        jvp_times.append(seconds(lambda: engine.directional_derivatives(problem, problem.params, gradient)))

    forward_s, ip_s = statistics.median(forward_times), statistics.median(ip_times)
    ratio = ip_s / forward_s
    paired = statistics.median(i / f for i, f in zip(ip_times, forward_times))
    met = ratio <= TARGET_RATIO
    lines = [
        f"SmallCNN ({n_params:,} parameters), {args.n_train:,} training inputs 1x28x28 ({args.data}), "
        f"batch {args.batch_size} "
        f"(passes in pieces of {piece}), "
        f"Utility on {args.n_target} targets, {torch.get_num_threads()} torch thread(s), median of {args.repeats} "
        f"(warm-up: forward {warm_up['forward']:.3f} s, ip {warm_up['ip']:.3f} s)",
        f"no-grad forward pass : {forward_s:.3f} s",
        f"ip (influence call)  : {ip_s:.3f} s  = objective gradient {statistics.median(gradient_times):.3f} s "
        f"+ jvp pass {statistics.median(jvp_times):.3f} s + overhead",
        f"ratio ip / forward   : {ratio:.2f}  (median of per-repeat ratios {paired:.2f}); "
        f"target <= {TARGET_RATIO}: {'MET' if met else 'NOT MET'}",
    ]
    print("\n".join(lines))
    if args.write_results:
        name, title = (("bench_scoring", "(experiments/bench_scoring.py)") if args.data == "random" else
                       ("bench_scoring_fashion_mnist", "on Fashion-MNIST (experiments/bench_scoring.py --data fashion-mnist)"))
        write_section(name, f"## Scoring speed {title}\n\n```\n" + "\n".join(lines) + "\n```")


if __name__ == "__main__":
    main()
