"""Helpers of the plumbing tests (not collected: no test_ prefix): running ibp_short_warmup.py in
this process and as a real process, reading what it prints and leaves behind."""
import hashlib
import os
import subprocess
import sys
import warnings

import torch

import ibp_short_warmup as ibp

REPO = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(REPO, 'ibp_short_warmup.py')
# A 3-epoch run of 128 synthetic images (2 steps an epoch), eps ramp in epoch 2: seconds on a CPU.
TINY = ['--smoke', '--epochs', '3', '--eps-start', '2', '--eps-length', '1', '--train-size', '128',
        '--test-size', '64', '--width', '0.0625', '--pgd-steps', '3', '--lr-milestones', '2']
HIDDEN = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def cli(*args, script=SCRIPT, timeout=300):
    """The script as a real process (one OpenMP thread): the CompletedProcess, text mode."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def one_error_line(err, names=None):
    """stderr is exactly one line 'error: ...' (no traceback) that contains `names`, if given."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, err
    if names is not None:
        assert str(names) in lines[0], lines[0]
    return lines[0]


def main_stderr(args, capsys):
    """ibp.main(args) in this process: (exit code, what a real process would show on stderr), i.e.
    the captured stderr plus every warning that Python's default filters would print."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        rc = ibp.main(args)
    shown = [f'{w.category.__name__}: {w.message}\n' for w in caught
             if not issubclass(w.category, HIDDEN)]
    return rc, capsys.readouterr().err + ''.join(shown)


def tree_digest(root):
    """{relative path: sha256} of every file and folder under root: any write shows up."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), root)] = 'folder'
        for f in files:
            path = os.path.join(folder, f)
            with open(path, 'rb') as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def flat(tensors):
    """All the tensors as one flat vector (parameters, gradients)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


class RunsCode:
    """Unpickling this calls open(marker, 'w'): a file that runs code when loaded unsafely."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


def stop_after_first_checkpoint(args, monkeypatch):
    """ibp.main(args) with a Ctrl-C arriving right after the first last.pt is written: the exit
    code (130)."""
    real_save = ibp.atomic_save

    def save_then_stop(obj, path):
        real_save(obj, path)
        if path.endswith('last.pt'):
            raise KeyboardInterrupt

    monkeypatch.setattr(ibp, 'atomic_save', save_then_stop)
    try:
        return ibp.main(args)
    finally:
        monkeypatch.setattr(ibp, 'atomic_save', real_save)
