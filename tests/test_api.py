import jaxquant as jq


def test_every_public_name_is_importable_and_listed():
    for name in jq.__all__:
        assert getattr(jq, name) is not None, name
    contract = ["quantize", "dequantize", "unpack_codes", "nbytes", "bits_per_param", "to_bnb",
                "from_bnb", "QArray"]
    assert set(contract) <= set(jq.__all__)
