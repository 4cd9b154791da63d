"""optim at its edges: each optim.* range a config can reach, the warm-up's length and
start, and which group (learning rate, decay, optimizer) a parameter lands in when the
groups' rules overlap."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrulm import optim

KW = dict(lr=1e-3, total_steps=10)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(schedule_kind="wsd", decay_fraction=0.0), "decay_fraction must be in \\(0, "),
        (dict(b1=1.0), "optim.b1 must be in \\[0, 1\\)"),
        (dict(b2=1.0), "optim.b2 must be in \\[0, 1\\)"),
        (dict(lr_factor=0.0), "optim.lr_factor must be positive"),
        (dict(lr=float("inf")), "optim.lr must be positive; got inf"),
        (dict(weight_decay=float("inf")), "optim.weight_decay must be >= 0; got inf"),
        (dict(total_steps=0), "train.steps must be positive; got 0"),
        (dict(warmup_fraction=1.5), "optim.warmup_fraction must be in \\[0, 1\\]"),
    ],
)
def test_out_of_range_settings_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(**{**KW, **override})


def test_the_warm_up_at_its_edges():
    """A warm-up over every step (warmup_fraction=1) is one linear ramp; its length is
    rounded, not truncated (0.29 x 100 = 28.999...: 29 steps); every schedule starts at
    ~1e-7, not 0."""
    _, ramp = optim.make_optimizer(lr=1e-3, total_steps=10, warmup_fraction=1.0)
    np.testing.assert_allclose(float(ramp(5)), 5e-4, rtol=1e-3)
    np.testing.assert_allclose(float(ramp(10)), 1e-3, rtol=1e-6)
    sched = optim.schedule(1e-3, 100, 0.29, "linear")
    assert float(sched(28)) < 0.99e-3 and float(sched(29)) == pytest.approx(1e-3)
    for kind in optim.SCHEDULES:
        assert float(optim.schedule(1e-3, 100, 0.1, kind)(0)) == pytest.approx(1e-7), kind


def test_overlapping_groups():
    """optim.no_decay naming a layer also holding recurrent parameters leaves those in the
    recurrent group (lr x lr_factor); what no_decay takes trains at lr (not lr x lr_factor);
    Muon steps the stack's matrices, never the output head's."""
    params = {"lru": {"nu_log": jnp.full((3,), 2.0), "C_re": jnp.full((3,), 2.0)},
              "norm": {"scale": jnp.full((3,), 2.0)}}  # fmt: skip
    labels = optim._labels(params, [re.compile("lru"), re.compile("scale")])
    assert labels == {"lru": {"nu_log": "recurrent", "C_re": "no_decay"},
                      "norm": {"scale": "no_decay"}}  # fmt: skip
    lr, factor = 0.1, 0.25
    tx, _ = optim.make_optimizer(lr=lr, total_steps=10, lr_factor=factor, warmup_fraction=0.0,
                                 weight_decay=0.5, no_decay="scale$")  # fmt: skip
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["norm"]["scale"], -lr, rtol=1e-4)  # Adam's step alone
    np.testing.assert_allclose(updates["lru"]["nu_log"], -lr * factor, rtol=1e-4)
    assert optim.is_hidden_matrix(("stack", "blocks", "mlp_in", "kernel"))
    assert not optim.is_hidden_matrix(("head", "kernel"))  # an untied output head
    assert not optim.is_hidden_matrix(("stack", "blocks", "lru", "B_re"))
    with pytest.raises(ValueError, match="reads as a character class"):
        optim.check_no_decay({"stack": {"kernel": jnp.zeros(2)}}, '["stack"]')
