"""The cost model behind ``fastvlm kernels``' projections and docs/kernels.md, on hand-computed cases."""

import pytest

from fastvlm import aot


def test_one_tile_gemm_is_memory_bound_and_reads_each_operand_once():
    c = aot.gemm(128, 256, 64, "bf16")  # exactly one 128 x 256 cuBLAS tile
    assert c.flops == 2 * 128 * 256 * 64 == 4_194_304
    assert c.hbm == c.l2 == (128 * 64 + 64 * 256 + 128 * 256) * 2 == 114_688
    assert c.time_s == pytest.approx(114_688 / 3.35e12 + 3e-6)


def test_tiling_re_reads_come_from_l2():
    # 2 x 2 tiles of 64: A (bf16) loaded by both column tiles, B (bf16 weight + fp32 score) by both row tiles
    c = aot.tiled_matmul(128, 128, 32, a_bytes=2, b_bytes=6, out_bytes=2, tile=(64, 64), dtype="bf16")
    assert c.l2 == 128 * 32 * 2 * 2 + 32 * 128 * 6 * 2 + 128 * 128 * 2 == 98_304
    assert c.hbm == 128 * 32 * 2 + 32 * 128 * 6 + 128 * 128 * 2 == 65_536


@pytest.mark.parametrize("dtype,peak,e", [("fp32", 67e12, 4), ("tf32", 495e12, 4), ("bf16", 989e12, 2),
                                          ("fp16", 989e12, 2)])
def test_8k_gemm_at_its_dtypes_peak_or_its_l2_re_reads(dtype, peak, e):
    c = aot.gemm(8192, 8192, 8192, dtype)  # A loaded by 32 column tiles of 256, B by 64 row tiles of 128
    flops, l2 = 2 * 8192**3, 8192 * 8192 * e * (32 + 64 + 1)
    assert c.flops == flops and c.l2 == l2 and c.hbm == 3 * 8192 * 8192 * e
    assert c.time_s == pytest.approx(max(flops / peak, l2 / 10e12) + 3e-6)
    if dtype == "fp32":  # IEEE fp32 FMA: compute bound, 2 ms
        assert c.time_s == pytest.approx(flops / 67e12 + 3e-6)


def test_recompute_is_counted_and_chains_add():
    fused = aot.orth_costs(64, 64, 32, 16, "bf16")["fused"]
    assert fused.flops == 2 * 64 * 64 * 32 + 2 * 64 * 32 * 16 * 2  # x @ R once per 32-column tile: twice
    a, b = aot.elementwise(1000, 8), aot.gemm(128, 256, 64, "bf16")
    assert (a + b).time_s == pytest.approx(a.time_s + b.time_s)
    assert a.hbm == a.l2 == 8000 and a.time_s == pytest.approx(8000 / 3.35e12 + 3e-6)


def test_projection_covers_the_issue_shapes_and_the_dispatch_takes_the_faster_path():
    rows = aot.projection_table()
    assert {r["shape"] for r in rows} >= {"6304x768->2304", "1576x1024->3072", "B=256 K=21843 D=1024"}
    for r in rows:
        faster = "fused" if r["fused_us"] <= r["composition_us"] else "composition"
        assert r["chosen"] == faster, r
