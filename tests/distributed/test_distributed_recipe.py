"""The recipe of docs/distributed.md and ``benchmarks/distributed_train.py``, on 2 gloo ranks.

The recipe block (```python torchrun in docs/distributed.md) is run as written, with only its
configuration line replaced by small sizes, through the same code path as on GPUs except
the device: DDP backbone, sharded CurricularFace outside DDP, fp16 autocast with
GlobalGradScaler, unscale_ + shard-aware clipping, per-rank checkpoints, ``predict``.
A run stopped after 2 steps and resumed from its checkpoints must end bit-identical to a
run of 4 steps; the 2-rank checkpoints re-sharded for 3 ranks resume there. The training
benchmark runs with AMP and clipping, and its evaluation.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "docs" / "distributed.md").read_text()
CONFIG = (
    "num_classes, dim, batch, steps, ckpt_every, ckpt_dir = "
    '1_000_000, 512, 128, 20_000, 1000, "ckpt"'
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv, world, log_dir, name):
    """Start ``world`` ranks of ``python argv`` with torchrun's environment; return them."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
            TORCH_NCCL_BLOCKING_WAIT="1",
        )
        if Path("/sys/class/net/lo").exists():
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        log = open(log_dir / f"{name}_rank{rank}.log", "w+")
        cmd = [sys.executable, *map(str, argv)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    return procs


def finish(procs, timeout=300.0):
    """Wait for the ranks (kill them all past ``timeout`` s); return rank 0's output."""
    deadline = time.monotonic() + timeout
    texts, timed_out = [], False
    for proc, log in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            # Ask the hung ranks where they are (faulthandler, see DIAGNOSE) before killing
            # them, so that a hang says where it happened.
            for p, _ in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGUSR1)
            time.sleep(2.0)
            for p, _ in procs:
                if p.poll() is None:
                    p.kill()
            proc.wait()
        log.seek(0)
        texts.append(log.read())
        log.close()
    if timed_out or any(p.returncode != 0 for p, _ in procs):
        joined = "\n".join(
            f"--- rank {r} (rc={p.returncode}) ---\n{t[-3000:]}"
            for r, ((p, _), t) in enumerate(zip(procs, texts))
        )
        raise AssertionError(f"ranks failed or hung (timed out: {timed_out}):\n{joined}")
    return texts[0]


def recipe(tmp_path, steps, ckpt_dir) -> Path:
    block = re.search(r"```python torchrun\n(.*?)```", DOCS, flags=re.S).group(1)
    assert CONFIG in block, "the recipe's configuration line changed: update CONFIG"
    small = f"num_classes, dim, batch, steps, ckpt_every, ckpt_dir = 40, 8, 6, {steps}, 2, "
    script = tmp_path / f"recipe_{steps}_{Path(ckpt_dir).name}.py"
    script.write_text(
        DIAGNOSE + block.replace(CONFIG, small + repr(str(ckpt_dir))) + TEARDOWN_CHECK
    )
    return script


# Prepended to the recipe: SIGUSR1 prints every thread's Python stack (``finish`` sends it to
# ranks that outlive their timeout, before killing them).
DIAGNOSE = "import faulthandler, signal\nfaulthandler.register(signal.SIGUSR1, all_threads=True)\n"

# Appended to the recipe: its teardown must leave no gloo thread behind (one that outlives
# the group can abort the process at exit, about one run in six), checked every time.
TEARDOWN_CHECK = """
_names = []
for _tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
    with open(f"/proc/self/task/{_tid}/comm") as _f:
        _names.append(_f.read().strip())
assert not [n for n in _names if "gloo" in n], f"gloo threads outlive the group: {_names}"
"""


def _equal(a, b, where=""):
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_readme_recipe_resumes_bit_identically_and_benchmark_evaluates(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    bench = [
        ROOT / "benchmarks" / "distributed_train.py",
        *"--backend gloo --num-classes 30 --dim 8 --batch-size 6 --steps 3 --log-every 1".split(),
        *"--amp --clip-grad-norm 1.0 --eval-batches 2 --eval-batch-size 5 --optimizer sgd".split(),
    ]
    first = [launch([recipe(tmp_path, 4, full)], 2, tmp_path, "full")]
    first.append(launch([recipe(tmp_path, 2, split)], 2, tmp_path, "split_a"))
    out_full = finish(first[0])
    finish(first[1])
    assert sorted(os.listdir(split)) == ["rank0.pt", "rank1.pt"]
    halfway = [torch.load(split / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert halfway[0]["step"] == 2
    # Re-shard the 2-rank checkpoints for 3 ranks (offline) and resume there for a step.
    from pml_extras.distributed import reshard_checkpoints

    three = tmp_path / "three"
    reshard_checkpoints([full / "rank0.pt", full / "rank1.pt"], three, 3)
    resharded = [torch.load(three / f"rank{r}.pt", weights_only=False) for r in range(3)]
    second = [launch([recipe(tmp_path, 4, split)], 2, tmp_path, "split_b")]
    second.append(launch(bench, 2, tmp_path, "bench"))
    second.append(launch([recipe(tmp_path, 5, three)], 3, tmp_path, "three"))
    finish(second[0])
    out_bench = finish(second[1])
    out_three = finish(second[2])
    assert "accuracy over all 40 classes" in out_three
    after = [torch.load(three / f"rank{r}.pt", weights_only=False) for r in range(3)]
    for r in range(3):
        assert after[r]["step"] == 5 and resharded[r]["step"] == 4
        assert after[r]["loss"]["class_range"].tolist() == [[0, 14], [14, 27], [27, 40]][r]
        assert not torch.equal(resharded[r]["loss"]["t"], after[0]["loss"]["t"])  # t moved
        assert torch.equal(after[r]["loss"]["t"], after[0]["loss"]["t"])  # same t everywhere

    match = re.search(r"accuracy over all 40 classes: ([0-9.]+)", out_full)
    assert match and 0.0 <= float(match.group(1)) <= 1.0, out_full
    for rank in range(2):
        a = torch.load(full / f"rank{rank}.pt", weights_only=False)
        b = torch.load(split / f"rank{rank}.pt", weights_only=False)
        assert a["step"] == b["step"] == 4
        assert a["loss"]["class_range"].tolist() == [[0, 20], [20, 40]][rank]
        assert a["loss_opt"]["state"], "the shard's momentum is checkpointed"
        _equal(a, b, f"rank{rank}")
        assert torch.isfinite(a["loss"]["W"]).all()
        assert not torch.equal(a["loss"]["W"], halfway[rank]["loss"]["W"])  # steps were taken
        assert a["scaler"]["scale"] > 0
    for rank in range(2):  # the backbone replicas agree; the shards differ
        other = torch.load(full / f"rank{1 - rank}.pt", weights_only=False)
        _equal(torch.load(full / f"rank{rank}.pt", weights_only=False)["model"], other["model"])

    assert "backend=gloo world=2" in out_bench
    assert re.search(r"step +3 +loss +[0-9.]+ +grad norm +[0-9.]+ +scale \d+", out_bench), out_bench
    match = re.search(
        r"eval: nearest-proxy accuracy over all 30 classes ([0-9.]+) \(20 ", out_bench
    )
    assert match, out_bench


def test_memory_benchmark_runs_and_gives_the_readme_figures(tmp_path):
    script = ROOT / "benchmarks" / "distributed_memory.py"
    argv = [script, "--num-classes", "3000", "--dim", "16", "--batch", "32"]
    out = finish(launch([*argv, "--out", tmp_path / "m.json"], 1, tmp_path, "mem"))
    assert re.search(r"rank 0: train +[0-9.]+ / +[0-9.]+ +predict +[0-9.]+ / +[0-9.]+", out), out
    sys.path.insert(0, str(script.parent))
    import distributed_memory as dm

    gib = {k: v / (1 << 30) for k, v in dm.formula(10_000_000, 512, 8, 8192, 0.1).items()}
    assert round(gib["train"], 2) == 7.18 and round(gib["predict"], 2) == 2.42
    assert round(gib["partial_fc"], 2) == 14.78 and round(gib["old_predict"], 2) == 42.93
    assert "SGD momentum, r=0.1: train 7.18  predict 2.42" in out
    assert "Adam, r=1.0: train 9.57" in out
