"""Property tests: attack-file validation never crashes and never accepts an invalid file."""

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from madry_ns import attack_file
from madry_ns.errors import AttackFileError

N = 2
EPS = 8.0
X_NAT = np.random.default_rng(0).integers(0, 256, (N, 32, 32, 3)).astype(np.uint8)

_dtypes = st.sampled_from([np.float64, np.float32, np.float16, np.int64, np.int32, np.uint8,
                           np.int8, np.bool_, np.complex64])
_shapes = st.sampled_from([(N, 32, 32, 3), (N + 1, 32, 32, 3), (N, 32, 32), (N, 3, 32, 32),
                           (0, 32, 32, 3), ()])


@st.composite
def _arrays(draw):
    """Mostly near-valid attacks (clean + small noise), with random corruptions."""
    shape = draw(_shapes)
    dtype = draw(_dtypes)
    if shape == (N, 32, 32, 3) and draw(st.booleans()):
        noise = draw(hnp.arrays(np.float64, shape, elements=st.floats(-10, 10),
                                fill=st.floats(-10, 10)))
        x = (X_NAT + noise).astype(dtype) if dtype != np.bool_ else (noise > 0)
    else:
        x = draw(hnp.arrays(dtype, shape))
    if x.size and x.dtype.kind == "f" and draw(st.booleans()):
        flat = x.reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf, 255.0002, -0.0002, 1e30]))
    return x


def _accepts(x):
    try:
        attack_file.validate(x, X_NAT, EPS)
    except AttackFileError:
        return False
    return True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_arrays())
def test_validation_raises_only_attack_file_errors_and_accepts_only_valid_arrays(x):
    if _accepts(x):
        assert x.shape == (N, 32, 32, 3)
        assert x.dtype.kind in "iuf"
        xf = x.astype(np.float64)
        assert np.isfinite(xf).all()
        assert xf.min() >= -1e-4 and xf.max() <= 255 + 1e-4
        assert np.abs(xf - X_NAT).max() <= EPS + 1e-4


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_refused_without_crashing(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("f") / "attack.npy"
    path.write_bytes(blob)
    with pytest.raises(AttackFileError):
        attack_file.validate(attack_file.load(str(path)), X_NAT, EPS)


@settings(max_examples=100, deadline=None)
@given(_arrays(), st.integers(0, 200))
def test_truncated_npy_files_are_refused_or_loaded_whole(tmp_path_factory, x, cut):
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    data = buf.getvalue()
    path = tmp_path_factory.mktemp("f") / "attack.npy"
    path.write_bytes(data[:max(len(data) - cut, 0)])
    try:
        loaded = attack_file.load(str(path))
    except AttackFileError:
        return
    assert cut == 0 and np.array_equal(loaded, x, equal_nan=x.dtype.kind in "fc")
