"""Values and gradients of the ops' CPU paths at fixed seeds, to show that a refactor keeps
them bit-identical.

    python tests/helpers/_ops_fingerprint.py save before.pt   # at the old commit
    python tests/helpers/_ops_fingerprint.py cmp before.pt    # at the new one: "all bit-identical"

class_logsumexp (three transforms, four dtypes, with and without CPU autocast), the
target cosine, all-pairs, dense and gather mined pair losses, with their gradients.
"""

import sys

import torch
import torch.nn.functional as F

from pml_extras.ops import pair_circle as pc
from pml_extras.ops.class_lse import class_logsumexp, target_cosine
from pml_extras.ops.pair_circle import all_pairs_circle_loss, mined_pairs_circle_loss

out = {}
g = torch.Generator().manual_seed(0)
for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for kind, p0, p1 in (("circle", 256.0, 0.25), ("curricular", 64.0, 0.3), ("scaled", 64.0, 0.0)):
        for ac in (False, True):
            x = torch.randn(37, 48, generator=g).to(dt).requires_grad_()
            W = torch.randn(48, 301, generator=g).requires_grad_()
            t = torch.randint(0, 301, (37,), generator=g)
            t[3] = -1
            rp = torch.rand(37, generator=g) - 0.5
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac and dt != torch.float64):
                lse, cy = class_logsumexp(x, W, t, kind, p0, p1, row_param=rp, chunk_size=64)
            (torch.where(torch.isfinite(lse), lse, 0).sum() + 3 * cy.sum()).backward()
            k = f"class.{dt}.{kind}.{ac}"
            out.update(
                {
                    k + ".lse": lse,
                    k + ".cos": cy,
                    k + ".gx": x.grad,
                    k + ".gw": W.grad,
                    k + ".tc": target_cosine(x, W, t),
                }
            )
    x = F.normalize(torch.randn(50, 32, generator=g), dim=1).to(dt).requires_grad_()
    lab = torch.randint(0, 7, (50,), generator=g)
    l = all_pairs_circle_loss(
        x, x, lab, lab, self_compare=True, m=0.25, gamma=64.0, block_size=(16, 24)
    )
    l.sum().backward()
    out[f"pair.{dt}.all"] = l
    out[f"pair.{dt}.all.g"] = x.grad
    a1 = torch.randint(0, 50, (300,), generator=g)
    p = torch.randint(0, 50, (300,), generator=g)
    same = lab[a1] == lab[p]
    a1p, pp = a1[same], p[same]
    a2, n = a1[~same], p[~same]
    # "sparse" was the gather path's name before the rename (it still works, with a warning).
    for path in ("dense", "gather" if hasattr(pc, "PATHS") else "sparse"):
        x.grad = None
        l = mined_pairs_circle_loss(
            x, x, a1p, pp, a2, n, m=0.25, gamma=64.0, path=path, chunk_size=17
        )
        l.sum().backward()
        out[f"pair.{dt}.{'dense' if path == 'dense' else 'gather'}"] = l
        out[f"pair.{dt}.{'dense' if path == 'dense' else 'gather'}.g"] = x.grad
out = {k: v.detach().clone() for k, v in out.items()}
if sys.argv[1] == "save":
    torch.save(out, sys.argv[2])
else:
    ref = torch.load(sys.argv[2])
    bad = [
        k
        for k in ref
        if not torch.equal(ref[k], out[k])
        and not (torch.isnan(ref[k]).all() and torch.isnan(out[k]).all())
    ]
    print(len(ref), "outputs;", "DIFFER:" if bad else "all bit-identical", bad)
