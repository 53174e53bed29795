"""Official α grids of Yu et al. 2023 (issue 14.5): numpy's arange reproduced bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from preflens.attribution.scaling import alpha_grid, numpy_arange, official_alpha_grid
from preflens.errors import ConfigError


def test_official_grids_equal_numpy_arange():
    mem = official_alpha_grid("memory")
    ic = official_alpha_grid("in_context")
    assert mem == np.arange(-5, 6, 0.1).tolist()          # bit for bit, including -4.800000000000001
    assert ic == np.arange(-10., 11., 0.5).tolist()
    assert (len(mem), len(ic)) == (110, 42)
    assert mem[-1] == pytest.approx(5.9) and ic[-1] == 10.5   # not 5 / 10 as documented before
    assert 0.0 not in mem and 1.0 not in mem                  # the official grid misses them exactly


@pytest.mark.parametrize("args", [(0, 1, 0.3), (-2.5, 7.1, 0.13), (3, -1, -0.7), (1, 1, 0.1),
                                  (-1e-3, 2e-3, 1e-4), (0, 10, 3)])
def test_numpy_arange_matches_numpy(args):
    assert numpy_arange(*args) == np.arange(*args).astype(float).tolist()


def test_grid_errors_and_cleaned_grid_differs():
    with pytest.raises(ConfigError):
        official_alpha_grid("value")
    with pytest.raises(ConfigError):
        numpy_arange(0, 1, 0)
    assert alpha_grid(-5, 5, 0.1)[-1] == 5.0  # the analysis grid stops at hi and contains 0 and 1
