"""Hypothesis profiles and import path for the property tests.

Profiles: 'fast' (default, a few examples per property, for every run) and 'thorough' (many
examples), chosen by HYPOTHESIS_PROFILE=thorough. With the CI variable set, the examples are
derandomized so that CI is reproducible. Deadlines are off: a first call pays torch's warm-up.
"""
import importlib.util
import os
import sys

import torch
from hypothesis import HealthCheck, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec('ibp_short_warmup') is None:  # respect a module already on the path
    sys.path.insert(0, ROOT)

torch.set_num_threads(1)  # tiny networks: one thread is as fast, and the machine is shared

_common = dict(deadline=None, derandomize=bool(os.environ.get('CI')), print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile('fast', max_examples=25, **_common)
settings.register_profile('thorough', max_examples=300, **_common)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'fast'))
