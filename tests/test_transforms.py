"""The one check of output-transform names."""

from __future__ import annotations

import pytest

from deepmr_dist.errors import InputError
from deepmr_dist.models.transforms import TRANSFORMS, check_transform


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_check_transform__returns_a_valid_name(transform):
    assert check_transform(transform) == transform


@pytest.mark.parametrize("bad", ["exp", "Sigmoid", ""])
def test_check_transform__unknown_name_is_an_input_error_listing_the_valid_ones(bad):
    with pytest.raises(InputError, match=f"unknown transform {bad!r}; valid: none, sigmoid, log1p$"):
        check_transform(bad)


def test_check_transform__needs_no_torch():
    import subprocess
    import sys

    code = "import sys\nimport deepmr_dist.models.transforms\nassert 'torch' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
