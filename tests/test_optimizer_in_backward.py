"""AdamW stepped inside the backward pass (amrlhf.optimizers.AdamWInBackward, the modules' `optimizer_in_backward`):
the same weights and optimizer state as a plain AdamW step, bit for bit; one gradient held at a time; the set-ups
it cannot serve refused with a message; the hooks gone after the fit."""

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from test_grpo import fit as fit_grpo
from test_grpo import letters_grpo
from test_ppo import fit as fit_ppo
from test_ppo import letters_ppo

from amrlhf.data import PreferenceDataModule, PromptDataModule
from amrlhf.errors import AmrlhfError, ConfigError
from amrlhf.models import ModelSpec
from amrlhf.modules import DPOModule, FrozenReference, ValueModel, onpolicy
from amrlhf.modules.onpolicy import clip_threshold
from amrlhf.optimizers import AdamWInBackward
from amrlhf.segmenters import SampleWiseSegmenter


class TiedNet(torch.nn.Module):
    """An embedding tied to the output head (as SmolLM2's), a checkpointed layer, and a bias-free head."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.mid = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(self.mid(t)), self.emb(x), use_reentrant=False)
        return torch.nn.functional.cross_entropy(self.head(h).flatten(0, 1), x.flatten())


def _groups(net):
    return [{"params": [net.emb.weight], "weight_decay": 0.0},
            {"params": [net.mid.weight, net.mid.bias], "weight_decay": 0.1}]


def _held_during_backward(net):
    """Hooks registered before the optimizer's: at each gradient's completion, how many parameters hold one."""
    seen = []
    for p in net.parameters():
        p.register_post_accumulate_grad_hook(lambda _: seen.append(sum(q.grad is not None for q in net.parameters())))
    return seen


@pytest.mark.parametrize("kernel", [{}, {"foreach": True}, {"fused": True}])
def test_the_weights_and_state_are_plain_adamw_s_bit_for_bit_with_one_gradient_held_at_a_time(kernel):
    torch.manual_seed(0)
    plain_net = TiedNet()
    net = copy.deepcopy(plain_net)
    held_plain, held = _held_during_backward(plain_net), _held_during_backward(net)
    plain = torch.optim.AdamW(_groups(plain_net), lr=1e-2, betas=(0.8, 0.99), **kernel)
    fused = AdamWInBackward(_groups(net), lr=1e-2, betas=(0.8, 0.99), **kernel)
    step_hooks = []
    fused.register_step_pre_hook(lambda *_: step_hooks.append(1))
    warm = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 3)) for o in (plain, fused)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randint(0, 50, (4, 7), generator=gen)
        loss = plain_net(x)
        loss.backward()
        plain.step()
        plain.zero_grad(set_to_none=True)
        assert torch.equal(fused.step(lambda: (out := net(x)).backward() or out), loss)  # noqa: B023
        assert all(p.grad is None for p in net.parameters())
        for s in warm:
            s.step()
    assert fused.updates == 5 * 3  # the tied weight updated once per step, after both of its uses
    assert len(step_hooks) == 5  # an optimizer's step hooks run once per step, not once per weight
    for a, b in zip(plain_net.parameters(), net.parameters(), strict=True):
        assert torch.equal(a, b)
    sa, sb = plain.state_dict(), fused.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, state in sa["state"].items():
        assert all(torch.equal(v, sb["state"][i][k]) for k, v in state.items())
    assert max(held_plain) == 3 and max(held) == 1  # plain AdamW holds every gradient; in-backward one at a time

    # its state dict is AdamW's: a run resumes with either optimizer
    resumed = torch.optim.AdamW(_groups(net), lr=1e-2, betas=(0.8, 0.99), **kernel)
    resumed.load_state_dict(fused.state_dict())
    fused.detach()
    x = torch.randint(0, 50, (4, 7), generator=gen)
    for n, o in ((plain_net, plain), (net, resumed)):
        n(x).backward()
        o.step()
    for a, b in zip(plain_net.parameters(), net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_after_detach_a_backward_keeps_its_gradients_and_leaves_the_weights():
    torch.manual_seed(0)
    net = TiedNet()
    opt = AdamWInBackward(net.parameters(), lr=1e-2)
    assert opt.attached and opt.step() is None  # no closure: nothing to run
    opt.detach()
    opt.detach()  # idempotent
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.randint(0, 50, (2, 5))).backward()
    assert not opt.attached and opt.updates == 0
    assert all(p.grad is not None for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def _fit_dpo(in_backward: bool, steps: int = 3, fused_adamw: bool = False, **trainer_kw):
    L.seed_everything(0, verbose=False)
    dm = PreferenceDataModule("local:tiny-arith/prefs_train", tokenizer="local:tiny-llama", max_length=64,
                              batch_size=2, shuffle=False)
    module = DPOModule(ModelSpec("local:tiny-llama"), reference=FrozenReference(), segmenter=SampleWiseSegmenter(),
                       lr=1e-3, warmup_steps=2, weight_decay=0.01, optimizer_in_backward=in_backward,
                       fused_adamw=fused_adamw)
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].detach())

    ckpt_path = trainer_kw.pop("ckpt_path", None)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False,
                        enable_checkpointing=trainer_kw.pop("enable_checkpointing", False),
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Losses(), *trainer_kw.pop("callbacks", [])], **trainer_kw)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, trainer, losses


def test_dpo_trains_the_same_weights_bit_for_bit_and_the_hooks_leave_with_the_fit():
    plain, _, plain_losses = _fit_dpo(False)
    fused, trainer, losses = _fit_dpo(True)
    opt = trainer.optimizers[0]
    assert isinstance(opt, AdamWInBackward) and opt.updates > 0 and not opt.attached
    assert len(losses) == 3 and all(torch.equal(a, b) for a, b in zip(plain_losses, losses, strict=True))
    a, b = dict(plain.named_parameters()), dict(fused.named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    start = DPOModule(ModelSpec("local:tiny-llama"))
    start.configure_model()
    assert any(not torch.equal(p, a["policy." + n]) for n, p in start.policy.named_parameters())  # it trained


def test_fused_adamw_is_the_fused_kernel_and_trains_the_same_weights_to_rounding_in_backward_too():
    plain, _, plain_losses = _fit_dpo(False)
    fused, trainer, losses = _fit_dpo(False, fused_adamw=True)
    fused_in_backward, trainer_ib, losses_ib = _fit_dpo(True, fused_adamw=True)
    assert trainer.optimizers[0].defaults["fused"] is True
    assert isinstance(trainer_ib.optimizers[0], AdamWInBackward) and trainer_ib.optimizers[0].defaults["fused"] is True
    assert trainer_ib.optimizers[0].updates > 0
    a, b, c = (dict(m.named_parameters()) for m in (plain, fused, fused_in_backward))
    assert all(torch.allclose(a[n], b[n], rtol=0, atol=1e-5) for n in a)  # AdamW's update, another kernel
    assert all(torch.equal(b[n], c[n]) for n in b)  # in the backward pass: the fused kernel per weight, the same
    assert all(torch.equal(x, y) for x, y in zip(losses, losses_ib, strict=True)) and len(plain_losses) == 3


@pytest.mark.parametrize(("trainer_kw", "message"), [
    ({"gradient_clip_val": 1.0}, "gradient_clip_val (1.0): the global norm needs every gradient (set trainer."),
    ({"accumulate_grad_batches": 2}, "accumulate_grad_batches (2)"),
    ({"callbacks": [L.pytorch.callbacks.GradientAccumulationScheduler({0: 2})]}, "accumulate_grad_batches (2)"),
])
def test_set_ups_that_need_every_gradient_before_the_step_are_refused(trainer_kw, message, monkeypatch):
    loads = []
    real = DPOModule.load_policy
    monkeypatch.setattr(DPOModule, "load_policy", lambda self: loads.append(1) or real(self))
    with pytest.raises(AmrlhfError, match="optimizer_in_backward") as err:
        _fit_dpo(True, **trainer_kw)
    assert message in str(err.value)
    # refused before the policy loads, but where the accumulation is set per epoch, only once it is
    assert loads == ([1] if "callbacks" in trainer_kw else [])


def test_multi_device_strategies_and_a_gradient_scaler_are_refused(monkeypatch):
    module = DPOModule(ModelSpec("local:tiny-llama"), optimizer_in_backward=True)
    stub = SimpleNamespace(gradient_clip_val=None, accumulate_grad_batches=1, world_size=2, strategy=object(),
                           precision="16-mixed")
    monkeypatch.setattr(DPOModule, "trainer", property(lambda self: stub))
    with pytest.raises(AmrlhfError) as err:
        module.check_optimizer_in_backward()
    assert "the object strategy: a weight would be updated before its gradient is reduced" in str(err.value)
    assert "precision 16-mixed" in str(err.value)


def test_a_failed_fit_takes_its_hooks_along_and_a_second_fit_trains_as_the_first():
    class Boom(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom")

    L.seed_everything(0, verbose=False)
    module = DPOModule(ModelSpec("local:tiny-llama"), reference=FrozenReference(), segmenter=SampleWiseSegmenter(),
                       lr=1e-3, optimizer_in_backward=True)
    dm = PreferenceDataModule("local:tiny-arith/prefs_train", tokenizer="local:tiny-llama", max_length=64,
                              batch_size=2, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, datamodule=dm)
    first = trainer.optimizers[0]
    assert first.updates > 0 and not first.attached and module._in_backward is None  # detached at the failure
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    second = trainer.optimizers[0]
    assert second is not first and second.updates == first.updates * 2  # 1 step, then 2: the new optimizer's own


def test_grpo_trains_the_same_weights_bit_for_bit_and_refuses_gradient_clipping(letters):
    with pytest.raises(ConfigError, match=r"max_grad_norm \(1.0\).*max_grad_norm: null"):
        letters_grpo(letters, optimizer_in_backward=True)
    a = letters_grpo(letters, max_grad_norm=None)
    b = letters_grpo(letters, max_grad_norm=None, optimizer_in_backward=True)
    ra, rb = fit_grpo(a, letters, rollouts=2), fit_grpo(b, letters, rollouts=2)
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_ppo_with_a_critic_on_its_own_backbone_trains_the_same_weights_bit_for_bit(letters):
    """Two backward passes per mini-batch (the policy's, then the critic's): each updates its own weights."""
    def build(**kw):
        torch.manual_seed(0)
        return letters_ppo(letters, critic=ValueModel(ModelSpec(str(letters[0]))), ppo_epochs=1, max_grad_norm=None,
                           **kw)

    a, b = build(), build(optimizer_in_backward=True)
    ra, rb = fit_ppo(a, letters, rollouts=2), fit_ppo(b, letters, rollouts=2)
    assert [r["loss/value_avg"] for r in ra] == [r["loss/value_avg"] for r in rb]
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert any(n.startswith("critic.") for n in pa) and any(n.startswith("policy.") for n in pa)


@pytest.mark.parametrize("in_backward", [False, True])
def test_a_resumed_fit_keeps_the_modules_adamw_kernel(in_backward):
    """torch restores `fused` from the checkpoint's state dict; the module's own setting must win, so that a fit
    resumed from a checkpoint runs the kernel it was configured with (and an interrupted fit equals an
    uninterrupted one)."""
    module = DPOModule(ModelSpec("local:tiny-llama"), fused_adamw=True, optimizer_in_backward=in_backward)
    module.configure_model()
    opt = module.configure_optimizers()
    plain = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in module.parameters()])
    for p in plain.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the default kernel's step counters take it; the fused kernel's float32
    try:
        plain.step()
    finally:
        torch.set_default_dtype(default_dtype)
    opt.load_state_dict(plain.state_dict())  # a checkpoint written by the default kernel
    assert all(g["fused"] is True for g in opt.param_groups)
    assert {s["step"].dtype for s in opt.state.values()} == {torch.float32}  # placed as the fused kernel needs them
    back = DPOModule(ModelSpec("local:tiny-llama"), optimizer_in_backward=in_backward)
    back.configure_model()
    default = back.configure_optimizers()
    default.load_state_dict(opt.state_dict())  # and the other way round
    assert all(g["fused"] is None for g in default.param_groups)


def test_a_fit_resumed_from_a_checkpoint_runs_the_fused_kernel_it_was_configured_with(tmp_path):
    _fit_dpo(False, steps=2, enable_checkpointing=True, default_root_dir=tmp_path)  # the default kernel's state
    (ckpt,) = tmp_path.rglob("*.ckpt")
    _, trainer, losses = _fit_dpo(False, steps=3, fused_adamw=True, ckpt_path=str(ckpt))
    assert len(losses) == 1 and all(g["fused"] is True for g in trainer.optimizers[0].param_groups)


def record_clipping(monkeypatch) -> list[tuple[float, float, float, int]]:
    """Every `torch.nn.utils.clip_grad_norm_` call from now on (Lightning's precision plugins make it): (max_norm,
    the gradients' norm before, their norm after, the number of weights passed)."""
    real, seen = torch.nn.utils.clip_grad_norm_, []

    def spy(params, max_norm, *a, **k):
        params = list(params)
        before = real(params, max_norm, *a, **k)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params
                                                      if p.grad is not None]))
        seen.append((max_norm, float(before), float(after), len(params)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    return seen


def test_fused_adamw_clips_under_bf16_mixed_where_lightning_would_refuse(monkeypatch):
    """Lightning's mixed-precision plugin refuses to clip for an optimizer that can unscale gradients itself (the
    fused kernel declares it), a GradScaler's concern bf16-mixed does not have: the module's fused AdamW takes
    unscaled gradients, so the plugin clips, over the optimizer's weights."""
    seen = record_clipping(monkeypatch)
    module, trainer, losses = _fit_dpo(False, steps=2, fused_adamw=True, precision="bf16-mixed",
                                       gradient_clip_val=1e-3)
    n_weights = sum(1 for p in module.parameters() if p.requires_grad)
    assert len(losses) == 2 and len(seen) == 2
    assert all(before > 1e-3 and after <= 1e-3 * (1 + 1e-4) and n == n_weights for _, before, after, n in seen)


def test_fused_adamw_under_a_gradient_scaler_takes_unscaled_gradients_clipped_through_lightning():
    """16-mixed (a GradScaler; a CPU Trainer turns it into bf16-mixed, so the plugin and the scaler by hand, in the
    order of the plugin's optimizer_step): the scaler unscales, Lightning's plugin clips (it refused to for the
    fused kernel), the scaler steps; the weights are the fused step's on the true, clipped gradients."""
    from lightning.pytorch.plugins.precision import MixedPrecision
    from lightning.pytorch.utilities import GradClipAlgorithmType

    def start():
        return [torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(i))) for i in range(2)]

    module = DPOModule(ModelSpec("local:tiny-llama"), fused_adamw=True, lr=1e-2)
    scaled, plain = start(), start()
    opt, ref = module.adamw(scaled), module.adamw(plain)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(sum((w ** 2).sum() for w in scaled)).backward()
    scaler.unscale_(opt)
    MixedPrecision("16-mixed", "cpu", scaler=scaler).clip_gradients(opt, 0.5, GradClipAlgorithmType.NORM)
    scaler.step(opt)
    sum((w ** 2).sum() for w in plain).backward()
    torch.nn.utils.clip_grad_norm_(plain, 0.5)
    ref.step()
    assert all(torch.equal(a, b) for a, b in zip(scaled, plain, strict=True))
    assert not torch.equal(plain[0], start()[0])  # it stepped


def test_grpo_with_fused_adamw_clips_by_max_grad_norm_under_bf16_mixed(letters, monkeypatch):
    """The manual-optimization path (GRPO's `self.clip_gradients`) through the same Lightning plugin."""
    seen = record_clipping(monkeypatch)
    module = letters_grpo(letters, fused_adamw=True, max_grad_norm=0.5)
    model, path = letters
    L.seed_everything(0, verbose=False)
    dm = PromptDataModule(train=str(path), tokenizer=str(model), max_length=8, batch_size=4)
    L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=module.steps_per_rollout(module.rows_per_rollout(4)),
              logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, dm)
    assert len(seen) == module.steps_per_rollout(module.rows_per_rollout(4)) and {m for m, *_ in seen} == {0.5}
    assert all(g["fused"] is True for g in module.trainer.optimizers[0].param_groups)


def test_on_policy_clipping_under_a_gradient_scaler_clips_the_true_gradients():
    """GRPO and PPO clip before `opt.step()`, where Lightning unscales under 16-mixed: the gradients are still
    scaled, so the threshold is scaled with them; clipping then unscaling equals unscaling then clipping."""
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert clip_threshold(0.5, MixedPrecision("16-mixed", "cpu", scaler=scaler)) == 512.0
    assert clip_threshold(0.5, MixedPrecision("bf16-mixed", "cpu")) == 0.5 == clip_threshold(0.5, Precision())
    true = [torch.randn(5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    scaled = [g * 1024.0 for g in true]
    a = [torch.nn.Parameter(torch.zeros(5)) for _ in true]
    b = [torch.nn.Parameter(torch.zeros(5)) for _ in true]
    for p, g in zip(a, true, strict=True):
        p.grad = g.clone()
    for p, s in zip(b, scaled, strict=True):
        p.grad = s.clone()
    torch.nn.utils.clip_grad_norm_(a, 0.5)
    torch.nn.utils.clip_grad_norm_(b, clip_threshold(0.5, MixedPrecision("16-mixed", "cpu", scaler=scaler)))
    assert all(torch.allclose(p.grad, q.grad / 1024.0, rtol=1e-6, atol=0) for p, q in zip(a, b, strict=True))


def test_grpo_clips_at_the_threshold_clip_threshold_gives(letters, monkeypatch):
    seen = record_clipping(monkeypatch)
    monkeypatch.setattr(onpolicy, "clip_threshold", lambda max_norm, plugin: 0.123)
    module = letters_grpo(letters, max_grad_norm=0.5)
    rows = fit_grpo(module, letters, rollouts=1)
    assert rows and seen and {m for m, *_ in seen} == {0.123}
