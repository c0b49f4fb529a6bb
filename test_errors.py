"""Issue 21, "nothing lost, nothing cryptic": every way a run can fail outside the mathematics is
one line on stderr, exit code 2 (130 for Ctrl-C), and leaves the run folder byte for byte as it
was, or, where a run was under way, holding its last finished epoch whole.

Oracles: sha256 of every file and folder of a run folder before and after (tree_digest), an
uninterrupted run of the same flags (its log records without the timings and its final metrics),
faults injected only into ibp_short_warmup's own view of `open` and `os` (disk full, permission
denied, read-only), real small and read-only tmpfs mounts where the machine permits mounting,
truncated copies of the real MNIST idx files, and a torchrun rank frozen with SIGSTOP.
"""
import contextlib
import errno
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

import ibp_short_warmup as ibp
from run_helpers import tree_digest  # {path: sha256}: any write shows up

REPO = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(REPO, 'ibp_short_warmup.py')
# A 3-epoch synthetic run of one step per epoch on 8x8 images: about a second in this process.
BASE = ['--smoke', '--epochs', '3', '--eps-start', '1', '--eps-length', '1', '--lr-milestones',
        '2', '--train-size', '64', '--test-size', '32', '--width', '0.0625', '--synthetic-shape',
        '3', '8', '8', '--pgd-steps', '1', '--device', 'cpu']
TIMINGS = ('seconds', 'img_per_s')


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """2 shared cores: one intra-op thread, also for the module-scoped runs."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ---- helpers ---------------------------------------------------------------------------------
def one_line(err, start='error: '):
    """stderr is exactly one line, starting with `start`, and no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start) and 'Traceback' not in err, err
    return lines[0]


def run(args, capsys):
    """ibp.main(args) in this process -> (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = ibp.main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def records(folder):
    """log.jsonl's records without the timings, which differ between any two runs."""
    with open(os.path.join(folder, 'log.jsonl')) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in f]


def final_metrics(folder):
    with open(os.path.join(folder, 'metrics.json')) as f:
        m = json.load(f)
    return {k: m[k] for k in ('std_err', 'pgd_err', 'ver_err', 'final_epoch')}


def last_epoch(folder):
    return torch.load(os.path.join(folder, 'last.pt'), weights_only=True)['epoch']


def temp_files(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith('.tmp'))


def copy_run(src, tmp_path, name='run'):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def strict_json(text):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(c):
        raise ValueError(f'not JSON: {c}')
    return json.loads(text, parse_constant=refuse)


# ---- the runs that tests copy ------------------------------------------------------------------
@pytest.fixture(scope='module')
def run3(tmp_path_factory):
    """The uninterrupted 3-epoch run: the reference of every resumed one."""
    out = tmp_path_factory.mktemp('errors') / 'run3'
    assert ibp.main(BASE + ['--out-dir', str(out)]) == 0
    return out


@pytest.fixture(scope='module')
def cut3(tmp_path_factory):
    """The same run killed between the two saves of epoch 3: log.jsonl holds epochs 1..3 (saved
    first), last.pt epoch 2. This is the one legal mismatch of log and checkpoint."""
    out = tmp_path_factory.mktemp('errors') / 'cut3'
    real = ibp.atomic_save

    def killed_before_last_pt_of_epoch_3(obj, path):
        if path.endswith('last.pt') and obj['epoch'] == 3:
            raise KeyboardInterrupt
        real(obj, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ibp, 'atomic_save', killed_before_last_pt_of_epoch_3)
        assert ibp.main(BASE + ['--out-dir', str(out)]) == 130
    assert last_epoch(out) == 2 and len(records(out)) == 3
    return out


# ================================================================================================
# The folder guard: a fresh run never writes into a folder holding a run file
# ================================================================================================
def test_folder_with_a_log_but_no_checkpoint_is_refused_and_untouched(run3, tmp_path, capsys):
    out = copy_run(run3, tmp_path)
    os.remove(out / 'last.pt')  # log.jsonl + metrics.json only
    before = tree_digest(out)
    rc, _, err = run(BASE + ['--out-dir', out], capsys)
    line = one_line(err)
    assert rc == 2 and 'already holds a run (log.jsonl, metrics.json)' in line, line
    assert '--resume' in line and '--out-dir' in line
    rc, _, err = run(BASE + ['--out-dir', out, '--resume'], capsys)
    line = one_line(err)
    assert rc == 2 and f'no checkpoint at {out}/last.pt' in line and 'nothing was saved' in line
    assert tree_digest(out) == before


@pytest.mark.parametrize('name', ibp.RUN_FILES)
def test_any_single_run_file_makes_a_folder_a_run(name, tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    (out / name).write_bytes(b'whatever\n')
    before = tree_digest(out)
    rc, _, err = run(BASE + ['--out-dir', out], capsys)
    assert rc == 2 and f'already holds a run ({name})' in one_line(err)
    assert tree_digest(out) == before


# ================================================================================================
# The log and the checkpoint: --resume refuses any log that does not match last.pt epoch for
# epoch, naming the line; the one extra record (the next epoch's) is legal and dropped
# ================================================================================================
def torn(line):
    return line[:len(line) // 2]


def torn_but_ending_in_brace(line):
    return line[:len(line) // 3] + line[-len(line) // 3:]  # no valid JSON, still ends in '}'


# cut3: last.pt epoch 2; lines are the log's 3 records as written (r1, r2, r3).
BAD_LOGS = {
    'middle line torn': (lambda r: [r[0], torn(r[1]), r[2]], 'line 2: not the record of epoch 2'),
    'record 2 missing': (lambda r: [r[0], r[2]], 'line 2: not the record of epoch 2'),
    'last line bad, ends in }': (lambda r: [r[0], r[1], torn_but_ending_in_brace(r[2])],
                                 'line 3: not the record of epoch 3'),
    'last needed line bad, ends in }': (lambda r: [r[0], torn_but_ending_in_brace(r[1])],
                                        'line 2: not the record of epoch 2'),
    'foreign record': (lambda r: [r[0], r[1].replace('"epoch": 2', '"epoch": 7')],
                       'line 2: not the record of epoch 2'),
    'not an object': (lambda r: [r[0], '[2]'], 'line 2: not the record of epoch 2'),
    'first line empty': (lambda r: ['', r[0], r[1]], 'line 1: not the record of epoch 1'),
    'one record short': (lambda r: [r[0]], 'holds 1 records, but last.pt 2 epochs'),
    'two records more': (lambda r: [*r, r[2].replace('"epoch": 3', '"epoch": 4')],
                         'holds 4 records, but last.pt 2 epochs'),
    'empty log': (lambda r: [], 'holds 0 records, but last.pt 2 epochs'),
    'no log': (None, 'holds 0 records, but last.pt 2 epochs'),
}


@pytest.mark.parametrize('case', BAD_LOGS)
def test_resume_refuses_a_log_that_does_not_match_last_pt(case, cut3, tmp_path, capsys):
    out = copy_run(cut3, tmp_path)
    edit, expected = BAD_LOGS[case]
    log = out / 'log.jsonl'
    if edit is None:
        os.remove(log)
    else:
        lines = log.read_text().splitlines()
        log.write_text(''.join(line + '\n' for line in edit(lines)))
    before = tree_digest(out)
    rc, out_text, err = run(BASE + ['--out-dir', out, '--resume'], capsys)
    line = one_line(err)
    assert rc == 2 and line.startswith(f'error: --resume: {log}') and expected in line, line
    assert out_text == ''
    assert tree_digest(out) == before


def test_resume_refuses_a_log_with_bytes_that_are_not_utf8(cut3, tmp_path, capsys):
    out = copy_run(cut3, tmp_path)
    log = out / 'log.jsonl'
    lines = log.read_bytes().splitlines()
    log.write_bytes(b'\n'.join([lines[0], b'\xff\xfe\x00garbage', lines[2]]) + b'\n')
    before = tree_digest(out)
    rc, _, err = run(BASE + ['--out-dir', out, '--resume'], capsys)
    assert rc == 2 and 'line 2' in one_line(err)
    assert tree_digest(out) == before


def test_the_extra_record_of_the_next_epoch_is_legal(run3, cut3, tmp_path, capsys):
    """Killed between saving log.jsonl and last.pt of epoch 3: --resume repeats epoch 3 and ends
    with exactly the uninterrupted run's log and metrics."""
    out = copy_run(cut3, tmp_path)
    rc, stdout, err = run(BASE + ['--out-dir', out, '--resume'], capsys)
    assert rc == 0, err
    assert [line.split()[1] for line in stdout.splitlines() if line.startswith('ep ')] == ['3']
    assert records(out) == records(run3)
    assert final_metrics(out) == final_metrics(run3)
    assert last_epoch(out) == 3 and temp_files(out) == []


# ================================================================================================
# Writes that fail: disk full, permission denied, read-only, not a folder
# ================================================================================================
class FailingFile:
    """A file open for writing whose write() puts half the data on disk, then fails."""

    def __init__(self, path, exc):
        self.f, self.exc = open(path, 'wb'), exc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        raise self.exc

    def __getattr__(self, name):
        return getattr(self.f, name)


class OsWith:
    """ibp's view of the os module with some functions replaced (os itself is untouched)."""

    def __init__(self, **replaced):
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(os, name)


def enospc(path=None):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def fail_nth_save(monkeypatch, name, n, where, exc):
    """Make the n-th atomic_save of `name` (its temporary file) fail at `where`: 'write' (half the
    bytes written), 'fsync' or 'open'. Returns a dict that gets the bytes of `name` as they were
    when that save began."""
    seen = dict(count=0, before=None)

    def is_target(path):
        base = os.path.basename(str(path))
        return base.startswith(name + '.') and base.endswith('.tmp')

    def fake_open(path, mode='r', *args, **kw):
        if 'w' in mode and is_target(path):
            seen['count'] += 1
            if seen['count'] == n:
                target = os.path.join(os.path.dirname(str(path)), name)
                if os.path.exists(target):
                    with open(target, 'rb') as f:
                        seen['before'] = f.read()
                if where == 'open':
                    raise exc
                if where == 'write':
                    return FailingFile(path, exc)
                seen['fsync_next'] = True
        return open(path, mode, *args, **kw)

    def fake_fsync(fd):
        if seen.pop('fsync_next', False):
            raise exc
        return os.fsync(fd)

    monkeypatch.setattr(ibp, 'open', fake_open, raising=False)
    monkeypatch.setattr(ibp, 'os', OsWith(fsync=fake_fsync))
    return seen


@pytest.mark.parametrize('where', ['write', 'fsync'])
def test_disk_full_while_saving_last_pt_keeps_epoch_1_and_resumes(where, run3, tmp_path,
                                                                   monkeypatch, capsys):
    out = tmp_path / 'run'
    seen = fail_nth_save(monkeypatch, 'last.pt', 2, where, enospc())
    rc, _, err = run(BASE + ['--out-dir', out], capsys)
    assert rc == 2 and seen['count'] == 2
    assert one_line(err) == f'error: cannot write {out}/last.pt: No space left on device'
    assert temp_files(out) == []
    assert (out / 'last.pt').read_bytes() == seen['before']  # epoch 1, byte for byte
    assert last_epoch(out) == 1 and len(records(out)) == 2  # the log of epoch 2 was saved first
    monkeypatch.undo()
    rc, _, err = run(BASE + ['--out-dir', out, '--resume'], capsys)
    assert rc == 0, err
    assert final_metrics(out) == final_metrics(run3)
    assert records(out) == records(run3)
    assert temp_files(out) == []


@pytest.mark.parametrize('code,text', [(errno.EACCES, 'Permission denied'),
                                       (errno.EROFS, 'Read-only file system')])
def test_a_folder_that_refuses_writes_is_one_line_and_stays_empty(code, text, tmp_path,
                                                                  monkeypatch, capsys):
    out = tmp_path / 'run'
    out.mkdir()  # an existing folder we may not write in (as root, chmod would not stop us)
    fail_nth_save(monkeypatch, 'log.jsonl', 1, 'open', PermissionError(code, text))
    rc, _, err = run(BASE + ['--out-dir', out], capsys)
    assert rc == 2 and one_line(err) == f'error: cannot write {out}/log.jsonl: {text}'
    assert tree_digest(out) == {}


@pytest.mark.parametrize('sub', ['', 'sub'])
def test_out_dir_that_is_a_file_is_one_line(sub, tmp_path, capsys):
    path = tmp_path / 'run'
    path.write_bytes(b'not a folder\n')
    out = path / sub if sub else path
    rc, _, err = run(BASE + ['--out-dir', out], capsys)
    line = one_line(err)
    why = 'Not a directory' if sub else 'File exists'
    assert rc == 2 and line == f'error: --out-dir {out}: cannot make this folder ({why})', line
    assert path.read_bytes() == b'not a folder\n' and sorted(os.listdir(tmp_path)) == ['run']


# ---- the same on real file systems: a 1 MB-ish tmpfs that fills up, a read-only one ------------
@contextlib.contextmanager
def tmpfs(path, options):
    path.mkdir()
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here: {proc.stderr.strip()}')
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', str(path)], capture_output=True)


def test_real_full_disk_keeps_epoch_1(run3, tmp_path, capsys):
    """A tmpfs with room for one last.pt, one log and a page or two, not for a second last.pt: the
    save of epoch 2's last.pt runs out of space."""
    if shutil.which('mount') is None:
        pytest.skip('no mount command')
    page = 4096
    size = os.path.getsize(run3 / 'last.pt')
    pages = -(-size // page) + 3
    with tmpfs(tmp_path / 'fs', f'size={pages * page}') as fs:
        out = fs / 'run'
        rc, _, err = run(BASE + ['--out-dir', out], capsys)
        assert rc == 2 and one_line(err) == \
            f'error: cannot write {out}/last.pt: No space left on device'
        assert temp_files(out) == []
        assert last_epoch(out) == 1 and len(records(out)) == 2


def test_real_read_only_file_system(tmp_path, capsys):
    if shutil.which('mount') is None:
        pytest.skip('no mount command')
    with tmpfs(tmp_path / 'ro', 'ro,size=64k') as fs:
        rc, _, err = run(BASE + ['--out-dir', fs], capsys)
        assert rc == 2
        assert one_line(err) == f'error: cannot write {fs}/log.jsonl: Read-only file system'
        rc, _, err = run(BASE + ['--out-dir', fs / 'sub'], capsys)
        assert rc == 2 and one_line(err) == \
            f'error: --out-dir {fs}/sub: cannot make this folder (Read-only file system)'
        assert os.listdir(fs) == []


# ---- stale temporary files of a killed run -------------------------------------------------------
STALE = ['last.pt.12345.tmp', 'log.jsonl.99.tmp', 'metrics.json.7.tmp']


def test_stale_temporary_files_are_removed_by_resume(run3, cut3, tmp_path, capsys):
    out = copy_run(cut3, tmp_path)
    for name in STALE:
        (out / name).write_bytes(b'half a checkpoint')
    (out / 'notes.tmp').write_bytes(b'not ours')  # not a run file's: kept
    rc, _, err = run(BASE + ['--out-dir', out, '--resume'], capsys)
    assert rc == 0, err
    assert temp_files(out) == ['notes.tmp']
    assert final_metrics(out) == final_metrics(run3)


def test_stale_temporary_files_are_removed_by_a_fresh_run(tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'last.pt.12345.tmp').write_bytes(b'half a checkpoint')  # not a run file: no refusal
    rc, _, err = run(BASE + ['--epochs', '1', '--lr-milestones', '1', '--out-dir', out], capsys)
    assert rc == 0, err
    assert temp_files(out) == [] and sorted(os.listdir(out)) == ['last.pt', 'log.jsonl',
                                                                 'metrics.json']


# ================================================================================================
# The flag checks: one line naming the flag, exit 2, nothing written
# ================================================================================================
FLAGS = [
    (['--eps', 'inf'], '--eps'),
    (['--eps', 'nan'], '--eps'),
    (['--eps=-inf'], '--eps'),
    (['--eps', '10'], '--eps'),
    (['--eps', '1e30'], '--eps'),
    (['--eps', '0'], '--eps'),
    (['--grad-clip', 'nan'], '--grad-clip'),
    (['--grad-clip', '0'], '--grad-clip'),
    (['--lr-milestones', '-5'], '--lr-milestones'),
    (['--lr-milestones', '99'], '--lr-milestones'),  # beyond --epochs 3
    (['--width', 'nan'], '--width'),
    (['--width', 'inf'], '--width'),
    (['--width', '0'], '--width'),
    (['--width', '17'], '--width'),
    (['--train-size', '-1'], '--train-size'),
    (['--out-dir', ''], '--out-dir'),
    (['--synthetic-classes', '1'], '--synthetic-classes'),
    (['--lr', '0'], '--lr'),
    (['--lr', 'nan'], '--lr'),
    (['--lr-decay', '0'], '--lr-decay'),
    (['--tau', '2'], '--tau'),
    (['--tau', 'nan'], '--tau'),
    (['--lam0', '-1'], '--lam0'),
    (['--lam0', 'inf'], '--lam0'),
    (['--dist-timeout', '0'], '--dist-timeout'),
    (['--batch-size', '64', '--accum-steps', '3'], '--accum-steps'),
    (['--epochs', '-1'], '--epochs'),
    (['--eps-start', '-1'], '--eps-start'),
]


@pytest.mark.parametrize('args,name', FLAGS, ids=[' '.join(a) or 'empty' for a, _ in FLAGS])
def test_bad_flag_is_one_line_naming_it_and_writes_nothing(args, name, tmp_path, monkeypatch,
                                                           capsys):
    monkeypatch.chdir(tmp_path)  # --out-dir '' must not write into the current folder either
    out = tmp_path / 'run'
    rc, stdout, err = run(BASE + ['--out-dir', out] + args, capsys)
    line = one_line(err)
    assert rc == 2 and name in line and stdout == '', line
    if name == '--synthetic-classes':
        assert '--synthetic-shape' not in line
    assert os.listdir(tmp_path) == []


ZEROS = ['--epochs', '--batch-size', '--accum-steps', '--eps-start', '--eps-length']


@pytest.mark.parametrize('name', ZEROS)
def test_zero_is_refused_too(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / 'run'
    rc, stdout, err = run(BASE + ['--epochs', '1', '--lr-milestones', '1', '--out-dir', out,
                                  name, '0'], capsys)
    assert rc == 2 and name in one_line(err)
    assert os.listdir(tmp_path) == []


def test_eval_checkpoint_checks_its_flags(run3, capsys):
    before = tree_digest(run3)
    rc, stdout, err = run(['--eval-checkpoint', run3 / 'last.pt', '--eps', 'nan'], capsys)
    assert rc == 2 and '--eps' in one_line(err) and stdout == ''
    assert tree_digest(run3) == before


def test_eval_checkpoint_of_a_folder_names_no_file(run3, capsys):
    rc, _, err = run(['--eval-checkpoint', run3], capsys)
    assert rc == 2 and one_line(err) == \
        f'error: {run3}: no such checkpoint file (a folder names none)'


def test_eval_checkpoint_prints_strict_json_and_writes_nothing(run3, capsys):
    before = tree_digest(run3)
    rc, stdout, err = run(['--eval-checkpoint', run3 / 'last.pt', '--pgd-steps', '1'], capsys)
    assert rc == 0 and err == ''
    res = strict_json(stdout)
    assert res['epoch'] == 3 and res['std_err'] <= res['pgd_err'] <= res['ver_err']
    assert tree_digest(run3) == before


# ================================================================================================
# Ctrl-C
# ================================================================================================
def interrupt_at_step(monkeypatch, n):
    real = ibp.train_step
    calls = dict(n=0)

    def step(*args, **kw):
        calls['n'] += 1
        if calls['n'] == n:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(ibp, 'train_step', step)


def test_ctrl_c_before_the_first_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'run'
    interrupt_at_step(monkeypatch, 1)  # one step per epoch: in epoch 1
    rc, _, err = run(BASE + ['--out-dir', out], capsys)
    assert rc == 130
    assert one_line(err, 'interrupted:') == \
        'interrupted: no epoch was finished, nothing was saved'
    assert tree_digest(out) == {}
    monkeypatch.undo()  # and the folder takes a fresh run
    rc, _, err = run(BASE + ['--epochs', '1', '--lr-milestones', '1', '--out-dir', out], capsys)
    assert rc == 0, err


def test_ctrl_c_after_epoch_1_then_resume(run3, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'run'
    interrupt_at_step(monkeypatch, 2)  # in epoch 2
    rc, _, err = run(BASE + ['--out-dir', out], capsys)
    assert rc == 130
    assert one_line(err, 'interrupted:') == \
        'interrupted: last.pt holds the last finished epoch: run the same command with --resume'
    assert last_epoch(out) == 1 and len(records(out)) == 1 and temp_files(out) == []
    monkeypatch.undo()
    rc, _, err = run(BASE + ['--out-dir', out, '--resume'], capsys)
    assert rc == 0, err
    assert records(out) == records(run3) and final_metrics(out) == final_metrics(run3)


def test_ctrl_c_in_eval_checkpoint(run3, monkeypatch, capsys):
    before = tree_digest(run3)

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ibp, 'evaluate', interrupted)
    rc, _, err = run(['--eval-checkpoint', run3 / 'last.pt'], capsys)
    assert rc == 130 and one_line(err, 'interrupted:') == 'interrupted: nothing was written'
    assert tree_digest(run3) == before


# ================================================================================================
# Datasets: corrupt and missing MNIST files, --eval-checkpoint's data folder
# ================================================================================================
MNIST_FILES = ['train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
               't10k-labels-idx1-ubyte']
MNIST_RUN = ['--dataset', 'mnist', '--epochs', '1', '--eps-start', '1', '--eps-length', '1',
             '--lr-milestones', '1', '--train-size', '64', '--test-size', '32', '--batch-size',
             '64', '--width', '0.0625', '--pgd-steps', '1', '--device', 'cpu']


def prepare_script():
    for shared in (os.path.join(REPO, '..', 'shared'), '/work/shared'):
        path = os.path.join(shared, 'data', 'prepare_offline_data.py')
        if os.path.isfile(path) and os.path.isdir(os.path.join(shared, 'data', 'mnist')):
            return path
    return None


@pytest.fixture(scope='module')
def mnist_root(tmp_path_factory):
    """ROOT/MNIST/raw/ with the four real idx files, laid out by the shared offline script."""
    script = prepare_script()
    if script is None:
        pytest.skip('no offline MNIST (../shared/data/mnist)')
    root = tmp_path_factory.mktemp('mnist') / 'data'
    subprocess.run([sys.executable, script, str(root)], check=True, capture_output=True,
                   timeout=120)
    assert sorted(os.listdir(root / 'MNIST' / 'raw')) == sorted(MNIST_FILES)
    return root


def mnist_copy(mnist_root, tmp_path, change=None):
    """A data folder of links to the real files, where `change` (name -> bytes or None: absent)
    replaces some."""
    raw = tmp_path / 'data' / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    change = change or {}
    for name in MNIST_FILES:
        if name not in change:
            os.symlink(mnist_root / 'MNIST' / 'raw' / name, raw / name)
        elif change[name] is not None:
            (raw / name).write_bytes(change[name])
    return tmp_path / 'data'


def head(mnist_root, name, n):
    with open(mnist_root / 'MNIST' / 'raw' / name, 'rb') as f:
        return f.read(n)


@pytest.fixture
def offline(monkeypatch):
    """No network, failing at once: what a download meets on a machine without internet."""
    def refused(*args, **kw):
        raise urllib.error.URLError(ConnectionRefusedError(errno.ECONNREFUSED,
                                                           'Connection refused'))
    monkeypatch.setattr(urllib.request, 'urlopen', refused)


@pytest.mark.parametrize('name,cut', [('train-images-idx3-ubyte', 1_000_000),
                                      ('t10k-labels-idx1-ubyte', 5000),
                                      ('train-images-idx3-ubyte', 'garbage')])
def test_corrupt_mnist_file_is_one_line(name, cut, mnist_root, tmp_path, offline, capsys):
    data = b'\x12\x34' * 50 if cut == 'garbage' else head(mnist_root, name, cut)
    root = mnist_copy(mnist_root, tmp_path, {name: data})
    before = tree_digest(root)
    out = tmp_path / 'run'
    rc, _, err = run(MNIST_RUN + ['--data-dir', root, '--out-dir', out], capsys)
    line = one_line(err)
    assert rc == 2 and line.startswith(f'error: mnist: the files in {root}/MNIST/raw/ are corrupt')
    assert tree_digest(root) == before and not os.path.exists(out)


@pytest.mark.parametrize('missing', ['one file', 'all files'])
def test_missing_mnist_offline_says_could_not_be_downloaded(missing, mnist_root, tmp_path,
                                                            offline, capsys):
    if missing == 'one file':
        root = mnist_copy(mnist_root, tmp_path, {'train-images-idx3-ubyte': None})
    else:
        root = tmp_path / 'data'
        root.mkdir()
    out = tmp_path / 'run'
    t0 = time.time()
    rc, _, err = run(MNIST_RUN + ['--data-dir', root, '--out-dir', out], capsys)
    assert time.time() - t0 < 60
    line = one_line(err)
    assert rc == 2 and f'mnist is not in {root} and could not be downloaded' in line, line
    assert not os.path.exists(out)


@pytest.fixture(scope='module')
def mnist_run(mnist_root, tmp_path_factory):
    out = tmp_path_factory.mktemp('mnist_run') / 'run'
    assert ibp.main(MNIST_RUN + ['--data-dir', str(mnist_root), '--out-dir', str(out)]) == 0
    return out


def test_eval_checkpoint_uses_the_checkpoints_data_dir(mnist_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/ here: only the checkpoint's data_dir can work
    rc, stdout, err = run(['--eval-checkpoint', mnist_run / 'last.pt'], capsys)
    assert rc == 0, err
    res = strict_json(stdout)
    assert res['epoch'] == 1 and res['std_err'] == final_metrics(mnist_run)['std_err']
    assert os.listdir(tmp_path) == []


def test_eval_checkpoint_with_an_empty_data_dir_creates_nothing(mnist_run, tmp_path,
                                                                monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / 'empty'
    empty.mkdir()
    rc, stdout, err = run(['--eval-checkpoint', mnist_run / 'last.pt', '--data-dir', empty],
                          capsys)
    line = one_line(err)
    assert rc == 2 and stdout == ''
    assert f'mnist is not in {empty} (not downloaded here)' in line and '--data-dir' in line, line
    assert os.listdir(tmp_path) == ['empty'] and os.listdir(empty) == []


def test_eval_checkpoint_of_a_run_with_a_relative_data_dir(mnist_root, tmp_path, monkeypatch,
                                                           capsys):
    where = tmp_path / 'project'
    where.mkdir()
    os.symlink(mnist_root, where / 'mydata')
    monkeypatch.chdir(where)
    rc, _, err = run(MNIST_RUN + ['--epochs', '1', '--pgd-steps', '0', '--data-dir', 'mydata',
                                  '--out-dir', 'run'], capsys)
    assert rc == 0, err
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc, stdout, err = run(['--eval-checkpoint', where / 'run' / 'last.pt'], capsys)
    assert rc == 0, err
    strict_json(stdout)


def test_mnist_sizes_are_checked(mnist_root, tmp_path, capsys):
    out = tmp_path / 'run'
    for flags, name in [(['--test-size', '99999'], '--test-size'),
                        (['--train-size', '60001'], '--train-size')]:
        rc, _, err = run(MNIST_RUN + flags + ['--data-dir', mnist_root, '--out-dir', out], capsys)
        line = one_line(err)
        assert rc == 2 and name in line and 'mnist has' in line, line
        assert not os.path.exists(out)


# ================================================================================================
# torchrun: a frozen rank makes rank 0 fail within --dist-timeout, with one line
# ================================================================================================
DIST_TIMEOUT = 5


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def pids_of(marker):
    """{rank: pid} of the python processes whose command line holds `marker` and whose
    environment has RANK (torchrun's workers)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                cmd = f.read().split(b'\0')
            if marker.encode() not in cmd:
                continue
            with open(f'/proc/{pid}/environ', 'rb') as f:
                env = dict(kv.split(b'=', 1) for kv in f.read().split(b'\0') if b'=' in kv)
        except OSError:
            continue
        if b'RANK' in env:
            found[int(env[b'RANK'])] = int(pid)
    return found


def gone(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] in 'ZX'
    except OSError:
        return True


@pytest.mark.skipif(not os.environ.get('THOROUGH_TESTS'),
                    reason='two torchrun ranks and torchrun\'s own 30 s teardown take ~50 s on the '
                           '2-core CPU: set THOROUGH_TESTS=1 (.ci/run does)')
def test_a_frozen_rank_fails_rank_0_within_dist_timeout(tmp_path):
    out = tmp_path / 'frozen_run'
    logs = tmp_path / 'logs'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2',
           '--master-port', str(free_port()), '--log-dir', str(logs), '--redirects', '3',
           SCRIPT,
           '--smoke', '--epochs', '500', '--eps-start', '1', '--eps-length', '1',
           '--lr-milestones', '500', '--train-size', '512', '--test-size', '32', '--width',
           '0.0625', '--synthetic-shape', '3', '8', '8', '--pgd-steps', '0', '--device', 'cpu',
           '--dist-timeout', str(DIST_TIMEOUT), '--out-dir', str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    ranks = {}
    try:
        deadline = time.time() + 180
        while not os.path.exists(out / 'last.pt'):  # training has started: epoch 1 is saved
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, 'no epoch within 180 s'
            time.sleep(0.2)
        ranks = pids_of(str(out))
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.time()
        while not gone(ranks[0]):
            assert time.time() - stopped < DIST_TIMEOUT + 30, 'rank 0 still waits'
            time.sleep(0.2)
        rank0_s = time.time() - stopped
        proc.wait(timeout=60)
        total_s = time.time() - stopped
    finally:
        for pid in ranks.values():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode != 0
    err0 = glob.glob(str(logs / '*' / 'attempt_0' / '0' / 'stderr.log'))
    assert len(err0) == 1, glob.glob(str(logs / '**'), recursive=True)
    with open(err0[0]) as f:
        text = f.read()
    line = one_line(text)
    assert line.startswith('error: torchrun: a rank stopped answering or failed (')
    assert line.endswith(f'--dist-timeout is {DIST_TIMEOUT} s')
    assert rank0_s < DIST_TIMEOUT + 25 and total_s < 60, (rank0_s, total_s)
    ck = torch.load(out / 'last.pt', weights_only=True)  # whole
    assert ck['epoch'] >= 1 and len(records(out)) in (ck['epoch'], ck['epoch'] + 1)
    assert temp_files(out) == []
    print(f'\n{line}\nrank 0 failed {rank0_s:.1f} s after SIGSTOP; torchrun ended after '
          f'{total_s:.1f} s')
