"""reshard_checkpoints: sharded checkpoints carried to another world size (no process group:
the checkpoints are written by the test)."""

from __future__ import annotations

import pytest
import torch

from pml_extras.distributed import (
    ShardedCurricularFaceLoss,
    shard_ranges,
)


def _fake_checkpoints(tmp_path, ranges, dim=3, adam=True):
    g = torch.Generator().manual_seed(0)
    num_classes = ranges[-1][1]
    full = {n: torch.randn(dim, num_classes, generator=g) for n in ("W", "exp_avg", "exp_avg_sq")}
    full["exp_avg_sq"] = full["exp_avg_sq"].abs()  # a second moment
    paths = []
    for r, (lo, hi) in enumerate(ranges):
        loss = {
            "W": full["W"][:, lo:hi].clone(),
            "class_range": torch.tensor([lo, hi]),
            "sample_step": torch.tensor(7),
            "t": torch.tensor([0.25]),
        }
        state = {"step": torch.tensor(7.0)}
        if adam:
            state.update(exp_avg=full["exp_avg"][:, lo:hi].clone())
            state.update(exp_avg_sq=full["exp_avg_sq"][:, lo:hi].clone())
        groups = torch.optim.Adam([torch.zeros(1)], lr=0.1).state_dict()["param_groups"]
        opt = {"state": {0: state}, "param_groups": groups}
        path = tmp_path / f"src{r}.pt"
        torch.save({"loss": loss, "loss_opt": opt, "model": {"a": torch.ones(2)}, "step": 3}, path)
        paths.append(path)
    return full, paths


@pytest.mark.parametrize("new_world, sizes", [(2, None), (4, [1, 5, 2, 2]), (1, None)])
def test_reshard_checkpoints_carries_w_t_sample_step_and_optimizer_state(
    tmp_path, new_world, sizes
):
    from pml_extras.distributed import reshard_checkpoints

    full, paths = _fake_checkpoints(tmp_path, shard_ranges(10, 3))
    out = reshard_checkpoints(paths, tmp_path / "dst", new_world, shard_sizes=sizes)
    new = [torch.load(p, weights_only=True) for p in out]
    ranges = shard_ranges(10, new_world, sizes)
    assert [n["loss"]["class_range"].tolist() for n in new] == [list(r) for r in ranges]
    assert torch.equal(torch.cat([n["loss"]["W"] for n in new], 1), full["W"])
    for name in ("exp_avg", "exp_avg_sq"):
        got = torch.cat([n["loss_opt"]["state"][0][name] for n in new], 1)
        assert torch.equal(got, full[name])
    for n in new:
        assert int(n["loss"]["sample_step"]) == 7 and float(n["loss"]["t"]) == 0.25
        assert float(n["loss_opt"]["state"][0]["step"]) == 7.0
        assert n["model"]["a"].sum() == 2 and n["step"] == 3
    if new_world == 1:  # loads into the one-process loss and its optimizer, then trains
        loss = ShardedCurricularFaceLoss(10, 3)
        loss.load_state_dict(new[0]["loss"])
        opt = torch.optim.Adam(loss.parameters(), lr=0.1)
        opt.load_state_dict(new[0]["loss_opt"])
        loss(torch.randn(4, 3), torch.tensor([0, 3, 9, 9])).backward()
        opt.step()
        assert torch.isfinite(loss.W).all() and float(opt.state[loss.W]["step"]) == 8.0


def test_reshard_checkpoints_refuses_what_it_cannot_carry(tmp_path):
    from pml_extras.distributed import reshard_checkpoints

    _, paths = _fake_checkpoints(tmp_path, [(0, 5), (5, 10)])
    bad = torch.load(paths[1], weights_only=True)
    bad["loss"]["t"] = torch.tensor([0.5])
    torch.save(bad, paths[1])
    with pytest.raises(ValueError, match="'loss.t' differs between rank 0"):
        reshard_checkpoints(paths, tmp_path / "a", 3)
    _, paths = _fake_checkpoints(tmp_path, [(0, 5), (5, 10)])
    for p in paths:
        ck = torch.load(p, weights_only=True)
        ck["loss_opt"]["state"][0]["factored"] = torch.zeros(4)
        torch.save(ck, p)
    with pytest.raises(ValueError, match="'factored' has shape \\(4,\\), neither W's"):
        reshard_checkpoints(paths, tmp_path / "b", 3)
    with pytest.raises(ValueError, match="do not tile"):
        reshard_checkpoints(paths[::-1], tmp_path / "c", 3)
