"""Sharded scoring on torch.distributed: 2 processes on localhost (gloo, launched by torchrun) vs one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import robust_infl as ri
from robust_infl.distributed import gather_rows, shard_chunks, sharded_influence
from robust_infl.models import MLP

from conftest import max_relative_error

ROOT = Path(__file__).resolve().parents[2]

# Each rank scores its shard; rank 0 saves what every rank returned.
WORKER = '''
import sys
import torch
import torch.distributed as dist
import robust_infl as ri
from robust_infl.distributed import (broadcast_module_state, gather_rows, init_process_group_from_env,
                                     rank_and_world_size, sharded_influence)
sys.path[:0] = {tests!r}
from test_distributed import RUNS, setting

assert init_process_group_from_env()
rank, world_size = rank_and_world_size()
model, train, target = setting()
results = {{name: sharded_influence(model, train, target, progress=False, **run(sys.argv[2])) for name, run in RUNS.items()}}
results["gather"] = gather_rows(torch.full((rank + 1, 2), float(rank)))
results["world_size"] = world_size
torch.manual_seed(100 + rank)  # a different model on each rank, then rank 0's everywhere
other = broadcast_module_state(type(model)(12, 4, hidden=(16,)))
results["states"] = gather_rows(torch.cat([p.detach().reshape(1, -1) for p in other.parameters()], dim=1))
if rank == 0:
    torch.save(results, sys.argv[1])
dist.destroy_process_group()
'''


def shift(model, x, y):
    return x + 0.05


def setting():
    torch.manual_seed(0)
    model = MLP(12, 4, hidden=(16,)).eval()
    x, y = torch.randn(101, 12), torch.randint(0, 4, (101,))
    xt, yt = torch.randn(15, 12), torch.randint(0, 4, (15,))
    return model, (x, y), (xt, yt)


# name -> (store folder -> options); 101 samples in chunks of 8: 13 chunks, 7 on rank 0 and 6 on rank 1.
RUNS = {
    "aggregate": lambda folder: dict(objective=ri.Robust(shift), batch_size=4, chunk_size=8),
    "matrix": lambda folder: dict(objective=ri.Robust(shift), aggregate=False, batch_size=4, chunk_size=8),
    "projected": lambda folder: dict(objective=ri.Utility(), aggregate=False, projection_dim=32, batch_size=8),
    "self": lambda folder: dict(objective=ri.Utility(), method="self", batch_size=8, chunk_size=8),
    "stored": lambda folder: dict(objective=ri.Robust(shift), batch_size=8, chunk_size=8, store=Path(folder) / "s"),
    "one_chunk": lambda folder: dict(objective=ri.Utility(), batch_size=128),  # rank 1 gets no chunk
}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    script = folder / "worker.py"
    script.write_text(WORKER.format(tests=[str(Path(__file__).parent), str(ROOT / "tests")]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(script), str(folder / "results.pt"), str(folder)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(folder / "results.pt"), folder


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_scores(two_processes, tmp_path):
    results, _ = two_processes
    assert results["world_size"] == 2
    model, train, target = setting()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, run in RUNS.items():
            alone = sharded_influence(model, train, target, progress=False, **run(tmp_path))
            assert results[name].shape == alone.shape
            assert max_relative_error(results[name], alone) <= 1e-6, name
    finally:
        torch.set_num_threads(threads)
    exact = ri.influence(model, train, target, objective=ri.Robust(shift), aggregate=False, batch_size=4, progress=False)
    assert max_relative_error(results["matrix"], exact) <= 1e-5


@pytest.mark.slow
def test_rows_of_uneven_shards_are_gathered_in_rank_order(two_processes):
    results, _ = two_processes
    assert torch.equal(results["gather"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))


@pytest.mark.slow
def test_rank_0_weights_are_broadcast_to_every_rank(two_processes):
    results, _ = two_processes
    torch.manual_seed(100)
    expected = torch.cat([p.detach().reshape(-1) for p in MLP(12, 4, hidden=(16,)).parameters()])
    assert torch.equal(results["states"][0], expected) and torch.equal(results["states"][1], expected)


@pytest.mark.slow
def test_a_store_written_by_two_processes_resumes_in_one(two_processes):
    results, folder = two_processes
    model, train, target = setting()
    options = RUNS["stored"](folder)
    assert len(list((folder / "s").glob("scores_*.npy"))) == 13
    resumed = sharded_influence(model, train, target, progress=False, resume=True, **options)
    assert torch.equal(resumed, results["stored"])


@given(n_chunks=st.integers(0, 50), world_size=st.integers(1, 9))
def test_shards_are_consecutive_near_equal_runs_covering_every_chunk(n_chunks, world_size):
    shards = [shard_chunks(n_chunks, rank, world_size) for rank in range(world_size)]
    assert [chunk for shard in shards for chunk in shard] == list(range(n_chunks))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_without_a_process_group_everything_stays_in_one_process():
    rows = torch.randn(3, 2)
    assert gather_rows(rows) is rows
    with pytest.raises(ValueError, match="^rank:"):
        shard_chunks(4, 2, 2)


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(method="if-exact"), ValueError, "^method:"),
        (dict(chunk_size=6, batch_size=4), ValueError, "^chunk_size: must be a multiple"),
        (dict(projection_dim=8), ValueError, "^projection_dim:"),
        (dict(method="self", aggregate=False), ValueError, "^aggregate:"),
        (dict(resume=True), ValueError, "^resume:"),
        (dict(aggregate=1), TypeError, "^aggregate:"),
        (dict(projection_dim=0, aggregate=False), ValueError, "^projection_dim:"),
    ],
)
def test_invalid_options_name_themselves(options, error, message):
    model, train, target = setting()
    with pytest.raises(error, match=message):
        sharded_influence(model, train, target, objective=ri.Utility(), progress=False, **options)


def test_fairness_objectives_have_no_matrix():
    model, (x, y), (xt, yt) = setting()
    model = MLP(12, 2, hidden=(4,)).eval()
    s = torch.arange(15) % 2
    with pytest.raises(ValueError, match="^aggregate:"):
        sharded_influence(model, (x, y % 2), (xt, yt % 2, s), objective=ri.DemographicParity(), aggregate=False,
                          progress=False)
