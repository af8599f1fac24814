"""The practitioner's baseline, `pruned_lora`: the same prelude + recurrent layer (once) + coda as an Ouroboros arm,
run as a plain transformers model, with a standard PEFT `LoraConfig` on all seven projections of every kept layer.

    model = build_pruned_lora(base_model, {"num_prelude_layers": 7, "num_coda_layers": 7})   # rank matched
    model(input_ids=ids)                  # the 15-layer pruned model with its LoRA
    with full_model(model):               # the whole 30-layer base (the distillation teacher), adapter off
        model(input_ids=ids)

One copy of the weights. The PEFT model wraps the *whole* base model: the LoRA sits on the kept layers only
(`layers_to_transform`), and a `PrunedStack` swaps the decoder's layer list for the kept layers around every forward
of the decoder, so every caller (Trainer, DDP, held-out evaluation) runs the pruned model, while `full_model()`
turns the swap off to run the full base: the teacher of `pruned_lora_kd`. The removed layers stay in memory, as they
do for every Ouroboros arm (an Ouroboros adapter's `disable_adapter()` runs them too); a standalone 15-layer copy
would save them (~half of SmolLM2-135M's decoder-layer weights) but could not be the teacher without loading the
full model a second time.

Rank: chosen so the LoRA's trainable parameters are within 5 % of the Ouroboros adapter the same options describe
(the Controller arm by default): `pruned_lora_plan`. LoRA scale 1 (lora_alpha = rank, as the coda LoRA and the
Ouroboros bases use), dropout 0, B zero-initialised, so training starts from exactly the pruned model. Where no
uniform rank lands within 5 % (SmolLM2-135M at the default split: r 6 is 6.0 % under, r 7 9.6 % over), some kept
layers get rank r + 1 through PEFT's own `rank_pattern` (whole layers, evenly spaced), which is still a plain
`LoraConfig`.

Where the LoRA sits (`lora_layers`): "kept" (the default, the issue's baseline) puts it on every kept layer;
"recurrent" on the recurrent layer alone, at the rank that matches the same budget. The second is not what a
practitioner would pick; it is the control that tells the two differences from an Ouroboros arm apart: where the
trainable update sits (one layer vs fifteen) and how often that layer runs (once vs num_steps times, modulated).

The saved adapter is an ordinary PEFT LoRA adapter of the *whole* base model (keys name the original layer
indices) plus `pruned_stack.json` (which layers run, the split, the rank plan and the base fingerprint of the kept
weights); `load_pruned_lora(base, folder)` puts both back.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

PRUNED_STACK_FILE = "pruned_stack.json"
PARAM_TOLERANCE = 0.05  # the "within 5 %" of the matched arm's trainable parameters
LORA_LAYERS = ("kept", "recurrent")  # which kept layers carry the LoRA: all of them, or the recurrent layer alone
STACK_ATTRIBUTE = "ouroboros_pruned_stack"  # where the causal LM keeps its PrunedStack


# ----------------------------------------------------------------------------------------------------
# the pruned stack: kept layers around each forward, the full model on request
# ----------------------------------------------------------------------------------------------------


class PrunedStack:
    """Run a transformers causal LM on its decoder layers `kept` (in that order) while keeping every layer: the
    decoder's `layers` is the kept list during each of its forwards (a pre-hook sets it, a hook that also runs on
    an exception puts the whole list back). `with stack.full():` runs the whole model. Attach with `attach()`."""

    def __init__(self, causal_lm: nn.Module, kept):
        from ouroboros_plugins import find_backbone

        self.backbone = find_backbone(causal_lm.config.model_type)
        self.decoder = self.backbone.decoder(causal_lm)
        self.all_layers = self.backbone.layers(self.decoder)
        self.kept = tuple(int(i) for i in kept)
        n = len(self.all_layers)
        if not self.kept or any(not 0 <= i < n for i in self.kept) or len(set(self.kept)) != len(self.kept):
            raise ValueError(f"kept layers must be distinct indices in 0..{n - 1}, got {list(self.kept)}")
        self.kept_layers = nn.ModuleList([self.all_layers[i] for i in self.kept])  # the same modules, not copies
        self._full = 0
        self._handles = []

    def attach(self, causal_lm: nn.Module) -> "PrunedStack":
        if getattr(causal_lm, STACK_ATTRIBUTE, None) is not None:
            raise ValueError("this model already runs a pruned stack")
        self._handles = [
            self.decoder.register_forward_pre_hook(self._enter),
            self.decoder.register_forward_hook(self._leave, always_call=True),
        ]
        object.__setattr__(causal_lm, STACK_ATTRIBUTE, self)  # a plain attribute: not a submodule
        return self

    def detach(self, causal_lm: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.decoder.layers = self.all_layers
        if getattr(causal_lm, STACK_ATTRIBUTE, None) is self:
            object.__delattr__(causal_lm, STACK_ATTRIBUTE)

    def _enter(self, module, args):
        if not self._full:
            module.layers = self.kept_layers

    def _leave(self, module, args, output):
        module.layers = self.all_layers

    @contextlib.contextmanager
    def full(self):
        """Run the whole model (every layer) inside this block."""
        self._full += 1
        try:
            yield
        finally:
            self._full -= 1


def pruned_stack_of(model) -> Optional[PrunedStack]:
    """The PrunedStack a model runs (through DDP / PEFT wrappers), or None."""
    for _ in range(4):
        stack = model.__dict__.get(STACK_ATTRIBUTE)
        if stack is not None:
            return stack
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # PeftModel
            model = model.get_base_model()
        else:
            return None
    return None


@contextlib.contextmanager
def full_model(model):
    """Inside this block a pruned_lora model runs its whole base model; any other model is unchanged. The adapter is
    not touched: combine with `model.disable_adapter()` for the teacher."""
    stack = pruned_stack_of(model)
    with stack.full() if stack is not None else contextlib.nullcontext():
        yield model


# ----------------------------------------------------------------------------------------------------
# the rank: within 5 % of the matched Ouroboros adapter's trainable parameters
# ----------------------------------------------------------------------------------------------------


@dataclass
class PrunedLoraPlan:
    """What a pruned_lora model is: the kept layers and the LoRA ranks, with the parameter budget it matches."""

    kept: tuple  # layer indices in the full model, in running order: prelude + (recurrent,) + coda
    num_prelude_layers: int
    recurrent_layer_index: int
    num_coda_layers: int
    r: int
    raised: tuple = ()  # kept layers (original indices) whose rank is r + 1
    target_params: int = 0  # trainable parameters of the matched Ouroboros adapter
    trainable_params: int = 0  # of this LoRA
    targets: tuple = field(default_factory=tuple)
    lora_layers: tuple = ()  # the layers (original indices) with a LoRA; () = every kept layer (records before the field)

    @property
    def relative_difference(self) -> float:
        return (self.trainable_params - self.target_params) / self.target_params if self.target_params else 0.0

    @property
    def adapted(self) -> tuple:
        """The kept layers that carry a LoRA."""
        return tuple(self.lora_layers) or tuple(self.kept)

    def to_json(self) -> dict:
        out = asdict(self)
        out["relative_difference"] = self.relative_difference
        return json.loads(json.dumps(out))

    def lora_config(self):
        """The standard PEFT LoraConfig: all target projections of the adapted layers, scale 1 (alpha = rank)."""
        from peft import LoraConfig

        patterns = {rf"layers\.{i}\.\w+\.\w+": self.r + 1 for i in self.raised}
        return LoraConfig(r=self.r, lora_alpha=self.r, target_modules=list(self.targets), layers_to_transform=list(self.adapted),
                          layers_pattern="layers", rank_pattern=dict(patterns), alpha_pattern=dict(patterns), lora_dropout=0.0,
                          bias="none", task_type="CAUSAL_LM")


def ouroboros_trainable_params(model, adapter_options: Mapping) -> int:
    """Trainable parameters of the Ouroboros adapter `adapter_options` (OuroborosConfig fields) on `model`, built on
    the meta device (no weights, no SVD): what `ouroboros eval` reports for that arm."""
    from ouroboros_plugins import OuroborosAdapter, OuroborosSpec, find_backbone, plan_for

    fields = {k: adapter_options[k] for k in OuroborosSpec.__dataclass_fields__ if k in adapter_options}
    spec = OuroborosSpec(**fields)
    backbone = find_backbone(model.config.model_type)
    decoder = backbone.decoder(model)
    plan_for(backbone, model.config, decoder, spec)  # the same checks as the arm itself
    shapes = backbone.projection_shapes(backbone.layers(decoder)[0])
    adapter = OuroborosAdapter(spec, model.config.hidden_size, shapes, backbone.rms_eps(model.config), device="meta")
    return sum(p.numel() for p in adapter.parameters())


def match_rank(per_rank: list, target: int, tolerance: float = PARAM_TOLERANCE) -> tuple:
    """(r, raised positions) minimising |LoRA params - target|: rank r on every layer, r + 1 on the layers at the
    returned positions (evenly spaced), where per_rank[k] = parameters one rank costs on layer k. Raises ValueError
    when even the best choice is more than `tolerance` away."""
    if target <= 0:
        raise ValueError(f"the parameter budget to match must be positive, got {target}")
    n = len(per_rank)
    total = sum(per_rank)
    r = max(1, int(target // total))
    best = None
    for rank in (r, r + 1):
        for k in range(n):
            positions = tuple(int(i * n / k) for i in range(k)) if k else ()
            count = rank * total + sum(per_rank[i] for i in positions)
            if best is None or abs(count - target) < abs(best[2] - target):
                best = (rank, positions, count)
    rank, positions, count = best
    if abs(count - target) > tolerance * target:
        raise ValueError(
            f"no LoRA rank gives {target:,} trainable parameters within {tolerance:.0%}: the closest, rank {rank} "
            f"({len(positions)} layers at {rank + 1}), has {count:,}"
        )
    return rank, positions


def pruned_lora_plan(model, adapter_options: Mapping, r: Optional[int] = None, lora_layers: str = "kept") -> PrunedLoraPlan:
    """The pruned_lora arm for `model` (a transformers causal LM; the meta device is enough): the kept layers of the
    split in `adapter_options` (OuroborosConfig fields: num_prelude_layers, num_coda_layers, recurrent_layer_index),
    the layers that carry the LoRA (`lora_layers`: "kept" = all of them, "recurrent" = the recurrent layer alone)
    and the LoRA rank: `r` on every adapted layer when given, else matched to the trainable parameters of the
    Ouroboros adapter `adapter_options` describes (within 5 %)."""
    if lora_layers not in LORA_LAYERS:
        raise ValueError(f"lora_layers (--lora-layers) must be one of {list(LORA_LAYERS)}, got {lora_layers!r}")
    from ouroboros_plugins import DEFAULT_TARGETS, OuroborosSpec, find_backbone, plan_for

    fields = {k: adapter_options[k] for k in OuroborosSpec.__dataclass_fields__ if k in adapter_options}
    backbone = find_backbone(model.config.model_type)
    decoder = backbone.decoder(model)
    layers = backbone.layers(decoder)
    plan = plan_for(backbone, model.config, decoder, OuroborosSpec(**fields))
    kept = plan.prelude + (plan.recurrent,) + plan.coda
    adapted = kept if lora_layers == "kept" else (plan.recurrent,)
    targets = tuple(DEFAULT_TARGETS)
    per_rank, sides = [], []  # parameters one rank costs per adapted layer; the smaller side of each projection
    for i in adapted:
        shapes = [dims for name, dims in backbone.projection_shapes(layers[i]).items() if name in targets]
        per_rank.append(sum(d_out + d_in for d_out, d_in in shapes))
        sides += [min(dims) for dims in shapes]
    narrowest = min(sides)
    target = ouroboros_trainable_params(model, adapter_options)
    if r is not None:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"lora_r (--lora-r) must be an integer >= 1, got {r!r}")
        positions = ()
    else:
        r, positions = match_rank(per_rank, target)
    top = r + (1 if positions else 0)
    if top > narrowest:  # a rank above a projection's smaller side adds parameters, not capacity: not equal-budget
        raise ValueError(f"the LoRA needs rank {top} on {len(adapted)} layer(s) ({lora_layers}) but the narrowest adapted "
                         f"projection has {narrowest} features, so part of the budget could not be used; adapt more "
                         f"layers or give a smaller lora_r (--lora-r)")
    raised = tuple(adapted[p] for p in positions)
    count = r * sum(per_rank) + sum(per_rank[p] for p in positions)
    return PrunedLoraPlan(kept=kept, num_prelude_layers=len(plan.prelude), recurrent_layer_index=plan.recurrent,
                          num_coda_layers=len(plan.coda), r=r, raised=raised, target_params=target, trainable_params=count,
                          targets=targets, lora_layers=() if lora_layers == "kept" else adapted)


# ----------------------------------------------------------------------------------------------------
# build, save, load
# ----------------------------------------------------------------------------------------------------


def lora_trainable_params(peft_model) -> int:
    return sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


def _attach(peft_model, plan: PrunedLoraPlan, base_fingerprint: dict):
    causal_lm = peft_model.get_base_model()
    PrunedStack(causal_lm, plan.kept).attach(causal_lm)
    peft_model.pruned_lora_plan = plan
    peft_model.pruned_lora_fingerprint = base_fingerprint
    return peft_model


def kept_fingerprint(model, plan: PrunedLoraPlan) -> dict:
    """The project's base fingerprint (shapes, rotary settings, a signature of every kept weight: embeddings, the kept
    layers, final norm, output head) of a plain causal LM, before any LoRA wraps its projections."""
    from ouroboros_plugins import LayerPlan, find_backbone, fingerprint

    backbone = find_backbone(model.config.model_type)
    decoder = backbone.decoder(model)
    n = len(backbone.layers(decoder))
    layer_plan = LayerPlan(num_layers=n, prelude=tuple(range(plan.num_prelude_layers)), recurrent=plan.recurrent_layer_index,
                           removed=(), coda=tuple(range(n - plan.num_coda_layers, n)), num_steps=1)
    return fingerprint(backbone, model.config, decoder, layer_plan, model.get_output_embeddings())


def build_pruned_lora(base_model, adapter_options: Mapping, r: Optional[int] = None, lora_layers: str = "kept"):
    """PEFT-wrap `base_model` (modified in place) with the pruned_lora arm: a LoRA on every target projection of the
    adapted layers (`lora_layers`), the pruned stack attached. Returns the PeftModel; `model.pruned_lora_plan` says
    what it is."""
    from peft import get_peft_model

    plan = pruned_lora_plan(base_model, adapter_options, r, lora_layers)
    base_fingerprint = kept_fingerprint(base_model, plan)
    model = get_peft_model(base_model, plan.lora_config())
    got = lora_trainable_params(model)
    if got != plan.trainable_params:  # PEFT matched other modules than planned: never train a different arm silently
        raise RuntimeError(f"the LoRA has {got:,} parameters, the plan {plan.trainable_params:,}")
    return _attach(model, plan, base_fingerprint)


def stack_record(peft_model) -> dict:
    """What pruned_stack.json holds: the plan and the fingerprint of the kept weights (the base it belongs to)."""
    return {"kind": "pruned_lora", "plan": peft_model.pruned_lora_plan.to_json(),
            "base_fingerprint": peft_model.pruned_lora_fingerprint}


def save_stack_record(peft_model, folder) -> None:
    from ouroboros_plugins.atomic import write_json

    write_json(Path(folder) / PRUNED_STACK_FILE, stack_record(peft_model), sort_keys=True)


def read_stack_record(folder) -> dict:
    path = Path(folder) / PRUNED_STACK_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc})") from None
    plan = data.get("plan") if isinstance(data, dict) else None
    if not isinstance(plan, dict) or data.get("kind") != "pruned_lora":
        raise ValueError(f"{path} is not a pruned_lora record (kind 'pruned_lora' with a plan)")
    try:
        plan = PrunedLoraPlan(**{k: v for k, v in plan.items() if k != "relative_difference"})
    except TypeError as exc:
        raise ValueError(f"{path}: bad plan ({exc})") from None
    plan.kept, plan.raised, plan.targets = tuple(plan.kept), tuple(plan.raised), tuple(plan.targets)
    plan.lora_layers = tuple(plan.lora_layers)
    if not set(plan.adapted) <= set(plan.kept):
        raise ValueError(f"{path}: bad plan (LoRA on layers {list(plan.adapted)}, not all of them kept {list(plan.kept)})")
    return {"plan": plan, "base_fingerprint": data.get("base_fingerprint")}


def is_pruned_lora(folder) -> bool:
    return (Path(folder) / PRUNED_STACK_FILE).is_file()


def load_pruned_lora(base_model, folder):
    """A saved pruned_lora adapter on `base_model` (the whole base it was trained on; refused when its kept weights
    differ), with the pruned stack attached. Returns the PeftModel (eval mode)."""
    from peft import PeftModel

    from ouroboros_plugins import check_fingerprint, find_backbone

    record = read_stack_record(folder)
    plan: PrunedLoraPlan = record["plan"]
    backbone = find_backbone(base_model.config.model_type)
    n = len(backbone.layers(backbone.decoder(base_model)))
    if max(plan.kept) >= n:
        raise ValueError(f"{folder}: the adapter keeps layer {max(plan.kept)}, the model has {n} layers")
    actual = kept_fingerprint(base_model, plan)
    if record["base_fingerprint"]:
        check_fingerprint(record["base_fingerprint"], actual)
    model = PeftModel.from_pretrained(base_model, str(folder))
    model.eval()
    return _attach(model, plan, actual)
