"""The replicated-loss wrapper on 2 gloo ranks: misuse, autograd.grad, traffic, syncs.

One process group runs every scenario of ``_dist_wrapper_worker.py`` with a 10 s group
timeout, so a misuse that desynchronised the collectives would surface as a gloo timeout
(or an abort) instead of the ValueError checked here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dist_harness import spawn  # noqa: E402

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "_dist_wrapper_worker.py"
WORLD = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn(
        WORLD,
        [4, 4],
        13,
        tmp_path_factory.mktemp("wrapper"),
        suites="misuse,grad_only,traffic,state,wrapper_syncs",
        timeout=240.0,
        worker=WORKER,
        PMLX_TIMEOUT=10,
    )


# Each misuse case: the words its ValueError must hold on every rank.
MISUSE = {
    "labels_one_rank": "whether labels were given (rank 0: yes, rank 1: no)",
    "ref_emb_one_rank": "whether ref_emb was given (rank 0: no, rank 1: yes)",
    "ref_labels_one_rank": "whether ref_labels were given (rank 0: no, rank 1: yes)",
    "indices_one_rank": "whether an indices_tuple was given (rank 0: no, rank 1: yes)",
    "dtype": "the embeddings' dtype (rank 0: torch.float64, rank 1: torch.float32)",
    "embedding_size": "the embedding size (rank 0: 6, rank 1: 7)",
    "efficient": "efficient (rank 0: no, rank 1: yes)",
    "train_eval": "training mode (rank 0: yes, rank 1: no)",
    "impl": "the loss's impl (rank 0: 'auto', rank 1: 'torch')",
    "miner_ref_one_rank": "whether ref_emb was given (rank 0: no, rank 1: yes)",
    "sharded_labels_one_rank": "whether labels were given (rank 0: yes, rank 1: no)",
    "sharded_indices_one_rank": "whether an indices_tuple was given (rank 0: no, rank 1: yes)",
    "sharded_dtype": "the embeddings' dtype (rank 0: torch.float64, rank 1: torch.float32)",
    "sharded_impl": "impl (rank 0: 'auto', rank 1: 'torch')",
}


@pytest.mark.parametrize("case", list(MISUSE))
def test_misuse_raises_the_same_error_on_every_rank(results, case):
    got = [r["misuse"][case] for r in results]
    for rank, g in enumerate(got):
        assert g["error"].startswith("ValueError: "), (rank, g["error"])
        assert "the ranks disagree on " + MISUSE[case] in g["error"], (rank, g["error"])
        assert g["error"] == got[0]["error"]  # the same words on every rank
        assert g["seconds"] < 5.0, g  # at once, not after the 10 s group timeout
        assert g["in_step"]  # the next collective still lines up
    for g in (r["misuse"]["after"] for r in results):
        assert g["error"].startswith("no error"), g


def _param_all_reduces(calls):
    # CurricularFaceLoss(13, 6).W is (6, 13): its gradient's all-reduce.
    return [c for c in calls if c[0] == "all_reduce" and c[1][0] == (6, 13)]


def test_autograd_grad_leaves_parameters_and_state_alone(results):
    for g in (r["grad_only"] for r in results):
        assert g["w_grad_after_grad"] is None and g["w_grad_after_inputs"] is None
        assert not _param_all_reduces(g["grad_calls"]) and not _param_all_reduces(g["inputs_calls"])
        assert torch.isfinite(g["gx"]).all() and g["gx"].abs().sum() > 0
        # A real backward into W: one all-reduce of its gradient, and every rank ends equal.
        assert len(_param_all_reduces(g["backward_calls"])) == 1
        assert g["w_grad"] is not None
    first = results[0]["grad_only"]
    for g in (r["grad_only"] for r in results[1:]):
        assert torch.equal(g["w_grad"], first["w_grad"]) and torch.equal(g["w"], first["w"])


def test_wrapper_moves_what_ddp_moves_for_the_loss_state(results):
    """Steps 2 and 3 (step 1 holds the one-off broadcast of the initial state)."""
    for res in results:
        t = res["traffic"]
        param = t["param_bytes"]  # W: 64 x 500 float32
        gather_backward = WORLD * 4 * 64 * 4  # the gathered embeddings' gradient
        for step in (1, 2):
            ours, ddp = t["wrapper_curricular"][step], t["ddp_curricular"][step]
            assert ddp["ddp_grad_all_reduce"] == param
            assert ddp["_broadcast_coalesced"] == 4  # t, DDP's broadcast_buffers
            assert ours["all_reduce"] == param + gather_backward
            assert ours["broadcast"] == ddp["_broadcast_coalesced"]  # t only, not W
            center = t["wrapper_center_paper"][step]
            assert center["broadcast"] == param  # the paper-rule centers: a buffer
            assert center["all_reduce"] == gather_backward
            # The old cadence (sync_every=1) broadcast W and t again at every step.
            assert t["wrapper_curricular_sync_every1"][step]["broadcast"] == param + 4
        # Step 1: the initial state, once (W and t).
        assert t["wrapper_curricular"][0]["broadcast"] == param + 4
    for name in ("wrapper_curricular", "ddp_curricular", "wrapper_curricular_sync_every1"):
        print(name, "bytes per rank, steps 1-3:", results[0]["traffic"][name])


def test_check_every_catches_drift_and_sync_every_is_deprecated(results):
    for res in results:
        s = res["state"]
        assert all(step["error"].startswith("no error") for step in s["check_clean"])
        drift = [step["error"] for step in s["check_drift"]]
        assert drift[0].startswith("no error") and drift[2].startswith("no error")
        for text in (drift[1], drift[3]):  # steps 2 and 4 run the check (check_every=2)
            assert text.startswith("RuntimeError: ") and "W (ranks [1] differ" in text, text
        assert all(step["in_step"] for step in s["check_drift"])
        assert s["default_warnings"] == []
        assert len(s["sync_every_warnings"]) == 1
        assert s["sync_every_warnings"][0].startswith("FutureWarning: ")
        assert "sync_every" in s["sync_every_warnings"][0]
        assert s["sync_every_equal"]  # sync_every=1 still restores rank 0's W


def test_efficient_wrappers_host_syncs_at_the_dispatcher(results):
    gather = ("tolist", "/distributed/_comm.py:all_gather_ints")
    pairs = [("aten::nonzero", "/distributed/wrapper.py:_own_pairs")] * 2
    drop = ("aten::nonzero", "/distributed/wrapper.py:_drop_self_comparisons")
    for res in results:
        got = res["wrapper_syncs"]
        assert got["loss"] == [gather, *pairs], got["loss"]
        assert got["loss_ref"] == [gather, *pairs], got["loss_ref"]  # one validation
        assert got["miner"] == [gather, drop], got["miner"]
        assert got["loss_mined"] == [gather, drop, gather], got["loss_mined"]
        # The counter sees a boolean-mask index, which a Tensor-method patch cannot.
        assert [name for name, _ in got["boolean_mask_seen"]] == ["aten::index"]
