"""The layout the card promises: ibp_short_warmup.py is one self-contained file.

It imports only the standard library, torch and torchvision (no file of this repository), the tools
script imports it one way, and a reader can run it as a script in a notebook (runpy) and use what
it defines there: build a model, train a step, certify it, all with the classes of that one run.
"""
import ast
import os
import runpy
import sys

import torch

REPO = os.path.dirname(os.path.abspath(__file__))
MAIN = os.path.join(REPO, 'ibp_short_warmup.py')
OWN = {os.path.splitext(f)[0] for f in os.listdir(REPO) if f.endswith('.py')}  # this repository


def imported(path):
    """The top-level module names that a file imports, anywhere in it (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split('.')[0])
    return names


def test_the_main_file_imports_only_the_standard_library_torch_and_torchvision():
    names = imported(MAIN)
    assert not names & OWN, names & OWN
    third_party = {n for n in names if n not in sys.stdlib_module_names}
    assert third_party <= {'torch', 'torchvision'}, third_party


def test_the_tools_import_the_main_file_and_nothing_imports_them_back():
    assert 'ibp_short_warmup' in imported(os.path.join(REPO, 'ibp_tools.py'))
    for name in OWN - {'ibp_tools'}:
        if not name.startswith('test_'):
            assert 'ibp_tools' not in imported(os.path.join(REPO, name + '.py')), name


def test_run_path_builds_trains_a_step_and_certifies_in_one_process():
    """runpy.run_path executes the file as a notebook's %run does (not as __main__: its CLI does not
    start); everything then comes from that one namespace, its Residual included."""
    torch.set_num_threads(1)
    ns = runpy.run_path(MAIN)
    cfg = ns['resolve'](ns['Config'](dataset='synthetic', model='wide_resnet', width=0.0625,
                                     synthetic_shape=(3, 8, 8), train_size=32, test_size=16,
                                     out_dir='unused'))
    info = ns['dataset_info'](cfg)
    model, opt, objective = ns['prepare'](cfg, torch.device('cpu'), info)
    assert any(isinstance(m, ns['Residual']) for m in model.modules())
    x, y = ns['synthetic_images'](32, info['shape'], info['classes'], 1)
    before = [p.detach().clone() for p in model.parameters()]
    stats = ns['train_step'](objective, opt, x.float() / 255, y, cfg.eps / 2, 0.25, cfg)
    assert not stats['nonfinite'].any()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    test = ns['synthetic_images'](16, info['shape'], info['classes'], 2)
    res = ns['evaluate'](model, test, cfg.eps, pgd_steps=2, recheck=True)
    assert 0 <= res['std_err'] <= res['pgd_err'] <= res['ver_err'] <= 1


def test_the_tools_script_is_the_first_file_importing_the_main_file_at_top_level():
    """The GPU check finds `python <tools script> benchmark ...` as the first file, alphabetically,
    other than the main file and test_*.py, whose top level imports ibp_short_warmup: that must
    be ibp_tools.py (conftest.py, say, imports it inside a fixture)."""
    files = sorted(f for f in os.listdir(REPO) if f.endswith('.py') and not f.startswith('test_')
                   and f != 'ibp_short_warmup.py')
    first = [f for f in files if any(line.startswith(('import ibp_short_warmup',
                                                      'from ibp_short_warmup import'))
                                     for line in open(os.path.join(REPO, f)))]
    assert first[0] == 'ibp_tools.py', first
