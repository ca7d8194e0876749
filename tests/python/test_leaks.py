"""No leaks: 1,000 training steps of the Engram layer in each table gradient mode keep the
process's resident memory flat once the first steps have allocated what they need."""

import pytest
import torch

import torch_engram as te
from conftest import HAS_PROC, rss_mib
from torch_engram import optim

# Bound on RSS growth between step 200 and step 1,000. A leak of one table gradient per step
# (about 0.4 MB here) or of one step's activations would exceed it within a few dozen steps.
BOUND_MIB = 8.0


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc")
@pytest.mark.parametrize("grad", ["fused", "sparse", "dense"])
def test_rss_stays_flat_over_1000_steps(grad):
    cfg = te.EngramConfig(
        engram_vocab_size=(811, 907),
        max_ngram_size=3,
        n_embed_per_ngram=32,
        n_head_per_ngram=2,
        layer_ids=(1,),
        pad_id=0,
        compressed_vocab_size=500,
    )
    torch.manual_seed(0)
    mod = te.Engram(
        cfg, 1, 64, hc_mult=2, hasher=te.NgramHasher(cfg), table_grad=grad, table_options=dict(state_alloc="eager")
    )
    opts = [o for o in optim.make_optimizers(mod, base_lr=1e-3) if o is not None]
    g = torch.Generator().manual_seed(0)
    marks = {}
    for step in range(1000):
        ids = torch.randint(0, 500, (4, 32), generator=g)
        hidden = torch.randn(4, 32, 2, 64, generator=g)
        for o in opts:
            o.zero_grad()
        mod(hidden, input_ids=ids).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(mod.parameters(), 1.0)
        for o in opts:
            o.step()
        if step in (199, 999):
            marks[step] = rss_mib()
    growth = marks[999] - marks[199]
    print(f"{grad}: RSS {marks[199]:.1f} MiB at step 200, {marks[999]:.1f} MiB at step 1000 ({growth:+.2f} MiB)")
    assert growth < BOUND_MIB
