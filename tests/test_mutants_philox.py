"""Exact behaviour of fastvlm/ops/philox.py, against an oracle written here from the Philox 4x32-10 definition
(Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) in plain Python integers, itself
checked on the published known-answer vectors; and grad_dropout's keep rule on hand-computed cases, past
the torch path's 64K-element chunk of the random stream. Fast: pure torch, no Triton."""

import pytest
import torch

from fastvlm.ops.philox import grad_dropout_torch, keep_scale, philox_uniform

M32 = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """The four output words for a 4-word counter and a 2-word key: 10 rounds of
    (c0, c1, c2, c3) -> (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0)), the key bumped by the
    Weyl constants between rounds."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for i in range(10):
        if i:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        pa, pb = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (pb >> 32) ^ c1 ^ k0, pb & M32, (pa >> 32) ^ c3 ^ k1, pa & M32
    return c0, c1, c2, c3


def tl_rand(seed, offset):
    """Triton's tl.rand(seed, offset): counter (offset lo, offset hi, 0, 0), key (seed lo, seed hi); the
    first word read as int32 v, folded to v or -v - 1 (>= 0), times 4.6566127342e-10 in fp32."""
    w = philox4x32_10((offset & M32, offset >> 32, 0, 0), (seed & M32, seed >> 32))[0]
    v = w - (1 << 32) if w >= 1 << 31 else w
    v = -v - 1 if v < 0 else v
    return (torch.tensor(float(v), dtype=torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)).item()


@pytest.mark.parametrize("counter,key,want", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_oracle_gives_the_published_known_answers(counter, key, want):
    assert philox4x32_10(counter, key) == want


SEEDS = [0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**62 - 1]
OFFSETS = [0, 1, 2, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**33 + 17, 2**40 + 3, 2**62 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_uniform_is_tl_rand_bit_for_bit(seed):
    got = philox_uniform(seed, torch.tensor(OFFSETS))
    assert got.dtype == torch.float32
    want = torch.tensor([tl_rand(seed, o) for o in OFFSETS], dtype=torch.float32)
    assert torch.equal(got, want), (seed, (got - want).abs().max())


def test_philox_uniform_takes_int32_offsets_and_stays_in_unit_interval():
    offs = torch.arange(0, 4000, dtype=torch.int32)
    u = philox_uniform(3, offs)
    assert torch.equal(u, philox_uniform(3, offs.to(torch.int64)))
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert u[:5].tolist() == [tl_rand(3, i) for i in range(5)]


def test_keep_scale_on_hand_computed_cases():
    # p = (1 + sign(a) (a + b) / (|a| + |b| + 1e-8)) / 2; kept where p > u: scale 1, else 1 - ratio = 0.4
    ga = torch.tensor([1.0, 1.0, -2.0, 2.0, 0.0, -1.0, 3.0])
    gb = torch.tensor([1.0, -1.0, -2.0, -1.0, 3.0, 3.0, 0.0])
    # p:               ~1    0.5    ~1   2/3   0.5   0.25   ~1
    u_keep = torch.tensor([0.99, 0.49, 0.999, 0.66, 0.4, 0.24, 0.99])
    u_drop = torch.tensor([0.99, 0.51, 0.999, 0.67, 0.6, 0.26, 0.99])
    assert keep_scale(ga, gb, u_keep, 0.6).tolist() == [1.0] * 7
    assert torch.allclose(keep_scale(ga, gb, u_drop, 0.6), torch.tensor([1.0, 0.4, 1.0, 0.4, 0.4, 0.4, 1.0]),
                          rtol=0, atol=1e-7)
    assert keep_scale(ga, gb, u_drop, 0.0).tolist() == [1.0] * 7  # ratio 0 keeps everything at scale 1
    assert keep_scale(ga, gb, u_drop, 1.0).tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert keep_scale(ga.half(), gb.half(), u_drop, 0.6).dtype == torch.float32


def test_keep_scale_epsilon_only_guards_zero():
    # both zero: p = (1 + 0 * 0 / 1e-8) / 2 = 0.5, finite
    s = keep_scale(torch.zeros(2), torch.zeros(2), torch.tensor([0.49, 0.51]), 0.5)
    assert s.tolist() == [1.0, 0.5]
    # tiny same-sign gradients: the 1e-8 (not a larger epsilon) keeps p near 1: (2e-9 / 1.2e-8 + 1) / 2 = 7/12
    a = torch.tensor([1e-9])
    assert keep_scale(a, a, torch.tensor([0.58]), 1.0).item() == 1.0
    assert keep_scale(a, a, torch.tensor([0.59]), 1.0).item() == 0.0


@pytest.mark.parametrize("offset", [0, 5, 2**32 - 3])
def test_grad_dropout_torch_past_the_64k_chunk(offset):
    n = (1 << 16) * 2 + 37  # three chunks of the random stream, the last one partial
    g = torch.Generator().manual_seed(0)
    ga = torch.randn(n, generator=g) + 0.01
    gb = -ga  # p = 0.5 exactly everywhere: kept iff 0.5 > u
    ratio = 0.7
    out = grad_dropout_torch(ga.view(2, -1) if n % 2 == 0 else ga, gb, ratio, 11, offset)
    assert out.shape == ga.shape and out.dtype == ga.dtype
    for i in (0, 1, (1 << 16) - 1, 1 << 16, (1 << 16) + 1, (1 << 17) - 1, 1 << 17, n - 1):
        keep = 0.5 > tl_rand(11, i + offset)
        want = ga[i] * (1.0 if keep else 1.0 - ratio)
        assert torch.allclose(out.view(-1)[i], want, rtol=1e-7, atol=0), (i, keep)
    # the same signs everywhere: p = 1 > u, all kept exactly
    assert torch.equal(grad_dropout_torch(ga, ga.clone(), ratio, 11, offset), ga)


def test_grad_dropout_torch_writes_into_out_and_keeps_the_dtype():
    ga = torch.randn(3, 5, dtype=torch.float16)
    gb = -ga
    out = torch.full_like(ga, 7.0)
    res = grad_dropout_torch(ga, gb, 1.0, 4, 2, out=out)
    assert res is out and res.dtype == torch.float16
    for i in range(ga.numel()):
        keep = 0.5 > tl_rand(4, i + 2)
        assert res.view(-1)[i].item() == (ga.view(-1)[i].item() if keep else 0.0)
