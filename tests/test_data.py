"""Training data: corrupt files skipped and counted, normalization constants, micro-batch sharding."""

import os
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import fastvit_style
from fastvit_style.configs import NORMALIZATION
from fastvit_style.data import ImageFolderDataset, collate_images, compute_normalization, micro_batches

Image = pytest.importorskip("PIL.Image")


def solid(path, rgb, hw=(32, 32)):
    Image.fromarray(np.full((*hw, 3), rgb, np.uint8)).save(path)


@pytest.fixture
def folder_with_corrupt_files(tmp_path):
    """3 readable images (one in a subfolder) and 3 corrupt ones: garbage, truncated PNG, truncated JPEG."""
    (tmp_path / "sub").mkdir()
    solid(tmp_path / "a.png", (200, 100, 50), (20, 30))
    solid(tmp_path / "sub" / "b.jpg", (10, 20, 30))
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "c.jpg", quality=95)
    (tmp_path / "garbage.tif").write_bytes(b"not an image at all")
    for good, bad in (("a.png", "trunc.png"), ("c.jpg", "trunc.jpg")):
        data = (tmp_path / good).read_bytes()
        (tmp_path / bad).write_bytes(data[: len(data) // 2])
    return tmp_path


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_files_are_skipped_counted_and_reported(folder_with_corrupt_files, workers):
    ds = ImageFolderDataset(folder_with_corrupt_files, input_size=32, dataset="camelyon17wilds")
    assert len(ds) == 6
    # Known before (another rank's finding, a resumed checkpoint's): marked in place, so that what the
    # workers find next still reaches this process's flags.
    ds.mark_unreadable(torch.tensor([p.endswith("garbage.tif") for p in ds.paths]))
    assert ds.skipped == 1
    loader = DataLoader(ds, batch_sampler=[list(range(6))], collate_fn=collate_images, num_workers=workers)
    if workers:  # a worker process warns on its own stderr, out of reach of pytest.warns
        (batch,) = list(loader)
    else:
        with pytest.warns(UserWarning, match="skipping unreadable image") as record:
            (batch,) = list(loader)
        assert sum("trunc.png" in str(w.message) for w in record) == 1
        # Not torch's fetch.py, the DataLoader's caller of __getitem__: the line in data.py that met it.
        assert {os.path.relpath(w.filename, os.path.dirname(fastvit_style.__file__)) for w in record} == {
            "data.py"
        }
        assert not any("garbage.tif" in str(w.message) for w in record)  # never read again
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.float32
    assert ds.skipped == 3  # counted in the main process, also when a worker found them
    assert sorted(p.rsplit("/", 1)[-1] for p in ds.skipped_paths) == ["garbage.tif", "trunc.jpg", "trunc.png"]
    # A second epoch skips them again without re-reading (no new warning).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (batch,) = list(DataLoader(ds, batch_sampler=[list(range(6))], collate_fn=collate_images))
    assert batch.shape[0] == 3 and ds.skipped == 3


def test_items_are_normalized_with_padding_at_minus_mean_over_std(tmp_path):
    solid(tmp_path / "wide.png", (255, 0, 255), (16, 32))
    mean, std = (0.5, 0.25, 0.5), (0.5, 0.25, 0.25)
    x = ImageFolderDataset(tmp_path, input_size=32, mean=mean, std=std)[0]
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(x[:, 8:24], ((torch.tensor([1.0, 0, 1]).view(3, 1, 1) - m) / s).expand(3, 16, 32))
    assert torch.allclose(x[:, :8], (-m / s).expand(3, 8, 32))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="input_size must be a positive int"):
            ImageFolderDataset(tmp_path, input_size=bad)


def test_compute_normalization_on_constant_colour_images_excludes_padding(tmp_path):
    solid(tmp_path / "a.png", (255, 0, 51))
    solid(tmp_path / "b.png", (0, 102, 51))
    mean, std = compute_normalization(tmp_path, input_size=32)
    assert mean == pytest.approx((0.5, 0.2, 0.2), abs=1e-6)
    assert std == pytest.approx((0.5, 0.2, 0.0), abs=1e-6)
    # A non-square image: its padding would pull the mean towards 0 and raise the std if counted.
    wide = tmp_path / "wide"
    wide.mkdir()
    solid(wide / "c.png", (255, 51, 102), (8, 32))
    mean, std = compute_normalization(wide, input_size=32)
    assert mean == pytest.approx((1.0, 0.2, 0.4), abs=1e-6)
    assert std == pytest.approx((0, 0, 0), abs=1e-6)


def test_micro_batches_ranks_see_what_one_accumulating_process_sees():
    one = micro_batches(10, 2, epoch=3, seed=7)
    assert one == micro_batches(10, 2, epoch=3, seed=7)  # a pure function of (seed, epoch): resumable
    assert one != micro_batches(10, 2, epoch=4, seed=7)
    assert sorted(i for b in one for i in b) == list(range(10)) and [len(b) for b in one] == [2] * 5
    ranks = [micro_batches(10, 2, epoch=3, seed=7, rank=r, world_size=2) for r in range(2)]
    # 5 micro-batches over 2 ranks: the first one is repeated so both ranks run 3 micro-steps.
    assert ranks[0] == one[0::2] and ranks[1] == one[1::2] + one[:1]
    assert micro_batches(5, 2, epoch=0, seed=0, shuffle=False) == [[0, 1], [2, 3], [4]]
    assert micro_batches(1, 2, epoch=0, seed=0, rank=3, world_size=4) == [[0]]


def test_validation_micro_batches_are_sharded_without_repeats():
    ranks = [
        micro_batches(5, 2, epoch=0, seed=0, rank=r, world_size=2, shuffle=False, pad=False) for r in range(2)
    ]
    assert ranks == [[[0, 1], [4]], [[2, 3]]]  # each image once, whatever the number of processes


def test_wide_greys_are_scaled_not_clipped(tmp_path):
    """16-bit and float greys (microscopy, medical scans), which Pillow's convert('RGB') would clip to 0/1."""
    from fastvit_style.imageio import read_rgb

    ramp = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "ramp32.tif")
    Image.fromarray(ramp.astype(np.float32) / 65535).save(tmp_path / "ramp.tif")
    expected = torch.from_numpy(ramp.astype(np.float32) / 65535).expand(3, 16, 16)
    for name in ("ramp16.png", "ramp32.tif", "ramp.tif"):
        torch.testing.assert_close(read_rgb(tmp_path / name), expected, rtol=0, atol=1e-7, msg=name)
    Image.fromarray(np.full((4, 4), 2.5, np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(
        ValueError, match=r"hdr.tif: float image with values in \[2.5, 2.5\]: expected .*\[0, 1\]"
    ):
        read_rgb(tmp_path / "hdr.tif")
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(ValueError, match="expected 16-bit intensities"):
        read_rgb(tmp_path / "big.tif")


def test_min_is_white_wide_greys_are_inverted_as_8_bit_ones_are(tmp_path):
    """A TIFF whose PhotometricInterpretation is 0 (min-is-white, as MONOCHROME1 X-rays are exported)
    stores 0 for white. Pillow inverts such greys of 8 bits or fewer as it decodes them, but hands 16-bit
    and float ones over as stored: read_rgb inverts those itself, or the scan would come out negative."""
    from PIL import TiffImagePlugin

    from fastvit_style.imageio import read_rgb

    stored = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[262] = 0  # PhotometricInterpretation: WhiteIsZero
    expected = torch.from_numpy(1 - stored.astype(np.float32) / 65535).expand(3, 16, 16)
    for name, values in (("x16.tif", stored), ("xf.tif", stored.astype(np.float32) / 65535)):
        Image.fromarray(values).save(tmp_path / name, tiffinfo=info)
        with Image.open(tmp_path / name) as im:  # written as given, and marked min-is-white
            assert im.tag_v2[262] == 0 and np.array_equal(np.array(im), values), name
        torch.testing.assert_close(read_rgb(tmp_path / name), expected, rtol=0, atol=1e-7, msg=name)
    Image.fromarray(stored).save(tmp_path / "black_is_zero.tif")
    torch.testing.assert_close(read_rgb(tmp_path / "black_is_zero.tif"), 1 - expected, rtol=0, atol=1e-7)


def test_12_bit_tiff_greys_are_scaled_by_4095(tmp_path):
    """Pillow opens a 12-bit grey TIFF (BitsPerSample 12, packed, as some X-ray detectors write) as 'I;16'
    with its values as stored, 0..4095: divided by 65535 the scan's white would come out at 1/16."""
    import struct

    from fastvit_style.imageio import read_rgb

    stored = np.linspace(0, 4095, 256).astype(np.uint16).reshape(16, 16)
    packed = bytes(
        b for x, y in stored.reshape(-1, 2).tolist() for b in (x >> 4, (x & 15) << 4 | y >> 8, y & 255)
    )
    # Little-endian TIFF of one uncompressed strip after the header and the 9 tags: width, height, bits,
    # compression, photometric, strip offset, samples per pixel, rows per strip, strip bytes.
    offset = 8 + 2 + 12 * 9 + 4
    tags = {256: 16, 257: 16, 258: 12, 259: 1, 262: 1, 273: offset, 277: 1, 278: 16, 279: len(packed)}
    ifd = b"".join(struct.pack("<HHII", tag, 4, 1, value) for tag, value in tags.items())
    (tmp_path / "x12.tif").write_bytes(b"II*\x00" + struct.pack("<IH", 8, 9) + ifd + bytes(4) + packed)
    with Image.open(tmp_path / "x12.tif") as im:
        assert np.array_equal(np.array(im), stored)  # decoded as stored
    expected = torch.from_numpy(stored.astype(np.float32) / 4095).expand(3, 16, 16)
    torch.testing.assert_close(read_rgb(tmp_path / "x12.tif"), expected, rtol=0, atol=1e-7)


def test_an_absurdly_large_image_is_a_bad_file_not_a_crash(tmp_path, monkeypatch):
    """Pillow's DecompressionBombError is no OSError: read_rgb makes it the ValueError of a bad file, which
    the dataset skips (and the commands report in one line)."""
    from fastvit_style.imageio import read_rgb

    solid(tmp_path / "a.png", (1, 2, 3))
    solid(tmp_path / "huge.png", (1, 2, 3), (64, 64))
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 1500
    )  # 64 x 64 is then over twice the limit, 32 x 32 not over it
    with pytest.raises(ValueError, match="cannot decode image .*huge.png.*DecompressionBombError"):
        read_rgb(tmp_path / "huge.png")
    ds = ImageFolderDataset(tmp_path, input_size=32)
    with pytest.warns(UserWarning, match="skipping unreadable image .*huge.png"):
        assert ds[1] is None
    assert ds[0] is not None


def test_linked_folders_are_followed_once(tmp_path):
    from fastvit_style.imageio import list_images

    (tmp_path / "data" / "own").mkdir(parents=True)
    (tmp_path / "site").mkdir()
    solid(tmp_path / "site" / "x.png", (1, 2, 3))
    solid(tmp_path / "data" / "own" / "y.png", (1, 2, 3))
    (tmp_path / "data" / "a_site").symlink_to(tmp_path / "site")
    (tmp_path / "data" / "b_site").symlink_to(tmp_path / "site")  # the same folder again
    (tmp_path / "site" / "loop").symlink_to(tmp_path / "data")  # a cycle
    found = [os.path.relpath(p, tmp_path / "data") for p in list_images(tmp_path / "data")]
    assert found == [os.path.join("a_site", "x.png"), os.path.join("own", "y.png")]


def test_a_missing_folder_and_a_file_are_told_apart(tmp_path):
    from fastvit_style.imageio import list_images

    (tmp_path / "t0.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"^image folder '.*nope' does not exist$"):
        list_images(tmp_path / "nope")
    with pytest.raises(NotADirectoryError, match=r"^--data '.*t0.png' is a file, not a folder$"):
        list_images(tmp_path / "t0.png", "--data")


def test_an_unreadable_subfolder_is_skipped_with_a_warning_and_an_unreadable_folder_raises(
    tmp_path, monkeypatch
):
    from fastvit_style.imageio import list_images

    (tmp_path / "data" / "locked").mkdir(parents=True)
    solid(tmp_path / "data" / "a.png", (1, 2, 3))
    solid(tmp_path / "data" / "locked" / "b.png", (1, 2, 3))
    scandir = os.scandir

    def refusing(path):  # chmod 000 would not stop root, who runs CI
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.warns(UserWarning, match=r"skipping unreadable folder '.*locked' \(PermissionError"):
        assert list_images(tmp_path / "data") == [str(tmp_path / "data" / "a.png")]
    with pytest.raises(PermissionError, match=r"^--data '.*locked' cannot be listed \(Permission denied\)$"):
        list_images(tmp_path / "data" / "locked", "--data")


def test_passing_os_errors_propagate_and_mark_nothing(tmp_path, monkeypatch):
    """Too many open files (or an I/O error on a network filesystem) says nothing about the file: it
    propagates instead of marking a good image unreadable for the rest of the run; a vanished file is
    unreadable."""
    import errno

    from fastvit_style import data

    solid(tmp_path / "a.png", (1, 2, 3))
    ds = ImageFolderDataset(tmp_path, input_size=32)

    def fail(path, size):
        raise OSError(errno.EMFILE, "Too many open files", path)

    monkeypatch.setattr(data, "load_image", fail)
    with pytest.raises(OSError, match="Too many open files"):
        ds[0]
    assert ds.skipped == 0
    monkeypatch.setattr(data, "read_rgb", lambda path: fail(path, None))
    with pytest.raises(OSError, match="Too many open files"):
        compute_normalization(tmp_path, input_size=32)
    monkeypatch.undo()
    # Through Pillow: the file opens, then a read fails as on a flaky network filesystem.
    import builtins
    import io

    real_open = builtins.open

    class FailingReads(io.RawIOBase):
        def __init__(self, f):
            self.f, self.reads = f, 0

        def readable(self):
            return True

        def read(self, n=-1):
            self.reads += 1
            if self.reads > 1:
                raise OSError(errno.EIO, "Input/output error")
            return self.f.read(n)

        def seek(self, *args):
            return self.f.seek(*args)

        def tell(self):
            return self.f.tell()

        def close(self):
            self.f.close()

    def flaky_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FailingReads(f) if str(path).endswith("a.png") and "b" in mode else f

    monkeypatch.setattr(Image.builtins, "open", flaky_open)
    with pytest.raises(OSError, match="Input/output error while reading image") as caught:
        ds[0]
    assert caught.value.errno == errno.EIO and ds.skipped == 0
    monkeypatch.undo()
    (tmp_path / "a.png").unlink()
    with pytest.warns(UserWarning, match="skipping unreadable image .*a.png.*FileNotFoundError") as record:
        assert ds[0] is None
    assert ds.skipped == 1
    (tmp_path / "b.png").write_bytes(b"not an image")
    solid(tmp_path / "c.png", (1, 2, 3))
    with pytest.warns(UserWarning, match="skipping unreadable image .*b.png") as more:
        compute_normalization(tmp_path, input_size=32)
    # Each warning names the line that asked for the image, not the data module's internals.
    assert [w.filename for w in [*record, *more]] == [__file__, __file__]


def test_normalize_refuses_integer_constants():
    from fastvit_style.imageio import denormalize, normalize

    image = torch.randint(0, 256, (3, 2, 2), dtype=torch.uint8)
    for fn in (normalize, denormalize):
        with pytest.raises(TypeError, match=r"expected a floating-point image in \[0, 1\], got torch.uint8"):
            fn(image, (0.5,) * 3, (0.25,) * 3)
        with pytest.raises(TypeError, match="constants_dtype must be a floating-point dtype"):
            fn(image.float(), (0.5,) * 3, (0.25,) * 3, constants_dtype=torch.int64)
    assert normalize(image, (0.5,) * 3, (0.25,) * 3, constants_dtype=torch.float32).dtype == torch.float32


def test_the_official_normalization_constants():
    """experiments/data/_constants.py as the shared doc (3.1) lists them: the only place they are written
    out, since every other test reads them from the table."""
    camelyon = ((0.7440, 0.5895, 0.7214), (0.1787, 0.2131, 0.1721))
    epistr = ((0.7360, 0.5158, 0.8072), (0.1948, 0.2434, 0.1438))
    fitzpatrick = ((0.6219, 0.4917, 0.4478), (0.2279, 0.1982, 0.1991))
    assert NORMALIZATION == {"camelyon17wilds": camelyon, "epistr": epistr, "fitzpatrick17k": fitzpatrick,
                             "fitzpatrick17k_12_34_56": fitzpatrick}  # fmt: skip


def test_a_file_without_read_permission_is_skipped(tmp_path, monkeypatch):
    """EACCES says the file itself cannot be read: skipped like a damaged one, not propagated."""
    import errno

    from fastvit_style import data

    solid(tmp_path / "a.png", (1, 2, 3))
    ds = ImageFolderDataset(tmp_path, input_size=32)

    def denied(path, size):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(data, "load_image", denied)
    with pytest.warns(UserWarning, match="skipping unreadable image .*a.png.*PermissionError"):
        assert ds[0] is None
    assert ds.skipped == 1


def test_a_folder_without_images_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images .* found under"):
        ImageFolderDataset(tmp_path, input_size=32)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with (
        pytest.warns(UserWarning, match="skipping unreadable image"),
        pytest.raises(ValueError, match="no readable images under"),
    ):
        compute_normalization(tmp_path, input_size=32)


def test_marked_files_add_to_those_found_and_must_match_the_dataset(folder_with_corrupt_files):
    ds = ImageFolderDataset(folder_with_corrupt_files, input_size=32)
    garbage = ds.paths.index(str(folder_with_corrupt_files / "garbage.tif"))
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert ds[garbage] is None
    ds.mark_unreadable(torch.tensor([p.endswith("trunc.png") for p in ds.paths]))
    assert sorted(os.path.basename(p) for p in ds.skipped_paths) == ["garbage.tif", "trunc.png"]
    for wrong in (torch.tensor([True]), torch.zeros(len(ds) + 1, dtype=torch.bool)):  # one would broadcast
        with pytest.raises(ValueError, match=rf"flags must have shape \({len(ds)},\)"):
            ds.mark_unreadable(wrong)
    assert ds.skipped == 2


def test_every_image_suffix_is_listed_and_broken_links_kept(tmp_path):
    """A broken link stays in the listing, to be reported (and skipped) when it is read."""
    from fastvit_style.imageio import list_images

    names = ["a.png", "b.JPG", "c.jpeg", "d.tif", "e.TIFF", "f.bmp", "g.ppm", "h.PGM", "i.webp"]
    for name in [*names, "j.gif", "k.txt"]:
        (tmp_path / name).write_bytes(b"")
    os.symlink(tmp_path / "gone.png", tmp_path / "l.png")
    assert [os.path.basename(p) for p in list_images(tmp_path)] == [*names, "l.png"]


def test_netpbm_and_webp_images_are_read(tmp_path):
    """The formats torchvision's ImageFolder (the official datasets') takes besides png/jpg/tif/bmp: a
    16-bit PGM of any maxval is scaled to 0..65535 by Pillow and read as a wide grey."""
    from PIL import Image

    from fastvit_style.imageio import read_rgb

    (tmp_path / "g.pgm").write_bytes(b"P5\n3 1\n4095\n" + np.array([0, 1365, 4095], dtype=">u2").tobytes())
    torch.testing.assert_close(
        read_rgb(tmp_path / "g.pgm"), torch.tensor([0, 1 / 3, 1]).expand(3, 1, 3), atol=1e-4, rtol=0
    )
    rgb = torch.randint(0, 256, (5, 4, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(rgb.numpy()).save(tmp_path / "c.webp", lossless=True)
    Image.fromarray(rgb.numpy()).save(tmp_path / "c.ppm")
    for name in ("c.webp", "c.ppm"):
        torch.testing.assert_close(
            read_rgb(tmp_path / name), rgb.permute(2, 0, 1).float() / 255, atol=0, rtol=0
        )


def test_the_short_side_is_truncated_and_never_zero():
    """int(size * short / long), as officially (5.6 -> 5); at least 1 pixel for a sliver."""
    from fastvit_style.imageio import resize_pad

    for (h, w), rows, cols in [((7, 10), 5, 8), ((10, 7), 8, 5), ((1, 100), 1, 8), ((100, 1), 8, 1)]:
        inside = resize_pad(torch.ones(3, h, w), 8)[0] > 0.5
        assert inside.sum(0).max() == rows and inside.sum(1).max() == cols, (h, w)


def test_the_resize_is_antialiased_as_pillows(tmp_path):
    """Downsizing averages the pixels it covers (torchvision's antialias=True), as Pillow's bilinear
    resize does: without antialiasing it would sample a few of them (noise would stay noise)."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "n.png")
    from fastvit_style.imageio import load_image

    ours = load_image(tmp_path / "n.png", 16)[:, :, 2:14]  # 64 x 48 -> 16 x 12, centred
    pil = np.array(Image.fromarray(noise).resize((12, 16), Image.BILINEAR), np.float32) / 255
    assert (ours - torch.from_numpy(pil).permute(2, 0, 1)).abs().max() <= 2 / 255


def test_negative_greys_are_refused(tmp_path):
    from fastvit_style.imageio import read_rgb

    Image.fromarray(np.full((4, 4), -5, np.int32)).save(tmp_path / "neg.tif")
    with pytest.raises(ValueError, match=r"values in \[-5, -5\]: expected 16-bit intensities"):
        read_rgb(tmp_path / "neg.tif")
    Image.fromarray(np.full((4, 4), -0.5, np.float32)).save(tmp_path / "negf.tif")
    with pytest.raises(ValueError, match=r"float image with values in \[-0.5, -0.5\]"):
        read_rgb(tmp_path / "negf.tif")


def test_the_divide_by_255_hint_is_given_only_for_constants_above_1():
    from fastvit_style.imageio import normalization

    with pytest.raises(ValueError, match=r"on the 0-255 scale: divide them by 255"):
        normalization(mean=[123.7, 116.3, 103.5], std=[58.4, 57.1, 57.4])
    # A tiny std or a negative mean is no 0-255 constant: dividing it by 255 would not help.
    for mean, std in (([0.5] * 3, [1e-5, 0.2, 0.2]), ([-0.1] * 3, [0.2] * 3)):
        with pytest.raises(ValueError, match=r"for images in \[0, 1\]") as refused:
            normalization(mean=mean, std=std)
        assert "255" not in str(refused.value)


def test_normalization_takes_both_constants_in_the_closed_unit_range():
    from fastvit_style.imageio import normalization

    with pytest.raises(ValueError, match="give both mean and std, or neither"):
        normalization(mean=[0.5] * 3)
    with pytest.raises(ValueError, match="give both mean and std, or neither"):
        normalization(std=[0.5] * 3)
    assert normalization(mean=[0, 0, 1], std=[1, 1, 1e-4]) == ((0, 0, 1), (1, 1, 1e-4))  # the range's ends
    # A dataset id as a command line may spell it.
    assert normalization("fitzpatrick17k-12-34-56") == NORMALIZATION["fitzpatrick17k_12_34_56"]
