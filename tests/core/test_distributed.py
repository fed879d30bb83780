"""torchrun with 2 CPU processes (gloo): completes, only rank 0 writes, metrics match, resume works."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli

# Every collective fails after this many seconds instead of hanging (VISIONPIPE_DIST_TIMEOUT).
DIST_ENV = {"VISIONPIPE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "VISIONPIPE_DIST_TIMEOUT": "120"}


def torchrun(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m visionpipe ARGS`` (a free port is picked by the rendezvous)."""
    env = {**os.environ, **DIST_ENV}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "visionpipe", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_files(run: Path) -> list[str]:
    """Files of a run folder, TensorBoard event files counted by folder (their names hold host and pid)."""
    return sorted(str(p.relative_to(run)) if p.parent.name != "tb" else "tb/<events>"
                  for p in run.rglob("*") if p.is_file())


@pytest.mark.parametrize(("port", "message"), [
    ("0", "MASTER_PORT is 0"),  # torchrun --master-port 0 hands port 0 to the workers: used to hang
    ("free", "could not start the gloo process group"),  # rank 1 never comes: fails after the timeout
])
def test_process_group_problems_fail_fast(tmp_path, tiny_pipeline, port, message):
    p = tiny_pipeline(epochs=1)
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()) if port == "free" else port, "VISIONPIPE_DIST_TIMEOUT": "3"}
    proc = run_cli("run", str(p), cwd=tmp_path, env=env, check=False, timeout=120)
    assert proc.returncode == 1
    assert message in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


COLLECTIVES = """\
import json, sys
import torch
from visionpipe.engine import distributed as dist
from visionpipe.engine.loaders import EpochSampler

assert dist.init_distributed(torch.device("cpu"))
r = dist.rank()
# rank 1 has a key rank 0 lacks: the union is reduced, the missing value counts as 0
sums = dist.all_reduce_sum({"sum/loss": 1.0 + r, **({"sum/extra": 5.0} if r else {})}, torch.device("cpu"))
with dist.main_first():  # rank 0 first, then rank 1: must not deadlock
    pass
sampler = EpochSampler(list(range(11)), seed=3)
reference = torch.utils.data.DistributedSampler(list(range(11)), shuffle=True, seed=3)
shards, torch_shards = {}, {}
for epoch in (0, 1):
    sampler.set_epoch(epoch)
    reference.set_epoch(epoch)
    shards[epoch] = [i for e, i in sampler if e == epoch]
    torch_shards[epoch] = list(reference)
out = {"sums": sums, "bcast": dist.broadcast_object(f"from {r}"), "shards": shards, "torch": torch_shards,
       "len": len(sampler)}
dist.cleanup()
open(sys.argv[1] + f".{r}.json", "w").write(json.dumps(out))
"""


def test_collectives_and_shards_two_processes(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    env = {**os.environ, **DIST_ENV}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-5000:]
    r0, r1 = (json.loads((tmp_path / f"out.{r}.json").read_text()) for r in (0, 1))
    assert r0["sums"] == r1["sums"] == {"sum/loss": 3.0, "sum/extra": 5.0}
    assert r0["bcast"] == r1["bcast"] == "from 0"
    assert r0["len"] == r1["len"] == 6
    for epoch in ("0", "1"):
        a, b = r0["shards"][epoch], r1["shards"][epoch]
        assert len(a) == len(b) == 6, "equal shard lengths: every rank runs the same number of steps"
        assert set(a) | set(b) == set(range(11)) and len(set(a) & set(b)) <= 1  # one index repeated as padding
    assert r0["shards"]["0"] != r0["shards"]["1"], "each epoch reshuffles"
    assert (r0["shards"], r1["shards"]) == (r0["torch"], r1["torch"]), "the shards of torch's DistributedSampler"


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, tiny_pipeline, color_data):
    p = tiny_pipeline(epochs=3, extra="evaluate: {split: val}\npredict: {source: %s}\n" % (color_data / "val"))
    torchrun("run", str(p), "--set", "train.batch_size=4", cwd=tmp_path)
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["tiny"], "one run folder, written by rank 0 only"
    run = runs[0]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "finished"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3], "each epoch logged once"
    log = (run / "run.log").read_text()
    assert [log.count(f"epoch {e}/3 ") for e in (1, 2, 3)] == [1, 1, 1], "only rank 0 logs to run.log"
    assert (run / "model.onnx").is_file()
    n_val = sum(1 for f in (color_data / "val").rglob("*") if f.is_file())
    # the predict stage runs on rank 0 only and predicts every input (it used to write shard 0 of 2 and stop)
    assert len((run / "predictions" / "predictions.jsonl").read_text().splitlines()) == n_val
    ddp = json.loads((run / "metrics.json").read_text())

    # single process, same global batch (2 ranks x 4 = 8)
    run_cli("run", str(p), "--run-dir", "single", "--set", "train.batch_size=8", cwd=tmp_path, timeout=300)
    single_dir = tmp_path / "single"
    single = json.loads(single_dir.joinpath("metrics.json").read_text())
    assert run_files(run) == run_files(single_dir), "two ranks write exactly the files one process writes"
    assert abs(ddp["val/top1"] - single["val/top1"]) <= 0.25
    assert ddp["val/top1"] >= 0.75 and single["val/top1"] >= 0.75
    assert ddp["val/loss"] == pytest.approx(single["val/loss"], abs=0.3)


@pytest.mark.slow
def test_resume_under_torchrun(tmp_path, tiny_pipeline):
    p = tiny_pipeline(epochs=1)
    torchrun("run", str(p), "--run-dir", "r", "--set", "train.batch_size=4", cwd=tmp_path)
    out = torchrun("run", "--resume", "r", "--set", "train.epochs=2", cwd=tmp_path)
    assert out.stderr.count("resumed at epoch 1/2") == 1, "rank 0 resumes and says so once"
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["resumed_from_epoch"] == 1 and manifest["world_size"] == 2
