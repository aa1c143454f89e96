"""Model summary: parameters, FLOPs/MACs and activation memory of one training step, per stage.

What is counted and how:

* **Parameters**: ``numel`` of every parameter (total and trainable). For models with an
  official counterpart (HiFuse, HEMF), also the parameters of official modules the official forward
  never calls (``model.official_unused_params()``), so the official count is reproduced.
* **FLOPs** with :class:`torch.utils.flop_counter.FlopCounterMode`: it ships with torch (no extra
  dependency), runs on any device, sees every aten op including the fused attention ops' fake
  kernels, and attributes counts to the module hierarchy, which gives the per-stage split. It counts
  matrix multiplications and convolutions (incl. SDPA); element-wise ops, norms and softmax are not
  counted, the usual convention of papers' GFLOPs tables. MACs = FLOPs / 2.
* **Activation memory**: the bytes of the tensors autograd saves for backward during one forward in
  training mode, collected with :func:`torch.autograd.graph.saved_tensors_hooks`. Each storage is
  counted once; parameters and buffers are excluded. This is what a training step keeps alive
  between forward and backward, measured, on any device (CPU included).

Stages are the model's top-level children (a top-level ``ModuleList``/``ModuleDict`` is opened one
level, so ``stages.0`` .. ``stages.3`` appear separately); what runs directly in the model's own
``forward`` is reported as ``(top level)``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn

TOP = "(top level)"


@dataclass
class StageSummary:
    name: str
    params: int
    flops: int
    activation_bytes: int


@dataclass
class ModelSummary:
    model: str
    image_size: List[int]
    batch_size: int
    in_chans: int
    params_total: int
    params_trainable: int
    params_official_unused: Optional[int]
    flops: int
    macs: int
    activation_bytes: int
    stages: List[StageSummary] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format(self) -> str:
        """A plain-text table for the terminal."""
        h, w = self.image_size
        lines = [
            f"{self.model}: input ({self.batch_size}, {self.in_chans}, {h}, {w})",
            f"  parameters        {self.params_total:,} (trainable {self.params_trainable:,})",
        ]
        if self.params_official_unused is not None:
            lines.append(
                f"  official unused   {self.params_official_unused:,} in official modules the forward never calls "
                f"(official total {self.params_total + self.params_official_unused:,})"
            )
        lines += [
            f"  FLOPs             {_si(self.flops)} ({_si(self.macs)} MACs)",
            f"  activation memory {_mb(self.activation_bytes)} saved for backward (one training step)",
            "",
            f"  {'stage':<24} {'params':>14} {'FLOPs':>10} {'activations':>12}",
        ]
        for s in self.stages:
            lines.append(f"  {s.name:<24} {s.params:>14,} {_si(s.flops):>10} {_mb(s.activation_bytes):>12}")
        return "\n".join(lines)


def _si(n: float) -> str:
    for unit, f in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.2f}{unit}"
    return f"{n:.0f}"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def stage_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Top-level children, with top-level ``ModuleList``/``ModuleDict`` containers opened one level."""
    out: Dict[str, nn.Module] = {}
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            for sub, m in child.named_children():
                out[f"{name}.{sub}"] = m
        else:
            out[name] = child
    return out


def official_unused_params(model: nn.Module) -> Optional[int]:
    """Parameters of official modules that the model's official counterpart builds but never calls
    (``model.official_unused_params()``, which HiFuse and HEMF compute from their structure), else None."""
    fn = getattr(model, "official_unused_params", None)
    return fn() if callable(fn) else None


class _StageTracker:
    """Which stage runs now: hooks on every module of each stage, so a stage counts whether the model calls
    the stage module itself or only its parts (``self.backbone.forward_intermediates(x)``, ``for blk in
    self.blocks``). ``on_switch(previous_stage)`` is called whenever the running stage changes."""

    def __init__(self, model: nn.Module, on_switch=None):
        self.stack: List[str] = []
        self.on_switch = on_switch
        self.handles = []
        for name, stage in stage_modules(model).items():
            for m in stage.modules():
                self.handles.append(m.register_forward_pre_hook(self._enter(name)))
                self.handles.append(m.register_forward_hook(self._leave))

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else TOP

    def _enter(self, name: str):
        def hook(module, args) -> None:
            if self.on_switch is not None and name != self.current:
                self.on_switch(self.current)
            self.stack.append(name)

        return hook

    def _leave(self, module, args, out) -> None:
        name = self.stack.pop()
        if self.on_switch is not None and name != self.current:
            self.on_switch(name)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def count_flops(model: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """FLOPs of one forward, per stage name plus ``TOP`` and ``"total"``; attention counts as the reference
    computes it whichever backend runs (:mod:`fusionblocks.ops.flops`)."""
    from torch.utils.flop_counter import FlopCounterMode

    out: Dict[str, int] = {name: 0 for name in stage_modules(model)}
    out[TOP] = 0
    counter = FlopCounterMode(display=False)
    mark = [0]

    def switch(previous: str) -> None:  # the FLOPs since the last switch belong to the stage that ran them
        now = int(counter.get_total_flops())
        out[previous] += now - mark[0]
        mark[0] = now

    tracker = _StageTracker(model, switch)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(x)
            switch(tracker.current)
    finally:
        tracker.remove()
        model.train(was_training)
    out["total"] = int(counter.get_total_flops())
    return out


def activation_bytes(model: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """Bytes saved for backward by one training-mode forward, per stage name plus ``TOP``.

    Runs forward and backward (so the step is complete and the saved tensors are freed).
    """
    stages = stage_modules(model)
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: set = set()
    per: Dict[str, int] = {name: 0 for name in stages}
    per[TOP] = 0

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            size = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
            return t
        if ptr not in exclude and ptr not in seen and size:
            seen.add(ptr)
            per[tracker.current] += size
        return t

    def unpack(t):
        return t

    tracker = _StageTracker(model)
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = model(x)
        loss = out.float().sum() if isinstance(out, torch.Tensor) else sum(o.float().sum() for o in out)
        loss.backward()
    finally:
        tracker.remove()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return per


def summarize(
    model: Union[str, nn.Module],
    image_size: Union[int, tuple] = 224,
    batch_size: int = 1,
    *,
    in_chans: Optional[int] = None,
    num_classes: int = 7,
    device: Union[str, torch.device] = "cpu",
) -> ModelSummary:
    """Summarize a model (a registered name or an ``nn.Module``) at one input size.

    Args:
        model: a name of :func:`fusionblocks.list_models` or a module.
        image_size: ``N`` or ``(H, W)``.
        batch_size: ``B`` of the input; FLOPs and activation memory are for the whole batch.
        in_chans: input channels; by default the model's ``in_chans`` attribute, else 3.
        num_classes: classifier outputs when ``model`` is a name (7: ISIC2018, the official counts' setting).
        device: where to run.

    Returns:
        A :class:`ModelSummary` (``.format()`` for text, ``.to_dict()`` for JSON).
    """
    if isinstance(model, str):
        from .models.registry import create_model

        name = model
        model = create_model(model, num_classes=num_classes)
    else:
        name = type(model).__name__
        num_classes = None
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if in_chans is None:
        in_chans = int(getattr(model, "in_chans", 3))
    model = model.to(device)
    x = torch.randn(batch_size, in_chans, h, w, device=device)
    flops = count_flops(model, x)
    act = activation_bytes(model, x)
    stages = [
        StageSummary(n, sum(p.numel() for p in m.parameters()), flops[n], act[n])
        for n, m in stage_modules(model).items()
    ]
    if flops[TOP] or act[TOP]:
        stage_params = sum(s.params for s in stages)
        top_params = sum(p.numel() for p in model.parameters()) - stage_params
        stages.append(StageSummary(TOP, top_params, flops[TOP], act[TOP]))
    return ModelSummary(
        model=name,
        image_size=[h, w],
        batch_size=batch_size,
        in_chans=in_chans,
        params_total=sum(p.numel() for p in model.parameters()),
        params_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        params_official_unused=official_unused_params(model),
        flops=flops["total"],
        macs=flops["total"] // 2,
        activation_bytes=sum(act.values()),
        stages=stages,
    )
