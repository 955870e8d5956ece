import pytest
import torch
from references import DT, flat

from hvpfunc import tree as T


def _trees():
    a = {"w": torch.randn(3, 2, dtype=DT), "b": [torch.randn(4, dtype=DT), (torch.randn((), dtype=DT),)]}
    b = T.random_like(a, generator=torch.Generator().manual_seed(1), kind="gaussian")
    return a, b


def test_dot_norm_match_flattened_reference():
    a, b = _trees()
    assert torch.allclose(T.dot(a, b), flat(a) @ flat(b))
    assert torch.allclose(T.norm(a), torch.linalg.vector_norm(flat(a)))


def test_elementwise_ops_match_flattened_reference():
    a, b = _trees()
    assert torch.allclose(flat(T.add(a, b)), flat(a) + flat(b))
    assert torch.allclose(flat(T.sub(a, b)), flat(a) - flat(b))
    assert torch.allclose(flat(T.scale(2.5, a)), 2.5 * flat(a))
    assert torch.allclose(flat(T.axpy(-0.5, a, b)), -0.5 * flat(a) + flat(b))
    assert torch.allclose(flat(T.axpy(torch.tensor(3.0, dtype=DT), a, b)), 3 * flat(a) + flat(b))
    assert T.numel(a) == 11
    assert float(T.norm(T.zeros_like(a))) == 0.0


def test_ops_work_under_vmap_and_match_loop():
    a, b = _trees()
    A = T.stack([a, b, T.add(a, b)])
    got = torch.func.vmap(lambda t: T.dot(t, b))(A)
    want = torch.stack([T.dot(t, b) for t in T.unstack(A)])
    assert torch.allclose(got, want)
    got_axpy = torch.func.vmap(lambda t: T.axpy(2.0, t, b))(A)
    for i, t in enumerate(T.unstack(A)):
        assert torch.allclose(flat(T.index(got_axpy, i)), flat(T.axpy(2.0, t, b)))


def test_random_like_is_reproducible_and_has_the_right_law():
    like = {"x": torch.zeros(2000, dtype=DT)}
    r1 = T.random_like(like, generator=torch.Generator().manual_seed(3))
    r2 = T.random_like(like, generator=torch.Generator().manual_seed(3))
    assert torch.equal(r1["x"], r2["x"])
    assert set(r1["x"].unique().tolist()) == {-1.0, 1.0}
    g = T.random_like(like, generator=torch.Generator().manual_seed(3), kind="gaussian", batch=5)
    assert g["x"].shape == (5, 2000)
    assert abs(float(g["x"].std()) - 1.0) < 0.05
    with pytest.raises(ValueError, match="rademacher"):
        T.random_like(like, kind="uniform")


def test_stack_unstack_roundtrip_and_structure_error():
    a, b = _trees()
    back = T.unstack(T.stack([a, b]))
    assert torch.equal(flat(back[1]), flat(b))
    with pytest.raises(ValueError, match="structure"):
        T.stack([a, {"w": a["w"]}])


def test_check_like_messages_name_the_leaf():
    a, _ = _trees()
    bad_shape = {"w": torch.zeros(2, 3, dtype=DT), "b": a["b"]}
    with pytest.raises(ValueError, match=r"v\['w'\] has shape \(2, 3\), but params\['w'\] has shape \(3, 2\)"):
        T.check_like(bad_shape, a)
    bad_dtype = {"w": a["w"], "b": [a["b"][0].float(), a["b"][1]]}
    with pytest.raises(TypeError, match=r"v\['b'\]\[0\] has dtype torch.float32"):
        T.check_like(bad_dtype, a)
    with pytest.raises(ValueError, match=r"missing leaves.*\['b'\]\[1\]\[0\]"):
        T.check_like({"w": a["w"], "b": [a["b"][0]]}, a)
    with pytest.raises(TypeError, match=r"v\['w'\] is a float, expected a tensor"):
        T.check_like({"w": 1.0, "b": a["b"]}, a)


def test_check_tree_rejects_integer_leaves():
    with pytest.raises(TypeError, match=r"params\['n'\] has dtype torch.int64"):
        T.check_tree({"x": torch.zeros(2), "n": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ValueError, match="no tensor leaves"):
        T.check_tree({})
