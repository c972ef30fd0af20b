"""fastconv.tools.data: IDX files, Fashion-MNIST discovery, digits, batching and sharding."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from fastconv.tools import data as D
from support import fake_fashion


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = D.write_idx(tmp_path / f"x-idx3-ubyte{suffix}", images)
    raw = gzip.open(path).read() if suffix else path.read_bytes()
    # the header as the format defines it: 0, 0, type 0x08, 3 dims, then big-endian sizes
    assert raw[:4] == bytes([0, 0, 8, 3])
    assert raw[4:16] == (5).to_bytes(4, "big") + (7).to_bytes(4, "big") + (3).to_bytes(4, "big")
    back = D.read_idx(path)
    assert back.dtype == np.uint8 and back.shape == (5, 7, 3)
    np.testing.assert_array_equal(back, images)


def test_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(D.DataError, match="not an IDX file"):
        D.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"abc")
    with pytest.raises(D.DataError, match=r"shape \(10,\).*holds 3"):
        D.read_idx(short)
    with pytest.raises(D.DataError, match="cannot read"):
        D.read_idx(tmp_path / "absent")


@pytest.mark.parametrize("layout,gz", [("torchvision", True), ("flat", False)])
def test_fashion_mnist_reads_both_layouts(tmp_path, layout, gz):
    arrays = fake_fashion(tmp_path, gz=gz, layout=layout)
    train, test = D.fashion_mnist(tmp_path)
    assert train.images.shape == (40, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (16, 1, 28, 28) and len(test) == 16
    np.testing.assert_array_equal(train.images[:, 0].numpy(), arrays["train_images"])
    np.testing.assert_array_equal(test.labels.numpy(), arrays["test_labels"].astype(np.int64))
    assert train.labels.dtype == torch.int64


def test_fashion_mnist_missing_files_name_them(tmp_path):
    with pytest.raises(D.DataError, match="no such directory"):
        D.find_fashion_mnist(tmp_path / "nowhere")
    fake_fashion(tmp_path)
    (tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(D.DataError) as info:
        D.find_fashion_mnist(tmp_path)
    msg = str(info.value)
    assert "t10k-labels-idx1-ubyte" in msg and "train-images" not in msg
    assert "FashionMNIST/raw" in msg


def test_fashion_mnist_mismatched_counts(tmp_path):
    fake_fashion(tmp_path, gz=False, layout="flat")
    D.write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(39, dtype=np.uint8))
    with pytest.raises(D.DataError, match="do not match"):
        D.fashion_mnist(tmp_path)


def test_input_sizes_follow_d2l():
    assert D.input_size("alexnet") == (224, 224) and D.input_size("vgg11") == (224, 224)
    assert D.input_size("nin") == (224, 224)
    assert D.input_size("googlenet") == (96, 96) and D.input_size("resnet18") == (96, 96)
    assert D.input_size("lenet") == (28, 28) and D.input_size("vgg16_bn") == (32, 32)
    assert D.input_size("alexnet", 64) == (64, 64)


def test_make_batch_scales_and_resizes():
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    images[0] = 77  # a constant image stays constant under bilinear resizing
    data = D.ArrayData("t", images, torch.arange(6))
    x, y = D.make_batch(data, torch.tensor([0, 3, 5]), (224, 224), "cpu", channels_last=True)
    assert x.shape == (3, 1, 224, 224) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, torch.tensor([0, 3, 5]))
    assert torch.allclose(x[0], torch.full_like(x[0], 77 / 255))
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # bilinear 28 -> 224 with align_corners=False samples pixel centres: the mean is kept
    src = images[3].double() / 255
    assert abs(float(x[1].double().mean()) - float(src.mean())) < 0.01
    same, _ = D.make_batch(data, torch.tensor([3]), (28, 28), "cpu")
    assert torch.equal(same[0], images[3].float() * (1 / 255))  # no resampling at 28x28


def _collect(data, batch, world, epoch, seed=3, start=0):
    """Per step, the labels each rank sees (labels = example indices)."""
    per_rank = [list(D.train_batches(data, batch, (4, 4), "cpu", seed=seed, epoch=epoch,
                                     start=start, rank=r, world=world)) for r in range(world)]
    return [[y for _, y in rank] for rank in per_rank]


def test_ranks_split_each_global_batch_exactly():
    n = 37
    data = D.ArrayData("t", torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.arange(n))
    single = _collect(data, 8, 1, epoch=0)[0]
    assert len(single) == 5 and sum(len(y) for y in single) == n  # d2l keeps the last batch
    assert sorted(torch.cat(single).tolist()) == list(range(n))
    two = _collect(data, 8, 2, epoch=0)
    assert len(two[0]) == len(two[1]) == 5  # last global batch of 5: 2 each, 1 dropped
    for step in range(4):
        union = torch.cat([two[0][step], two[1][step]])
        assert torch.equal(union, single[step])  # rank 0 takes the first half, rank 1 the rest
    assert torch.equal(torch.cat([two[0][4], two[1][4]]), single[4][:4])
    other_epoch = _collect(data, 8, 1, epoch=1)[0]
    assert not torch.equal(torch.cat(other_epoch), torch.cat(single))
    assert torch.equal(torch.cat(_collect(data, 8, 1, epoch=0)[0]), torch.cat(single))
    resumed = _collect(data, 8, 1, epoch=0, start=2)[0]
    assert torch.equal(torch.cat(resumed), torch.cat(single[2:]))
    with pytest.raises(D.DataError, match="does not split"):
        _collect(data, 7, 2, epoch=0)


def test_eval_batches_cover_every_example_once():
    n = 23
    data = D.ArrayData("t", torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.arange(n))
    seen = [y for r in range(3) for _, y in D.eval_batches(data, 6, (4, 4), "cpu", rank=r,
                                                           world=3)]
    assert sorted(torch.cat(seen).tolist()) == list(range(n))


def test_synthetic_is_deterministic_and_shaped():
    a_train, a_test = D.synthetic((3, 8, 8), 20, 5, seed=4)
    b_train, _ = D.synthetic((3, 8, 8), 20, 5, seed=4)
    assert a_train.images.shape == (20, 3, 8, 8) and a_test.images.shape == (5, 3, 8, 8)
    assert torch.equal(a_train.images, b_train.images)
    assert int(a_train.labels.max()) < 10
    train, test = D.load("synthetic", "lenet", batch_size=16)
    assert train.images.shape == (160, 1, 28, 28) and len(test) == 32


def test_digits_real_data_set():
    pytest.importorskip("sklearn", reason="scikit-learn ships the digits data set")
    train, test = D.digits()
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.images.shape[1:] == (1, 8, 8)
    assert int(train.images.max()) == 16 and train.scale == 1 / 16
    assert set(torch.cat([train.labels, test.labels]).tolist()) == set(range(10))
    x, _ = D.make_batch(train, torch.arange(4), (28, 28), "cpu")
    assert x.shape == (4, 1, 28, 28) and float(x.max()) <= 1.0
    with pytest.raises(D.DataError, match="--data-dir"):
        D.load("fashion-mnist", "lenet")
