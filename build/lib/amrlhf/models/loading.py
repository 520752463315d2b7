"""Model and tokenizer loading.

A model name is a hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`), a local HF folder, a `.gguf`
file (dequantised on load), or a prepared asset id (`local:smollm2-135m-instruct`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from amrlhf.assets import resolve_local
from amrlhf.errors import AmrlhfError
from amrlhf.paths import LOCAL_PREFIX, is_local_id

log = logging.getLogger(__name__)


@dataclass
class LoraSpec:
    """LoRA adapters via peft. With LoRA, the DPO reference can be the base with adapters disabled."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


@dataclass
class ModelSpec:
    """Which model to load and how.

    name: hub id, local HF folder, `.gguf` file, or `local:ID`.
    dtype: `auto` = float32, for a trained model and a frozen one (a reference, a scorer) alike: bf16
        compute comes from `trainer.precision: bf16-mixed`, whose autocast the frozen models' forward
        passes share, so the default reference computes exactly what the initial policy computes. Or
        `float32` / `bfloat16` / `float16`: `bfloat16` on a frozen model is the explicit opt-in to
        half-size weights (its log-probs then differ from the fp32 policy's at step 0).
    disable_dropout: every dropout of the model off (default, as TRL does): each `nn.Dropout` (LoRA's
        too) at p=0 and the probabilities read from config fields and layer attributes (`attention_dropout`,
        `hidden_dropout`, ...) at 0, so a training-mode forward pass computes what an eval-mode one does:
        PPO's ratio compares update-time log-probs (train mode) with rollout-time ones (eval mode), and
        DPO's policy is compared with an eval-mode reference. `false` keeps the checkpoint's dropout (and
        LoRA's `dropout`) as a regulariser, at the price of those mismatches. The config saved by
        `amrlhf export` then carries the zeros the model was trained with.
    """

    name: str
    dtype: str = "auto"
    lora: LoraSpec | None = None
    gradient_checkpointing: bool = False
    revision: str | None = None
    tokenizer: str | None = None
    extra: dict = field(default_factory=dict)
    disable_dropout: bool = True


def resolve_model(name: str) -> tuple[str, str | None]:
    """-> (path or hub id, gguf file name or None)."""
    if is_local_id(name):
        root = resolve_local(name, "model")
        ggufs = sorted(p.name for p in root.glob("*.gguf"))
        if (root / "config.json").exists() or not ggufs:
            return str(root), None
        return str(root), ggufs[0]
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise AmrlhfError(f"model file not found: {path}")
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if name.startswith((".", "/", "~")) or path.suffix in {".ckpt", ".pt", ".safetensors"}:
        raise AmrlhfError(f"model path not found: {name}")
    return name, None  # a hub id


def torch_dtype(dtype: str) -> torch.dtype:
    """`auto`: float32 on every device, for a model that trains (its weights are the optimizer's master copy:
    use `trainer.precision: bf16-mixed` for bf16 compute on a GPU; pure-bf16 weights lose small updates)
    and for a frozen one (the same weights dtype under the same autocast as the policy); other dtypes
    only when named."""
    if dtype == "auto":
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise AmrlhfError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16") from None


def load_error(what: str, name: str, exc: Exception) -> str:
    """One line for a model or tokenizer that did not load: a prepared asset names the command that
    rebuilds it, a local folder says whether it is a model folder at all, a hub id suggests offline use."""
    why = f"{exc.__class__.__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    if is_local_id(name):
        asset = name[len(LOCAL_PREFIX):].partition("/")[0]
        return f"could not load {what} '{name}' ({why}): the asset may be damaged; run `amrlhf prepare {asset} --force`"
    path = Path(name).expanduser()
    if path.exists():
        folder = path if path.is_dir() else path.parent
        if not (folder / "config.json").exists() and path.suffix != ".gguf":
            return f"{name} is not a Hugging Face model folder (it has no config.json): could not load {what} ({why})"
        return f"could not load {what} from {name} ({why})"
    return (f"could not load {what} '{name}': {why}. "
            "Offline? Use a prepared copy (`amrlhf prepare`, then `local:...`) or a local folder.")


def _hub_call(what: str, name: str, fn, *args, **kwargs):
    from safetensors import SafetensorError

    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:  # missing, truncated or foreign files
        raise AmrlhfError(load_error(what, name, exc)) from exc


def load_tokenizer(name: str, revision: str | None = None):
    """A tokenizer with a pad token. Masks never derive from the pad id (they come from
    lengths), so pad == eos cannot break them; padding is done by our collator."""
    from transformers import AutoTokenizer

    path, gguf = resolve_model(name)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tok = _hub_call("tokenizer", name, AutoTokenizer.from_pretrained, path, revision=revision, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
        log.info("tokenizer %s has no pad token: using %r (masks come from lengths)", name, tok.pad_token)
    return tok


DROPOUTS = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
            torch.nn.FeatureAlphaDropout)


def _is_dropout_field(name: str, value) -> bool:
    return ("dropout" in name or "pdrop" in name) and isinstance(value, float)


def disable_dropout(model) -> None:
    """Every dropout of `model` off: dropout modules at p=0, and the probabilities that layers read from their
    own attributes (Llama's `attention_dropout`, copied from the config at construction) or from the config
    at 0 (nested configs included)."""
    for module in model.modules():
        if isinstance(module, DROPOUTS):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_dropout_field(name, value):
                setattr(module, name, 0.0)
    configs = [getattr(model, "config", None)]
    while configs:
        config = configs.pop()
        if config is None or not hasattr(config, "to_dict"):
            continue
        for name, value in list(vars(config).items()):
            if _is_dropout_field(name, value):
                setattr(config, name, 0.0)
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config (text_config, ...)
                configs.append(value)


def _finish(model, spec: ModelSpec, trainable: bool):
    # from_pretrained returns eval mode; trainable models start in train mode, frozen ones stay in eval mode
    model.train(trainable)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if spec.lora is not None:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=spec.lora.r,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            target_modules=spec.lora.target_modules,
            task_type=None,
            # a reward model's fresh scalar head must train in full, not stay random under LoRA
            modules_to_save=["score"] if hasattr(model, "score") else None,
        )
        if spec.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, cfg)
    if spec.disable_dropout:
        disable_dropout(model)
    if not trainable:
        model.requires_grad_(False)
    return model


def load_causal_lm(spec: ModelSpec, trainable: bool = True):
    """The model of `spec`, in train mode; `trainable=False`: frozen (eval mode, no gradients)."""
    from transformers import AutoModelForCausalLM

    path, gguf = resolve_model(spec.name)
    kwargs = {"gguf_file": gguf} if gguf else {}
    log.info("loading causal LM %s (%s)", spec.name, "gguf, dequantised" if gguf else "HF weights")
    model = _hub_call(
        "model", spec.name, AutoModelForCausalLM.from_pretrained, path,
        dtype=torch_dtype(spec.dtype), revision=spec.revision, **kwargs, **spec.extra,
    )
    return _finish(model, spec, trainable)


def load_reward_model(spec: ModelSpec, trainable: bool = True):
    """A scalar head on every position: `AutoModelForTokenClassification(num_labels=1)`.

    One forward pass gives the prefix score s_t at every token (docs/method.md); the sequence score is
    the head's output at the last response token. Loaded from a causal-LM checkpoint, the head is
    new (randomly initialised); loaded from a saved reward model, it is restored.
    """
    from transformers import AutoConfig, AutoModelForTokenClassification

    path, gguf = resolve_model(spec.name)
    kwargs = {"gguf_file": gguf} if gguf else {}
    config = _hub_call("reward model config", spec.name, AutoConfig.from_pretrained, path, revision=spec.revision,
                       **kwargs)
    config.num_labels, config.classifier_dropout = 1, 0.0
    model = _hub_call(
        "reward model", spec.name, AutoModelForTokenClassification.from_pretrained, path, config=config,
        dtype=torch_dtype(spec.dtype), revision=spec.revision, **kwargs, **spec.extra,
    )
    return _finish(model, spec, trainable)
