"""The Ouroboros method's configuration, independent of any host framework.

`OuroborosSpec` says *what* to build; `resolve()` checks it against a concrete model's dimensions and
returns the layer plan. Every field carries a help string (``field(metadata={"help": ...})``), the
same convention PEFT configs use, so host adapters can reuse the dataclass as-is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULATIONS = ("controller", "static")
CONTROLLER_HEADS = ("normalised", "paper")
POOLINGS = ("causal_mean", "token", "sequence_mean")
# Poolings whose modulation at position i depends only on positions <= i.
CAUSAL_POOLINGS = ("causal_mean", "token")
# Stated ranges. Depth: the paper's tables have 64 rows; 1024 applications of one layer is far past any use and
# still finishes (10**5 hung a 1 x 8 forward for minutes). Widths: far above any model's hidden size. Retention:
# the gate bias logit(1 - retention) stays finite (about +-13.8) inside this margin.
MAX_STEPS = 1024
MAX_WIDTH = 65536
RETENTION_MARGIN = 1e-6


@dataclass
class OuroborosSpec:
    num_prelude_layers: int = field(default=2, metadata={"help": "Pretrained layers run once before the recurrence (the Prelude)."})
    num_coda_layers: int = field(default=2, metadata={"help": "Pretrained layers run once after the recurrence (the Coda)."})
    recurrent_layer_index: Optional[int] = field(
        default=None,
        metadata={"help": "Index (in the full model) of the layer applied num_steps times. None = middle of the removed span."},
    )
    num_steps: int = field(default=4, metadata={"help": "Recurrence depth N: how many times the recurrent layer is applied (1..1024)."})
    max_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": "Rows of the per-step tables (step embedding, per-step norms, static modulation). "
            "None = num_steps, so no parameter goes unused; set larger to train with sampled depth."
        },
    )
    r: int = field(default=32, metadata={"help": "Rank of the frozen SVD LoRA bases (and length of each modulation vector)."})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "LoRA scale numerator: delta = (lora_alpha / r) * B (m * A x). None = r."})
    target_modules: Optional[list] = field(
        default=None,
        metadata={"help": "Projections of the recurrent layer to modulate. None = all seven: " + ", ".join(DEFAULT_TARGETS)},
    )
    modulation: str = field(
        default="controller",
        metadata={"help": "'controller' (input-conditioned, the method) or 'static' (one learned vector per step: the paper's baseline)."},
    )
    controller_pooling: str = field(
        default="causal_mean",
        metadata={
            "help": "What the Controller reads at position i: 'causal_mean' (mean of positions <= i, padding excluded), "
            "'token' (position i alone) or 'sequence_mean' (whole sequence: leaks future tokens; reference reproduction only, "
            "refused for generation)."
        },
    )
    controller_hidden: int = field(default=128, metadata={"help": "Controller width (also the step-embedding width)."})
    controller_state_dim: int = field(default=256, metadata={"help": "Width of the Controller's projection of the pooled hidden state."})
    controller_head: str = field(
        default="normalised",
        metadata={
            "help": "How the Controller reads the pooled state: 'normalised' (this implementation: RMS-normalise it, then a "
            "linear projection) or 'paper' (the paper's s = SiLU(Linear(pooled)) on the raw stream)."
        },
    )
    use_gate: bool = field(default=True, metadata={"help": "Gated recurrence h' = g*n + (1-g)*h. False = h' = n (the no-gate ablation)."})
    gate_retention: float = field(
        default=0.88, metadata={"help": "Retention 1-g at initialisation, in [1e-6, 1 - 1e-6]. 0.88 gives gate bias -1.992."}
    )
    coda_lora_r: int = field(
        default=0,
        metadata={
            "help": "Rank of a trainable LoRA (scale 1, B zero-initialised) on every projection of every coda layer; "
            "0 = none (the paper). Beyond the paper: its own proposed fix for the missing held-out gain."
        },
    )

    def __post_init__(self):
        self.validate_spec()

    # -- checks that need no model ---------------------------------------------------------------
    def validate_spec(self) -> None:
        def need_int(name, low, high=None):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
                bound = f"in {low}..{high}" if high is not None else f">= {low}"
                raise ValueError(f"{name} must be an integer {bound}, got {value!r}")

        def number(name) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        need_int("num_prelude_layers", 0)
        need_int("num_coda_layers", 0)
        need_int("num_steps", 1, MAX_STEPS)
        need_int("r", 1)
        need_int("controller_hidden", 1, MAX_WIDTH)
        need_int("controller_state_dim", 1, MAX_WIDTH)
        need_int("coda_lora_r", 0)
        if self.max_steps is not None:
            need_int("max_steps", 1, MAX_STEPS)
            if self.max_steps < self.num_steps:
                raise ValueError(f"max_steps ({self.max_steps}) must be >= num_steps ({self.num_steps})")
        if self.recurrent_layer_index is not None:
            need_int("recurrent_layer_index", 0)
        if self.modulation not in MODULATIONS:
            raise ValueError(f"modulation must be one of {list(MODULATIONS)}, got {self.modulation!r}")
        if self.controller_head not in CONTROLLER_HEADS:
            raise ValueError(f"controller_head must be one of {list(CONTROLLER_HEADS)}, got {self.controller_head!r}")
        if self.controller_pooling not in POOLINGS:
            raise ValueError(f"controller_pooling must be one of {list(POOLINGS)}, got {self.controller_pooling!r}")
        if not isinstance(self.use_gate, bool):
            raise ValueError(f"use_gate must be True or False, got {self.use_gate!r}")
        if not RETENTION_MARGIN <= number("gate_retention") <= 1.0 - RETENTION_MARGIN:
            raise ValueError(
                f"gate_retention must lie in [{RETENTION_MARGIN:g}, 1 - {RETENTION_MARGIN:g}] (strictly inside (0, 1), so the "
                f"gate bias stays finite), got {self.gate_retention!r}"
            )
        if self.lora_alpha is not None and not number("lora_alpha") > 0:
            raise ValueError(f"lora_alpha must be a positive finite number or None, got {self.lora_alpha!r}")
        targets = self.targets
        unknown = [t for t in targets if t not in DEFAULT_TARGETS]
        if unknown or not targets or len(set(targets)) != len(targets):
            raise ValueError(
                f"target_modules must be a non-empty list without repeats drawn from {list(DEFAULT_TARGETS)}; "
                f"unknown or repeated: {unknown or targets}"
            )

    # -- derived values --------------------------------------------------------------------------
    @property
    def targets(self) -> tuple[str, ...]:
        if self.target_modules is None:
            return DEFAULT_TARGETS
        if isinstance(self.target_modules, str):
            return (self.target_modules,)
        return tuple(self.target_modules)

    @property
    def rows(self) -> int:
        return self.max_steps if self.max_steps is not None else self.num_steps

    @property
    def scale(self) -> float:
        return (self.lora_alpha if self.lora_alpha is not None else self.r) / self.r

    @property
    def gate_bias(self) -> float:
        g = 1.0 - float(self.gate_retention)
        return math.log(g / (1.0 - g))

    @property
    def is_causal(self) -> bool:
        return self.modulation == "static" or self.controller_pooling in CAUSAL_POOLINGS

    def require_causal(self, purpose: str) -> None:
        """The one refusal of non-causal modulation, for every host: raise ValueError unless no position reads
        a later one. purpose: what the caller wanted to do, e.g. "be served by vLLM"."""
        if not self.is_causal:
            raise ValueError(
                f"controller_pooling={self.controller_pooling!r} lets every position read the whole sequence, future "
                f"tokens included (a reference reproduction only), so this adapter cannot {purpose}; use one trained "
                "with controller_pooling='causal_mean' or 'token', or modulation='static'"
            )

    def method_fields(self) -> dict:
        """The Ouroboros fields only (what an exported checkpoint's config stores)."""
        return {name: getattr(self, name) for name in OuroborosSpec.__dataclass_fields__}

    # -- checks against a model ------------------------------------------------------------------
    def resolve(self, num_layers: int, projection_shapes: dict[str, tuple[int, int]]) -> "LayerPlan":
        """Check the spec against a model with `num_layers` layers whose recurrent-layer projections have
        `projection_shapes[name] = (d_out, d_in)`, and return which layers go where."""
        p, c = self.num_prelude_layers, self.num_coda_layers
        if p + c >= num_layers:
            raise ValueError(
                f"num_prelude_layers + num_coda_layers must be < the model's {num_layers} layers "
                f"(got {p} + {c} = {p + c}); the allowed range for their sum is 0..{num_layers - 1}"
            )
        span = list(range(p, num_layers - c))
        if len(span) < 2:
            raise ValueError(
                f"the removed span (layers {p}..{num_layers - c - 1}) holds {len(span)} layer; the SVD bases need at "
                f"least one removed layer besides the recurrent one, so num_prelude_layers + num_coda_layers must be "
                f"<= {num_layers - 2}"
            )
        rec = self.recurrent_layer_index if self.recurrent_layer_index is not None else span[len(span) // 2]
        if rec not in span:
            raise ValueError(
                f"recurrent_layer_index={rec} lies inside the prelude or coda; it must be in the removed span "
                f"{span[0]}..{span[-1]} (num_prelude_layers={p}, num_coda_layers={c}, {num_layers} layers)"
            )
        for name in self.targets:
            if name not in projection_shapes:
                raise ValueError(f"target module {name!r} is not a projection of this model: {sorted(projection_shapes)}")
            d_out, d_in = projection_shapes[name]
            if self.r > min(d_out, d_in):
                raise ValueError(
                    f"r={self.r} is larger than projection {name!r} allows: r must be <= min(d_out, d_in) = {min(d_out, d_in)}"
                )
        if self.coda_lora_r and projection_shapes:  # the coda LoRA covers every projection of every coda layer
            name, (d_out, d_in) = min(projection_shapes.items(), key=lambda item: min(item[1]))
            if self.coda_lora_r > min(d_out, d_in):
                raise ValueError(
                    f"coda_lora_r={self.coda_lora_r} is larger than the smallest coda projection ({name!r}, {d_out} x {d_in}) "
                    f"allows: coda_lora_r must be <= {min(d_out, d_in)}"
                )
        return LayerPlan(
            num_layers=num_layers,
            prelude=tuple(range(p)),
            recurrent=rec,
            removed=tuple(i for i in span if i != rec),
            coda=tuple(range(num_layers - c, num_layers)),
            num_steps=self.num_steps,
        )


@dataclass(frozen=True)
class LayerPlan:
    """Which pretrained layers run where, and which KV-cache slot each application uses."""

    num_layers: int
    prelude: tuple
    recurrent: int
    removed: tuple  # dropped layers (the SVD bases come from them)
    coda: tuple
    num_steps: int

    @property
    def num_slots(self) -> int:
        """KV-cache slots per token: one per prelude layer, one per recurrence step, one per coda layer."""
        return len(self.prelude) + self.num_steps + len(self.coda)

    def prelude_slot(self, i: int) -> int:
        return i

    def step_slot(self, t: int) -> int:
        return len(self.prelude) + t

    def coda_slot(self, k: int) -> int:
        return len(self.prelude) + self.num_steps + k
