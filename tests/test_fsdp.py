"""amrlhf.strategies.FSDP on a CPU machine: what it wraps, what it refuses (one `error:` line, before any model is
loaded), its clipping and checkpoint-error paths. A sharded run, its checkpoints and exact resume need CUDA
devices: docs/fsdp.md says how to run them and that they have not been run yet."""

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import ROOT, amrlhf, recipe
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.plugins.precision import FSDPPrecision

from amrlhf.errors import AmrlhfError, ConfigError
from amrlhf.models import LoraSpec, ModelSpec, load_causal_lm, load_reward_model
from amrlhf.modules import DPOModule, GRPOModule, SFTModule
from amrlhf.strategies import FSDP, ClippingFSDPPrecision, decoder_layer_class, unsupported

TINY = ModelSpec("local:tiny-llama")
SWITCH = "--trainer.strategy.class_path=amrlhf.strategies.FSDP"


def test_the_wrapped_layer_is_the_policys_decoder_layer():
    lm, rm = load_causal_lm(TINY), load_reward_model(TINY)
    assert decoder_layer_class(lm).__name__ == decoder_layer_class(rm).__name__ == "LlamaDecoderLayer"
    assert decoder_layer_class(lm, "LlamaDecoderLayer") is decoder_layer_class(lm)
    assert decoder_layer_class(lm, "transformers.models.llama.modeling_llama.LlamaDecoderLayer") is type(lm.model.layers[0])
    with pytest.raises(AmrlhfError, match="'Qwen2DecoderLayer' is not a module class of LlamaForCausalLM; its repeated "
                                          "layer is LlamaDecoderLayer"):
        decoder_layer_class(lm, "Qwen2DecoderLayer")
    with pytest.raises(AmrlhfError, match="no list of identical layers"):
        decoder_layer_class(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kwargs,message", [
    ({"state_dict_type": "sharded"}, "state_dict_type 'sharded' is not supported"),
    ({"param_dtype": "float16"}, "param_dtype must be one of"),
    ({"sharding_strategy": "ZERO3"}, "sharding_strategy must be one of"),
])
def test_settings_it_cannot_honour_are_refused_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FSDP(**kwargs)


def test_mixed_precision_keeps_float32_reductions_and_buffers():
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        mp = FSDP(param_dtype=name).mixed_precision_config
        assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (dtype, torch.float32, torch.float32)


def test_a_cpu_accelerator_is_refused_with_one_line():
    with pytest.raises(ConfigError, match=r"FSDP \(amrlhf.strategies.FSDP\) needs CUDA devices"):
        FSDP().accelerator = CPUAccelerator()


def test_clipping_by_norm_goes_through_the_root_module():
    strategy = FSDP()
    strategy.precision_plugin = FSDPPrecision("bf16-mixed")
    plugin = strategy.precision_plugin
    assert isinstance(plugin, ClippingFSDPPrecision) and plugin.precision == "bf16-mixed"
    calls = []
    plugin.root = SimpleNamespace(clip_grad_norm_=calls.append)
    plugin.clip_gradients(None, clip_val=0.5)
    assert calls == [0.5]


def test_a_missing_or_damaged_checkpoint_is_one_line(tmp_path):
    strategy = FSDP()
    with pytest.raises(AmrlhfError, match="checkpoint not found"):
        strategy.load_checkpoint(tmp_path / "missing.ckpt")
    damaged = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(4096)}}, damaged)
    damaged.write_bytes(damaged.read_bytes()[:2000])
    strategy.model, strategy._lightning_module = torch.nn.Linear(2, 2), L.LightningModule()
    with pytest.raises(AmrlhfError, match="not a readable checkpoint"):
        strategy.load_checkpoint(damaged)


def test_setups_fsdp_cannot_train_are_named():
    def why(module, checkpoint_layers=True, callbacks=()):
        return unsupported(module, SimpleNamespace(callbacks=list(callbacks)), checkpoint_layers)

    from amrlhf.callbacks import LmEval

    assert why(DPOModule(TINY)) is None and why(SFTModule(TINY)) is None
    assert "generates rollouts" in why(GRPOModule.__new__(GRPOModule))
    assert "BestOfN" in why(SimpleNamespace(rollout=object(), policy_spec=TINY))
    assert "LoRA" in why(DPOModule(ModelSpec("local:tiny-llama", lora=LoraSpec())))
    checkpointed = SFTModule(ModelSpec("local:tiny-llama", gradient_checkpointing=True))
    assert "recomputed twice" in why(checkpointed) and why(checkpointed, checkpoint_layers=False) is None
    assert "LmEval" in why(DPOModule(TINY), callbacks=[LmEval.__new__(LmEval)])


@pytest.mark.parametrize("path", ["recipes/sft/smollm2.yaml", "recipes/rm/smollm2.yaml", "recipes/dpo/smollm2.yaml"])
def test_the_switch_parses_for_sft_reward_model_and_dpo(path, capsys, monkeypatch):
    from amrlhf.lightning_cli import AmrlhfCLI

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        AmrlhfCLI(args=["fit", "--config", path, SWITCH, "--trainer.strategy.init_args.layer=LlamaDecoderLayer",
                        "--print_config"])
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: amrlhf.strategies.FSDP" in out and "layer: LlamaDecoderLayer" in out


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the recipe would start training")
@pytest.mark.parametrize("config,args", [(str(ROOT / "recipes" / "dpo" / "smollm2_fsdp.yaml"), []),
                                         (recipe("sft"), [SWITCH]), (recipe("rm"), [SWITCH])],
                         ids=["dpo-fsdp-recipe", "sft-switch", "rm-switch"])
def test_fsdp_on_a_cpu_machine_is_one_error_line_before_any_model_loads(tmp_path: Path, config, args):
    proc = amrlhf("fit", "--config", config, "--runs_root", str(tmp_path / "runs"), *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "loading causal LM" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: trainer: FSDP (amrlhf.strategies.FSDP) needs CUDA "
                                                     "devices, but no CUDA device is visible"), proc.stderr[-3000:]
