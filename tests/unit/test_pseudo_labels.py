import numpy as np
import pytest
from dime_ds.data.pseudo_labels import PseudoLabels, PseudoLabelError, write_pseudo_labels, UNLABELLED
def test_roundtrip(tmp_path):
    c = np.random.default_rng(0).normal(size=(3, 4))
    write_pseudo_labels(tmp_path, ["a", "b", "c"], np.array([2, 0, 1]), c, {"seed": 1})
    p = PseudoLabels(tmp_path)
    assert p.k == 3 and len(p) == 3 and p.manifest["seed"] == 1
    assert p.lookup(["c", "zz", "a"]).tolist() == [1, UNLABELLED, 2]
    assert np.allclose(np.linalg.norm(p.centroids, axis=1), 1)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(PseudoLabelError, match="stage=cluster"):
        PseudoLabels(tmp_path)
