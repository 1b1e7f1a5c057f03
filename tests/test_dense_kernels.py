"""The dense matmul (``runner/native/dense.c``): float32 and bfloat16 weights in the runner's panels give torch's
products, for every row count its register tiles split into and panels the last of which is padded."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runner import native


@pytest.fixture(scope="module", params=["vectorized", "portable"])
def kernels(request, tmp_path_factory):
    """The kernels as this CPU builds them, and the portable build (plain loops) that other CPUs get."""
    spec = native.build_for_this_cpu(portable=request.param == "portable")
    if spec is None:
        pytest.skip("no C compiler")
    return native.Kernels(native.build(spec, tmp_path_factory.mktemp("native")), spec)


@pytest.mark.parametrize("rows, columns", [(576, 576), (200, 64), (7, 30), (33, 1536)])
@pytest.mark.parametrize("m", [1, 3, 12, 13, 64, 97, 300])
def test_float32_panels_give_torchs_product(kernels, rows, columns, m):
    torch.manual_seed(rows * m)
    w, x = torch.randn(rows, columns) * 0.1, torch.randn(m, columns)
    panels = kernels.pack_dense(w)
    assert panels.numel() * 4 == kernels.dense_nbytes(w) >= w.numel() * 4
    out = kernels.dense(x, panels, rows)
    assert out.shape == (m, rows)
    assert torch.allclose(out, F.linear(x, w), atol=1e-5 * columns ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("m", [1, 12, 64, 97])
def test_bfloat16_panels_give_the_product_of_rounded_activations(kernels, m):
    w, x = (torch.randn(200, 576) * 0.1).bfloat16(), torch.randn(m, 576)
    if kernels.dense_bits(torch.bfloat16, 576) is None:
        assert not kernels.dense_bf16  # this build leaves bfloat16 weights to torch
        return
    assert kernels.dense_bits(torch.bfloat16, 575) is None  # the pairs need an even number of columns
    out = kernels.dense(x, kernels.pack_dense(w), 200)
    expected = x.bfloat16().float() @ w.float().T  # the activations rounded to bfloat16, summed in float32
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)
    halves = kernels.dense_halves(x.bfloat16(), kernels.pack_dense(w), 200)  # bfloat16 in, bfloat16 out
    assert halves.dtype == torch.bfloat16 and torch.equal(halves, out.bfloat16())  # rounded once, to nearest even


def test_a_row_of_nan_gives_nan_in_that_row_only(kernels):
    w, x = torch.randn(64, 32), torch.randn(3, 32)
    x[1, 5] = float("nan")
    out = kernels.dense(x, kernels.pack_dense(w), 64)
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()
