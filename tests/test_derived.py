"""Extension points used as a newcomer would: a store-backed artifact of one's
own, registered in its one place (`store.register_derived`), is named by
`derive_key`, read back, verified and reported with no other change."""

from __future__ import annotations

import numpy as np
import pytest

from actcache.builder import build
from actcache.files import derive_key, load_npz, save_npz
from actcache.store import DERIVED, Store, register_derived, verify
from conftest import cfg_for


@pytest.fixture()
def test_artifact():
    register_derived("centroids")
    yield "centroids"
    DERIVED.pop("centroids", None)


def test_a_derived_artifact_of_ones_own(tiny_model_dir, jsonl, tmp_path, test_artifact):
    st = build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "store", layers="0", masks=("isolated",)))
    X = st.acts("resid", 0, "mean", "isolated", split="pool")
    by_label = {int(y): X[st.labels[st.pool_rows] == y].mean(0) for y in np.unique(st.labels[st.pool_rows])}
    params = {"array": "resid/L0/mean/isolated", "by": "label"}
    path = st.derived_path(test_artifact, **params)
    # named by derive_key, in its own folder, with the registered suffix
    assert path == st.dir / "centroids" / f"{derive_key(st.key, 'centroids', **params)[:32]}.npz"
    save_npz(path, {"c0": by_label[0], "c1": by_label[1]})
    back = load_npz(st.derived_path(test_artifact, **params))
    np.testing.assert_array_equal(back["c1"], X[st.labels[st.pool_rows] == 1].mean(0))
    assert Store(st.dir).info()["derived"]["centroids"] == 1

    rep = verify(st.dir)
    assert rep.ok and rep.checked >= 1
    path.write_bytes(b"not an npz")  # verify checks every registered kind
    rep = verify(st.dir)
    assert not rep.ok and [f.path for f in rep.findings] == [str(path)]
    assert verify(st.dir, repair=True).ok and not path.exists()


def test_unregistered_kinds_are_refused(tiny_model_dir, jsonl, tmp_path):
    st = build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "store", layers="0", masks=("isolated",)))
    from actcache.errors import ConfigError

    with pytest.raises(ConfigError, match="register_derived"):
        st.derived_path("nothing-registered", x=1)
