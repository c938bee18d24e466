"""Model loading and the built-in tiny random-weight model.

The default model (``DEFAULT_MODEL_NAME``) exists so that every machine can run the
whole serving path without downloading weights, like vLLM's dummy load format: a small
Llama with seeded random weights and an offline byte-level BPE tokenizer trained on a
corpus embedded below. It is built once into the cache directory and reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.logs import get_logger
from services.settings import DEFAULT_MODEL_NAME, Settings

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL_NAME",
    "LEAN_FORWARD_ARCHITECTURES",
    "RANDOM_LLAMA_SHAPES",
    "count_parameters",
    "cpu_has_fast_bf16",
    "ensure_default_model",
    "ensure_random_llama",
    "generation_defaults",
    "load_model",
    "load_tokenizer",
    "model_context_length",
    "prefers_bf16_on_cpu",
    "resolve_dtype",
    "resolve_model_path",
    "served_max_model_len",
]

log = get_logger(__name__)

DEFAULT_MODEL_SEED = 20240601
DEFAULT_VOCAB_SIZE = 4096
BUILD_VERSION = 1
"""Bump when the recipe changes so caches built by an older recipe are rebuilt."""
_MARKER = "fairway_build.json"

DEFAULT_SHAPE: dict[str, int] = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
"""Llama shape of the built-in default model (about 3M parameters)."""

RANDOM_LLAMA_SHAPES: dict[str, dict[str, int]] = {
    # 12 x (attention 1.6M + SwiGLU MLP 7.1M) + embeddings: about 106M parameters.
    "llama-100m": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
    },
    # Llama-3.2-1B's body (16 x (attention 10.5M + MLP 50.3M)): about 1B parameters, for
    # GPU benchmarks where no real weights can be downloaded.
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
}
"""Bigger random-weight Llama shapes (same tokenizer and recipe) for benchmarks."""

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A large language model reads a prompt and
writes an answer one token at a time. Serving many tenants at once means that the
scheduler must be fair: every client gets its share of the machine, and nobody waits
forever while others are served. Short jobs first lowers the average response time, but
it can starve the long ones, so we age the waiting requests and keep deadlines.
What is the capital of France? Paris is the capital of France. How many days are there
in a week? There are seven days in a week: Monday, Tuesday, Wednesday, Thursday, Friday,
Saturday and Sunday. Please write a short poem about the sea. The sea is wide and deep,
the waves roll in and out, and the gulls cry above the water.
Explain how a hash table works. A hash table maps keys to values by computing a hash of
the key and using it as an index into an array of buckets. Collisions are handled by
chaining or by open addressing.
def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)
for i in range(10):
    print(i, fibonacci(i))
class Queue:
    def __init__(self):
        self.items = []
    def push(self, item):
        self.items.append(item)
    def pop(self):
        return self.items.pop(0)
import numpy as np
x = np.zeros((3, 4), dtype=np.float32)
{"name": "fairway", "version": "0.1.0", "tenants": ["alpha", "beta", "gamma"], "ok": true}
SELECT id, name, created_at FROM users WHERE active = 1 ORDER BY created_at DESC LIMIT 10;
Translate to German: Good morning, how are you? Guten Morgen, wie geht es dir?
Translate to French: Thank you very much. Merci beaucoup. Où est la gare? C'est ici.
Translate to Spanish: The weather is nice today. El tiempo está bueno hoy. ¿Qué tal?
Summarize the following article in three sentences. The article describes a new method
for training neural networks with less memory. The authors show that their method
matches the accuracy of the baseline while using half of the memory. They release code.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 25 32 50 64 100 128 256 512 1024
2048 4096 65536 3.14159 2.71828 1e-5 0.001 42 1999 2023 2024 2025 -1 +1 = < > <= >= != ==
Punctuation and symbols: ( ) [ ] { } < > , . ; : ! ? ' " ` ~ @ # $ % ^ & * - _ + = / \\ |
User: Can you help me plan a trip to Japan? Assistant: Of course! Tokyo, Kyoto and Osaka
are popular cities. You could visit temples, gardens and museums, and try sushi, ramen
and tempura. Spring is cherry blossom season, and autumn has beautiful red leaves.
User: Why is the sky blue? Assistant: Sunlight is scattered by the molecules of the air,
and blue light is scattered more than red light because it has a shorter wavelength.
Once upon a time there was a little girl who lived in a village near the forest. Every
day she walked to her grandmother's house with a basket of bread and apples.
The mitochondria is the powerhouse of the cell. Water boils at one hundred degrees
Celsius at sea level. The Earth orbits the Sun once a year, and the Moon orbits the
Earth about once a month. Light travels at about three hundred thousand kilometres per
second. Photosynthesis turns carbon dioxide and water into sugar and oxygen.
Unicode: café naïve résumé Zürich São Paulo Kraków Ελληνικά русский 中文 日本語 한국어 العربية
emoji 😀 🚀 ✨ 👍 — “quotes” ‘single’ … • → ← ✓ ×
Error: connection refused. Retrying in 5 seconds. Warning: the queue is full (429).
INFO request_id=abc123 tenant=alpha tokens=17 latency_ms=42.5 status=200
"""


def _training_corpus() -> list[str]:
    """Deterministic training text: the corpus lines, repeated with seeded word shuffles so
    that common words merge into single tokens."""
    import random

    rng = random.Random(DEFAULT_MODEL_SEED)
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    words = _CORPUS.split()
    out = list(lines) * 4
    for _ in range(400):
        out.append(" ".join(rng.choice(words) for _ in range(12)))
    return out


def build_default_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerBase:
    """Byte-level BPE (GPT-2 style) trained on the embedded corpus, with BOS prepended,
    special tokens for chat, and a ChatML-like template. Fully offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_default_model(
    vocab_size: int, tokenizer: PreTrainedTokenizerBase, shape: dict[str, int] | None = None
) -> PreTrainedModel:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        **(shape or DEFAULT_SHAPE),
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        # A wider init than the usual 0.02 makes logits decisive, so greedy decoding is
        # not decided by float rounding between attention implementations.
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(DEFAULT_MODEL_SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model.eval()


def _is_complete(path: Path, shape: dict[str, int] | None = None) -> bool:
    marker = path / _MARKER
    if not marker.is_file():
        return False
    try:
        built = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    # Builds from before shapes were recorded are the default shape.
    return built.get("build_version") == BUILD_VERSION and built.get("shape", DEFAULT_SHAPE) == (
        shape or DEFAULT_SHAPE
    )


def ensure_default_model(cache_dir: Path) -> Path:
    """Build the tiny default model into ``cache_dir/<name>/`` once and return its path.

    Idempotent and safe under concurrency: the model is written to a temporary directory
    next to the target and renamed into place; a process that loses the race discards its
    copy and uses the winner's (both are identical: seeded weights, deterministic BPE).
    """
    return _ensure_built(Path(cache_dir).expanduser(), DEFAULT_MODEL_NAME, DEFAULT_SHAPE)


def ensure_random_llama(cache_dir: Path, name: str, shape: dict[str, int] | None = None) -> Path:
    """Build a random-weight Llama of ``shape`` (default: ``RANDOM_LLAMA_SHAPES[name]``) with
    the default model's tokenizer and recipe into ``cache_dir/fairway-<name>/`` once, the
    same way as the default model (save_pretrained, atomic rename), and return its path."""
    if shape is None:
        if name not in RANDOM_LLAMA_SHAPES:
            known = ", ".join(sorted(RANDOM_LLAMA_SHAPES))
            raise ValueError(f"unknown random Llama shape {name!r} (known: {known})")
        shape = RANDOM_LLAMA_SHAPES[name]
    return _ensure_built(Path(cache_dir).expanduser(), f"fairway-{name}", dict(shape))


def _ensure_built(cache_dir: Path, name: str, shape: dict[str, int]) -> Path:
    target = cache_dir / name
    if _is_complete(target, shape):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        tokenizer = build_default_tokenizer()
        model = _build_default_model(len(tokenizer), tokenizer, shape)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(
            json.dumps({"build_version": BUILD_VERSION, "seed": DEFAULT_MODEL_SEED, "shape": shape})
        )
        if target.exists() and not _is_complete(target, shape):
            # A stale or half-written build from an older recipe: move it aside first.
            stale = Path(tempfile.mkdtemp(prefix=f".{name}-stale-", dir=cache_dir))
            try:
                os.replace(target, stale / "old")
            except OSError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process renamed its complete copy into place first.
            if not _is_complete(target, shape):
                raise
        else:
            log.info("model_built", path=str(target), vocab_size=len(tokenizer), **shape)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model_path: str | None, cache_dir: Path) -> str:
    """A configured path or hub id as given; ``None`` means the built-in default model.
    A path (``/``, ``.`` or ``~`` first) that is not a directory raises FileNotFoundError
    here, instead of transformers' complaint that it is not a valid hub repo id."""
    if model_path:
        if model_path.startswith(("/", ".", "~")):
            local = Path(model_path).expanduser()
            if not local.is_dir():
                raise FileNotFoundError(
                    f"model path {model_path!r} (FAIRWAY_MODEL_PATH) is not a directory")
            return str(local)
        return model_path
    return str(ensure_default_model(cache_dir))


CONTEXT_LENGTH_KEYS = (
    "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx",
)
"""Keys under which a ``config.json`` gives the longest context the model was built for."""


def model_context_length(config: Mapping[str, Any]) -> int | None:
    """The longest context a model's ``config.json`` (as a dict) allows; None if it does
    not say. A multimodal config gives its language model's under ``text_config``."""
    for section in (config.get("text_config"), config):
        if isinstance(section, Mapping):
            lengths = [v for k in CONTEXT_LENGTH_KEYS
                       if isinstance(v := section.get(k), int) and not isinstance(v, bool) and v > 0]
            if lengths:
                return min(lengths)
    return None


def _model_json(directory: Path, name: str) -> dict[str, Any]:
    """A JSON object file of a model's directory; {} where there is none to read here."""
    try:
        data = json.loads((directory.expanduser() / name).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def local_model_dir(settings: Settings) -> Path:
    """Where the served model's files are on this machine if anywhere: the configured path
    (a hub id names none here) or the built-in model's place in the cache. Not built."""
    if settings.model_path:
        return Path(settings.model_path).expanduser()
    return settings.cache_dir / DEFAULT_MODEL_NAME


def served_max_model_len(settings: Settings) -> int:
    """``max_model_len`` capped at the served model's own context length, read from its
    ``config.json`` where this process can read it (a gateway may run without the model's
    files, and a hub id has none here: then the setting as it is). Without the cap, the
    gateway would advertise, and the scorer accept, prompts the workers then refuse."""
    limit = model_context_length(_model_json(local_model_dir(settings), "config.json"))
    if limit is None or limit >= settings.max_model_len:
        return settings.max_model_len
    log.warning("max_model_len_capped", configured=settings.max_model_len, model_limit=limit,
                detail="FAIRWAY_MAX_MODEL_LEN is above what the model allows; using the model's")
    return limit


def model_vocab_size(path: str) -> int | None:
    """The vocabulary size of the model at ``path`` (its ``config.json``, or its language
    model's ``text_config``); None where this process cannot read it."""
    config = _model_json(Path(path), "config.json")
    for section in (config.get("text_config"), config):
        if isinstance(section, Mapping):
            size = section.get("vocab_size")
            if isinstance(size, int) and not isinstance(size, bool) and size > 0:
                return size
    return None


GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k")
"""Sampling settings a model's ``generation_config.json`` may give, which serve as the
defaults of requests that do not set them (vLLM's ``--generation-config auto``)."""


def generation_defaults(path: str) -> dict[str, float | int]:
    """``temperature``, ``top_p`` and ``top_k`` from the ``generation_config.json`` of the
    model at ``path``, those it gives as numbers; {} without the file (a hub id, say)."""
    config = _model_json(Path(path), "generation_config.json")
    found: dict[str, float | int] = {}
    for key in GENERATION_DEFAULT_KEYS:
        value = config.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            found[key] = int(value) if key == "top_k" else float(value)
    return found


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


CPU_BF16_MIN_PARAMETERS = 30_000_000
"""From this size ``auto`` runs a plain Llama in bf16 on a CPU with bf16 matrix kernels.
Measured on a 2-core AMX CPU (16-row decode step, prepacked weights): the 3M default
model steps in 3.5 ms in fp32 and 4.2 ms in bf16 (per-op overhead, not weights, bounds
it), the 106M llama-100m in 63 ms in fp32 and 34 ms in bf16 (reading weights bounds it)."""

LEAN_FORWARD_ARCHITECTURES = frozenset({"LlamaForCausalLM"})
"""Models the engine runs through its own lean forward on CPU (services/engine/forward.py),
which prepacks bf16 weights and bounds the shapes oneDNN builds kernels for. Only these
get bf16 from ``auto`` on CPU: through transformers' forward every new input shape costs
oneDNN about 1 MB of cached kernel in bf16 (not in fp32)."""


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU's oneDNN has bf16 matrix kernels (AVX512-BF16 or AMX)."""
    import torch

    return bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def resolve_dtype(dtype: str, device: str, cpu_bf16: bool = False):
    """``auto`` is bf16 on CUDA; on CPU it is fp32 (exact, and fastest for small models)
    unless ``cpu_bf16`` (see :func:`prefers_bf16_on_cpu`)."""
    import torch

    if dtype == "auto":
        if str(device).startswith("cuda") or cpu_bf16:
            return torch.bfloat16
        return torch.float32
    try:
        value = getattr(torch, dtype)
    except AttributeError:
        raise ValueError(f"unknown dtype {dtype!r}") from None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")  # noqa: TRY004 - a bad dtype name, like above
    return value


def count_parameters(path: str) -> int:
    """Parameters of the causal LM at ``path``, counted on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def prefers_bf16_on_cpu(path: str) -> bool:
    """Whether ``auto`` runs the model at ``path`` in bf16 on this CPU: a model of
    ``LEAN_FORWARD_ARCHITECTURES`` with ``CPU_BF16_MIN_PARAMETERS`` or more, on a CPU with bf16
    matrix kernels, where bf16 halves the weight bytes every decode step reads."""
    from transformers import AutoConfig

    try:
        architectures = set(AutoConfig.from_pretrained(path).architectures or [])
        return (
            bool(architectures & LEAN_FORWARD_ARCHITECTURES)
            and cpu_has_fast_bf16()
            and count_parameters(path) >= CPU_BF16_MIN_PARAMETERS
        )
    except (OSError, ValueError, ImportError) as exc:
        log.warning("model_size_unknown", path=path, error=str(exc))
        return False


def load_model(path: str, device: str, dtype: str, **kwargs: object) -> PreTrainedModel:
    """Load a causal LM for inference on ``device``; extra kwargs go to ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    on_cpu = str(device).split(":")[0] == "cpu"
    cpu_bf16 = dtype == "auto" and on_cpu and prefers_bf16_on_cpu(path)
    torch_dtype = resolve_dtype(dtype, device, cpu_bf16)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    except TypeError:
        # Older transformers spell the argument ``torch_dtype``.
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch_dtype, **kwargs)
    return model.to(device).eval()
