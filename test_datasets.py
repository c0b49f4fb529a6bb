"""Data: the augmentation (random flips and edge-padded crops), a dataset that is not there (one
line), and the TinyImageNet folder (tiny-imagenet-200 layout): labels in ImageFolder's sorted order,
as in the authors' release, nothing written into the folder, a broken folder as one line."""
import json
import os

import pytest
import torch

import ibp_short_warmup as ibp
from run_helpers import main_stderr, one_error_line, tree_digest

CPU = torch.device('cpu')


def test_augment_is_a_flip_and_edge_padded_crop():
    """Every augmented image is, found by brute force over all flips and offsets, a flip and a crop
    of its edge-padded input; over 24 images both flips and every offset occur."""
    n, c, h, w, pad = 24, 2, 5, 4, 2
    x = torch.rand(n, c, h, w)
    out = ibp.augment(x, pad, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    seen = set()
    for i in range(n):
        found = []
        for flip in (False, True):
            img = x[i].flip(2) if flip else x[i]
            for oy in range(2 * pad + 1):
                for ox in range(2 * pad + 1):  # replicate padding = clamped indices
                    rows = (torch.arange(h) + oy - pad).clamp(0, h - 1)
                    cols = (torch.arange(w) + ox - pad).clamp(0, w - 1)
                    if torch.equal(img[:, rows][:, :, cols], out[i]):
                        found.append((flip, oy, ox))
        assert found, f'image {i} is not a flip + crop of its input'
        seen.update(found)
    assert {f for f, _, _ in seen} == {False, True}  # both flips
    assert {oy for _, oy, _ in seen} == set(range(2 * pad + 1))  # every offset 0 .. 2 pad, both
    assert {ox for _, _, ox in seen} == set(range(2 * pad + 1))


def test_missing_dataset_offline_is_one_line(tmp_path, capsys):
    """No network here: CIFAR-10 in an empty folder is one line naming the dataset and --data-dir,
    exit 2, no checkpoint (torchvision's own output silenced)."""
    empty = tmp_path / 'data'
    empty.mkdir()
    rc, err = main_stderr(['--dataset', 'cifar10', '--data-dir', str(empty), '--out-dir',
                           str(tmp_path / 'run'), '--epochs', '1', '--eps-start', '1',
                           '--eps-length', '1', '--lr-milestones', '1', '--width', '0.0625',
                           '--train-size', '64',
                           '--test-size', '64'], capsys)
    assert rc == 2
    line = one_error_line(err)
    assert 'cifar10' in line and '--data-dir' in line
    assert not os.path.exists(tmp_path / 'run' / 'last.pt')


WNIDS = ['n09256479', 'n01443537', 'n04067472']  # not sorted: the labels are the sorted order
COLOURS = [(220, 40, 40), (40, 220, 40), (40, 40, 220)]  # each class one solid colour
VAL_CLASSES = [2, 0, 1, 1, 2, 0]  # the colour (index in WNIDS) of val_k.JPEG


def write_tiny_imagenet(root, per_class=4):
    import PIL.Image
    base = root / 'tiny-imagenet-200'
    (base / 'val' / 'images').mkdir(parents=True)
    (base / 'test' / 'images').mkdir(parents=True)
    (base / 'wnids.txt').write_text(''.join(w + '\n' for w in WNIDS))
    (base / 'words.txt').write_text(''.join(f'{w}\tthing {i}\n' for i, w in enumerate(WNIDS)))
    for w, colour in zip(WNIDS, COLOURS):
        (base / 'train' / w / 'images').mkdir(parents=True)
        for k in range(per_class):
            PIL.Image.new('RGB', (64, 64), colour).save(
                base / 'train' / w / 'images' / f'{w}_{k}.JPEG')
        (base / 'train' / w / f'{w}_boxes.txt').write_text(
            ''.join(f'{w}_{k}.JPEG\t0\t0\t63\t63\n' for k in range(per_class)))
    for k, c in enumerate(VAL_CLASSES):
        PIL.Image.new('RGB', (64, 64), COLOURS[c]).save(base / 'val' / 'images' / f'val_{k}.JPEG')
    (base / 'val' / 'val_annotations.txt').write_text(
        ''.join(f'val_{k}.JPEG\t{WNIDS[c]}\t0\t0\t63\t63\n' for k, c in enumerate(VAL_CLASSES)))
    PIL.Image.new('RGB', (64, 64), (128, 128, 128)).save(base / 'test' / 'images' / 'test_0.JPEG')
    return base


def tiny_cfg(root, out):
    return ibp.resolve(ibp.Config(dataset='tinyimagenet', data_dir=str(root), device='cpu',
                                  out_dir=str(out)))


def colour_class(x):
    """The class whose colour is nearest to each image's mean colour (JPEG keeps a flat colour)."""
    mean = x.double().mean((2, 3))
    return ((mean[:, None] - torch.tensor(COLOURS, dtype=torch.float64)) ** 2).sum(2).argmin(1)


def tmp_files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith('.tmp')]


def test_tinyimagenet_labels_are_the_sorted_wnids_and_nothing_is_written(tmp_path):
    base = write_tiny_imagenet(tmp_path)
    before = tree_digest(base)
    (xtr, ytr), (xte, yte) = ibp.load_data(tiny_cfg(tmp_path, tmp_path / 'run'), CPU)
    assert xtr.dtype == torch.uint8 and xtr.shape == (12, 3, 64, 64) and xte.shape == (6, 3, 64, 64)
    label_of_colour = torch.tensor([sorted(WNIDS).index(w) for w in WNIDS])
    colour_of_label = torch.tensor([WNIDS.index(w) for w in sorted(WNIDS)])
    for x, y in ((xtr, ytr), (xte, yte)):
        assert torch.equal(y, label_of_colour[colour_class(x)])
        colours = torch.tensor(COLOURS, dtype=torch.int16)[colour_of_label[y]][:, :, None, None]
        assert (x.short() - colours).abs().max() <= 8
    assert torch.bincount(ytr).tolist() == [4, 4, 4] and torch.bincount(yte).tolist() == [2, 2, 2]
    assert tree_digest(base) == before and not tmp_files(tmp_path)


def break_folder(kind, base):
    if kind == 'no_annotations':
        os.remove(base / 'val' / 'val_annotations.txt')
    elif kind == 'unknown_val_class':  # a val image of a wnid that has no train folder
        with open(base / 'val' / 'val_annotations.txt', 'a') as f:
            f.write('val_0.JPEG\tn02099601\t0\t0\t63\t63\n')
    elif kind == 'empty_class_folder':
        for f in os.listdir(base / 'train' / WNIDS[0] / 'images'):
            os.remove(base / 'train' / WNIDS[0] / 'images' / f)
    elif kind == 'truncated_jpeg':
        path = base / 'train' / WNIDS[1] / 'images' / f'{WNIDS[1]}_2.JPEG'
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])


TINY_FLAGS = ['--dataset', 'tinyimagenet', '--width', '0.03', '--epochs', '2', '--eps-start', '1',
              '--eps-length', '1', '--lr-milestones', '2', '--batch-size', '8', '--pgd-steps', '2',
              '--device', 'cpu']


@pytest.mark.parametrize('kind', ['no_annotations', 'unknown_val_class', 'empty_class_folder',
                                  'truncated_jpeg'])
def test_broken_tinyimagenet_folder_is_a_user_error(kind, tmp_path, capsys):
    root = tmp_path / 'data'
    base = write_tiny_imagenet(root)
    break_folder(kind, base)
    before = tree_digest(root)
    with pytest.raises(ibp.UserError) as e:
        ibp.load_data(tiny_cfg(root, tmp_path / 'run'), CPU)
    assert '\n' not in str(e.value)
    out = tmp_path / 'run'
    rc, err = main_stderr(TINY_FLAGS + ['--data-dir', str(root), '--out-dir', str(out)], capsys)
    assert rc == 2
    one_error_line(err)
    assert not (out / 'last.pt').exists()
    assert tree_digest(root) == before  # nothing written


def test_tinyimagenet_cli_run_trains_and_certifies(tmp_path, capsys):
    root, out = tmp_path / 'data', tmp_path / 'run'
    write_tiny_imagenet(root)
    capsys.readouterr()
    assert ibp.main(TINY_FLAGS + ['--data-dir', str(root), '--out-dir', str(out)]) == 0, \
        capsys.readouterr().err
    metrics = json.load(open(out / 'metrics.json'))
    assert metrics['final_epoch'] == 2 and metrics['test_size'] == 6
    assert 0 <= metrics['ver_err'] <= 1
    assert metrics['std_err'] <= metrics['pgd_err'] <= metrics['ver_err']
    assert [json.loads(line)['epoch'] for line in open(out / 'log.jsonl')] == [1, 2]
