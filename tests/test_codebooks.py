import hashlib

import numpy as np
import pytest

from jaxquant._src import codebooks


def test_nf4_matches_bitsandbytes_and_is_sorted_with_exact_zero():
    assert codebooks.NF4.dtype == np.float32 and len(codebooks.NF4) == 16
    assert codebooks.NF4[7] == 0 and codebooks.NF4[0] == -1 and codebooks.NF4[15] == 1
    assert np.all(np.diff(codebooks.NF4) > 0)
    assert codebooks.NF4[8] == np.float32(0.07958029955625534)


def test_fp4_is_bitsandbytes_table_not_e2m1():
    raw = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3], np.float32) / np.float32(12)
    np.testing.assert_array_equal(codebooks.FP4[:8], raw)
    np.testing.assert_array_equal(codebooks.FP4[8:], -raw)
    assert np.signbit(codebooks.FP4[8])  # code 8 is -0
    assert codebooks.QTYPES["fp4"].zero_code == 0


def test_dynamic_map_is_bit_exact():
    signed = codebooks.DYNAMIC8_SIGNED
    assert hashlib.sha256(signed.astype("<f4").tobytes()).hexdigest().startswith("e732639a65f497b4")
    assert len(np.unique(signed)) == 256 and signed[127] == 0 and signed[255] == 1
    assert signed[0] == np.float32(-0.99296874)
    assert np.all(np.diff(codebooks.DYNAMIC8_UNSIGNED) > 0) and codebooks.DYNAMIC8_UNSIGNED[0] == 0


def test_integer_grids_are_twos_complement():
    np.testing.assert_array_equal(np.sort(codebooks.INT4), np.arange(-8, 8))
    np.testing.assert_array_equal(np.sort(codebooks.INT8), np.arange(-128, 128))
    assert codebooks.INT4[0xF] == -1 and codebooks.INT8[0x80] == -128


def test_midpoints_are_the_sorted_tables_float32_midpoints():
    qt = codebooks.QTYPES["fp4"]
    s = np.sort(codebooks.FP4)
    np.testing.assert_array_equal(qt.midpoints, (s[:-1] + s[1:]) / np.float32(2))
    # bitsandbytes' (torch.argsort) order for FP4, read off 0.50.2
    assert qt.sorted_order.tolist() == [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]


def test_unknown_qtype_lists_valid_ones():
    with pytest.raises(ValueError, match="valid qtypes are"):
        codebooks.get_qtype("nf3")
