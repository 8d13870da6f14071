"""Mixed precision with class-sharded losses: a GradScaler whose overflow decision is global.

``torch.amp.GradScaler`` looks for inf/NaN only in the gradients of this rank's optimizer.
With W sharded by classes, an overflow in one rank's shard then makes only that rank skip
its step and halve its scale: the replicas of the backbone diverge, the ranks' loss scales
differ, and the embedding gradients all-reduced by the next backward mix losses scaled by
different factors. :class:`GlobalGradScaler` all-reduces the found-inf flag over the
process group in ``unscale_`` (which ``step`` calls if you did not), so every rank skips the
same steps and keeps the same scale. It also gives one decision to all the optimizers
unscaled in an iteration (a backbone optimizer and a shard optimizer, clipped together).

``torch.distributed.fsdp.sharded_grad_scaler.ShardedGradScaler`` does the same for FSDP
(one all-reduce per device and optimizer; it also works with gloo on CPU, see
``tests/distributed/test_distributed_sync.py``); this one issues exactly one small all-reduce per
``unscale_`` whatever the devices, also on a rank whose optimizer has no gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.amp.grad_scaler import OptState

from . import _comm


class GlobalGradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` with the found-inf flag reduced (MAX) over ``process_group``.

    Same arguments as ``torch.amp.GradScaler`` plus ``process_group`` (default: the
    world). A collective: ``unscale_`` (or ``step`` without it) must be called on every rank,
    for the same optimizers in the same order. With several optimizers, unscale all of them
    before the first ``step``: the flag is shared by every optimizer unscaled since the last
    ``update()``, so they all skip an iteration together. Recipe (every rank)::

        scaler = GlobalGradScaler("cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y)          # model = DDP(backbone); loss_fn sharded
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)                     # global found-inf: same decision everywhere
        pml_extras.distributed.clip_grad_norm_(
            model.parameters(), 5.0, sharded=loss_fn.parameters()
        )
        scaler.step(opt)                         # skipped on every rank, or on none
        scaler.update()                          # the same scale on every rank

    With bf16 autocast no scaler is needed (bf16 has float32's range).
    """

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        process_group=None,
    ) -> None:
        super().__init__(
            device,
            init_scale=init_scale,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            enabled=enabled,
        )
        self.process_group = process_group

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        if not self._enabled:
            return
        # GradScaler keeps one found-inf flag per device of each optimizer's gradients
        # (private, as FSDP's ShardedGradScaler uses it). All optimizers unscaled since the
        # last update() share one flag: with a clip over the backbone and the shard, an
        # overflow in one optimizer's gradients reaches the others' through the norm.
        states = [
            st
            for st in self._per_optimizer_states.values()
            if st["stage"] is OptState.UNSCALED and "found_inf_per_device" in st
        ]
        device = self._scale.device
        if _comm.is_active(self.process_group):
            backend = str(dist.get_backend(self.process_group)).lower()
            device = torch.device("cpu") if backend == "gloo" else device
        flag = torch.zeros((), dtype=torch.float32, device=device)
        for st in states:
            for value in st["found_inf_per_device"].values():
                flag = torch.maximum(flag, value.to(device=device, dtype=torch.float32).max())
        if _comm.is_active(self.process_group):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group)
        for st in states:
            for value in st["found_inf_per_device"].values():
                value.copy_(flag.to(value.device).expand_as(value))
        found = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        if not found:  # no gradients here: record the global flag, so step() agrees too
            found[self._scale.device] = flag.to(self._scale.device).reshape(1)
