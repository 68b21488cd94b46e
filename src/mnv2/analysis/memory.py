"""Working memory of a network's forward pass (paper section 5.1, equation 2, Table 3), from its traced graph.

With only trivial parallel structure (residuals) there is one sensible execution order, and the memory a schedule needs
is paper eq. (2):  M(G) = max over ops of [ sum |inputs| + sum |outputs| + |workspace| ].
What counts as an "op" decides the answer:
  (a) "materialised": every op of the traced graph (conv-BN-act units, pools, adds, ...) writes its output whole, as a
      framework does by default;
  (b) "fused": each bottleneck block is ONE op whose inner tensors are disposable (they are produced and consumed slice
      by slice, `mnv2.deploy.tsplit`), and the first layer is fused with the op that consumes it (Table 3's caption:
      the stem conv is linear and per output channel, so its output never has to exist whole).
Table 3 lists, per resolution, the largest tensor that must be materialised; `resolution_table` computes it.

The graph comes from torch.fx with conv-BN-act units kept whole (they are one op for any runtime: BN folds into the
conv, the activation is applied in place) and shapes from `ShapeProp`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..models.blocks import Conv2dSame, ConvBNAct, InvertedResidual
from ..models.mobilenetv1 import DepthwiseSeparable
from ..models.shufflenet import ShuffleUnit

# Modules whose forward is one op in mode (b): the bottleneck-like blocks of the three networks of Table 3.
BLOCK_TYPES: tuple[type[nn.Module], ...] = (InvertedResidual, DepthwiseSeparable, ShuffleUnit)
# The module name of the first layer that Table 3's caption fuses with its consumer.
STEM = "stem"


class _Tracer(fx.Tracer):
    """Keeps conv-BN-act units (and TF 'SAME' convs, whose padding is data-dependent Python) as single nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (ConvBNAct, Conv2dSame)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, input_size: int | tuple[int, int] = 224, batch: int = 1) -> fx.GraphModule:
    """The model's fx graph with every node's output shape (`node.meta["tensor_meta"]`) for one input size."""
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    was_training = model.training
    model.eval()
    try:
        graph = _Tracer().trace(model)
        gm = fx.GraphModule(model, graph)
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(batch, 3, h, w))
    finally:
        model.train(was_training)
    return gm


@dataclass(frozen=True)
class Tensor:
    """One activation tensor of the graph: the node that produces it and its shape."""
    name: str
    shape: tuple[int, ...]

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def resolution(self) -> tuple[int, int]:
        """(H, W) of an N x C x H x W map; (1, 1) for an N x C vector."""
        return (self.shape[2], self.shape[3]) if len(self.shape) == 4 else (1, 1)

    @property
    def channels(self) -> int:
        return self.shape[1] if len(self.shape) >= 2 else 1


@dataclass
class Op:
    """A scheduled op: the graph nodes it runs, the tensors it reads from outside and the tensors it leaves behind."""
    name: str
    nodes: list[str]
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)

    def bytes(self, dtype_bytes: int = 2, workspace: int = 0) -> int:
        """The op's term in paper eq. (2)."""
        return dtype_bytes * (sum(t.numel() for t in self.inputs) + sum(t.numel() for t in self.outputs)) + workspace


def _tensor(node: fx.Node) -> Tensor | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return Tensor(node.name, tuple(meta.shape))


def _computing(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op in ("call_module", "call_function", "call_method")]


def block_groups(gm: fx.GraphModule, fuse_stem: bool = True) -> dict[str, str]:
    """Mode (b) grouping: node name -> op name. A node inside a `BLOCK_TYPES` module belongs to that (outermost)
    block; any other node is an op of its own. With `fuse_stem`, the `stem` op joins the op that consumes it."""
    groups: dict[str, str] = {}
    for node in _computing(gm.graph):
        key = node.name
        for path, (_, typ) in node.meta.get("nn_module_stack", {}).items():
            if isinstance(typ, type) and issubclass(typ, BLOCK_TYPES):
                key = path  # the block's qualified module name, e.g. "blocks.3"
                break
        groups[node.name] = key
    if fuse_stem:
        stem = [n for n in _computing(gm.graph) if n.op == "call_module" and n.target == STEM]
        if len(stem) == 1:
            consumers = {groups[u.name] for u in stem[0].users if u.name in groups}
            if len(consumers) == 1:
                target = consumers.pop()
                fused = f"{STEM}+{target}"
                for name, g in groups.items():
                    if g in (groups[stem[0].name], target):
                        groups[name] = fused
    return groups


def schedule(gm: fx.GraphModule, groups: dict[str, str] | None = None) -> list[Op]:
    """The ops of the graph in execution order. `groups` maps node names to op names (nodes sharing an op name run as
    one op, mode (b)); without it every computing node is its own op (mode (a))."""
    nodes = _computing(gm.graph)
    groups = groups or {}
    ops: dict[str, Op] = {}
    owner: dict[str, str] = {}
    for node in nodes:
        key = groups.get(node.name, node.name)
        ops.setdefault(key, Op(key, [])).nodes.append(node.name)
        owner[node.name] = key
    for node in nodes:
        op = ops[owner[node.name]]
        for arg in node.all_input_nodes:
            if owner.get(arg.name) == op.name or arg.op == "get_attr":
                continue
            t = _tensor(arg)
            if t is not None and t not in op.inputs:
                op.inputs.append(t)
        leaves_op = any(owner.get(u.name) != op.name for u in node.users)
        t = _tensor(node)
        if leaves_op and t is not None and t not in op.outputs:
            op.outputs.append(t)
    return list(ops.values())


def eq2_bytes(ops: Iterable[Op], dtype_bytes: int = 2, workspace: dict[str, int] | None = None) -> tuple[int, Op]:
    """Paper eq. (2): max over ops of [sum |inputs| + sum |outputs| + |workspace|] in bytes, and the op that sets it."""
    workspace = workspace or {}
    best = max(ops, key=lambda op: op.bytes(dtype_bytes, workspace.get(op.name, 0)))
    return best.bytes(dtype_bytes, workspace.get(best.name, 0)), best


def materialised(ops: Iterable[Op]) -> list[Tensor]:
    """Tensors written whole by the schedule: every op's outputs (the network input is given, not produced)."""
    seen, out = set(), []
    for op in ops:
        for t in op.outputs:
            if t.name not in seen:
                seen.add(t.name)
                out.append(t)
    return out


@dataclass(frozen=True)
class TableCell:
    """Table 3's cell: the largest tensor materialised at a resolution (channels, bytes) and the node producing it."""
    resolution: tuple[int, int]
    channels: int
    bytes: int
    node: str


def resolution_table(ops: Iterable[Op], dtype_bytes: int = 2) -> list[TableCell]:
    """Per resolution (largest first), the largest materialised tensor, as Table 3 lists it."""
    best: dict[tuple[int, int], Tensor] = {}
    for t in materialised(ops):
        r = t.resolution
        if r not in best or t.numel() > best[r].numel():
            best[r] = t
    return [TableCell(r, best[r].channels, best[r].numel() * dtype_bytes, best[r].name)
            for r in sorted(best, key=lambda r: -r[0] * r[1])]


@dataclass
class MemoryReport:
    """Eq. (2) peaks and Table 3 rows of one model at one input size, in both modes."""
    input_size: tuple[int, int]
    dtype_bytes: int
    peak_materialised: int
    peak_op_materialised: Op
    peak_fused: int
    peak_op_fused: Op
    table_materialised: list[TableCell]
    table_fused: list[TableCell]


def memory_report(model: nn.Module, input_size: int | tuple[int, int] = 224, dtype_bytes: int = 2) -> MemoryReport:
    """Paper eq. (2) and the Table 3 rows of `model` (fp16 activations by default, as in Table 3)."""
    gm = trace(model, input_size)
    ops_a = schedule(gm)
    ops_b = schedule(gm, block_groups(gm))
    pa, op_a = eq2_bytes(ops_a, dtype_bytes)
    pb, op_b = eq2_bytes(ops_b, dtype_bytes)
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    return MemoryReport(size, dtype_bytes, pa, op_a, pb, op_b, resolution_table(ops_a, dtype_bytes),
                        resolution_table(ops_b, dtype_bytes))


def table3_rows(report: MemoryReport, paper: dict | None = None) -> list[dict]:
    """Table 3 rows, ours beside the paper's: one dict per resolution (paper rows first, then any other resolution
    our graph materialises), with channels and kB (1000 bytes, the paper's unit) in both modes.
    `paper` is one column of `mnv2.paper.reference.TABLE3` (resolution -> (channels, kB or None for O(1)))."""
    fused = {c.resolution: c for c in report.table_fused}
    every = {c.resolution: c for c in report.table_materialised}
    sizes = [(r, r) for r in (paper or {})]
    sizes += [r for r in list(every) + list(fused) if r not in sizes]
    rows = []
    for r in dict.fromkeys(sizes):
        b, a = fused.get(r), every.get(r)
        p = (paper or {}).get(r[0]) if r[0] == r[1] else None
        rows.append({"resolution": f"{r[0]}x{r[1]}",
                     "fused_channels": b.channels if b else None, "fused_kb": b.bytes / 1000 if b else None,
                     "fused_node": b.node if b else None,
                     "every_channels": a.channels if a else None, "every_kb": a.bytes / 1000 if a else None,
                     "every_node": a.node if a else None,
                     "paper_channels": p[0] if p else None, "paper_kb": p[1] if p else None})
    return rows
