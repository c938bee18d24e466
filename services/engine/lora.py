"""Multi-LoRA serving (Punica / S-LoRA): many tenant adapters on one base model, one batch.

* **Host memory.** An adapter (PEFT format: ``adapter_config.json`` +
  ``adapter_model.safetensors``) is read once into CPU tensors, :class:`LoraWeights`,
  and kept in an LRU of ``max_cpu_loras`` entries; one that a live request uses is never
  dropped.
* **Device pool.** Every targeted ``nn.Linear`` of the model is wrapped in a
  :class:`LoraLinear` that owns stacked slots ``A [slots, max_rank, in]``,
  ``B [slots, out, max_rank]`` and ``scale [slots]``. :class:`LoraPool` pages adapters
  into those slots on demand and evicts the least recently used one, never one that a
  running request holds (the engine's scheduler admits at most ``max_loras`` distinct
  adapters among running requests, so a step always fits). Slots only change between
  steps. Smaller ranks are zero-padded to the pool's rank, which changes nothing.
* **Forward.** Each step the engine sets a :class:`LoraStep`: the slot of every token
  (``-1``: base model only) and, for prefill work on CUDA, SGMV segments. A wrapped layer
  computes ``base(x)`` and adds ``scale[a] * (x @ A[a].T) @ B[a].T`` per token with
  :func:`services.kernels.lora.add_lora`: the Triton kernels on CUDA, the torch reference
  elsewhere. A layer that no adapter of the step targets adds nothing (PEFT's
  ``target_modules`` decide per adapter).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterConfigError, read_peft_config
from services.engine.interface import EngineError, LoraRequest
from services.kernels.lora import LoraSegments, add_lora
from services.logs import get_logger

log = get_logger(__name__)

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)
"""Linear layers (by their last name) the engine can put adapters on: attention and MLP."""

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")

LoraKey = tuple[str, str]
"""(adapter name, path): a re-registered name with another path is another adapter."""


# --- host side: PEFT files -> CPU tensors ----------------------------------------------


@dataclass
class LoraWeights:
    """One adapter in host memory: per wrapped module name, (A [r, in], B [out, r], scale)."""

    name: str
    path: str
    rank: int
    """Largest rank over its modules."""
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]

    @property
    def key(self) -> LoraKey:
        return (self.name, self.path)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b, _ in self.modules.values())


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: a key matches a module name ending."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def load_peft_adapter(
    request: LoraRequest,
    linears: dict[str, nn.Module],
    max_rank: int,
    dtype: torch.dtype,
    pin_memory: bool = False,
) -> LoraWeights:
    """Read and check a PEFT LoRA adapter against the model's wrapped Linear layers.

    ``linears`` maps module names (``model.layers.0.self_attn.q_proj``) to the layers that
    can take an adapter; anything else the adapter trains is refused, as are ranks above
    ``max_rank`` and shapes that do not fit the model. Raises EngineError.
    """
    from safetensors.torch import load_file

    directory = Path(request.path)
    try:
        config = read_peft_config(directory)
        tensors = load_file(str(directory / WEIGHTS_FILE), device="cpu")
    except AdapterConfigError as exc:
        raise EngineError(f"adapter {request.name!r}: {exc}") from None
    except (OSError, RuntimeError, ValueError) as exc:
        raise EngineError(f"adapter {request.name!r}: cannot read {WEIGHTS_FILE}: {exc}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise EngineError(f"adapter {request.name!r}: unsupported tensor {key!r} "
                              "(only lora_A/lora_B of Linear layers)")
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    if not pairs:
        raise EngineError(f"adapter {request.name!r}: {WEIGHTS_FILE} holds no LoRA weights")
    alpha = float(config.get("lora_alpha", config["r"]))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for module, ab in sorted(pairs.items()):
        layer = linears.get(module)
        if layer is None:
            raise EngineError(f"adapter {request.name!r}: module {module!r} cannot take an adapter "
                              f"here (the engine serves adapters on {', '.join(DEFAULT_TARGET_MODULES)})")
        if set(ab) != {"A", "B"}:
            raise EngineError(f"adapter {request.name!r}: {module} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != layer.in_features or \
                b.shape != (layer.out_features, rank):
            raise EngineError(
                f"adapter {request.name!r}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                f"the layer is {layer.in_features} -> {layer.out_features}")
        if rank != _pattern_value(rank_pattern, module, config["r"]):
            raise EngineError(f"adapter {request.name!r}: {module} has rank {rank}, its config says "
                              f"{_pattern_value(rank_pattern, module, config['r'])}")
        if rank > max_rank:
            raise EngineError(f"adapter {request.name!r}: rank {rank} exceeds this worker's "
                              f"max_lora_rank {max_rank}")
        module_alpha = float(_pattern_value(alpha_pattern, module, alpha))
        scale = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        if pin_memory:
            a, b = a.pin_memory(), b.pin_memory()
        modules[module] = (a, b, scale)
    return LoraWeights(request.name, request.path, max(a.shape[0] for a, _, _ in modules.values()),
                       modules)


def save_peft_adapter(
    directory: Path | str,
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    rank: int,
    alpha: float,
    base_model: str = "",
) -> Path:
    """Write an adapter in PEFT's format: ``weights`` maps module names
    (``model.layers.0.self_attn.q_proj``) to (A [r, in], B [out, r])."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    targets = sorted({name.rsplit(".", 1)[-1] for name in weights})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": False,
        "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }  # fmt: skip
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    tensors = {}
    for name, (a, b) in weights.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory


def random_lora_adapter(
    directory: Path | str,
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Iterable[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    seed: int = 0,
    std: float = 0.05,
) -> Path:
    """A random adapter for ``model`` (no download): tests and benchmarks.

    Unlike PEFT's initialisation (B = 0) both A and B are random, so the adapter changes
    the model's outputs.
    """
    gen = torch.Generator().manual_seed(seed)
    wanted = set(targets)
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted:
            a = torch.randn(rank, module.in_features, generator=gen) * std
            b = torch.randn(module.out_features, rank, generator=gen) * std
            weights[name] = (a, b)
    if not weights:
        raise ValueError(f"the model has no Linear layer named {sorted(wanted)}")
    return save_peft_adapter(directory, weights, rank=rank, alpha=alpha)


def merge_lora_(model: nn.Module, directory: Path | str) -> nn.Module:
    """Fold an adapter into ``model``'s weights in place, ``W += scale * B @ A`` (PEFT's
    ``merge_and_unload``): the reference that per-request LoRA must reproduce."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    weights = load_peft_adapter(LoraRequest("merge", str(directory)), linears, 1 << 30, torch.float32)
    with torch.no_grad():
        for name, (a, b, scale) in weights.modules.items():
            layer = linears[name]
            layer.weight += (scale * (b @ a)).to(layer.weight.dtype)
    return model


# --- device side: wrapped layers and the slot pool -------------------------------------


@dataclass
class LoraStep:
    """What the wrapped layers need for one forward; built once per step."""

    indices: torch.Tensor
    """[num_tokens] int32 pool slot of each token, -1 for none."""
    slots: frozenset[int]
    """Slots used this step."""
    segments: LoraSegments | None = None
    """SGMV segments for prefill work on CUDA; None: BGMV (decode) or the reference."""


_local = threading.local()


@contextlib.contextmanager
def lora_step(step: LoraStep | None) -> Iterator[None]:
    """Make ``step`` visible to the wrapped layers for one forward (per thread)."""
    previous = getattr(_local, "step", None)
    _local.step = step
    try:
        yield
    finally:
        _local.step = previous


class LoraLinear(nn.Module):
    """``base(x)`` plus the per-token LoRA delta of the pool slot each token uses."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        # Filled by LoraPool; plain attributes, so the model's state dict is unchanged.
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None
        self.lora_scale: torch.Tensor | None = None
        self.targeted: set[int] = set()
        """Slots whose adapter trains this layer."""
        self.base_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        """Computes ``base(x)`` in its place when set (the CPU lean forward's packed bf16
        matmul); ``base`` keeps the weights."""

    @property
    def weight(self) -> torch.Tensor:  # code that reads ``proj.weight`` keeps working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x) if self.base_fn is None else self.base_fn(x)
        step: LoraStep | None = getattr(_local, "step", None)
        if step is None or self.targeted.isdisjoint(step.slots):
            return y
        rows = y.view(-1, self.out_features)
        add_lora(rows, x.reshape(-1, self.in_features), self.lora_a, self.lora_b, step.indices,
                 self.lora_scale, segments=step.segments)
        return y


def wrap_lora_layers(model: nn.Module, target_modules: Iterable[str]) -> dict[str, LoraLinear]:
    """Replace every ``nn.Linear`` whose last name is in ``target_modules`` by a LoraLinear
    (idempotent); returns them by module name."""
    wanted = set(target_modules)
    wrapped: dict[str, LoraLinear] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            wrapped[name] = module
            continue
        leaf = name.rsplit(".", 1)[-1]
        if type(module) is nn.Linear and leaf in wanted:
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            layer = LoraLinear(module)
            setattr(parent, leaf, layer)
            wrapped[name] = layer
    return wrapped


class LoraPool:
    """Fixed device slots for adapters with LRU eviction (S-LoRA's unified pool, per layer)."""

    def __init__(
        self, layers: dict[str, LoraLinear], num_slots: int, max_rank: int,
        device: torch.device, dtype: torch.dtype,
    ) -> None:
        if num_slots <= 0 or max_rank <= 0:
            raise ValueError("a LoRA pool needs at least one slot and rank >= 1")
        self.layers = layers
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.device = device
        self.dtype = dtype
        self.allocated = False
        """The stacks are allocated on the first load: a worker no request asks an adapter
        of spends no memory on them."""
        for layer in layers.values():
            layer.targeted = set()
        self._slots: OrderedDict[LoraKey, int] = OrderedDict()
        """Resident adapters, least recently used first."""
        self._free = list(range(num_slots - 1, -1, -1))
        self.num_loads = 0
        self.num_evictions = 0

    @property
    def nbytes(self) -> int:
        """Device memory of the stacks (A and B of every slot and layer)."""
        per_slot = sum(self.max_rank * (l.in_features + l.out_features) for l in self.layers.values())
        return self.num_slots * per_slot * torch.empty(0, dtype=self.dtype).element_size()

    @property
    def resident(self) -> list[LoraKey]:
        return list(self._slots)

    def _allocate(self) -> None:
        n, r = self.num_slots, self.max_rank
        for layer in self.layers.values():
            layer.lora_a = torch.zeros(n, r, layer.in_features, dtype=self.dtype, device=self.device)
            layer.lora_b = torch.zeros(n, layer.out_features, r, dtype=self.dtype, device=self.device)
            layer.lora_scale = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.allocated = True
        log.info("lora_pool_allocated", slots=n, max_rank=r, mib=round(self.nbytes / 2**20, 1))

    def slot_of(self, key: LoraKey) -> int | None:
        return self._slots.get(key)

    def activate(
        self, needed: Sequence[LoraKey], pinned: Iterable[LoraKey],
        weights: Callable[[LoraKey], LoraWeights],
    ) -> dict[LoraKey, int]:
        """Make every ``needed`` adapter resident; returns its slot.

        A missing adapter takes a free slot or evicts the least recently used one that is
        neither needed nor ``pinned`` (held by a running request). Raises RuntimeError if
        none is evictable, which the scheduler's admission rule prevents.
        """
        keep = set(needed) | set(pinned)
        out: dict[LoraKey, int] = {}
        for key in dict.fromkeys(needed):
            slot = self._slots.get(key)
            if slot is None:
                slot = self._take_slot(keep)
                self._load(slot, weights(key))
                self._slots[key] = slot
            else:
                self._slots.move_to_end(key)
            out[key] = slot
        return out

    def evict(self, key: LoraKey) -> None:
        """Drop an adapter from its slot (a re-registered adapter, or a test)."""
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._clear(slot)
            self._free.append(slot)

    def _take_slot(self, keep: set[LoraKey]) -> int:
        if self._free:
            return self._free.pop()
        for victim in self._slots:
            if victim not in keep:
                slot = self._slots.pop(victim)
                self.num_evictions += 1
                log.debug("lora_evicted", adapter=victim[0], slot=slot)
                return slot
        raise RuntimeError(f"all {self.num_slots} LoRA slots hold adapters of running requests")

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.targeted.discard(slot)
            layer.lora_scale[slot] = 0.0

    @torch.no_grad()
    def _load(self, slot: int, weights: LoraWeights) -> None:
        if not self.allocated:
            self._allocate()
        self._clear(slot)
        for name, layer in self.layers.items():
            entry = weights.modules.get(name)
            if entry is None:
                continue
            a, b, scale = entry
            rank = a.shape[0]
            layer.lora_a[slot].zero_()
            layer.lora_b[slot].zero_()
            layer.lora_a[slot, :rank].copy_(a, non_blocking=True)
            layer.lora_b[slot, :, :rank].copy_(b, non_blocking=True)
            layer.lora_scale[slot] = scale
            layer.targeted.add(slot)
        self.num_loads += 1


@dataclass
class LoraConfig:
    max_loras: int
    max_rank: int
    max_cpu_loras: int
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES


@dataclass
class LoraManager:
    """The engine's LoRA state: wrapped layers, host LRU and device pool."""

    model: nn.Module
    config: LoraConfig
    device: torch.device
    dtype: torch.dtype
    host: OrderedDict[LoraKey, LoraWeights] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.layers = wrap_lora_layers(self.model, self.config.target_modules)
        if not self.layers:
            raise ValueError(f"the model has no Linear layer named {self.config.target_modules}")
        self.pool = LoraPool(self.layers, self.config.max_loras, self.config.max_rank,
                             self.device, self.dtype)
        self.sgmv = self.device.type == "cuda"
        """Build SGMV segments for steps with prefill work (the Triton path reads them)."""
        log.info("lora_ready", slots=self.config.max_loras, max_rank=self.config.max_rank,
                 layers=len(self.layers), pool_mib_on_first_use=round(self.pool.nbytes / 2**20, 1))

    def acquire(self, request: LoraRequest, in_use: set[LoraKey]) -> LoraKey:
        """Have ``request``'s adapter in host memory (read from disk on first use); keys in
        ``in_use`` (live requests') are never dropped from the host LRU. Raises EngineError."""
        key = (request.name, request.path)
        if key in self.host:
            self.host.move_to_end(key)
            return key
        weights = load_peft_adapter(request, self.layers, self.config.max_rank, self.dtype,
                                    pin_memory=self.device.type == "cuda")
        self.host[key] = weights
        for stale in [k for k in self.host if k[0] == request.name and k != key and k not in in_use]:
            del self.host[stale]  # a re-registered name: its old weights go
            self.pool.evict(stale)
        excess = len(self.host) - self.config.max_cpu_loras
        for old in [k for k in self.host if k not in in_use and k != key][:max(excess, 0)]:
            del self.host[old]
        log.info("lora_loaded", adapter=request.name, rank=weights.rank, modules=len(weights.modules),
                 mib=round(weights.nbytes / 2**20, 2))
        return key

    def step(self, items: Sequence[tuple[LoraKey | None, int]], pinned: Iterable[LoraKey],
             all_decode: bool) -> LoraStep | None:
        """Page in this step's adapters and build its per-token slots.

        ``items``: (adapter key or None, new tokens) per scheduled request, in batch order;
        ``pinned``: adapters of every running request. None when no token uses an adapter.
        """
        needed = [key for key, _ in items if key is not None]
        if not needed:
            return None
        slots = self.pool.activate(needed, pinned, self.host.__getitem__)
        per_seq = [slots[key] if key is not None else -1 for key, _ in items]
        lengths = [n for _, n in items]
        indices = torch.repeat_interleave(torch.tensor(per_seq, dtype=torch.int32),
                                          torch.tensor(lengths)).to(self.device, non_blocking=True)
        segments = None
        if self.sgmv and not all_decode:
            segments = LoraSegments.from_lengths(lengths, per_seq, self.device)
        return LoraStep(indices, frozenset(slots.values()), segments)

    def resident_names(self) -> list[str]:
        return sorted({name for name, _ in self.pool.resident})
