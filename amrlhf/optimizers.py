"""AdamW stepped inside the backward pass: each parameter is updated, and its gradient freed, as soon as that
gradient is complete, so the trainable weights' gradients never exist all at once (torchtune's
`optimizer_in_bwd`; PyTorch's tutorial "How to save memory by fusing the optimizer step into the backward pass").

Every update is AdamW's own (`torch.optim.AdamW.step`) on one parameter, so the weights and
the optimizer state are those of a plain AdamW step over all of them, bit for bit, and the state dict has AdamW's
format (a checkpoint resumes with either optimizer). What it cannot do follows from updating during the backward:
clip by the global gradient norm (the norm is known only once every gradient exists), accumulate gradients over
several backward passes, or wait for a data-parallel all-reduce. `amrlhf.modules.base` refuses those set-ups.

Why no part of the backward reads a weight after its update: within one backward graph, autograd runs a leaf's
gradient accumulation once, after every use of the leaf has sent its gradient (a tied embedding's two uses
included), and a node needing the weight's value runs before that. It holds for non-reentrant activation
checkpointing (one graph; what `amrlhf.models` sets) and for several backward passes over disjoint weights (PPO's
policy, then its critic). It does not hold where a weight is used in a second graph: reentrant checkpointing (a
nested backward per region, so a weight shared by two regions is updated twice) or a use through `.detach()`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch
from torch import Tensor


def _adamw_step():
    """torch.optim.AdamW.step without the step-hook and profiler wrapper torch puts on it once any AdamW exists: the
    wrapper's hooks belong to a whole optimizer step, which `AdamWInBackward.step` is (hooks once per step, not
    once per weight)."""
    step = torch.optim.AdamW.step
    while getattr(step, "hooked", False):
        step = step.__wrapped__
    return step


class AdamWInBackward(torch.optim.AdamW):
    """torch.optim.AdamW whose update runs in each parameter's post-accumulate-grad hook.

    `step(closure)` runs the closure (forward and backward: the updates happen there) and returns its loss;
    `step()` after a backward the caller ran itself is a no-op. `detach()` removes the hooks: afterwards a
    backward leaves the weights alone and keeps the gradients, as for any model."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], **kwargs):
        super().__init__(params, **kwargs)
        self._group_of = {id(p): i for i, group in enumerate(self.param_groups) for p in group["params"]}
        self._handles = [p.register_post_accumulate_grad_hook(self._update)
                         for group in self.param_groups for p in group["params"]]
        self._lock = threading.Lock()  # autograd runs one thread per device: weights on two GPUs (a device_map)
        self.updates = 0  # parameter updates made (a count for tests and logs)

    def _update(self, param: Tensor) -> None:
        """AdamW's step on `param` alone, then its gradient freed. The other parameters are hidden from
        `step` meanwhile, so one still holding a gradient (not yet updated) is left alone."""
        with self._lock:
            groups = [group["params"] for group in self.param_groups]
            mine = self._group_of[id(param)]
            try:
                for i, group in enumerate(self.param_groups):
                    group["params"] = [param] if i == mine else []
                _adamw_step()(self)
            finally:
                for group, params in zip(self.param_groups, groups, strict=True):
                    group["params"] = params
            param.grad = None
            self.updates += 1

    def step(self, closure=None):  # type: ignore[override]
        """Run `closure` (its backward updates the parameters) and return its loss; without one, nothing to do."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def detach(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)
