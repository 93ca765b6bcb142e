"""Tests of swsc_hf.core.packing: bit-exact little-endian packing of codebook indices."""

from __future__ import annotations

import pytest
import torch

from swsc_hf.core import packing
from swsc_hf.core.packing import bits_for, pack_codes, packed_nbytes, unpack_codes


def test_bits_for():
    assert [bits_for(k) for k in (1, 2, 3, 4, 5, 16, 17, 256, 257, 65536)] == [1, 1, 2, 2, 3, 4, 5, 8, 9, 16]
    with pytest.raises(ValueError):
        bits_for(0)


def test_packed_nbytes():
    assert packed_nbytes(0, 3) == 0
    assert packed_nbytes(8, 3) == 3
    assert packed_nbytes(9, 3) == 4
    assert packed_nbytes(5, 16) == 10


def test_bit_layout_is_lsb_first():
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0x81]
    assert pack_codes(torch.tensor([1, 2]), 4).tolist() == [0x21]
    assert pack_codes(torch.tensor([0xABC, 0x123]), 12).tolist() == [0xBC, 0x3A, 0x12]


@pytest.mark.parametrize("bits", range(1, 17))
def test_round_trip_all_bits(bits):
    g = torch.Generator().manual_seed(bits)
    for count in (1, 7, 8, 9, int(torch.randint(10, 3000, (1,), generator=g))):
        codes = torch.randint(0, 2**bits, (count,), generator=g)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (packed_nbytes(count, bits),)
        assert torch.equal(unpack_codes(packed, bits, count), codes)
    extremes = torch.tensor([0, 2**bits - 1] * 5)
    assert torch.equal(unpack_codes(pack_codes(extremes, bits), bits, 10), extremes)


def test_any_shape_and_dtype():
    codes = torch.randint(0, 200, (7, 13), dtype=torch.int32)
    assert torch.equal(unpack_codes(pack_codes(codes, 8), 8, codes.numel()), codes.flatten().long())
    codes = torch.randint(0, 4, (33,), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, 2), 2, 33), codes.long())


def test_round_trip_across_pack_chunks(monkeypatch):
    monkeypatch.setattr(packing, "_PACK_CHUNK", 64)
    codes = torch.randint(0, 2**11, (1000,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(unpack_codes(pack_codes(codes, 11), 11, 1000), codes)


@pytest.mark.parametrize("bits", [1, 3, 7, 8, 13, 16])
def test_range_unpack_equals_slice(bits):
    g = torch.Generator().manual_seed(100 + bits)
    codes = torch.randint(0, 2**bits, (997,), generator=g)
    packed = pack_codes(codes, bits)
    full = unpack_codes(packed, bits, 997)
    for start, count in ((0, 1), (1, 5), (13, 100), (500, 497), (996, 1), (997, 0)):
        assert torch.equal(unpack_codes(packed, bits, count, start), full[start : start + count])
    # A stream cut right after the requested codes is enough.
    assert torch.equal(unpack_codes(packed[: packed_nbytes(300, bits)], bits, 50, 250), full[250:300])


def test_errors():
    with pytest.raises(ValueError, match=r"code 8 at flat index 2 is outside \[0, 7\]"):
        pack_codes(torch.tensor([1, 2, 8]), 3)
    with pytest.raises(ValueError, match="code -1"):
        pack_codes(torch.tensor([-1, 0]), 4)
    with pytest.raises(ValueError, match="integer dtype"):
        pack_codes(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([1]), 17)
    packed = pack_codes(torch.arange(10), 4)
    with pytest.raises(ValueError, match="expected at least 6 bytes, got 5"):
        unpack_codes(packed, 4, 11)
    with pytest.raises(ValueError, match="expected at least 6 bytes, got 5"):
        unpack_codes(packed, 4, 2, start=10)
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(packed.to(torch.int32), 4, 10)
