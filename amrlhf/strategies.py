"""Sharded training: `trainer.strategy: {class_path: amrlhf.strategies.FSDP}` in any SFT, reward-model or DPO
recipe (recipes/dpo/smollm2_fsdp.yaml; docs/fsdp.md).

`FSDP` is Lightning's FSDPStrategy with what a recipe would otherwise spell out:
- auto-wrap on the policy's decoder layer class, resolved from the loaded policy (`layer: auto`: the class of
  its longest list of identical layers, `LlamaDecoderLayer` for SmolLM2) or named (`layer: Qwen2DecoderLayer`);
  the embeddings, final norm and head stay in the root unit (tied embeddings stay tied);
- activation checkpointing on those layers (`activation_checkpointing: true`);
- mixed precision that keeps the single-device `bf16-mixed` numerics: the trainer's autocast does the bf16
  compute, FSDP gathers `param_dtype` weights (float32 by default, so the frozen reference and the scorers,
  which FSDP does not wrap, compute what the initial policy computes) and reduces gradients in float32;
- gradient clipping by norm (`gradient_clip_val`), which Lightning's FSDP precision plugin refuses, through
  the root module's `clip_grad_norm_` (the norm over every rank's shards);
- full (rank-0, one-file) checkpoints only, loaded with the same one-line errors as CheckedCheckpointIO.

Set-ups it cannot run end as one `error:` line before any model is loaded: no CUDA accelerator, PPO / GRPO,
BestOfN rejection sampling, LoRA, the `LmEval` callback, `state_dict_type: sharded`, and activation checkpointing
together with the policy's own `gradient_checkpointing`.

The frozen reference and the scorers are not submodules of the LightningModule (amrlhf/modules/reference.py),
so FSDP never sees them: each rank holds a full replica on its GPU, in the dtype its ModelSpec names.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from amrlhf.errors import AmrlhfError, ConfigError

log = logging.getLogger(__name__)

PARAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")


def repeated_layers(model: nn.Module) -> nn.ModuleList | None:
    """The longest `nn.ModuleList` of `model` whose elements all share one class (a transformer's decoder
    layers: `model.layers` of Llama / Qwen2, `transformer.h` of GPT-2); None if there is none."""
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    return best


def decoder_layer_class(model: nn.Module, name: str = "auto") -> type[nn.Module]:
    """The layer class FSDP wraps (and checkpoints): `auto` = the class of the policy's repeated layers;
    otherwise the module class of that name (a dotted path's last part) found in the policy."""
    layers = repeated_layers(model)
    if name == "auto":
        if layers is None:
            raise AmrlhfError(f"FSDP: {type(model).__name__} has no list of identical layers to wrap: "
                              "name the layer class with trainer.strategy.init_args.layer")
        return type(layers[0])
    short = name.rsplit(".", 1)[-1]
    classes = {type(m).__name__: type(m) for m in model.modules()}
    if short not in classes:
        found = f"; its repeated layer is {type(layers[0]).__name__}" if layers is not None else ""
        raise AmrlhfError(f"FSDP layer '{name}' is not a module class of {type(model).__name__}{found} "
                          "(use layer: auto)")
    return classes[short]


def needs_cuda(accelerator) -> str:
    """Why FSDP cannot run on `accelerator` (a one-line message)."""
    where = type(accelerator).__name__.replace("Accelerator", "").lower() or "this accelerator"
    seen = "no CUDA device is visible" if not torch.cuda.is_available() else f"the trainer chose {where}"
    return (f"FSDP (amrlhf.strategies.FSDP) needs CUDA devices, but {seen} (accelerator {where}): run it on a GPU "
            "machine with trainer.accelerator auto or cuda; here drop trainer.strategy "
            "(or use --trainer.strategy=ddp for several CPU processes)")


def unsupported(module, trainer, checkpoint_layers: bool) -> str | None:
    """Why this module / trainer set-up cannot train under FSDP (None when it can). Checked before the policy
    is loaded."""
    from amrlhf.callbacks import LmEval
    from amrlhf.modules import OnPolicyModule

    name = type(module).__name__
    if isinstance(module, OnPolicyModule):
        return (f"FSDP trains SFT, reward models and DPO; {name} generates rollouts with the policy, which FSDP "
                "shards: use DDP (--trainer.strategy=ddp)")
    if getattr(module, "rollout", None) is not None:
        return f"FSDP: {name} with rollout (BestOfN) samples from the sharded policy, not yet supported: use DDP"
    spec = getattr(module, "policy_spec", None)
    if spec is not None and spec.lora is not None:
        return ("FSDP with a LoRA policy is not supported: its checkpoints keep the trainable weights by parameter "
                "name, which FSDP's wrapping changes; use DDP, or drop the model's lora")
    if spec is not None and spec.gradient_checkpointing and checkpoint_layers:
        return ("FSDP: both the policy's gradient_checkpointing and the strategy's activation_checkpointing are on "
                "(each layer would be recomputed twice): set one of them to false")
    if trainer is not None and any(isinstance(c, LmEval) for c in trainer.callbacks):
        return ("FSDP: the LmEval callback evaluates the in-memory policy, which FSDP shards: drop it and run "
                "`amrlhf eval` on the exported checkpoint")
    return None


class ClippingFSDPPrecision(FSDPPrecision):
    """Lightning's FSDP precision plugin, with clipping by norm through the root FSDP module (set by the
    strategy once it has wrapped the model): `FSDP.clip_grad_norm_` computes the norm over every rank's shards,
    where `torch.nn.utils.clip_grad_norm_` would see this rank's shard only."""

    root = None

    def clip_grad_by_norm(self, optimizer, clip_val) -> None:
        if self.root is None:
            super().clip_grad_by_norm(optimizer, clip_val)  # Lightning's error: no root module to clip through
            return
        self.root.clip_grad_norm_(clip_val)


class FSDP(FSDPStrategy):
    """Lightning's FSDPStrategy set up for amrlhf's policies (module docstring)."""

    def __init__(self, layer: str = "auto", activation_checkpointing: bool = True, sharding_strategy: str = "FULL_SHARD",
                 param_dtype: str = "float32", state_dict_type: str = "full", cpu_offload: bool = False):
        """
        Args:
            layer: the decoder layer class each FSDP unit wraps: `auto` (the policy's repeated layer) or a class
                name (`LlamaDecoderLayer`, `Qwen2DecoderLayer`, ...).
            activation_checkpointing: recompute each wrapped layer in the backward pass (the policy's own
                `gradient_checkpointing` must then be off).
            sharding_strategy: FULL_SHARD (parameters, gradients and optimizer state), SHARD_GRAD_OP, NO_SHARD
                or HYBRID_SHARD.
            param_dtype: dtype of the gathered weights: float32 (default: the numerics of a single-device
                `bf16-mixed` run) or bfloat16 (half the all-gather traffic and gathered-layer memory; the policy
                then computes slightly differently from a float32 reference at step 0).
            state_dict_type: `full` only: one checkpoint file gathered on rank 0, what resume, `amrlhf export`,
                the interrupt handler and the MLflow copy of the final weights read and write.
            cpu_offload: keep parameters and gradients on the CPU between uses (slower; less GPU memory).
        """
        if state_dict_type != "full":
            raise ConfigError(f"FSDP state_dict_type '{state_dict_type}' is not supported: amrlhf's resume, export, "
                              "interrupt checkpoint and MLflow weights expect one file; use state_dict_type: full")
        if param_dtype not in PARAM_DTYPES:
            raise ConfigError(f"FSDP param_dtype must be one of {sorted(PARAM_DTYPES)}, got '{param_dtype}'")
        if sharding_strategy not in SHARDING:
            raise ConfigError(f"FSDP sharding_strategy must be one of {', '.join(SHARDING)}, got '{sharding_strategy}'")
        from torch.distributed.fsdp import MixedPrecision

        mixed = MixedPrecision(param_dtype=PARAM_DTYPES[param_dtype], reduce_dtype=torch.float32,
                               buffer_dtype=torch.float32)
        super().__init__(mixed_precision=mixed, sharding_strategy=sharding_strategy, state_dict_type="full",
                         cpu_offload=cpu_offload)
        self.layer, self.checkpoint_layers, self.param_dtype = layer, activation_checkpointing, param_dtype

    @property
    def accelerator(self):
        return self._accelerator

    @accelerator.setter
    def accelerator(self, accelerator) -> None:
        # Lightning sets it while building the Trainer: refusing here stops before any model is loaded
        if accelerator is not None and not isinstance(accelerator, CUDAAccelerator):
            raise ConfigError(needs_cuda(accelerator))
        self._accelerator = accelerator

    @property
    def precision_plugin(self) -> FSDPPrecision:
        return FSDPStrategy.precision_plugin.fget(self)

    @precision_plugin.setter
    def precision_plugin(self, plugin) -> None:
        if plugin is not None and type(plugin) is FSDPPrecision:
            plugin = ClippingFSDPPrecision(plugin.precision, plugin.scaler)
        FSDPStrategy.precision_plugin.fset(self, plugin)

    def setup_environment(self) -> None:
        module = self.lightning_module
        why = unsupported(module, getattr(module, "_trainer", None), self.checkpoint_layers)
        if why:
            raise AmrlhfError(why)
        super().setup_environment()

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy = getattr(model, "policy", None)
        cls = decoder_layer_class(policy if policy is not None else model, self.layer)
        log.info("FSDP: wrapping each %s%s; gathered weights in %s", cls.__name__,
                 " (activation checkpointing)" if self.checkpoint_layers else "", self.param_dtype)
        self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy({cls})
        if self.checkpoint_layers:
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": ModuleWrapPolicy({cls})}
        root = super()._setup_model(model)
        if isinstance(self.precision_plugin, ClippingFSDPPrecision):
            self.precision_plugin.root = root
        return root

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """FSDPStrategy reads the file itself (not through the checkpoint IO): a missing or unreadable file is
        reported as one line, as CheckedCheckpointIO reports it without FSDP."""
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():
            raise AmrlhfError(f"checkpoint not found: {path}")
        try:
            return super().load_checkpoint(path, weights_only=weights_only)
        except Exception as exc:
            line = (str(exc).strip().splitlines() or [""])[0]
            raise AmrlhfError(f"{path}: not a readable checkpoint for this run, damaged, incomplete or of another "
                              f"model ({type(exc).__name__}: {line}); use another checkpoint, or start again without "
                              "--ckpt_path") from None
