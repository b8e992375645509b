"""Check of the CUDA path: the same scoring and attack code on the GPU as on the CPU, with GPU timings.

Without a CUDA GPU it says so and exits 0. With one, on the reference SmallCNN, ``--n-train``
random training images and ``--n-target`` targets, it runs on both devices and compares:

- PGD (linf 0.1, 10 steps) on the targets: robust accuracy on each device (the random start
  differs between devices, so only the accuracies are compared, loosely);
- IP aggregate scores on the CPU-attacked targets: a CPU model scored with ``device="cuda"``, and a
  model moved to the GPU;
- the train x target matrix (``sharded_influence(aggregate=False)``) and self-influence
  (``method="self"``);
- end-to-end ``Robust(PGD)`` scores (the attack runs on each device, so they agree only roughly).

The exact comparisons need Pearson >= 0.9999 (TF32 is switched off for them); the script exits 1
otherwise. GPU times are medians of ``--repeats`` runs after a warm-up, synchronised with the GPU;
CPU times are one run after a warm-up.

    PYTHONPATH=. .venv/bin/python experiments/check_gpu.py [--n-train 4000] [--n-target 500]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Callable

import torch

from attacks.plumbing import make_generator
import robust_infl as ri
from attacks.registry import make_attack
from robust_infl.distributed import sharded_influence
from robust_infl.models import SmallCNN

MIN_PEARSON = 0.9999


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """Median wall-clock seconds of ``fn`` over ``repeats`` runs after one warm-up (synchronised with
    the GPU), and its result."""
    result = fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two flattened tensors, on the CPU in float64."""
    return float(torch.corrcoef(torch.stack([a.detach().cpu().flatten().double(), b.detach().cpu().flatten().double()]))[0, 1])


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` that ``model`` classifies as ``y``."""
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> int:
    """Run the checks; print a table of CPU and GPU times and agreements. Returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-target", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_gpu: no CUDA GPU is present; the GPU checks were skipped (the CPU path is covered by the tests)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gpu = torch.device("cuda")
    generator = make_generator(args.seed)
    torch.manual_seed(args.seed)
    model = SmallCNN().eval()
    model_gpu = copy.deepcopy(model).to(gpu)
    train = (torch.rand(args.n_train, 1, 28, 28, generator=generator), torch.randint(0, 10, (args.n_train,), generator=generator))
    x_t, y_t = torch.rand(args.n_target, 1, 28, 28, generator=generator), torch.randint(0, 10, (args.n_target,), generator=generator)
    pgd = make_attack("pgd", eps=0.1, norm="linf", steps=10, seed=args.seed)
    common = dict(batch_size=args.batch_size, progress=False)

    cpu_pgd_s, x_adv = timed(lambda: pgd(model, x_t, y_t), 1)
    gpu_pgd_s, x_adv_gpu = timed(lambda: pgd(model_gpu, x_t.to(gpu), y_t.to(gpu)), args.repeats)
    target = (x_adv, y_t)
    print(f"{torch.cuda.get_device_name(gpu)}; SmallCNN, {args.n_train} training images, {args.n_target} targets, "
          f"batch {args.batch_size}; GPU times: median of {args.repeats} after a warm-up")
    print(f"PGD linf 0.1 x 10 steps: CPU {cpu_pgd_s:.3f} s, GPU {gpu_pgd_s:.3f} s; robust accuracy CPU "
          f"{accuracy(model, x_adv, y_t):.3f}, GPU {accuracy(model_gpu, x_adv_gpu, y_t.to(gpu)):.3f}")

    checks = {
        "ip aggregate, CPU model, device='cuda'": (
            lambda device: ri.influence(model, train, target, objective=ri.Utility(), device=device, **common), True),
        "ip aggregate, model on the GPU": (
            lambda device: ri.influence(model if device == "cpu" else model_gpu, train, target,
                                        objective=ri.Utility(), **common), True),
        "ip matrix (sharded, factored)": (
            lambda device: sharded_influence(model, train, target, objective=ri.Utility(), aggregate=False,
                                             device=device, **common), True),
        "self-influence (sharded, factored)": (
            lambda device: sharded_influence(model, train, target, objective=ri.Utility(), method="self",
                                             device=device, **common), True),
        "Robust(PGD) end to end": (
            lambda device: ri.influence(model, train, (x_t, y_t), objective=ri.Robust(pgd), device=device, **common),
            False),
    }
    print("| check | CPU s | GPU s | speed-up | Pearson | max rel. err | verdict |\n|---|---|---|---|---|---|---|")
    failed = False
    for name, (run, exact) in checks.items():
        cpu_s, on_cpu = timed(lambda: run("cpu"), 1)
        gpu_s, on_gpu = timed(lambda: run("cuda"), args.repeats)
        if on_gpu.device.type != "cuda":
            raise AssertionError(f"{name}: the scores came back on {on_gpu.device}, expected cuda")
        r = pearson(on_cpu, on_gpu)
        error = float((on_gpu.cpu() - on_cpu).abs().max() / on_cpu.abs().max())
        verdict = ("OK" if r >= MIN_PEARSON else "FAILED") if exact else "(attacks differ by device)"
        failed |= exact and r < MIN_PEARSON
        print(f"| {name} | {cpu_s:.3f} | {gpu_s:.3f} | {cpu_s / gpu_s:.1f}x | {r:.6f} | {error:.1e} | {verdict} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
