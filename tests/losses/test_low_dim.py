"""The low-dimensional rule (scale, margin, regime), the spread proxy init, and unfolding.

The rule's formulas are checked against their definitions written out here, the spread
layouts against known optima of the Tammes problem, and a short digits run at 3-D shows
that the defaults unfold classes that the papers' values leave folded.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import losses as pml_losses

from pml_extras.losses import (
    ArcFaceLoss,
    CosFaceLoss,
    CurricularFaceLoss,
    SparseCircleLoss,
    auto_proxy_init_,
    spread_init_,
)
from pml_extras.losses import _low_dim as ld
from pml_extras.losses._spread import min_pairwise_angle, spread_proxies

pytestmark = pytest.mark.usefixtures("single_thread")

classes = st.integers(2, 10**7)
dims = st.integers(1, 4096)


def largest_random_cosine(c: int, d: int) -> float:
    # Gaussian estimate of max |cos| over the C(C-1)/2 pairs of C random proxies in R^D.
    pairs = c * (c - 1) / 2
    return math.sqrt(2.0 * math.log(2.0 * pairs) / d)


# ---------------------------------------------------------------------------- the rule


@given(classes, st.data())
def test_regime_is_its_definition(c, data):
    # D drawn around the threshold (0.25x to 4x of 4*ln(C(C-1))), where a wrong constant shows.
    t = 4.0 * math.log(c * (c - 1))
    d = data.draw(st.integers(max(1, int(t / 4)), int(4 * t) + 1))
    expected = largest_random_cosine(c, d) > math.cos(math.pi / 4)
    # Exactly at the threshold the two forms may round differently.
    if abs(largest_random_cosine(c, d) - math.cos(math.pi / 4)) > 1e-9:
        assert ld.is_low_dimensional(c, d) == expected


@given(classes, dims)
def test_auto_scale_is_adacos_or_paper(c, d):
    low = largest_random_cosine(c, d) > math.cos(math.pi / 4) + 1e-9
    high = largest_random_cosine(c, d) < math.cos(math.pi / 4) - 1e-9
    s = ld.resolve_scale("auto", 64.0, c, d, "X")
    if low:
        # Zhang et al. 2019: B ~ C - 1 non-targets at cos 0, P = 1/2 at theta = pi/4.
        s_adacos = math.sqrt(2) * math.log(c - 1)
        assert s == pytest.approx(max(s_adacos, math.sqrt(2)), rel=1e-12)
        if c >= 4:
            # At this scale the target's probability is 1/2 at 45 degrees.
            p = math.exp(s * math.cos(math.pi / 4)) / (
                math.exp(s * math.cos(math.pi / 4)) + (c - 1)
            )
            assert p == pytest.approx(0.5, rel=1e-9)
    if high:
        assert s == 64.0


@given(classes, dims, st.floats(1e-3, 1e3))
def test_explicit_values_are_exact(c, d, value):
    assert ld.resolve_scale(value, 64.0, c, d, "X") == value
    assert ld.resolve_circle_margin(value, 0.25, c, d, "X") == value
    assert ld.resolve_angular_margin(value, 0.5, c, d, "X") == value


@settings(max_examples=40)
@given(st.integers(2, 40), st.integers(2, 40))
def test_auto_angular_margin_is_half_the_separation_angle(c, d):
    m = ld.resolve_angular_margin("auto", 0.5, c, d, "X")
    if not ld.is_low_dimensional(c, d):
        assert m == 0.5
        return
    # theta*: the smallest pairwise angle of the spread layout the rule's init draws.
    w = spread_proxies(c, d, generator=torch.Generator().manual_seed(0))
    theta = math.radians(min_pairwise_angle(w))
    assert m == pytest.approx(min(0.5, theta / 2), abs=1e-9)
    if d == 2:
        # The regular C-gon: neighbours 2*pi/C apart, so the margin is pi/C below 0.5.
        assert m == pytest.approx(min(0.5, math.pi / c), rel=1e-12)
    # At that margin a sample within theta*/4 of its proxy meets it against any other
    # proxy of the layout: theta_y + m < theta_j for theta_y <= theta*/4, theta_j >= theta*.
    assert theta / 4 + m <= theta - theta / 4 + 1e-9


def test_face_recognition_scale_keeps_paper_settings():
    # C = 1M classes, D = 512: the papers' regime.
    assert not ld.is_low_dimensional(10**6, 512)
    assert ld.resolve_scale("auto", 64.0, 10**6, 512, "X") == 64.0
    assert ld.resolve_scale("auto", 256.0, 10**6, 512, "X") == 256.0
    assert ld.resolve_circle_margin("auto", 0.25, 10**6, 512, "X") == 0.25
    assert ld.resolve_angular_margin("auto", 0.5, 10**6, 512, "X") == 0.5
    # 10 classes: low-dimensional up to 17-D, paper values from 18-D (and at 128-D).
    assert [ld.is_low_dimensional(10, d) for d in (2, 3, 17, 18, 128)] == [1, 1, 1, 0, 0]


def test_high_dim_defaults_equal_pml_init_and_paper_values():
    # A high-dimensional case small enough to build: the auto init is PML's normal_ draw.
    for cls, attrs in (
        (SparseCircleLoss, {"gamma": 256.0, "m": 0.25}),
        (CurricularFaceLoss, {"scale": 64.0, "margin": 0.5}),
    ):
        torch.manual_seed(3)
        ours = cls(100, 64)
        torch.manual_seed(3)
        w = torch.nn.init.normal_(torch.empty(64, 100))
        assert torch.equal(ours.W.detach(), w)
        for name, value in attrs.items():
            assert getattr(ours, name) == value


def test_low_dim_defaults_and_explicit_paper_values():
    sc = SparseCircleLoss(10, 3)
    assert sc.gamma == pytest.approx(math.sqrt(2) * math.log(9))
    assert sc.m == pytest.approx(ld.separation_cosine(10, 3))
    assert 0.39 < sc.m < 0.42  # Tammes: 10 points on S^2 at 66.15 degrees, cos 0.404
    cf = CurricularFaceLoss(10, 3)
    assert cf.scale == pytest.approx(math.sqrt(2) * math.log(9)) and cf.margin == 0.5
    sc = SparseCircleLoss(10, 3, m=0.25, gamma=256)
    assert (sc.m, sc.gamma) == (0.25, 256.0)
    assert CurricularFaceLoss(10, 3, scale=64).scale == 64.0
    # CurricularFace's margin: pi/10 between the regular decagon's neighbours (36 deg).
    assert CurricularFaceLoss(10, 2).margin == pytest.approx(math.pi / 10, rel=1e-12)
    assert CurricularFaceLoss(10, 2, margin=0.5).margin == 0.5
    assert CurricularFaceLoss(10, 128).margin == 0.5
    # ArcFace/CosFace: the rule is an option; the PML-compatible defaults are unchanged.
    assert ArcFaceLoss(10, 3).scale == 64.0 and CosFaceLoss(10, 3).scale == 64.0
    assert ArcFaceLoss(10, 3, scale="auto").scale == pytest.approx(math.sqrt(2) * math.log(9))
    assert CosFaceLoss(10, 3, scale="auto").scale == pytest.approx(math.sqrt(2) * math.log(9))
    # ArcFace's margin (degrees, like PML): 28.6 by default; "auto" is the rule's.
    assert ArcFaceLoss(10, 2).margin == pytest.approx(math.radians(28.6), rel=1e-12)
    assert ArcFaceLoss(10, 2, margin="auto").margin == pytest.approx(math.pi / 10, rel=1e-12)
    assert ArcFaceLoss(10, 3, margin="auto").margin == pytest.approx(math.radians(28.6))
    assert ArcFaceLoss(10, 128, margin="auto").margin == pytest.approx(math.radians(28.6))
    torch.manual_seed(5)
    ours = ArcFaceLoss(10, 3)
    torch.manual_seed(5)
    theirs = pml_losses.ArcFaceLoss(10, 3)
    assert torch.equal(ours.W.detach(), theirs.W.detach())


@pytest.mark.parametrize("bad", ["Auto", "adacos", ""])
def test_bad_auto_strings_are_rejected(bad):
    for cls, name in (
        (SparseCircleLoss, "gamma"),
        (SparseCircleLoss, "m"),
        (CurricularFaceLoss, "scale"),
        (CurricularFaceLoss, "margin"),
        (ArcFaceLoss, "scale"),
        (ArcFaceLoss, "margin"),
    ):
        with pytest.raises(ValueError, match=f"{name} must be a number or 'auto'"):
            cls(10, 3, **{name: bad})


SHARDED_TWINS = [
    ("ShardedSparseCircleLoss", SparseCircleLoss, ("m", "gamma")),
    ("ShardedCurricularFaceLoss", CurricularFaceLoss, ("margin", "scale", "momentum")),
]


@pytest.mark.parametrize("sharded_name, twin, names", SHARDED_TWINS)
@pytest.mark.parametrize("c, d", [(10, 2), (10, 3), (10, 17), (10, 18), (10, 128), (50, 20)])
def test_sharded_losses_resolve_the_twins_defaults(sharded_name, twin, names, c, d):
    # Low-dimensional (D < 4 ln(C(C-1)): 18.0 for C=10, 31.2 for C=50) and high.
    import pml_extras.distributed as dist_

    sharded_cls = getattr(dist_, sharded_name)
    torch.manual_seed(4)
    sharded = sharded_cls(c, d)
    torch.manual_seed(4)
    single = twin(c, d)
    for name in names:
        assert getattr(sharded, name) == getattr(single, name), (name, c, d)
    # The logit scale is read through the twin's attribute name (copied onto the class for
    # torch 2.4's Dynamo): the same attribute, the same value.
    assert sharded_cls.scale_name == twin.scale_name
    assert sharded._scale() == getattr(single, twin.scale_name)
    # One process holds every class: the same default init, draw for draw.
    assert torch.equal(sharded.W.detach(), single.W.detach())
    # Explicit values pass through both unchanged.
    explicit = {"m": 0.3, "gamma": 80.0, "margin": 0.4, "scale": 30.0, "momentum": 0.1}
    kw = {k: explicit[k] for k in names}
    plain = sharded_cls(c, d, weight_init_func=torch.nn.init.normal_, **kw)
    assert all(getattr(plain, k) == v for k, v in kw.items())
    # A typo in "auto" names the sharded loss and the argument.
    with pytest.raises(ValueError, match=f"{sharded_name}: {names[0]} must be a number or"):
        sharded_cls(c, d, **{names[0]: "Auto"})


def test_sharded_defaults_are_the_papers_at_face_recognition_sizes():
    # C = 1M classes, D = 512: resolved without building the 2 GB W.
    assert SparseCircleLoss.resolve_hyper_parameters(10**6, 512) == {"m": 0.25, "gamma": 256.0}
    assert CurricularFaceLoss.resolve_hyper_parameters(10**6, 512, owner="X") == {
        "margin": 0.5,
        "scale": 64.0,
        "momentum": 0.01,
    }
    low = SparseCircleLoss.resolve_hyper_parameters(10**6, 64)
    assert low["gamma"] == pytest.approx(math.sqrt(2) * math.log(10**6 - 1))


def test_rule_init_decides_on_the_global_class_count():
    # A shard of 2 columns out of C = 10 classes in 3-D: low-dimensional for C = 10
    # (threshold 18.0) although a 2-class W alone would not be (threshold 2.8).
    torch.manual_seed(0)
    shard = auto_proxy_init_(torch.empty(3, 2), num_classes=10)
    torch.testing.assert_close(shard.norm(dim=0), torch.full((2,), ld.LOW_DIM_PROXY_LENGTH))
    torch.manual_seed(0)
    alone = auto_proxy_init_(torch.empty(3, 2))
    torch.manual_seed(0)
    assert torch.equal(alone, torch.nn.init.normal_(torch.empty(3, 2)))


def test_sharded_init_decides_on_the_global_class_count(monkeypatch):
    # Rank 0 of 5 (construction makes no collective call, so the group is faked): a shard
    # of 2 of the 10 classes in 3-D gets the rule's short proxies, as the 10 classes are
    # low-dimensional in 3-D although 2 classes alone would not be.
    import pml_extras.distributed as dist_
    from pml_extras.distributed import _comm

    monkeypatch.setattr(_comm, "group_info", lambda group=None: (0, 5))
    loss = dist_.ShardedCurricularFaceLoss(10, 3, init_seed=0)
    assert (loss.class_start, loss.class_end) == (0, 2)
    lengths = loss.W.detach().norm(dim=0)
    torch.testing.assert_close(lengths, torch.full((2,), ld.LOW_DIM_PROXY_LENGTH))


def test_bad_sizes_are_named_before_the_rule_runs():
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        SparseCircleLoss(0, 3)
    with pytest.raises(ValueError, match="embedding_size must be a positive int, got 2.5"):
        CurricularFaceLoss(10, 2.5)


@given(st.integers(3, 2000))
def test_packing_bound_is_exact_in_2d_and_closed_form_in_3d(c):
    assert ld.packing_bound_cosine(c, 2) == pytest.approx(math.cos(2 * math.pi / c), abs=2e-3)
    # S^2: a cap of angular radius r holds (1 - cos r) / 2 of the sphere.
    half = 1.0 - 2.0 / c
    assert ld.packing_bound_cosine(c, 3) == pytest.approx(2 * half * half - 1, abs=2e-3)


@settings(max_examples=15)
@given(st.integers(2, 40), st.integers(2, 40))
def test_separation_cosine_known_cases(c, d):
    s = ld.separation_cosine(c, d)
    if d >= c:
        assert s == 0.0
    elif d == 2:
        assert s == pytest.approx(math.cos(2 * math.pi / c), abs=1e-12)
    else:
        # Never better than the area bound (no layout is), and as good as the
        # cross-polytope where that fits (C <= 2D points at pairwise cos <= 0).
        assert s >= ld.packing_bound_cosine(c, d) - 1e-3
        if c <= 2 * d:
            assert s <= 0.02


# ------------------------------------------------------------------------- spread init


@given(st.integers(3, 64))
def test_spread_2d_is_the_regular_polygon(c):
    w = spread_proxies(c, 2, generator=torch.Generator().manual_seed(c))
    assert w.shape == (2, c)
    torch.testing.assert_close(w.norm(dim=0), torch.ones(c, dtype=torch.float64))
    assert min_pairwise_angle(w) == pytest.approx(360.0 / c, abs=1e-9)


@pytest.mark.parametrize(
    "c, optimum",
    [(4, math.degrees(math.acos(-1 / 3))), (6, 90.0), (12, 63.4349)],
    ids=["tetrahedron", "octahedron", "icosahedron"],
)
def test_spread_3d_reaches_known_optima(c, optimum):
    for seed in range(2):
        w = spread_proxies(c, 3, generator=torch.Generator().manual_seed(seed))
        assert w.shape == (3, c)
        assert min_pairwise_angle(w) == pytest.approx(optimum, abs=0.5)


@given(st.integers(1, 40), st.integers(0, 20))
def test_spread_orthonormal_when_d_at_least_c(c, extra):
    w = spread_proxies(c, c + extra, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(w.t() @ w, torch.eye(c, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_spread_init_keeps_dtype_and_gaussian_lengths(dtype):
    w = torch.empty(3, 10, dtype=dtype)
    torch.manual_seed(0)
    out = spread_init_(w)
    assert out is w and w.dtype == dtype and w.shape == (3, 10)
    # Directions spread (10 points on S^2: Tammes angle 66.15 degrees) ...
    assert min_pairwise_angle(w.float()) > 64.0
    # ... lengths those of normal_ columns (chi with 3 degrees of freedom, mean 1.60).
    assert 0.8 < float(w.float().norm(dim=0).mean()) < 2.4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_spread_init_takes_a_length(dtype):
    w = spread_init_(torch.empty(3, 10, dtype=dtype), length=0.25)
    # Tammes angle 66.15 degrees; bf16's 8-bit mantissa moves directions by ~1 degree.
    floor = 62.0 if dtype == torch.bfloat16 else 65.5
    assert w.dtype == dtype and min_pairwise_angle(w.float()) > floor
    torch.testing.assert_close(
        w.double().norm(dim=0), torch.full((10,), 0.25, dtype=torch.float64), rtol=1e-2, atol=0
    )
    for bad in (0.0, -1.0, float("nan"), float("inf"), "short"):
        with pytest.raises(ValueError, match="length must be a positive number"):
            spread_init_(torch.empty(3, 10), length=bad)


def test_auto_init_switches_on_the_rule():
    torch.manual_seed(1)
    low = auto_proxy_init_(torch.empty(3, 10))
    assert min_pairwise_angle(low) > 64.0
    # Short proxies when low-dimensional, every column the same length.
    torch.testing.assert_close(low.norm(dim=0), torch.full((10,), ld.LOW_DIM_PROXY_LENGTH))
    # CurricularFace's default init is this one; SparseCircle's keeps normal_ lengths
    # (chi with 3 degrees of freedom, mean 1.60) on the same spread directions.
    lengths = CurricularFaceLoss(10, 2).W.detach().norm(dim=0)
    torch.testing.assert_close(lengths, torch.full((10,), ld.LOW_DIM_PROXY_LENGTH))
    torch.manual_seed(2)
    sc = SparseCircleLoss(10, 3).W.detach()
    assert min_pairwise_angle(sc) > 64.0 and 0.8 < float(sc.norm(dim=0).mean()) < 2.4
    torch.manual_seed(2)
    high = SparseCircleLoss(10, 128).W.detach()
    torch.manual_seed(2)
    assert torch.equal(high, torch.nn.init.normal_(torch.empty(128, 10)))
    torch.manual_seed(1)
    high = auto_proxy_init_(torch.empty(128, 10))
    torch.manual_seed(1)
    assert torch.equal(high, torch.nn.init.normal_(torch.empty(128, 10)))


def proxy_turn_degrees(loss_fn, steps: int = 3) -> float:
    """Mean angle (degrees) the proxies turn in ``steps`` Adam steps at the recipe's loss
    lr (1e-2) on a fixed 2-D batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 2, generator=g)
    y = torch.arange(128) % 10
    before = torch.nn.functional.normalize(loss_fn.W.detach().clone(), dim=0)
    opt = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(x, y).backward()
        opt.step()
    after = torch.nn.functional.normalize(loss_fn.W.detach(), dim=0)
    cos = (before * after).sum(0).clamp(-1.0, 1.0)
    return float(torch.rad2deg(torch.acos(cos)).mean())


def test_short_proxies_turn_early():
    # The reason for the short init: its proxies reorder in the first steps, while
    # proxies of normal_ length move by about a degree (their cyclic order is then fixed).
    torch.manual_seed(0)
    short = proxy_turn_degrees(CurricularFaceLoss(10, 2))
    torch.manual_seed(0)
    long = proxy_turn_degrees(CurricularFaceLoss(10, 2, weight_init_func=spread_init_))
    assert short > 20.0 and long < 3.0, (short, long)


# ---------------------------------------------------------------- unfolding end to end


def class_directions(loss_fn, seed: int) -> int:
    """Train a digits MLP at 3-D; return how many distinct class directions the test
    embeddings have (class mean directions more than 20 degrees from every other)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x / 16.0, dtype=torch.float32)
    y = torch.as_tensor(y)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1400], perm[1400:]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128),
        torch.nn.BatchNorm1d(128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 3),
    )
    opt = torch.optim.Adam(
        [{"params": model.parameters(), "lr": 1e-3}, {"params": loss_fn.parameters(), "lr": 1e-2}]
    )
    for _ in range(10):
        for b in torch.randperm(len(tr), generator=g).split(100):
            idx = tr[b]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model(x[te]), dim=1)
        means = torch.stack([emb[y[te] == k].mean(0) for k in range(10)])
    means = torch.nn.functional.normalize(means, dim=1)
    cos = means @ means.t()
    cos.fill_diagonal_(-1.0)
    return int((cos.max(1).values < math.cos(math.radians(20))).sum())


def test_defaults_unfold_classes_at_3d():
    # The papers' values with PML's init fold classes together (digits 3-D: 0.68 acc) ...
    torch.manual_seed(0)
    paper = SparseCircleLoss(10, 3, m=0.25, gamma=256, weight_init_func=torch.nn.init.normal_)
    folded = class_directions(paper, seed=0)
    # ... the defaults (the rule) give every class its own direction.
    torch.manual_seed(0)
    unfolded = class_directions(SparseCircleLoss(10, 3), seed=0)
    torch.manual_seed(0)
    unfolded_cf = class_directions(CurricularFaceLoss(10, 3), seed=0)
    assert unfolded == 10 and unfolded_cf == 10
    assert folded < 10
