"""The real[] literals pgml.embed answers with and pgml.embed_batch COPYs (serving/inference.real_literals): numpy
writes every value at once, and each must read back as exactly the float32 the model computed, across float32's
whole range (zeros, subnormals, the largest value, the neighbours of every power of ten)."""

from __future__ import annotations

import numpy as np

from pgml_tuned.serving.inference import real_literals


def read_back(literals: list[str]) -> np.ndarray:
    return np.array([[np.float32(x) for x in s[1:-1].split(",")] for s in literals], dtype=np.float32)


def test_every_value_reads_back_as_the_same_float32() -> None:
    rng = np.random.default_rng(0)
    powers = np.float32(10.0) ** np.arange(-45, 39, dtype=np.float32)
    powers = powers[np.isfinite(powers) & (powers > 0)]
    edges = np.concatenate(
        [
            [0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1.17549435e-38, 3.4028235e38, -3.4028235e38, 0.1, 123456789.0],
            np.nextafter(powers, np.float32(0)),
            powers,
            np.nextafter(powers, np.float32(np.inf)),
        ]
    ).astype(np.float32)
    scaled = rng.standard_normal((64, 384)) * 10.0 ** rng.integers(-44, 38, (64, 384))
    scaled = scaled.astype(np.float32)
    scaled[~np.isfinite(scaled)] = 1.0
    for vectors in (rng.standard_normal((100, 384)).astype(np.float32), edges.reshape(1, -1), scaled):
        literals = real_literals(vectors)
        assert len(literals) == len(vectors)
        back = read_back(literals)
        assert back.shape == vectors.shape
        assert np.array_equal(back, vectors), vectors[back != vectors][:5]


def test_the_literal_is_what_postgresql_and_json_take() -> None:
    (literal,) = real_literals(np.array([[0.5, -0.000123, 0.0]], dtype=np.float32))
    assert literal == "{+500000000e-09,-123000005e-12,+000000000e-08}"
    assert real_literals(np.zeros((2, 0), dtype=np.float32)) == ["{}", "{}"]
