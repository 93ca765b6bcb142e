"""`int8_grid_codebook`: each book's values rounded to integer multiples of its largest magnitude / 127, against a
brute-force search over the 255 multiples."""

from __future__ import annotations

import pytest
import torch

from swsc_hf.core.compress import INT8_GRID_MAX, int8_grid_codebook


def nearest_multiple_oracle(codebook: torch.Tensor) -> torch.Tensor:
    """Per book, each value replaced by the nearest of k * step (k = -127..127, step = the stored top / 127; ties to
    the even k), value by value."""
    out = torch.empty_like(codebook)
    for b in range(codebook.shape[0]):
        book = codebook[b].float()
        top = float(book.abs().max())
        step = torch.tensor(top, dtype=torch.float32) / INT8_GRID_MAX if top > 0 else torch.tensor(1.0)
        grid = torch.arange(-INT8_GRID_MAX, INT8_GRID_MAX + 1, dtype=torch.float32)
        for index in range(book.numel()):
            distance = (book.view(-1)[index] / step - grid).abs()
            best = grid[distance == distance.min()]
            k = best[best % 2 == 0][0] if best.numel() > 1 else best[0]
            out[b].view(-1)[index] = (k * step).to(codebook.dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 16, 1), (3, 256, 4), (2, 64, 2)], ids=str)
def test_values_move_to_the_nearest_multiple_of_their_books_step(shape, dtype):
    codebook = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * torch.tensor([3.0, 0.01, 1.0])[
        : shape[0], None, None]).to(dtype)
    grid = int8_grid_codebook(codebook)
    assert grid.dtype == dtype and grid.shape == codebook.shape
    assert torch.equal(grid, nearest_multiple_oracle(codebook))
    top = codebook.float().abs().amax(dim=(1, 2))
    assert torch.equal(grid.float().abs().amax(dim=(1, 2)), top)  # each book keeps its largest magnitude
    moved = (grid.float() - codebook.float()).abs().amax(dim=(1, 2))
    assert (moved <= top / (2 * INT8_GRID_MAX) + top * torch.finfo(dtype).eps).all()  # half a step + rounding
    assert torch.equal(int8_grid_codebook(grid), grid)  # a book on its grid stays as it is


def test_an_all_zero_book_stays_zero_and_books_are_independent():
    codebook = torch.zeros(2, 4, 1)
    codebook[1, :, 0] = torch.tensor([1.0, 0.5, -0.25, 0.003])
    grid = int8_grid_codebook(codebook)
    assert torch.equal(grid[0], torch.zeros(4, 1))
    step = torch.tensor(1.0) / INT8_GRID_MAX
    # 127 steps; 63.5 (a tie: to the even 64); -31.75; 0.381
    assert torch.equal(grid[1, :, 0], torch.tensor([127.0, 64.0, -32.0, 0.0]) * step)
