"""README.md: its paper-to-code table names what exists."""
import os
import re

import ibp_short_warmup as ibp
import ibp_tools
from run_helpers import REPO


def test_readme_paper_to_code_table_names_existing_functions():
    """Every name in backticks in README's paper-to-code table (functions and classes alike) is a
    function or class of ibp_short_warmup or ibp_tools; flags (--x) and file names are not names."""
    readme = open(os.path.join(REPO, 'README.md')).read()
    table = readme[readme.index('Paper to code'):readme.index('## Output')]
    names = set(re.findall(r'`([A-Za-z_][A-Za-z_0-9]*)`', table))
    assert len(names) >= 10, 'the table lost its function names'
    found = [n for n in names if callable(getattr(ibp, n, getattr(ibp_tools, n, None)))]
    missing = sorted(names - set(found))
    assert not missing, f'README names functions that do not exist: {missing}'
    # and every [paper]-tagged contribution is reachable from the table
    for n in ('ibp_init_', 'warmup_regularizers', 'ibp_forward'):
        assert n in names
