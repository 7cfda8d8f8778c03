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


def test_class_tile_kernel_reads_t_and_x_once_per_batch_tile_and_f_once_per_class_tile():
    # B = 256 fits one batch tile; TF32 class tiles of 64: one program, every operand once
    c = aot.class_tile_cost(256, 64, 16, "tf32", out_bytes=3 * 4 * 256)
    assert c.flops == 2 * 256 * 64 * 16 + 4 * 64 * 16 + 2 * 256 * 16 == 536_576
    assert c.hbm == c.l2 == (256 * 16 + 2 * 64 * 16) * 4 + 3072 + 4 * (256 + 64) == 28_928
    # B = 300: two batch tiles of 256; IEEE fp32 class tiles of 32: K = 100 is 4 class tiles
    c = aot.class_tile_cost(300, 100, 8, "fp32", out_bytes=0)
    assert c.l2 == 300 * 8 * 4 * 4 + 2 * 100 * 8 * 4 * 2 + 4 * 400 == 52_800
    assert c.hbm == (300 * 8 + 2 * 100 * 8) * 4 + 4 * 400 == 17_600


def test_residual_forward_is_the_class_tiles_and_one_combine_launch():
    fused = aot.residual_ce_costs(256, 64, 16, "tf32")["fused"]
    partials = 3 * 4 * 256 * 1
    assert fused.launches == 2
    assert fused.hbm == 28_928 + partials + 8 * 256
    assert fused.time_s == pytest.approx(28_928 / 3.35e12 + (partials + 2048) / 3.35e12 + 6e-6)


def test_residual_backward_per_class_chunk():
    # one chunk (64 x 32 x 16, fp32): G recomputed with its sums of G * logit (one batch tile), the folded
    # d uhat + norm backward, the d fhat matmul; then the features' norm backward
    c = aot.residual_ce_backward_costs(64, 32, 16, "fp32")["fused"]
    gdot = 4 * 1 * 32
    g = (64 * 16 + 2 * 32 * 16) * 4 + 4 * 64 * 32 + gdot + 4 * 96  # reads f, t, x; writes G, gdot; rf, ru
    fold = 32 * 64 * 4 + 64 * 16 * 4 + 32 * 16 * 4 * 4 + gdot  # G^T, f; t, x read, d t, d x written; gdot
    dfh = 64 * 32 * 4 + 32 * 16 * 8 + 64 * 16 * 8  # G, t and x, d fhat read and written
    fnorm = 64 * 16 * 16
    assert c.hbm == g + fold + dfh + fnorm == 74_368 and c.launches == 4
    # frozen features and base (TaskRes): no d fhat matmul, no f norm backward, d x alone written
    r = aot.residual_ce_backward_costs(64, 32, 16, "fp32", train_features=False, train_base=False)["fused"]
    assert r.hbm == g + fold - 32 * 16 * 4 and r.launches == 2
    # the real shape: 2^23 // 1024 = 8192 classes a chunk, 3 chunks of 3 launches, then f's norm backward
    assert aot.residual_ce_backward_costs(256, 21843, 1024, "tf32")["fused"].launches == 3 * 3 + 1


def test_residual_logits_forward_is_two_norm_passes_and_one_tiled_matmul():
    # B = 64, K = 32, D = 16 at IEEE fp32: one 64 x 32 tile (logits_config: batch tile 64 rows, 32 classes)
    c = aot.residual_logits_costs(64, 32, 16, "fp32")
    norms = (64 * 16 * 4 + 4 * 64) + (2 * 32 * 16 * 4 + 4 * 32)  # f, rf; t and x, ru
    mm = 64 * 16 * 4 + 32 * 16 * 8 + 64 * 32 * 4 + 4 * (64 + 32)  # f, t and x, the logits; rf, ru
    assert c["fused"].launches == 3 and c["fused"].flops == 2 * 64 * 32 * 16
    assert c["fused"].hbm == norms + mm == 8_576 + 16_768
    assert c["fused"].time_s == pytest.approx((8_576 + 16_768) / 3.35e12 + 9e-6)
    comp = c["composition"]  # u = t + alpha x, its normalisation, the GEMM writing fp32 logits
    assert comp.launches == 3 and comp.hbm == 32 * 16 * 12 + 32 * 16 * 8 + 64 * 16 * 4 + 32 * 16 * 4 + 64 * 32 * 4
    # B = 256 at TF32: batch tiles of 128 rows by 64 classes; K = 128: 2 x 2 tiles, f read by both column
    # tiles, t and x by both batch tiles; rf per column tile, ru per batch tile
    norms = (256 * 16 * 4 + 4 * 256) + (2 * 128 * 16 * 4 + 4 * 128)
    c = aot.residual_logits_costs(256, 128, 16, "tf32")["fused"]
    assert c.l2 == norms + 256 * 16 * 4 * 2 + 128 * 16 * 8 * 2 + 256 * 128 * 4 + 4 * (256 * 2 + 128 * 2) == 233_984
    # the 64 x 32 tiles it had: 4 batch tiles, 4 column tiles
    old = aot.residual_logits_costs(256, 128, 16, "tf32", tile=(64, 32))["fused"]
    assert old.l2 == norms + 256 * 16 * 4 * 4 + 128 * 16 * 8 * 4 + 256 * 128 * 4 + 4 * (256 * 4 + 128 * 4) == 302_592


def test_masked_backward_score_gradient_and_dx_paths():
    sg = aot.score_grad_cost(64, 64, 64, "bf16", dropout=True)  # one 64 x 64 tile: dy, x, then W, ref, dS
    assert sg.flops == 2 * 64**3 and sg.hbm == sg.l2 == 64 * 64 * (2 + 2 + 2 + 4 + 4) == 57_344
    costs = aot.masked_backward_costs(64, 64, 64, "bf16")
    rebuild = 64 * 64 * (4 + 2 + 2)  # W*[S>tau]: W, S in, the masked copy out
    assert costs["composition"].hbm == rebuild + 3 * 64 * 64 * 2 + 57_344
    assert costs["unfused"].hbm == rebuild + 3 * 64 * 64 * 2 + (2 * 64 * 64 * 2 + 64 * 64 * 4) + 64 * 64 * 14


def test_score_gradient_grid_fill_and_split_k():
    # 768 x 768 at 64 x 64 tiles: 144 programs of the 264 (2 per SM) the fill asks for
    one = aot.score_grad_cost(6304, 768, 768, "bf16", dropout=True, split=1)
    flops, l2 = 2 * 768 * 768 * 6304, 6304 * 768 * 2 * 12 * 2 + 768 * 768 * 10
    assert one.flops == flops and one.l2 == l2
    assert one.time_s == pytest.approx(max(flops / 989e12, l2 / 10e12) * 264 / 144 + 3e-6)
    # two splits: 288 programs (full), two fp32 partials written; then one pass reads them, W and ref, writes dS
    two = aot.score_grad_cost(6304, 768, 768, "bf16", dropout=True, split=2)
    part_l2 = 6304 * 768 * 2 * 12 * 2 + 768 * 768 * 8
    reduce_bytes = 768 * 768 * (8 + 2 + 4 + 4)
    assert two.launches == 2 and two.l2 == part_l2 + reduce_bytes
    assert two.time_s == pytest.approx(max(flops / 989e12, part_l2 / 10e12) + 3e-6 + reduce_bytes / 3.35e12 + 3e-6)
    assert aot.score_grad_cost(6304, 768, 768).time_s == two.time_s < one.time_s  # the launcher's choice
    # 2304 x 768: 432 tiles, full; one pass
    assert aot.score_grad_cost(6304, 2304, 768).launches == 1


def test_orth_backward_fused_re_reads_dy_per_block():
    # M = 64 (one row tile), N = 32, K = 64, b = 32: two blocks, so dy is loaded twice
    c = aot.orth_backward_costs(64, 32, 64, 32, "bf16")
    partials = 1 * 2 * 32 * 32 * 4
    assert c["fused"].flops == 2 * 64 * 32 * 64 + 4 * 64 * 64 * 32
    assert c["fused"].l2 == 64 * 32 * 2 * 2 + 32 * 64 * 2 + 2 * 64 * 64 * 2 + 2 * partials + partials
    comp = c["composition"]  # cuBLAS dxr, the rotate kernel (dx), the block gram (dR)
    assert comp.launches == 3
    assert comp.flops == 2 * 64 * 64 * 32 + 2 * (2 * 64 * 64 * 32)


#: rows where the model says the path the ops take is not the fastest (see docs/kernels.md): the masked
#: backward's fused score gradient (64 x 64 tiles; at 768 x 768 its 144 tiles fill 55% of the GPU, split-K
#: at 6304 tokens, not at 1576) against cuBLAS + one epilogue pass (cuBLAS modelled at peak, any grid), and the residual
#: backward with every input trained at K = 21843, D = 1024 and TF32 (its d fhat matmul: G re-read per 64
#: columns of D, t and x per 128 batch rows)
KNOWN_LOSSES = {("masked_linear bwd", s) for s in (
    "1576x768->2304", "1576x768->768", "1576x768->3072", "1576x3072->768", "1576x1024->3072", "6304x768->2304", "6304x768->768",
    "6304x768->3072", "6304x3072->768", "6304x1024->3072")} | {
    ("residual_ce bwd all", "B=256 K=21843 D=1024", "tf32")}


def test_projection_covers_the_issue_shapes_and_where_the_chosen_path_loses():
    rows = aot.projection_table()
    assert {r["shape"] for r in rows} >= {"6304x768->2304", "1576x1024->3072", "B=256 K=21843 D=1024"}
    assert {(r["op"], r["dtype"]) for r in rows if r["op"].startswith("residual")} == {
        (f"residual_ce {p}", d) for p in ("fwd", "bwd", "bwd all") for d in ("fp32", "tf32")} | {
        ("residual_logits fwd", d) for d in ("fp32", "tf32")}
    losses = set()
    for r in rows:
        times = {k[:-3]: v for k, v in r.items() if k.endswith("_us")}
        if times[r["chosen"]] > min(times.values()):
            assert " fwd" not in r["op"], r  # every forward takes its fastest modelled path
            losses.add((r["op"], r["shape"]) if r["op"].startswith("masked") else (r["op"], r["shape"], r["dtype"]))
    assert losses == KNOWN_LOSSES


def test_cayley_is_latency_bound_and_stacking_fills_the_sms():
    # one block of b = 16, pivoted: per step 20 x 256 / 128 = 40 issue cycles and 8 reductions x 150 cycles
    c = aot.cayley_cost(1, 16)
    assert c.time_s == pytest.approx(16 * (40 + 1200) / 1.755e9 + 3e-6)
    assert c.hbm == 8 * 16 * 16 and c.launches == 1
    # 4225 blocks in one launch: 16 resident per SM, 132 SMs: 3 waves, each step max(16 x 40, 1240) cycles
    assert aot.cayley_cost(4225, 16).time_s == pytest.approx(3 * 16 * 1240 / 1.755e9 + 3e-6)
    # the same blocks as 25 launches of 169: each 1 wave with 2 blocks on some SMs, 25 x (16 x 1240 cycles + 3 us)
    assert aot.cayley_cost(4225, 16, launches=25).time_s == pytest.approx(25 * (16 * 1240 / 1.755e9 + 3e-6))
    # unpivoted (before): 11 x 256 / 128 = 22 issue cycles and 4 x 150 of waits per step
    assert aot.cayley_cost(1, 16, pivoting=False).time_s == pytest.approx(16 * (22 + 600) / 1.755e9 + 3e-6)
    # b = 64 pads to 64 and holds one block per SM: 1200 blocks are 10 waves of 64 steps
    issue = 20 * 64 * 64 / 128
    assert aot.cayley_cost(1200, 64).time_s == pytest.approx(10 * 64 * max(issue, issue + 1200) / 1.755e9 + 3e-6)
    rows = {r["b"]: r for r in aot.cayley_table()}
    assert rows[32]["blocks"] == 76_800 // 32 and rows[32]["layers"] == 48
    assert all(r["stacked_us"] < r["per_layer_us"] for r in rows.values())
