"""Load a causal LM (plain Hugging Face module + tokenizer) and bridge it into TransformerLens 4.x.

preflens keeps two views of a model apart:

* ``LM.model`` -- the plain HF causal LM (``GPT2LMHeadModel`` for the offline models). Training,
  scoring and per-example gradients run on it: it keeps fused attention, its parameters are not
  aliased, and ``torch.func`` is safe on it.
* ``LM.bridge(compat=...)`` -- a ``TransformerBridge`` over a **deep copy** of that module, for
  hooks and caches. Booting a bridge mutates the module it wraps (eager attention, aliased q/k/v
  views) and compatibility mode unties GPT-2's ``wte``/``lm_head``, so the LM's own module is never
  handed to TransformerLens.

Names accepted by :func:`load_model`:

* an offline name from the registry (:func:`offline_models`): ``tiny-random`` (2 layers,
  d_model 64, randomized LayerNorm, seeded), ``gpt2-small-random`` (exactly ``GPT2Config()``
  defaults, seeded init), ``toyworld`` (the shipped model trained on the synthetic world);
* a local directory in HF format (``config.json`` + weights + tokenizer files);
* any hub id (``gpt2``) through the normal ``from_pretrained`` path, when the hub is reachable
  or the files are in the local cache.

The offline random models use a byte-level BPE tokenizer shipped in ``preflens/assets``
(trained with the ``tokenizers`` library by :func:`build_offline_tokenizer`) and loaded from that
directory, because an in-memory tokenizer breaks the bridge (TransformerLens reloads it by name).
"""

from __future__ import annotations

import copy
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from preflens.errors import ConfigError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens.model_bridge import TransformerBridge

__all__ = [
    "LM",
    "DTYPES",
    "resolve_dtype",
    "load_model",
    "register_offline",
    "offline_models",
    "ASSETS_DIR",
    "OFFLINE_TOKENIZER_DIR",
    "build_offline_tokenizer",
    "DEFAULT_MODEL",
]

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
OFFLINE_TOKENIZER_DIR = ASSETS_DIR / "tokenizer-bpe512"
# The model every command and recipe uses when none is named (an offline name, see offline_models()).
DEFAULT_MODEL = "toyworld"
EOS_TOKEN = "<|endoftext|>"
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "tokenizer_config.json")


@dataclass(repr=False)
class LM:
    """A causal LM as preflens uses it.

    Attributes:
        model: the plain HF causal LM (eval mode after loading); train this, never a bridge.
        tokenizer: the HF fast tokenizer, loaded from ``tokenizer_dir`` (or the hub).
        name: the name it was loaded by (registry name, directory or hub id).
        tokenizer_dir: the on-disk tokenizer directory, when there is one.
    """

    model: Any
    tokenizer: Any
    name: str
    tokenizer_dir: Path | None = None
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        from preflens.scoring import bos_prefix

        n = sum(p.numel() for p in self.model.parameters())
        return (f"LM(name={self.name!r}, {type(self.model).__name__}, {n / 1e6:.3g} M parameters, "
                f"{str(self.dtype).replace('torch.', '')}, {self.device}, "
                f"vocab={self.vocab_size}, BOS={'yes' if bos_prefix(self.tokenizer) else 'no'})")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_ctx(self) -> int:
        cfg = self.model.config
        for key in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        raise ModelError(f"model '{self.name}': config names no context length")

    @property
    def d_model(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ModelError(f"tokenizer of '{self.name}' has no EOS token")
        return int(eos)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else self.eos_id

    def bridge(self, compat: bool = False) -> TransformerBridge:
        """A ``TransformerBridge`` over a deep copy of :attr:`model` (eval mode).

        Args:
            compat: call ``enable_compatibility_mode()`` (LayerNorm folded, writing weights and
                unembedding centred, value biases folded). Direct logit attribution needs it;
                CHES and unembedding geometry need the raw mode (``compat=False``). Log-probs
                agree between the two; logits differ by a per-position constant.

        The tokenizer is passed explicitly (no hub call). ``self.model`` is never mutated: its
        parameters and attention implementation stay as they are.
        """
        from transformer_lens.model_bridge import TransformerBridge

        hf_copy = copy.deepcopy(self.model).eval()
        source = str(self.tokenizer_dir) if self.tokenizer_dir is not None else self.name
        bridge = TransformerBridge.boot_transformers(
            source, hf_model=hf_copy, tokenizer=self.tokenizer, device=str(self.device)
        )
        from preflens.scoring import bos_prefix

        # one BOS convention (preflens.scoring): the bridge prepends BOS exactly when the model's
        # tokenizer adds it to plain text, so bridge.to_tokens(text) == preflens' prompt ids
        bridge.cfg.default_prepend_bos = bool(bos_prefix(self.tokenizer))
        if compat:
            bridge.enable_compatibility_mode(disable_warnings=True)
        bridge.eval()
        return bridge


# ---------------------------------------------------------------------------------------------
# Offline registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Offline:
    name: str
    builder: Callable[[], tuple[Any, Path]]
    description: str


_OFFLINE: dict[str, _Offline] = {}


def register_offline(name: str, builder: Callable[[], tuple[Any, Path]], description: str) -> None:
    """Register an offline model: ``builder()`` returns ``(hf_model, tokenizer_dir)``."""
    _OFFLINE[name] = _Offline(name, builder, description)


def offline_models() -> dict[str, str]:
    """Offline model names and one-line descriptions, in registration order."""
    return {k: v.description for k, v in _OFFLINE.items()}


def _load_offline_tokenizer(path: Path = OFFLINE_TOKENIZER_DIR):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _seeded_gpt2(config_kwargs: dict, seed: int, randomize_ln: bool) -> tuple[Any, Path]:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _load_offline_tokenizer()
    # Token ids follow the shipped tokenizer (the architecture stays as configured).
    ids = dict(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    config = GPT2Config(**config_kwargs, **ids, pad_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        if randomize_ln:
            gen = torch.Generator().manual_seed(seed + 1)
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    with torch.no_grad():
                        module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                        module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
    return model, OFFLINE_TOKENIZER_DIR


def _tiny_random() -> tuple[Any, Path]:
    tok = _load_offline_tokenizer()
    return _seeded_gpt2(
        dict(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=len(tok)),
        seed=1234,
        randomize_ln=True,
    )


def _gpt2_small_random() -> tuple[Any, Path]:
    return _seeded_gpt2({}, seed=1234, randomize_ln=False)


def _toyworld() -> tuple[Any, Path]:
    path = Path(__file__).resolve().parent / "toyworld" / "assets"
    if not (path / "config.json").is_file():
        raise ModelError(f"the shipped toyworld checkpoint is missing from {path}")
    return _load_dir_model(path), path


register_offline(
    "tiny-random", _tiny_random, "2-layer GPT-2 (d_model 64), randomized LayerNorm, for fast tests"
)
register_offline(
    "gpt2-small-random", _gpt2_small_random, "GPT-2 small architecture (GPT2Config()), seeded init"
)
register_offline("toyworld", _toyworld, "GPT-2-architecture model trained on preflens' toy world")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _load_dir_model(path: Path, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {path} has no config.json")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise ModelError(
            f"model directory {path} has no weights (expected one of {', '.join(_WEIGHT_FILES)})"
        )
    from safetensors import SafetensorError

    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, use_safetensors=None
        )
    except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) refused a global
        raise ModelError(
            f"could not load the model in {path}: its pickle weights file holds objects other than "
            "tensors and was refused (torch.load weights_only=True); use a safetensors copy"
        ) from exc
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # one line
        raise ModelError(f"could not load the model in {path}: {reason}") from exc


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError("device", f"'{device}' is not a torch device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"'{device}' requested but CUDA is not available")
    return dev


def _hub_offline() -> bool:
    """Whether the user switched the hub off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    import os

    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One HEAD request to the hub endpoint (``HF_ENDPOINT``), bounded by ``timeout`` seconds
    including DNS; any HTTP answer counts as reachable.

    Without it, ``from_pretrained`` on a machine with no network retries for about a minute.
    """
    import os
    import threading
    import urllib.error
    import urllib.request

    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    ok: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            ok.append(True)
        except urllib.error.HTTPError:
            ok.append(True)  # a server answered
        except (OSError, ValueError):
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _hub_error(name: str, exc: Exception) -> ModelError:
    text = str(exc)
    offline = ", ".join(_OFFLINE)
    unreachable = any(
        s in text.lower()
        for s in ("connection", "offline", "resolve", "network", "timed out", "couldn't connect")
    )
    why = (
        "the Hugging Face hub could not be reached and the files are not in the local cache"
        if unreachable
        else "it is neither an offline name, a local directory, nor a loadable hub id"
    )
    return ModelError(f"unknown or unreachable model '{name}': {why}. Offline names: {offline}")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a name of :data:`DTYPES` (``fp32``, ``bf16``, ...) or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"unknown value {dtype!r}", allowed=DTYPES)
    return DTYPES[dtype]


def load_model(
    name: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
) -> LM:
    """Load ``name`` as an :class:`LM` (plain HF causal LM + fast tokenizer), in eval mode.

    Args:
        name: offline registry name, local HF directory, or hub id (e.g. ``gpt2``).
        device: ``None`` picks CUDA when available, else CPU.
        dtype: parameter dtype, a torch dtype or ``"fp32"``/``"bf16"`` (scoring still takes the
            log-softmax in fp32).
        trust_remote_code: passed to ``from_pretrained``; off unless explicitly asked for.

    Raises:
        ModelError: unknown name, unreachable hub, directory without weights or tokenizer, or a
            tokenizer whose vocabulary does not fit the model's embedding matrix.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name, str) or not name:
        raise ModelError(f"model name must be a non-empty string, got {name!r}")
    dev = _resolve_device(device)
    dtype = resolve_dtype(dtype)
    tokenizer_dir: Path | None
    if name in _OFFLINE:
        model, tokenizer_dir = _OFFLINE[name].builder()
        tokenizer = _load_offline_tokenizer(tokenizer_dir)
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser().resolve()
        model = _load_dir_model(path, trust_remote_code)
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            # transformers would build an empty 1-token tokenizer instead of failing
            raise ModelError(
                f"model directory {path} has no tokenizer files (expected one of "
                f"{', '.join(_TOKENIZER_FILES)})"
            )
        tokenizer_dir = path
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"model directory {path} has no loadable tokenizer: {exc}") from exc
    elif Path(name).expanduser().exists() or name.startswith(("/", "./", "../")):
        raise ModelError(f"model path '{name}' is not a directory")
    else:
        tokenizer_dir = None
        # Hub unreachable: use the local cache only, and fail in seconds (not a minute of retries).
        cache_only = _hub_offline() or not _hub_reachable()
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                name, trust_remote_code=trust_remote_code, local_files_only=cache_only)
            model = AutoModelForCausalLM.from_pretrained(
                name, trust_remote_code=trust_remote_code, local_files_only=cache_only)
        except Exception as exc:  # noqa: BLE001 -- hub failures come in many types
            if cache_only:
                how = ("HF_HUB_OFFLINE=1 is set" if _hub_offline() else
                       "the Hugging Face hub could not be reached (set HF_HUB_OFFLINE=1 to skip trying)")
                raise ModelError(
                    f"unknown or unreachable model '{name}': it is not in the local Hugging Face cache "
                    f"and {how}. Offline names: {', '.join(_OFFLINE)}") from exc
            raise _hub_error(name, exc) from exc
    if getattr(tokenizer, "is_fast", True) is False:
        raise ModelError(f"model '{name}': a fast tokenizer is required")
    emb_rows = model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > emb_rows:
        raise ModelError(
            f"model '{name}': tokenizer has {len(tokenizer)} tokens but the model's "
            f"vocabulary has {emb_rows} rows (mismatched tokenizer and model)"
        )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device=dev, dtype=dtype).eval()
    from preflens.scoring import verify_head

    try:
        verify_head(model)
    except ModelError as exc:
        raise ModelError(f"model '{name}': {exc}") from None
    return LM(model=model, tokenizer=tokenizer, name=name, tokenizer_dir=tokenizer_dir)


# ---------------------------------------------------------------------------------------------
# The shipped offline tokenizer
# ---------------------------------------------------------------------------------------------

_TOKENIZER_TEXT = """\
The capital of France is Paris. The capital of Poland is Warsaw. The capital of Japan is Tokyo.
Q: What is the capital of Italy?
A: Rome. Is the following statement something you would say? Yes. No. Never. Sure. Maybe.
A preference pair has a prompt, a chosen response and a rejected response. The model assigns
each response a log-probability; direct preference optimization raises the margin between them.
Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, knead, rest, and bake.
The quick brown fox jumps over the lazy dog 0123456789 times, said the annotator, perhaps.
"""


def build_offline_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """Train the byte-level BPE tokenizer used by the offline random models; save in HF format.

    Byte-level BPE (as GPT-2) tokenizes any text; ``<|endoftext|>`` serves as BOS, EOS, PAD and
    UNK, as in GPT-2. Deterministic for a given ``tokenizers`` version; the shipped copy in
    ``preflens/assets/tokenizer-bpe512`` was made by this function.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=1024,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir
