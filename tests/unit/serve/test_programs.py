"""The device programs' slot layout (vffn_jax/serve/programs.py `SlotLayout` and `decode_bucket`'s views): a
bucket is the first q places of every device's block of slots, the host's row order and the device's agree, new
requests fill the lowest places across devices, and writing a bucket back leaves the other slots as they were."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from vffn_jax.serve import programs
from vffn_jax.serve.programs import SlotLayout


@pytest.mark.parametrize("slots,dp", [(32, 1), (16, 8), (24, 4), (8, 8)])
def test_buckets_members_and_rows_agree(slots, dp):
    lay = SlotLayout(slots, dp)
    assert lay.buckets[-1] == slots // dp and all(b < lay.buckets[-1] for b in lay.buckets[:-1])
    for q in lay.buckets:
        members = lay.members(q)
        assert len(members) == dp * q and len(set(members.tolist())) == dp * q
        assert (lay.row_of(q, members) == np.arange(dp * q)).all()  # row_of inverts members
        assert all(m // lay.per == r // q for r, m in enumerate(members))  # each row stays on its slot's device
        # the device-side view takes exactly these slots, in this order
        x = np.arange(slots)
        assert (np.asarray(programs._bucket_view(jnp.asarray(x), 0, lay, q)) == members).all()
    order = lay.fill_order(range(slots))
    assert order[:dp] == [d * lay.per for d in range(dp)]  # one request per device before any second place
    for n in range(1, slots + 1):  # the first n requests need the smallest bucket that can hold n
        assert lay.bucket_for(order[:n]) == next(q for q in lay.buckets if dp * q >= n)


def test_bucket_write_changes_only_the_bucket():
    lay = SlotLayout(8, 2)
    x = jnp.arange(2 * 8 * 3).reshape(2, 8, 3)
    part = -programs._bucket_view(x, 1, lay, 2) - 1
    y = np.asarray(programs._bucket_write(x, part, 1, lay, 2))
    members = lay.members(2)
    assert (y[:, members] == np.asarray(part)).all()
    others = np.setdiff1d(np.arange(8), members)
    assert (y[:, others] == np.asarray(x)[:, others]).all()
