"""Paper section 5.1 eq. (2) and Table 3, checked against hand computations."""

import pytest
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from mnv2 import create_model
from mnv2.analysis.memory import block_groups, eq2_bytes, memory_report, resolution_table, schedule, table3_rows, trace
from mnv2.paper import reference

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy() -> fx.GraphModule:
    """x (1x3x4x5) -> relu -> *2 -> cat with x -> spatial sum: a residual-like toy with a concat."""
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.relu, (x,))
    b = g.call_function(torch.mul, (a, 2.0))
    c = g.call_function(torch.cat, ([x, b], 1))
    s = g.call_function(torch.sum, (c,), {"dim": (2, 3)})
    g.output(s)
    gm = fx.GraphModule(nn.Module(), g)
    ShapeProp(gm).propagate(torch.zeros(1, 3, 4, 5))
    return gm


def test_eq2_toy_graph_equals_hand_computation():
    ops = schedule(_toy())
    # Elements: relu 60 in + 60 out; mul 60 + 60; cat (60 + 60) in + 120 out = 240; sum 120 in + 6 out.
    assert [op.bytes(1) for op in ops] == [120, 120, 240, 126]
    peak, op = eq2_bytes(ops, dtype_bytes=2)
    assert (peak, op.name) == (480, "cat")
    # A workspace term is added to its op only: 120 * 2 + 600 bytes on the mul op beats the concat's 480.
    peak, op = eq2_bytes(ops, 2, workspace={"mul": 600})
    assert (peak, op.name) == (840, "mul")


def test_eq2_toy_graph_fused_op_hides_inner_tensor():
    gm = _toy()
    ops = schedule(gm, {"relu": "f", "mul": "f"})
    fused = next(op for op in ops if op.name == "f")
    assert [t.name for t in fused.inputs] == ["x"] and [t.name for t in fused.outputs] == ["mul"]
    assert fused.bytes(1) == 60 + 60  # relu's output is internal to the fused op
    # Table 3 style: only op outputs are materialised; at 4x5 the largest is the 6-channel concat.
    cells = resolution_table(ops, 2)
    assert (cells[0].resolution, cells[0].channels, cells[0].bytes) == ((4, 5), 6, 240)


def test_mobilenet_v2_eq2_peaks_by_hand():
    r = memory_report(create_model("mobilenet_v2"), 224)
    # (a): block 1's depthwise reads the 96x112x112 expansion and writes 96x56x56 (16-bit).
    assert r.peak_materialised == 2 * (96 * 112 * 112 + 96 * 56 * 56)
    assert r.peak_op_materialised.name == "blocks_1_dw"
    # (b): the stem fused with block 0 reads the 3x224x224 image and writes 16x112x112.
    assert r.peak_fused == 2 * (3 * 224 * 224 + 16 * 112 * 112)
    assert r.peak_op_fused.name == "stem+blocks.0"


def test_mobilenet_v2_materialised_tensors_have_table2_shapes():
    gm = trace(create_model("mobilenet_v2"), 224)
    ops = schedule(gm, block_groups(gm))
    shapes = {(t.channels, t.resolution[0]) for op in ops for t in op.outputs}
    # Paper Table 2, by hand: block outputs (c at the block's output resolution), the 1280 conv, pool and logits.
    table2 = {(16, 112), (24, 56), (32, 28), (64, 14), (96, 14), (160, 7), (320, 7), (1280, 7), (1280, 1), (1000, 1)}
    assert shapes == table2
    # 17 bottlenecks, the first fused with the stem: 16 block ops + the fused one.
    assert sum(1 for op in ops if op.name.startswith(("blocks.", "stem+"))) == 17
    # Every op (a) also materialises the expansions: t * k channels at the input resolution of each block.
    every = {(t.channels, t.resolution[0]) for op in schedule(gm) for t in op.outputs}
    assert {(96, 112), (144, 56), (192, 28), (384, 14), (576, 14), (960, 7)} <= every


def test_table3_rows_carry_paper_values_beside_ours():
    r = memory_report(create_model("mobilenet_v1"), 224)
    rows = {row["resolution"]: row for row in table3_rows(r, reference.TABLE3["mobilenet_v1"])}
    assert (rows["56x56"]["fused_channels"], rows["56x56"]["paper_channels"]) == (128, 128)
    assert rows["56x56"]["fused_kb"] == pytest.approx(128 * 56 * 56 * 2 / 1000)
    assert rows["112x112"]["paper_kb"] is None  # the paper's O(1)


def test_shufflenet_stem_fused_with_max_pool_leaves_nothing_at_112():
    r = memory_report(create_model("shufflenet_v1"), 224)
    fused = {c.resolution[0]: c.channels for c in r.table_fused}
    every = {c.resolution[0]: c.channels for c in r.table_materialised}
    assert 112 not in fused and every[112] == 48  # 2x stem: 48 channels
    assert fused[56] == 48 and fused[28] == 480 and fused[14] == 960 and fused[7] == 1920


def test_profile_memory_cli_prints_ours_beside_paper(capsys):
    import json

    from mnv2.cli.main import main

    assert main(["profile", "mobilenet_v2", "--memory", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["eq2"]["fused_bytes"] == 2 * (3 * 224 * 224 + 16 * 112 * 112)
    row = next(r for r in out["table3"] if r["resolution"] == "56x56")
    assert (row["fused_channels"], row["paper_channels"], row["paper_kb"]) == (24, 32, 200)
    assert out["paper_max_kb"] == 200
    assert main(["profile", "shufflenet_v1", "--width", "2", "--memory"]) == 0
    text = capsys.readouterr().out
    assert "480/753" in text and "400/600" in text  # ours (g=3) and the paper's (g=2 widths) side by side
