r"""Convergence: a whole seeded training run of each fastvlm tuner against an independent implementation of the
same method, on a small random-init open_clip model (or, for TaskRes, cached features).

The independent side never calls fastvlm's ops or tuners: masks are a straight-through estimator and the
gradient-dropout rule written out here (only the Philox stream, ``philox_uniform``, is shared: it is tested
bit for bit against Triton's ``tl.rand`` in tests/test_masked.py); LoRA and OFT run through peft on the same
layers; TaskRes is the paper's formula. Both sides start from the same tensors and take the same optimiser
steps, and the tests compare the loss of every step and the trained tensors at the end.

Tolerances: a rounding model, not fitted numbers
-------------------------------------------------
Both sides compute the same math in fp32 with different operation orders (a masked matmul over patches
against a conv, SDPA against nn.MultiheadAttention, a merged weight against a low-rank path, Triton tiles
against BLAS), so they differ by rounding. A computation whose rounding errors are independent, N roundings
in all, is off by at most ``lambda * sqrt(N) * u`` (u = 2^-24, fp32's unit roundoff) with probability at
least ``1 - 2 N exp(-lambda^2 / 2)`` (Higham & Mary, "A new approach to probabilistic rounding error
analysis", SISC 2019); lambda = 6 makes that failure probability below 1e-4 for every chain here. N is
the sum of the reduction lengths along the chain (``vit_chain`` counts them from the model's shapes):

    eps_f = lambda * u * sqrt(N_forward)       relative error of the normalised image features

Logits (scale s) then differ by dz <= s eps_f, which every step checks on the dz it measures between the
two sides (TaskRes adds the first-order effect of the residuals' difference so far). From dz:

    loss:   |dL| <= 2 dz + lambda u sqrt(K + 1) max|z|     (cross-entropy is 2-Lipschitz in the logits'
                                                            max-norm, plus its own log-sum-exp)
    eps_g = 4 dz + lambda * u * sqrt(N_backward)           a gradient's error relative to its largest element

since the backward starts from dL/dz = softmax(z) - onehot, whose rows have 1-norm 2 (1 - p_target) >=
1 - p_max, and softmax's Jacobian diag(p) - p p^T turns a logit change dz into a row change of 1-norm at
most 4 dz (1 - p_max): relatively 4 dz; the backward then adds its own roundings. Where a test cannot see
one side's logits (RMT's zero-shot teacher) it takes the worst case dz = s eps_f. With G_t the largest
element of a tensor's step-t gradient, the trained tensors then agree to

    SGD:   |d theta_T| <= sum_t lr eps_g G_t                                (the steps' errors add up)
    Adam:  |d theta_T| <= sum_t lr_t 2 eps_g max_t'<=t G_t' / (sqrt(v_hat_t) + eps)   (first order: Adam
           divides each element's step by its own RMS gradient, and its averages mix every step so far)

The model tests use plain SGD: with the same optimiser on both sides it is the method that is compared, and
SGD keeps a step proportional to its gradient, so rounding stays at rounding scale. (Adam would move an
element whose gradient is pure rounding noise by a full +-lr on either side, and any element-wise bound on
it must allow that.) TaskRes runs ``train_taskres`` as shipped, with its Adam, under the Adam bound.

These are upper bounds: most operations run the same kernels in the same order on both sides, so the
differences stay far below them. A difference of method (another dropout stream, a rotation of the other
sign, a delta merged twice) moves logits or gradients by a fair fraction of themselves and fails at once.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fastvlm.models import TINY, TINY_CONFIG, load_clip
from fastvlm.ops.philox import philox_uniform
from fastvlm.train.rmt import RMTRecipe, rmt_losses, rmt_step
from fastvlm.train.taskres import TaskResRecipe, train_taskres
from fastvlm.tuners.lora import LoRAConfig
from fastvlm.tuners.mask import MaskConfig, apply_masks
from fastvlm.tuners.orth import OrthConfig, apply_orth
from fastvlm.tuners.pack import apply_method
from fastvlm.tuners.taskres import TaskResConfig, TaskResHead

U32 = 2.0 ** -24
# open_clip's image-tower MLP layers (nn.Linear), as peft's target_modules
MLP_TARGETS = r"visual\.transformer\.resblocks\.\d+\.mlp\.(c_fc|c_proj)"
LAMBDA = 6.0

# the Triton interpreter runs a kernel launch in ~0.1-1 s: its runs use a 1-block ViT at 8 px (patch 4)
MICRO = "fastvlm-test-conv-micro"
MICRO_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 8, "layers": 1, "width": 32, "patch_size": 4, "head_width": 16},
    "text_cfg": {**TINY_CONFIG["text_cfg"], "width": 32, "layers": 1},
}


def _register():
    from open_clip import factory

    factory._MODEL_CONFIGS.setdefault(MICRO, MICRO_CONFIG)


_register()


@pytest.fixture(autouse=True)
def _one_thread():
    """These runs are chains of small ops (a [136, 64] x [64, 192] matmul at most): one thread each, so that
    they never wait at OpenMP barriers on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rounding_bound(n_roundings: int) -> float:
    return LAMBDA * U32 * math.sqrt(n_roundings)


def grad_bound(dz: float, n_backward: int) -> float:
    """eps_g: a gradient's error relative to its largest element, for logits that differ by dz."""
    return 4 * dz + rounding_bound(n_backward)


def vit_chain(model, batch: int, n_classes: int) -> tuple[int, int]:
    """(N_forward, N_backward): the reduction lengths from the image to the loss of an open_clip ViT, and the
    same plus the sum over every row (batch x tokens) that a weight-shaped gradient takes."""
    v = model.visual
    width, patch = v.conv1.weight.shape[0], v.conv1.weight[0].numel()
    tokens = v.positional_embedding.shape[0]
    blk = v.transformer.resblocks[0]
    heads, hidden = blk.attn.num_heads, blk.mlp.c_fc.weight.shape[0]
    per_block = (2 * width  # two layer norms
                 + width + width // heads + 2 * tokens  # QKV, scores, softmax, attention-weighted values
                 + width + width + hidden)  # out projection, MLP in, MLP out
    out = v.proj.shape[1]
    forward = patch + 2 * width + len(v.transformer.resblocks) * per_block + width + 2 * out + n_classes
    return forward, forward + batch * tokens


def _clip(name=TINY):
    torch.manual_seed(0)
    model = load_clip(name, None)[0]
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _task(model, batch, n_classes=5, seed=1):
    """Images, labels, and a normalised classifier near the images' mean feature: a random-init tower maps
    all images close together, and a classifier of random directions would give logits 100 apart (loss
    ~30) and a first step that throws the masks around; this one starts at loss ~log(5)."""
    g = torch.Generator().manual_seed(seed)
    size = model.visual.image_size[0]
    images = torch.randn(batch, 3, size, size, generator=g)
    labels = torch.randint(0, n_classes, (batch,), generator=g)
    with torch.no_grad():
        mean = F.normalize(model.encode_image(images), dim=-1).mean(0)
    noise = F.normalize(torch.randn(n_classes, mean.numel(), generator=g), dim=-1)
    return images, labels, F.normalize(mean + 0.1 * noise, dim=-1)


def ce_bound(dz: float, logits: torch.Tensor) -> float:
    """Cross-entropy moves by at most 2 dz when the logits move by dz, and rounds its own log-sum-exp over
    K logits of size up to max|z|."""
    return 2 * dz + rounding_bound(logits.shape[1] + 1) * logits.detach().abs().max().item()


def _logits(features, classifier, scale=100.0):
    return scale * F.normalize(features, dim=-1) @ classifier.T


class _Capture(torch.optim.SGD):
    """SGD that keeps the gradients it was given (what the tuner's backward produced)."""

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def _step_both(features, opt, ref_features, opt_ref, classifier, labels, eps_f, n_backward, lr, bound, ref_params):
    """One SGD step on each side; checks the logits and the loss and adds this step's gradient error bound
    (lr eps_g(dz) G per tensor) to ``bound``. Returns the reference loss."""
    z = _logits(features(), classifier)
    loss = F.cross_entropy(z, labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
    z_ref = _logits(ref_features(), classifier)
    want = F.cross_entropy(z_ref, labels)
    opt_ref.zero_grad()
    want.backward()
    dz = (z - z_ref).abs().max().item()
    assert dz <= 100.0 * eps_f, f"logits differ by {dz:.2e} > s eps_f = {100.0 * eps_f:.2e}"
    assert abs(loss.item() - want.item()) <= ce_bound(dz, z_ref), (loss.item(), want.item(), dz)
    eps_g = grad_bound(dz, n_backward)
    for b, q in zip(bound, ref_params):
        b += lr * eps_g * q.grad.abs().max()
    opt_ref.step()
    return want.item()


def _assert_within(name, got, want, bound):
    err = (got - want).abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (f"{name}: {int((err > bound).sum())} of {err.numel()} elements beyond the "
                                        f"bound; worst {err.view(-1)[worst]:.3e} > {bound.view(-1)[worst]:.3e}")


# ---------------------------------------------------------------------------------------------------------
# RMT masks
# ---------------------------------------------------------------------------------------------------------

TAU = 5e-3


class _STE(torch.autograd.Function):
    """[S > tau] forward, the gradient straight through to S backward."""

    @staticmethod
    def forward(ctx, s):
        return (s > TAU).to(s.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


def _layer_seed(seed, step, index):
    # the seed of mask `index` (in the model's parameter order) at `step`, as fastvlm/train/rmt.py chooses it
    return (seed * 1_000_003 + step * 7_919 + index * 104_729) % (2**62)


def _dropout(ga, gb, ratio, seed):
    """Gradient dropout regularity, as fastvlm/ops/masked.py documents it: P = 0.5 (1 + sign(ga) (ga + gb) /
    (|ga| + |gb| + 1e-8)), U = philox(seed, row-major index), g = ((1 - ratio) + ratio [P > U]) ga."""
    p = 0.5 * (1.0 + torch.sign(ga) * (ga + gb) / (ga.abs() + gb.abs() + 1e-8))
    u = philox_uniform(seed, torch.arange(ga.numel())).view(ga.shape)
    return ((1.0 - ratio) + ratio * (p > u).to(ga.dtype)) * ga, p, u


def test_rmt_matches_straight_through_and_gradient_dropout(backend):
    """rmt_step against the recipe written out: the zero-shot teacher (original weights), L_kl, CE + 1e-4
    sum ||S||_2, gradients by the straight-through estimator, pass 1 = grad L_kl, pass 2 = grad(CE + reg)
    dropped against it, one SGD step; twelve steps (four through the interpreter).

    Every step checks, besides the losses:
    1. the rule, on fastvlm's own gradients: rmt_step's dropped gradient equals the rule written out here
       applied to the pass-1 and pass-2 gradients that rmt_losses gives for the same state, to the few
       roundings by which the fused regulariser term differs;
    2. the method: those gradients against the reference's (pass 2 within eps_g(dz); pass 1 also carries
       the zero-shot teacher's difference, which the test cannot see, so within the worst case);
    3. the runs: the dropped gradients of the two runs agree except at dropout decisions whose P is within
       the two sides' difference of U, and the scores and masks agree within the accumulated bound."""
    interp = backend == "triton"
    name, batch, steps, lr = (MICRO, 4, 4, 0.1) if interp else (TINY, 8, 12, 0.1)
    ratio = 0.5  # both factors of the rule, 1 (kept) and 1 - ratio (dropped), non-zero: both show in gradients
    recipe = RMTRecipe(lr=lr, drop_ratio=ratio, seed=3)
    ref = _clip(name)
    images, labels, classifier = _task(ref, batch)
    n_fwd, n_bwd = vit_chain(ref, batch, classifier.shape[0])
    eps_f = rounding_bound(n_fwd)
    eps_worst = grad_bound(recipe.logit_scale * eps_f, n_bwd)

    tuned = apply_masks(_clip(name), MaskConfig(init=1e-2, threshold=TAU))
    scores = [p for p in tuned.parameters() if p.requires_grad]
    opt = _Capture(scores, lr=lr)

    visual = ref.visual
    weights = dict(visual.named_parameters())
    names = ["conv1.weight"] + [f"transformer.resblocks.{i}.attn.{w}" for i in range(len(visual.transformer.resblocks))
                                for w in ("in_proj_weight", "out_proj.weight")]
    s_ref = [torch.full(weights[n].shape, 1e-2, requires_grad=True) for n in names]
    assert [tuple(s.shape) for s in scores] == [tuple(s.shape) for s in s_ref], "mask tensors in another order"
    opt_ref = torch.optim.SGD(s_ref, lr=lr)

    bound = [torch.zeros_like(s) for s in s_ref]
    rule_boundary, rule_expected, cross_boundary, mask_flips, first_ce = 0, 0.0, 0, 0, None
    for step in range(steps):
        # fastvlm: the two passes' gradients for this state, then the step itself
        ce_f, kl_f, reg_f, sc = rmt_losses(tuned, images, labels, classifier, recipe)
        assert len(sc) == len(scores) and all(a is b for a, b in zip(sc, scores)), "rmt_losses' scores"
        gb_f = torch.autograd.grad(kl_f, sc, retain_graph=True)
        ga_f = torch.autograd.grad(ce_f + reg_f, sc)
        with torch.no_grad():
            z_got = _logits(tuned.encode_image(images), classifier, recipe.logit_scale)
        got = rmt_step(tuned, images, labels, classifier, opt, recipe, step)  # on the fixture's backend

        # the reference
        with torch.no_grad():
            p_zs = _logits(visual(images), classifier, recipe.logit_scale).softmax(-1)
        masked = {n: weights[n] * _STE.apply(s) for n, s in zip(names, s_ref)}
        z = _logits(functional_call(visual, masked, (images,)), classifier, recipe.logit_scale)
        logp = z.log_softmax(-1)
        l_kl = -(p_zs * logp).sum(-1).mean()
        ce = F.nll_loss(logp, labels)
        reg = recipe.reg * sum(torch.linalg.vector_norm(s) for s in s_ref)
        g_b = torch.autograd.grad(l_kl, s_ref, retain_graph=True)
        g_a = torch.autograd.grad(ce + reg, s_ref)

        first_ce = ce.item() if first_ce is None else first_ce
        dz = (z_got - z.detach()).abs().max().item()
        assert dz <= recipe.logit_scale * eps_f, (step, dz, recipe.logit_scale * eps_f)
        eps_g = grad_bound(dz, n_bwd)
        assert abs(got["ce"] - ce.item()) <= ce_bound(dz, z), (step, got["ce"], ce.item(), dz)
        assert abs(got["kl"] - l_kl.item()) <= 2 * recipe.logit_scale * eps_f, (step, got["kl"], l_kl.item())

        for i, (s, ga, gb) in enumerate(zip(s_ref, g_a, g_b)):
            seed = _layer_seed(recipe.seed, step, i)
            stepped = opt.grads[i].view(s.shape)
            g_reg = (recipe.reg * s / torch.linalg.vector_norm(s)).detach()

            # 1. the rule on fastvlm's own gradients. The fused pass adds the regulariser's gradient inside
            # the score-gradient computation, rmt_losses' autograd after it: a few roundings of the summands
            a_f, b_f = ga_f[i].view(s.shape), gb_f[i].view(s.shape)
            want_f, p_f, u_f = _dropout(a_f, b_f, ratio, seed)
            tol_rule = 4 * U32 * (a_f.abs() + 2 * g_reg.abs())
            off = (stepped - want_f).abs() > tol_rule
            p_slack = 2 * tol_rule / (a_f.abs() + b_f.abs() + 1e-8)
            near = ((p_f - u_f).abs() <= p_slack) | (a_f.abs() <= tol_rule)
            assert bool(near[off].all()), (f"step {step}, mask {i}: rmt_step's gradient is not the dropout rule on "
                                           f"its own gradients at {int((off & ~near).sum())} elements")
            rule_boundary += int(off.sum())
            rule_expected += float((2 * p_slack).clamp(max=1.0).sum())

            # 2. the method's gradients
            scale_a, scale = ga.abs().max().item(), max(ga.abs().max().item(), gb.abs().max().item())
            _assert_within(f"step {step}, pass-2 gradient {i}", a_f, ga, torch.full_like(ga, eps_g * scale_a))
            _assert_within(f"step {step}, pass-1 gradient {i}", b_f, gb, torch.full_like(gb, eps_worst * scale))

            # 3. the runs: the two sides' dropped gradients. P moves by at most (|d ga| + |d gb|) / (|ga| + |gb|)
            # (x2, both terms of P), and a ga within its tolerance of 0 may change sign: only there can the
            # sides decide [P > U] differently; such an element then moves by lr ratio |ga| in this step
            g, p, u = _dropout(ga, gb, ratio, seed)
            s.grad = g
            tol_a, tol_b = eps_g * scale_a, eps_worst * scale
            diff = (stepped - g).abs()
            off = diff > tol_a
            p_slack = 2 * (tol_a + tol_b) / (ga.abs() + gb.abs() + 1e-8)
            near = ((p - u).abs() <= p_slack) | (ga.abs() <= tol_a)
            assert bool(near[off].all()), (f"step {step}, mask {i}: {int((off & ~near).sum())} dropped gradients "
                                           f"differ beyond {tol_a:.1e} away from a dropout boundary")
            cross_boundary += int(off.sum())
            bound[i] += lr * torch.where(off, diff, torch.full_like(diff, tol_a))
        opt_ref.step()

        for i, (s, s_got) in enumerate(zip(s_ref, scores)):
            s_got = s_got.detach().view(s.shape)
            _assert_within(f"step {step}, scores {i}", s_got, s.detach(), bound[i])
            flips = (s_got > TAU) != (s.detach() > TAU)
            near = (s.detach() - TAU).abs() <= bound[i]
            assert bool(near[flips].all()), f"step {step}, mask {i}: a mask differs away from the threshold"
            mask_flips += int(flips.sum())

    # the run did train: masks went off and the task loss fell (so the comparison covered both)
    assert sum(int((s <= TAU).sum()) for s in s_ref) > 0, "no mask switched off: only the all-on network was compared"
    assert ce.item() < first_ce - 0.05, (first_ce, ce.item())
    # Boundary decisions: [P > U] is a hard threshold on a quantity known to within rounding, so an element
    # whose P lies within that rounding of its U may be kept by one computation and scaled by 1 - ratio by
    # the other. U is uniform and independent of P, so in check 1 their number is at most Poisson with mean
    # sum(min(1, 2 p_slack)), which is well below one here. (In check 3 the pass-1 tolerance is the worst
    # case, so its slack is wide and its count, cross_boundary, is only bounded element by element.)
    mu = rule_expected
    assert rule_boundary <= mu + LAMBDA * math.sqrt(mu) + LAMBDA, (
        f"{rule_boundary} boundary decisions against the rule (Poisson mean <= {mu:.2g}); across the runs "
        f"{cross_boundary} decisions and {mask_flips} mask-steps differed, each within its bound")


# ---------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------


def test_lora_matches_peft_and_merged_attention():
    """apply_lora on every target against peft's LoRA on the MLP layers (open_clip's c_fc/c_proj are
    nn.Linear, which peft targets by name) and, for attention, W + (alpha/r) B A written into the packed
    in_proj_weight and out_proj.weight of nn.MultiheadAttention.

    Attention does not go through peft: peft 0.21.2's LoRA MultiheadAttention merges the out_proj delta
    twice in its forward (the out_proj weight used is W + 2 (alpha/r) B A: merge() writes W + dW into the
    wrapped out_proj and then calls out_proj.merge(), which adds dW again)."""
    rank, alpha, batch, steps, lr = 4, 8.0, 8, 10, 0.1
    targets = ("attn_in", "attn_out", "mlp_fc", "mlp_proj")
    model = _clip()
    images, labels, classifier = _task(model, batch)
    n_fwd, n_bwd = vit_chain(model, batch, classifier.shape[0])
    layers = 4 * len(model.visual.transformer.resblocks)
    # the low-rank path adds x A^T (width) and its B product (rank) per adapted layer
    extra = layers * (model.visual.conv1.weight.shape[0] + rank)
    eps_f = rounding_bound(n_fwd + extra)

    names = apply_method(model, "lora", LoRAConfig(rank=rank, alpha=alpha, targets=targets, seed=4))
    tuned, named = model, dict(model.named_parameters())
    params = [named[n] for n in names]
    start = [p.detach().clone() for p in params]

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_clip(), LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                                                    target_modules=MLP_TARGETS))
    visual = peft_model.base_model.model.visual
    ref_params, attn, peft_a = [], [], []
    for blk in visual.transformer.resblocks:
        pairs = []
        for w in (blk.attn.in_proj_weight, blk.attn.out_proj.weight):
            a = torch.empty(rank, w.shape[1], requires_grad=True)
            b = torch.zeros(w.shape[0], rank, requires_grad=True)
            pairs.append((a, b))
            ref_params += [a, b]
        attn.append(pairs)
        for lin in (blk.mlp.c_fc, blk.mlp.c_proj):
            assert lin.scaling["default"] == alpha / rank
            ref_params += [lin.lora_A["default"].weight, lin.lora_B["default"].weight]
            peft_a.append(lin.lora_A["default"].weight)
    assert [tuple(p.shape) for p in params] == [tuple(p.shape) for p in ref_params], "LoRA factors in another order"
    with torch.no_grad():
        # both libraries start A Kaiming-uniform (bound 1/sqrt(fan_in)) and B at zero: the same start in law;
        # the run starts both from fastvlm's draw
        for a in peft_a + [p for p in params if p.shape[0] == rank]:
            assert a.abs().max() <= 1 / math.sqrt(a.shape[1]) and a.abs().max() > 0.5 / math.sqrt(a.shape[1])
        assert not any(p.any() for p in params if p.shape[0] != rank)
        for p, q in zip(params, ref_params):
            q.copy_(p)

    def ref_forward():
        merged = {}
        for i, ((a_in, b_in), (a_out, b_out)) in enumerate(attn):
            blk = visual.transformer.resblocks[i].attn
            merged[f"transformer.resblocks.{i}.attn.in_proj_weight"] = blk.in_proj_weight + (alpha / rank) * b_in @ a_in
            merged[f"transformer.resblocks.{i}.attn.out_proj.weight"] = (blk.out_proj.weight
                                                                         + (alpha / rank) * b_out @ a_out)
        return functional_call(visual, merged, (images,))

    opt, opt_ref = torch.optim.SGD(params, lr=lr), torch.optim.SGD(ref_params, lr=lr)
    bound = [torch.zeros_like(p) for p in params]
    losses = []
    for step in range(steps):
        losses.append(_step_both(lambda: tuned.encode_image(images), opt, ref_forward, opt_ref, classifier, labels, eps_f,
                                 n_bwd + extra, lr, bound, ref_params))
    for i, (p, q, b) in enumerate(zip(params, ref_params, bound)):
        _assert_within(f"LoRA factor {i}", p.detach(), q.detach(), b)
    assert losses[-1] < losses[0] - 0.1, f"the run did not train: {losses}"
    assert all(not torch.equal(p, p0) for p, p0 in zip(params, start)), "a factor never moved"


# ---------------------------------------------------------------------------------------------------------
# OFT / OrthCR rotations
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("neumann_terms", [None, 3])
def test_orth_matches_peft_oft(neumann_terms):
    """apply_orth on the image tower's MLP layers against peft's OFT on the same layers (block size 16).

    Sign conventions, from peft/tuners/oft/layer.py (OFTRotationModule._cayley_batch), with Q = U - U^T
    built from the same strict upper triangle in the same (triu_indices) order:
    - peft's exact branch (use_cayley_neumann=False) solves R (I + Q) = I - Q: R = (I - Q)(I + Q)^-1, which
      is fastvlm's R = (I + Q)(I - Q)^-1 at -Q. So peft's parameters are minus fastvlm's: both start at 0
      and SGD is odd in the gradient, so the runs stay mirrored.
    - peft's series branch sums I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1) for n = num_cayley_neumann_terms
      (n >= 4; n = 3 gives the same as n = 4), which is fastvlm's (I + Q)(I + Q + ... + Q^k) at k = n - 2
      with the same sign. The two peft branches thus rotate opposite ways for the same parameters.
    Both apply blockdiag(R) to the input, x @ R per block, before the frozen linear layer."""
    from peft import OFTConfig, get_peft_model

    block, batch, steps, lr = 16, 8, 8, 0.3
    model = _clip()
    images, labels, classifier = _task(model, batch)
    n_fwd, n_bwd = vit_chain(model, batch, classifier.shape[0])
    layers = 2 * len(model.visual.transformer.resblocks)
    # per rotated layer: the b x b inverse (or series products) and the rotation, b-long reductions each
    eps_f = rounding_bound(n_fwd + 2 * layers * block)

    tuned = apply_orth(model, OrthConfig(block_size=block, towers=("visual",), mlp=True, attention=False,
                                         neumann_terms=neumann_terms))
    params = [p for p in tuned.parameters() if p.requires_grad]
    exact = neumann_terms is None
    peft_model = get_peft_model(_clip(), OFTConfig(
        oft_block_size=block, r=0, module_dropout=0.0, target_modules=MLP_TARGETS,
        use_cayley_neumann=not exact, num_cayley_neumann_terms=5 if exact else neumann_terms + 2))
    ref_params = [p for p in peft_model.parameters() if p.requires_grad]
    assert [tuple(p.shape) for p in params] == [tuple(p.shape) for p in ref_params], "rotations in another order"
    assert not any(p.any() for p in params + ref_params), "both start at the identity rotation"
    sign = -1.0 if exact else 1.0

    opt, opt_ref = torch.optim.SGD(params, lr=lr), torch.optim.SGD(ref_params, lr=lr)
    bound = [torch.zeros_like(p) for p in params]
    losses = []
    for step in range(steps):
        losses.append(_step_both(lambda: tuned.encode_image(images), opt, lambda: peft_model.encode_image(images),
                                 opt_ref, classifier, labels, eps_f, n_bwd + 4 * layers * block, lr, bound, ref_params))
    for i, (p, q, b) in enumerate(zip(params, ref_params, bound)):
        _assert_within(f"rotation {i}", p.detach(), sign * q.detach(), b)
    assert losses[-1] < losses[0] - 0.1 and min(p.abs().max() for p in params) > 1e-3, "the run did not train"


# ---------------------------------------------------------------------------------------------------------
# TaskRes
# ---------------------------------------------------------------------------------------------------------


def test_taskres_matches_the_formula(backend):
    """train_taskres (TaskResHead, Adam, warm-up + cosine, seeded shuffles) against the formula
    logits = s norm(f) @ norm(base + alpha residual)^T with F.cross_entropy, the same Adam, schedule (a
    constant warm-up lr for the first epoch, then cosine to 0) and shuffles. The head's logits are recorded
    at every step (an observer around ``head.loss``), so each step's loss and gradient bound use the
    measured logits' difference; every epoch's mean loss and the final residual within those bounds."""
    interp = backend == "triton"
    d, k, n, batch, epochs = (16, 4, 16, 8, 3) if interp else (32, 5, 40, 16, 10)
    alpha, scale, lr, wd, seed = 0.5, 100.0, 1e-2, 5e-4, 7
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(k, d, generator=g)
    labels = torch.arange(n) % k
    feats = protos[labels] + 1.5 * torch.randn(n, d, generator=g)
    base = protos + torch.randn(k, d, generator=g)  # a zero-shot classifier that is off
    # backward: normalising f and u (d each), the logit dot product (d), the log-sum-exp (k), the batch sum
    # of d(residual) and the normalisation's backward (d)
    n_bwd = 4 * d + k + batch
    eps_f = rounding_bound(3 * d + k)

    head = TaskResHead(base, TaskResConfig(alpha=alpha, logit_scale=scale))
    seen = []
    loss_of = head.loss

    def observed_loss(features, target, *args, **kwargs):
        out = loss_of(features, target, *args, **kwargs)
        with torch.no_grad():
            seen.append((out.item(), head(features)))
        return out

    head.loss = observed_loss
    recipe = TaskResRecipe(lr=lr, weight_decay=wd, batch_size=batch, epochs=epochs, warmup_epochs=1, warmup_lr=1e-5)
    history = train_taskres(head, feats, labels, recipe, shots=n // k, seed=seed)  # on the fixture's backend

    residual = torch.zeros(k, d, requires_grad=True)
    opt = torch.optim.Adam([residual], lr=lr, weight_decay=wd)
    beta2, adam_eps = opt.defaults["betas"][1], opt.defaults["eps"]
    gen = torch.Generator().manual_seed(seed)
    bound, g_max, want, loss_bounds, step = torch.zeros(k, d), 0.0, [], [], 0
    for epoch in range(epochs):
        lr_e = 1e-5 if epoch < 1 else 0.5 * lr * (1 + math.cos(math.pi * (epoch - 1) / (epochs - 1)))
        for group in opt.param_groups:
            group["lr"] = lr_e
        perm = torch.randperm(n, generator=gen)
        total = total_bound = 0.0
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            logits = scale * F.normalize(feats[idx], dim=-1) @ F.normalize(base + alpha * residual, dim=-1).T
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            loss_got, z_got = seen[step]
            dz = (z_got - logits.detach()).abs().max().item()
            # rounding, plus the residuals' difference so far: |d logit| <= s |d norm(u)| <= 2 s alpha |d r| / |u|
            u_norm = (base + alpha * residual).detach().norm(dim=1)
            drift = float((2 * scale * alpha * bound.norm(dim=1) / u_norm).max())
            assert dz <= scale * eps_f + drift, (step, dz, scale * eps_f, drift)
            assert abs(loss_got - loss.item()) <= ce_bound(dz, logits), (step, loss_got, loss.item(), dz)
            total_bound += idx.numel() * ce_bound(dz, logits)
            g_max = max(g_max, residual.grad.abs().max().item())  # Adam's averages mix every step so far
            eps_g = grad_bound(dz, n_bwd)
            opt.step()
            state = opt.state[residual]
            v_hat = state["exp_avg_sq"] / (1 - beta2 ** int(state["step"]))
            bound += lr_e * 2 * eps_g * g_max / (v_hat.sqrt() + adam_eps)
            total += loss.item() * idx.numel()
            step += 1
        want.append(total / n)
        loss_bounds.append(total_bound / n)

    assert step == len(seen), f"train_taskres took {len(seen)} steps, the recipe {step}"
    for epoch, (a, b, tol) in enumerate(zip(history, want, loss_bounds)):
        assert abs(a - b) <= tol, f"epoch {epoch}: mean loss {a:.7f} vs {b:.7f} (bound {tol:.1e})"
    _assert_within("residual", head.residual.detach(), residual.detach(), bound)
    assert want[-1] < want[0] - 0.05, "the run did not train"
