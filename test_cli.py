"""The command line of ibp_short_warmup.py: its flags, and a bad flag as one line on stderr with
exit code 2 (no traceback, no usage text, nothing written)."""
import os

import pytest

import ibp_short_warmup as ibp
from run_helpers import cli, one_error_line

BAD = [(['--eps', '-0.1'], '--eps'),
       (['--epochs', '3', '--eps-start', '2', '--eps-length', '3'], 'longer than the run'),
       (['--model', 'vgg'], '--model'),
       (['--tau', '0'], '--tau'),
       (['--tau', '1.5'], '--tau'),
       (['--batch-size', '10', '--accum-steps', '3'], '--accum-steps'),
       (['--epochs', 'abc'], '--epochs'),
       (['--bn', 'none', '--model', 'resnext'], '--bn'),
       (['--synthetic-shape', '3', '30', '30'], '--synthetic-shape'),
       (['--resume'], 'last.pt')]  # the missing file is named


@pytest.mark.parametrize('args,word', BAD)
def test_bad_flags_exit_2_with_one_line(args, word, tmp_path, capsys):
    out = tmp_path / 'run'
    assert ibp.main(['--dataset', 'synthetic', '--train-size', '64', '--test-size', '64',
                     '--width', '0.0625', '--out-dir', str(out), *args]) == 2
    assert word in one_error_line(capsys.readouterr().err)
    assert not os.path.exists(out / 'last.pt')


def test_bad_flag_through_the_real_cli(tmp_path):
    proc = cli('--dataset', 'synthetic', '--tau', '0', '--out-dir', str(tmp_path / 'run'))
    assert proc.returncode == 2 and proc.stdout == ''
    one_error_line(proc.stderr, names='--tau')


def test_smoke_preset_keeps_explicit_values():
    """parse_args: 'the preset fills only what the user did not set'."""
    assert ibp.parse_args(['--smoke']).dataset == 'synthetic'
    assert ibp.parse_args(['--smoke', '--width', '0.25']).width == 0.25
    # explicitly given values that happen to equal the Config default must be kept as well
    assert ibp.parse_args(['--smoke', '--width', '1.0']).width == 1.0
    assert ibp.parse_args(['--smoke', '--dataset', 'cifar10']).dataset == 'cifar10'
