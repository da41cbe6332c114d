"""Kind ``hf-causal-lm``: a Hugging Face causal LM, fully fine-tuned or with LoRA adapters.

    DATADIET_MODEL=hf-causal-lm
    DATADIET_MODEL_CONFIG='{"path": "/models/SmolLM2-135M-Instruct", "lora": {"r": 8, "alpha": 16}}'

Needs ``pip install 'datadiet[hf]'`` (transformers, peft, gguf); the core imports without it: transformers
is imported when a model of this kind is built. Nothing is downloaded: every load is local
(``local_files_only``, ``HF_HUB_OFFLINE=1``).

Config (``DATADIET_MODEL_CONFIG``; exactly one of ``path`` and ``config``):
    path        a local directory holding any ``AutoModelForCausalLM`` checkpoint and its tokenizer
    gguf_file   a GGUF file inside ``path`` (optional). Converted once to safetensors under
                ``<DATADIET_DATA_DIR>/models/gguf-<sha256 of the file>/`` (dequantized, float32), so later
                loads read that copy in about a second instead of dequantizing again
    config      a transformers config dict (``{"model_type": "llama", ...}``) for a randomly initialised
                model (tests); its initial weights are a function of the config alone (seed 0), so a LoRA
                checkpoint over it can be checked against its base
    tokenizer   a local tokenizer directory (default: the model's; required with ``config``)
    lora        ``{"r": 8, "alpha": 16, "target_modules": [...], "dropout": 0.0}`` (PEFT; LoRA: Hu et al.
                2021, arXiv:2106.09685; target_modules null: PEFT's default for the architecture), or null
                for full fine-tuning
    max_length  tokens per sample, prompt and target together (default 512; at most the model's context)
    dtype       the base weights' dtype: "auto" (bfloat16 for a LoRA model's frozen base when CUDA is
                available, else float32: fully fine-tuned weights stay float32, as AdamW's small steps would
                be lost in bfloat16; the trainer's bf16 autocast runs the matmuls in bf16 either way),
                "float32", "bfloat16", "float16". LoRA adapters stay float32 (PEFT's autocast_adapter_dtype)

Samples. ``input`` is a string or a conversation: a list of ``{"role": "system"|"user"|"assistant"|"tool",
"content": str}`` messages (a string is one user message). The tokenizer's chat template renders it with
``add_generation_prompt=True``; the tokens of ``target`` and then EOS follow, and the loss covers those only
(labels -100 on the prompt and padding). A tokenizer without a chat template renders a string as itself
and a conversation as one ``"<role>: <content>\\n"`` line per message followed by ``"assistant: "``.

Truncation, with L = max_length and n_t = target tokens + EOS: the prompt keeps its last
min(len, max(L - n_t, L // 2)) tokens (its start, e.g. a long system prompt, is what goes), and the target
keeps what fits after it: a target longer than the room is cut on the right and gets no EOS (it did not end
there), but it keeps at least L - L // 2 tokens, so never goes entirely. ``predict`` keeps the prompt's last
L - L // 4 tokens and generates greedily until EOS or L tokens in all.

Scored layers (trainer/hypergrad.py): with LoRA the adapters' ``lora_A`` and ``lora_B`` Linear layers (the
base is frozen); with full fine-tuning every ``nn.Linear`` and GPT-2 ``Conv1D`` whose weight trains. An
output head tied to the input embedding is scored as one matrix, both its uses (``hypergrad.TiedEmbedding``);
other embeddings (GPT-2's positions) and the norms' gains are trained but not scored.

Checkpoints (trainer/checkpoint.py): full fine-tuning stores every tensor; with LoRA only the adapter
weights, and the header names the base (``datadiet.base_path``) and ``datadiet.base_sha256``, the sha256 of
the base model's state dict as loaded (``checkpoint.tensors_sha256``: sorted names, dtype, shape, bytes).
Loading rebuilds the base from the config's path and refuses a base whose hash differs.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.base import Batch, ModelNotFound, TrainModel, check_int, resolve_config, sample_values

logger = logging.getLogger(__name__)

KIND = "hf-causal-lm"
ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100  # label of positions outside the target (F.cross_entropy's ignore_index)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

DEFAULTS: dict[str, Any] = {
    "path": None,
    "gguf_file": None,
    "config": None,
    "tokenizer": None,
    "lora": None,
    "max_length": 512,
    "dtype": "auto",
}
LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16, "target_modules": None, "dropout": 0.0}
RANDOM_INIT_SEED = 0


# --- samples -------------------------------------------------------------------------------------------


def check_conversation(value: Any, where: str = "input") -> list[dict[str, str]]:
    """``value`` as a conversation: a non-empty list of {"role": one of ROLES, "content": str} (no other
    keys). Raises TypeError (wrong types) or ValueError (an unknown role, extra keys, an empty list),
    naming the message index."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise TypeError(f"{where}[{i}] must be an object with 'role' and 'content'")
        if set(m) != {"role", "content"}:
            raise ValueError(f"{where}[{i}] must have exactly the keys 'role' and 'content', got {sorted(m)}")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}[{i}].role must be one of {list(ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise TypeError(f"{where}[{i}].content must be a string, got {type(m['content']).__name__}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def render_prompt(tokenizer: Any, value: Any) -> str:
    """The prompt text of an ``input`` (a string or a conversation), ready for the target to follow.

    With a chat template: ``apply_chat_template(messages, add_generation_prompt=True)``, a string being one
    user message. Without: a string as itself; a conversation as ``"<role>: <content>\\n"`` per message,
    then ``"assistant: "``."""
    if isinstance(value, str):
        if not getattr(tokenizer, "chat_template", None):
            return value
        messages = [{"role": "user", "content": value}]
    else:
        messages = check_conversation(value)
        if not getattr(tokenizer, "chat_template", None):
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TypeError(f"{KIND}: the chat template rendered {type(text).__name__}, not a string")
    return text


def fit_example(prompt: list[int], target: list[int], eos: int, max_length: int) -> tuple[list[int], int]:
    """(tokens, kept prompt length): the prompt's tail, the target and EOS, at most ``max_length`` tokens.
    See the module docstring for the rule."""
    body = [*target, eos]
    n_prompt = min(len(prompt), max(max_length - len(body), max_length // 2))
    kept = prompt[len(prompt) - n_prompt :]
    return kept + body[: max_length - n_prompt], n_prompt


# --- the model -----------------------------------------------------------------------------------------


class HFCausalLM(TrainModel):
    """A transformers ``AutoModelForCausalLM`` (``self.net``; a ``peft.PeftModel`` with LoRA) and its
    tokenizer behind the TrainModel interface. Raises ModelNotFound for a missing path, ValueError for a bad
    config, ImportError when transformers or peft is not installed."""

    kind = KIND
    input_kind = "text"

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        cfg = resolve_config(self.kind, config, DEFAULTS)
        if (cfg["path"] is None) == (cfg["config"] is None):
            raise ValueError(f"{self.kind}: config needs exactly one of 'path' (a local model) and 'config'")
        if cfg["config"] is not None and not isinstance(cfg["config"], dict):
            raise ValueError(f"{self.kind}: config 'config' must be a transformers config object")
        if cfg["config"] is not None and cfg["tokenizer"] is None:
            raise ValueError(f"{self.kind}: a randomly initialised model ('config') needs a 'tokenizer' dir")
        if cfg["gguf_file"] is not None and cfg["path"] is None:
            raise ValueError(f"{self.kind}: 'gguf_file' names a file inside 'path'")
        if cfg["dtype"] != "auto" and cfg["dtype"] not in DTYPES:
            raise ValueError(f"{self.kind}: config 'dtype' must be 'auto' or one of {sorted(DTYPES)}")
        if cfg["lora"] is not None:
            cfg["lora"] = _lora_config(cfg["lora"])
        self.max_length = check_int(self.kind, cfg, "max_length", 8)
        self.config = cfg

        transformers = _import_transformers()
        net, tokenizer_dir, self.base_path = _load_base(transformers, cfg)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"{self.kind}: the tokenizer at {tokenizer_dir} has no eos_token")
        self.eos_id: int = int(self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id: int = self.eos_id if pad is None else int(pad)
        context = getattr(net.config, "max_position_embeddings", None) or getattr(
            net.config, "n_positions", 0
        )
        if context and self.max_length > context:
            raise ValueError(
                f"{self.kind}: max_length {self.max_length} exceeds the model's context {context}"
            )

        # the base's hash is taken as loaded, before any cast, so it does not depend on the device's dtype
        self.base_sha256: str | None = None
        if cfg["lora"] is not None:
            from trainer.checkpoint import tensors_sha256

            self.base_sha256 = tensors_sha256(net.state_dict())
        net.to(_resolve_dtype(cfg["dtype"], lora=cfg["lora"] is not None))
        if cfg["lora"] is not None:
            net = _add_lora(net, cfg["lora"])
            self.adapter_names = sorted("net." + n for n, p in net.named_parameters() if p.requires_grad)
        self.net: Any = net  # a transformers PreTrainedModel, or a peft PeftModel around one
        self._keeps_logits = "logits_to_keep" in inspect.signature(type(_inner(net)).forward).parameters

    # -- TrainModel ------------------------------------------------------------------------------------
    def collate(self, samples: Sequence[Mapping[str, Any]]) -> Batch:
        """-> input_ids (B, T), attention_mask (B, T) (1 on tokens, 0 on right padding), labels (B, T):
        the next token where it is a target token or EOS, else -100."""
        inputs = sample_values(self.kind, samples, "input")
        targets = sample_values(self.kind, samples, "target")
        encoded = []
        for i, (x, y) in enumerate(zip(inputs, targets, strict=True)):
            if not isinstance(y, str):
                raise TypeError(f"{self.kind}: sample {i} target must be a string, got {type(y).__name__}")
            if not isinstance(x, str | list):
                raise TypeError(f"{self.kind}: sample {i} input must be a string or a list of messages")
            prompt = self._encode(render_prompt(self.tokenizer, x))
            encoded.append(fit_example(prompt, self._encode(y), self.eos_id, self.max_length))
        T = max(len(seq) for seq, _ in encoded) - 1
        ids = torch.full((len(encoded), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), T), dtype=torch.long)
        labels = torch.full((len(encoded), T), IGNORE, dtype=torch.long)
        for i, (seq, n_prompt) in enumerate(encoded):
            n = len(seq) - 1
            ids[i, :n] = torch.tensor(seq[:-1])
            mask[i, :n] = 1
            # position t predicts seq[t + 1]: the first target token is predicted at n_prompt - 1
            labels[i, n_prompt - 1 : n] = torch.tensor(seq[n_prompt:])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def per_sample_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """loss_i = mean over target positions t of -log p(labels_it | tokens_i,<=t): (B,), in nats.

        Logits are computed from the first position that predicts a target token on (``logits_to_keep``),
        so a long prompt costs no (T, vocab) logits."""
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        T = labels.shape[1]
        keep = T
        if self._keeps_logits:
            first = int((labels != IGNORE).to(torch.int8).argmax(dim=1).min())  # one host sync
            keep = T - first
        kwargs: dict[str, Any] = {"logits_to_keep": keep} if self._keeps_logits else {}
        logits = self.net(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits  # (B, K, V)
        kept = labels[:, T - logits.shape[1] :]  # (B, K)
        nll = F.cross_entropy(
            logits.float().flatten(0, 1), kept.flatten(), ignore_index=IGNORE, reduction="none"
        ).view_as(kept)  # (B, K), 0 where IGNORE
        count = (kept != IGNORE).sum(dim=1).clamp(min=1)  # (B,)
        return nll.sum(dim=1) / count

    @torch.no_grad()
    def predict(self, inputs: Sequence[Any]) -> list[str]:
        """Greedy completion of each input (string or conversation) up to EOS or max_length tokens in
        all, without the prompt: list[str], special tokens removed."""
        if not inputs:
            return []
        room = self.max_length - self.max_length // 4
        prompts = [self._encode(render_prompt(self.tokenizer, x))[-room:] for x in inputs]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every row's next token is at the same position
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        from transformers import GenerationConfig

        gen = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=self.max_length - width,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        )
        was_training = self.training
        self.eval()
        try:
            out = self.net.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), generation_config=gen
            )  # (B, width + new)
        finally:
            self.train(was_training)
        answers = []
        for row in out[:, width:].tolist():
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            answers.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return answers

    def scored_modules(self) -> list[Any]:
        """Trainable ``nn.Linear`` and GPT-2 ``Conv1D`` layers (with LoRA: the adapters' lora_A and
        lora_B), in module order; a trainable output head tied to the input embedding comes as one
        ``hypergrad.TiedEmbedding`` in its place."""
        from trainer.hypergrad import TiedEmbedding, is_conv1d

        head, embedding = self.net.get_output_embeddings(), self.net.get_input_embeddings()
        tied = (
            isinstance(head, nn.Linear)
            and isinstance(embedding, nn.Embedding)
            and head.weight is embedding.weight
            and head.weight.requires_grad
        )
        out: list[Any] = []
        for m in self.net.modules():
            if tied and m is head:
                out.append(TiedEmbedding(embedding, head))
            elif (isinstance(m, nn.Linear) or is_conv1d(m)) and m.weight.requires_grad:
                out.append(m)
        return out

    # -- checkpoints -----------------------------------------------------------------------------------
    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """Full fine-tuning: the state dict, each tied tensor once (under its first name in sorted order);
        LoRA: the adapter weights only."""
        state = self.state_dict()
        if self.config["lora"] is not None:
            return {n: state[n] for n in self.adapter_names}
        out: dict[str, Tensor] = {}
        seen: set[tuple[int, int]] = set()
        for name in sorted(state):
            t = state[name]
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if key not in seen:  # a tied head's weight is the embedding's: stored once
                seen.add(key)
                out[name] = t
        return out

    def load_checkpoint_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """The inverse of ``checkpoint_tensors``; RuntimeError when the names do not match exactly."""
        expected = set(self.checkpoint_tensors())
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise RuntimeError(f"tensors differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.load_state_dict(tensors, strict=False)  # the rest: the frozen base, or a tied tensor's alias

    def checkpoint_metadata(self) -> dict[str, str]:
        """With LoRA: {"base_path", "base_sha256"}, the base model a checkpoint of adapters needs."""
        if self.base_sha256 is None:
            return {}
        return {"base_path": self.base_path, "base_sha256": self.base_sha256}

    # -- helpers ---------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids


def _inner(net: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel wrapper (or ``net`` itself)."""
    get_base = getattr(net, "get_base_model", None)
    return get_base() if callable(get_base) else net


def _import_transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before the first import of huggingface_hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"{KIND} needs transformers and peft: pip install 'datadiet[hf]' ({e})") from e
    return transformers


def _resolve_dtype(name: str, *, lora: bool) -> torch.dtype:
    if name == "auto":  # trained weights stay float32: AdamW steps below bf16's resolution would be lost
        return torch.bfloat16 if lora and torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def _lora_config(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{KIND}: config 'lora' must be an object {sorted(LORA_DEFAULTS)} or null")
    lora = resolve_config(f"{KIND} lora", value, LORA_DEFAULTS)
    check_int(f"{KIND} lora", lora, "r", 1)
    alpha, dropout, targets = lora["alpha"], lora["dropout"], lora["target_modules"]
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise ValueError(f"{KIND}: lora 'alpha' must be a number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"{KIND}: lora 'dropout' must be a number in [0, 1), got {dropout!r}")
    if targets is not None and (
        not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets)
    ):
        raise ValueError(f"{KIND}: lora 'target_modules' must be a non-empty list of module names or null")
    return lora


def _add_lora(net: nn.Module, lora: Mapping[str, Any]) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError(f"{KIND} with 'lora' needs peft: pip install 'datadiet[hf]' ({e})") from e
    try:
        peft_config = LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=float(lora["dropout"]),
            target_modules=lora["target_modules"],
            fan_in_fan_out=_has_conv1d(net),  # GPT-2's Conv1D stores (d_in, d_out)
            task_type="CAUSAL_LM",
        )
        return get_peft_model(net, peft_config)
    except ValueError as e:
        raise ValueError(f"{KIND}: cannot add LoRA adapters ({e}); name lora 'target_modules'") from e


def _has_conv1d(net: nn.Module) -> bool:
    from trainer.hypergrad import is_conv1d

    return any(is_conv1d(m) for m in net.modules())


def _load_base(transformers: Any, cfg: Mapping[str, Any]) -> tuple[nn.Module, str, str]:
    """(the base model as stored, its tokenizer's directory, what names the base in a checkpoint)."""
    if cfg["config"] is not None:
        tokenizer_dir = _existing_dir(cfg["tokenizer"], "tokenizer")
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        given = dict(cfg["config"])
        model_type = given.pop("model_type", None)
        if not isinstance(model_type, str):
            raise ValueError(f"{KIND}: config 'config' needs a 'model_type' (e.g. 'llama', 'gpt2')")
        given.setdefault("vocab_size", len(tok))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tok, name, None)
            if value is not None:
                given.setdefault(name, value)
        try:
            hf_config = transformers.AutoConfig.for_model(model_type, **given)
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{KIND}: bad transformers config: {e}") from e
        with torch.random.fork_rng(devices=[]):  # the same random base in every process
            torch.manual_seed(RANDOM_INIT_SEED)
            net = transformers.AutoModelForCausalLM.from_config(hf_config)
        return net, tokenizer_dir, f"config:{model_type}"

    path = _existing_dir(cfg["path"], "model path")
    load = path
    if cfg["gguf_file"] is not None:
        load = _gguf_as_safetensors(transformers, Path(path), str(cfg["gguf_file"]))
    net = transformers.AutoModelForCausalLM.from_pretrained(load, local_files_only=True, dtype="auto")
    tokenizer_dir = _existing_dir(cfg["tokenizer"], "tokenizer") if cfg["tokenizer"] else load
    return net, tokenizer_dir, path if cfg["gguf_file"] is None else str(Path(path) / cfg["gguf_file"])


def _existing_dir(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{KIND}: {what} must be a directory name, got {value!r}")
    p = Path(value).expanduser()
    if not p.is_dir():
        raise ModelNotFound(f"{KIND}: {what} {str(p)!r} is not a directory (nothing is downloaded)")
    return str(p.resolve())


def _gguf_as_safetensors(transformers: Any, directory: Path, name: str) -> str:
    """A directory with the GGUF model dequantized to safetensors and its tokenizer: converted on first
    use into ``<data dir>/models/gguf-<sha256 of the file>/``, reused after."""
    gguf = directory / name
    if not gguf.is_file():
        raise ModelNotFound(f"{KIND}: GGUF file {str(gguf)!r} does not exist (nothing is downloaded)")
    h = hashlib.sha256()
    with gguf.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    from store.config import Settings

    cache = Path(Settings().data_dir) / "models" / f"gguf-{h.hexdigest()[:32]}"
    if (cache / "config.json").is_file():
        return str(cache.resolve())
    logger.info("converting %s to safetensors under %s (once)", gguf, cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp-", dir=cache.parent))
    try:
        kwargs = {"gguf_file": name, "local_files_only": True}
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=torch.float32, **kwargs
        )
        # dequantized on load: what remains of the GGUF "quantizer" only stops save_pretrained
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        transformers.AutoTokenizer.from_pretrained(str(directory), **kwargs).save_pretrained(tmp)
        tmp.rename(cache)  # atomic: a reader sees the whole directory or none
    except OSError:
        if not (cache / "config.json").is_file():  # not just another process that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(cache.resolve())
