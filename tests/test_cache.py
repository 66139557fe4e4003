"""The cache under --data_path: decoded folder datasets, fitted ZCAs and whitened images, built once, never stale;
and the progress lines that decoding prints."""
import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from mtt import data
from mtt.data import DATASETS, IMAGENET_SUBSETS, ZCA, get_dataset
from tools.bench_data import old_fit

RNG = np.random.default_rng(0)
# Pictures of other sizes than the side they are squashed to, in the modes a dataset holds:
# colour, greyscale, palette and RGBA PNGs, and colour and greyscale JPEGs.
MODES = ["RGB", "L", "P", "RGBA"]


def picture(index):
    """A random picture (smooth enough for JPEG to keep detail) of a size that varies with index."""
    h, w = 20 + 3 * (index % 4), 26 - 2 * (index % 3)
    pixels = RNG.integers(0, 256, (h // 2 + 1, w // 2 + 1, 4), dtype=np.uint8).repeat(2, 0).repeat(2, 1)[:h, :w]
    image = Image.fromarray(pixels, "RGBA")
    mode = MODES[index % len(MODES)]
    return image.convert("RGB").quantize(16) if mode == "P" else image.convert(mode)


def save(path, index, ext):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = picture(index)
    image = image.convert("L" if image.mode == "L" else "RGB") if ext == "JPEG" else image
    image.save(path.with_suffix(f".{ext}"), quality=90) if ext == "JPEG" else image.save(path.with_suffix(f".{ext}"))
    return path.with_suffix(f".{ext}")


def reference_pixels(files, res):
    """What the loader decoded before the cache: PIL, one file at a time, uint8 N x 3 x res x res."""
    out = []
    for path in files:
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("RGB").resize((res, res), Image.BILINEAR)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def tiny_zip_layout(root, ext):
    """Tiny ImageNet as its zip unpacks: train/{wnid}/images/*, val/images/* and val_annotations.txt."""
    train = [save(root / "train" / wnid / "images" / f"{wnid}_{i}", 3 * c + i, ext)
             for c, wnid in enumerate(["n01", "n02"]) for i in range(3)]
    test = [save(root / "val" / "images" / f"val_{i}", 10 + i, ext) for i in range(3)]
    (root / "val" / "val_annotations.txt").write_text("".join(f"{f.name}\tn0{1 + i % 2}\t0\t0\t1\t1\n"
                                                              for i, f in enumerate(test)))
    return train, test


def tiny_folder_layout(root, ext):
    """Tiny ImageNet as the original prepares it: the test set in val/images/{wnid}/."""
    train, _ = tiny_zip_layout(root, ext)
    for file in (root / "val" / "images").iterdir():
        file.unlink()
    test = [save(root / "val" / "images" / wnid / f"v{i}", 20 + i, ext) for i, wnid in enumerate(["n01", "n02"])]
    return train, test


def imagenet_layout(root, ext):
    """1000 class folders, of which imagenette's hold two pictures each in train/ and one in val/."""
    wnids = [f"n{i:08d}" for i in range(1000)]
    for wnid in wnids:
        (root / "train" / wnid).mkdir(parents=True)
    in_order = sorted(IMAGENET_SUBSETS["imagenette"])  # the loader lists class folders by name
    train = [save(root / "train" / wnids[c] / f"t{i}", 2 * c + i, ext) for c in in_order for i in range(2)]
    test = [save(root / "val" / wnids[c] / "v", c, ext) for c in in_order]
    return train, test


LAYOUTS = {  # name -> (make the folder, dataset, res)
    "tiny-zip": (tiny_zip_layout, "Tiny", 64),
    "tiny-folders": (tiny_folder_layout, "Tiny", 64),
    "imagenet": (imagenet_layout, "ImageNet", 16),
}


def load(dataset, data_path, res):
    """The loader's uint8 training and test images."""
    x_train, _, x_test, _, _ = DATASETS[dataset].load(str(data_path), "imagenette", res)
    return x_train, x_test


def no_decoding(*args):
    raise AssertionError("decoded again: the cache was not used")


def cached_files(data_path, pattern="*.npy"):
    return sorted(p.name for p in (data_path / "cache").glob(pattern))


@pytest.mark.parametrize("ext", ["JPEG", "png"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_first_and_second_load_give_the_pixels_of_the_uncached_loader(tmp_path, monkeypatch, layout, ext):
    make, dataset, res = LAYOUTS[layout]
    train, test = make(tmp_path, ext)
    expected = reference_pixels(train, res), reference_pixels(test, res)
    first = load(dataset, tmp_path, res)
    assert all(torch.equal(found, want) for found, want in zip(first, expected))
    assert len(cached_files(tmp_path)) == 2  # one file for the training set, one for the test set
    monkeypatch.setattr(data, "_decode_chunk", no_decoding)
    second = load(dataset, tmp_path, res)
    assert all(torch.equal(found, want) for found, want in zip(second, expected))
    assert first[0].shape == (len(train), 3, res, res)


def test_a_file_added_to_the_folder_is_decoded_and_replaces_the_stale_cache(tmp_path, capsys):
    train, _ = tiny_zip_layout(tmp_path, "JPEG")
    load("Tiny", tmp_path, 64)
    before = cached_files(tmp_path, "Tiny-train-*")
    train.append(save(tmp_path / "train" / "n02" / "images" / "n02_9", 30, "JPEG"))
    x_train, _ = load("Tiny", tmp_path, 64)
    assert torch.equal(x_train, reference_pixels(train, 64))
    after = cached_files(tmp_path, "Tiny-train-*")
    assert len(after) == 1 and after != before  # rebuilt under its new key; the stale file is gone
    assert f"replacing {before[0]}" in capsys.readouterr().out


def test_a_changed_file_is_decoded_again(tmp_path):
    train, _ = tiny_zip_layout(tmp_path, "png")
    load("Tiny", tmp_path, 64)
    save(train[1].with_suffix(""), 40, "png")  # a new picture of another size under the same name
    x_train, _ = load("Tiny", tmp_path, 64)
    assert torch.equal(x_train, reference_pixels(train, 64))


def test_another_res_has_its_own_cache(tmp_path, monkeypatch):
    train, _ = imagenet_layout(tmp_path, "JPEG")
    load("ImageNet", tmp_path, 16)
    x_train, _ = load("ImageNet", tmp_path, 8)
    assert x_train.shape == (20, 3, 8, 8) and torch.equal(x_train, reference_pixels(train, 8))
    assert cached_files(tmp_path, "imagenette-train-*") == sorted(
        cached_files(tmp_path, "imagenette-train-16px-*") + cached_files(tmp_path, "imagenette-train-8px-*"))
    monkeypatch.setattr(data, "_decode_chunk", no_decoding)
    assert torch.equal(load("ImageNet", tmp_path, 16)[0], reference_pixels(train, 16))  # both stay valid


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_cache_is_rebuilt_with_one_line(tmp_path, capsys, damage):
    train, _ = tiny_zip_layout(tmp_path, "JPEG")
    load("Tiny", tmp_path, 64)
    [name] = cached_files(tmp_path, "Tiny-train-*")
    path = tmp_path / "cache" / name
    whole = path.read_bytes()
    path.write_bytes({"truncate": whole[:len(whole) // 2], "garbage": b"x" * len(whole), "empty": b""}[damage])
    capsys.readouterr()
    x_train, _ = load("Tiny", tmp_path, 64)
    assert torch.equal(x_train, reference_pixels(train, 64))
    lines = [line for line in capsys.readouterr().out.splitlines() if "is damaged" in line]
    assert len(lines) == 1 and lines[0].startswith(f"the cache {path} is damaged (") and "decoding again" in lines[0]
    assert path.read_bytes() == whole


def test_without_a_writable_cache_folder_the_images_are_decoded_and_said_once(tmp_path, capsys):
    train, test = tiny_zip_layout(tmp_path, "JPEG")
    (tmp_path / "cache").write_text("a file in the way")
    x_train, x_test = load("Tiny", tmp_path, 64)
    assert torch.equal(x_train, reference_pixels(train, 64)) and torch.equal(x_test, reference_pixels(test, 64))
    said = [line for line in capsys.readouterr().out.splitlines() if "cache folder" in line]
    assert said == [f"cannot write the cache folder {tmp_path / 'cache'} (File exists): decoding and ZCA fits "
                    f"are not kept"]


def test_a_broken_image_is_still_one_line_from_a_worker(tmp_path):
    tiny_zip_layout(tmp_path, "JPEG")
    (tmp_path / "train" / "n02" / "images" / "n02_1.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(data.UsageError, match=r"^cannot read image .*n02_1\.JPEG: cannot identify image file"):
        load("Tiny", tmp_path, 64)
    assert cached_files(tmp_path, "Tiny-train-*") == []


# ---------------------------------------------------------------------------------------------
# ZCA: fitted once per training set, equal to the fit before it was cached


def test_zca_fit_equals_the_uncached_fit_to_float_rounding():
    """Bit for bit with the same CPU threads. With other threads, or on a GPU, the float64 sums
    round differently: on Fashion-MNIST's 5000 x 784, transforms 2e-9 apart, whitened images 1.2e-7."""
    torch.manual_seed(0)
    pixels = (torch.nn.functional.interpolate(torch.rand(300, 3, 4, 4), size=8, mode="bilinear") * 255).round()
    pixels = pixels.to(torch.uint8)
    scaled = pixels.float() / 255
    before = old_fit(scaled)  # ZCA.fit as it was, float images summed on the CPU in float64
    fitted = ZCA.fit(pixels, chunk=64)
    assert torch.equal(fitted.mean, before.mean)
    assert (fitted.transform - before.transform).abs().max() <= 1e-6
    assert (fitted.inverse_transform - before.inverse_transform).abs().max() <= 1e-6
    whitened = fitted.apply_(scaled.clone(), chunk=100)
    assert (whitened - ((scaled.flatten(1) - before.mean) @ before.transform).view_as(scaled)).abs().max() <= 1e-5
    assert whitened.abs().max() > 1  # not a no-op
    from_floats = ZCA.fit(scaled, chunk=64)
    assert torch.equal(from_floats.transform, fitted.transform)  # uint8 scaled a chunk at a time: the same numbers


def test_zca_is_fitted_once_and_read_back_bit_for_bit(tmp_path, monkeypatch, capsys):
    first = get_dataset("FashionMNIST-mini", str(tmp_path), zca=True)
    assert "fitting ZCA on 5000 images of 1x28x28 on cpu" in capsys.readouterr().out
    monkeypatch.setattr(ZCA, "fit", no_decoding)
    second = get_dataset("FashionMNIST-mini", str(tmp_path), zca=True)
    assert torch.equal(second.zca.transform, first.zca.transform)
    assert torch.equal(second.images_train, first.images_train) and torch.equal(second.images_test, first.images_test)
    # eval.py's refit for a set without zca.pt: the plain data's fitted_zca finds the same file
    plain = get_dataset("FashionMNIST-mini", str(tmp_path))
    assert torch.equal(plain.fitted_zca().transform, first.zca.transform)
    assert "fitting" not in capsys.readouterr().out


def test_another_training_set_fits_its_own_zca(tmp_path):
    train, _ = imagenet_layout(tmp_path, "png")
    fit = lambda: get_dataset("ImageNet", str(tmp_path), zca=True, res=8).zca
    first = fit()
    save(train[3].with_suffix(""), 50, "png")
    second = fit()
    assert not torch.equal(first.transform, second.transform)
    assert len(cached_files(tmp_path, "zca-ImageNet-imagenette-8px-*.pt")) == 1
    assert torch.equal(ZCA.fit(load("ImageNet", tmp_path, 8)[0]).transform, second.transform)


def test_a_damaged_zca_cache_is_refitted_with_one_line(tmp_path, capsys):
    first = get_dataset("FashionMNIST-mini", str(tmp_path), zca=True).zca
    [path] = (tmp_path / "cache").glob("zca-*.pt")
    path.write_bytes(path.read_bytes()[:1000])
    capsys.readouterr()
    again = get_dataset("FashionMNIST-mini", str(tmp_path), zca=True).zca
    out = capsys.readouterr().out
    assert f"the cache {path} is damaged (" in out and "fitting again" in out
    assert torch.equal(again.transform, first.transform)


def test_whitened_images_are_kept_and_read_back_equal_to_whitening_anew(tmp_path, monkeypatch, capsys):
    uncached = get_dataset("FashionMNIST-mini", None, zca=True)
    first = get_dataset("FashionMNIST-mini", str(tmp_path), zca=True)
    out = capsys.readouterr().out
    assert "whitening FashionMNIST-mini-train: 5000 images, once" in out
    assert "whitening FashionMNIST-mini-test: 1000 images, once" in out
    monkeypatch.setattr(ZCA, "fit", no_decoding)
    monkeypatch.setattr(ZCA, "apply_", no_decoding)
    second = get_dataset("FashionMNIST-mini", str(tmp_path), zca=True)
    for split in ("images_train", "images_test"):
        assert torch.equal(getattr(second, split), getattr(uncached, split))
        assert torch.equal(getattr(first, split), getattr(uncached, split))
    assert second.images_train.abs().max() > 1  # whitened, not [0, 1] pixels
    assert "whitening" not in capsys.readouterr().out


def test_a_refitted_zca_whitens_again_and_a_damaged_whitened_file_is_rebuilt(tmp_path, capsys):
    first = get_dataset("FashionMNIST-mini", str(tmp_path), zca=True)
    [zca_file] = (tmp_path / "cache").glob("zca-*.pt")
    [train_file] = (tmp_path / "cache").glob("whitened-FashionMNIST-mini-train-*.npy")
    zca_file.write_bytes(zca_file.read_bytes()[:1000])
    capsys.readouterr()
    again = get_dataset("FashionMNIST-mini", str(tmp_path), zca=True)  # the ZCA refitted: its images whitened again
    assert "whitening FashionMNIST-mini-train: 5000 images, once" in capsys.readouterr().out
    [new_train_file] = (tmp_path / "cache").glob("whitened-FashionMNIST-mini-train-*.npy")
    assert new_train_file != train_file and torch.equal(again.images_train, first.images_train)
    new_train_file.write_bytes(new_train_file.read_bytes()[:1000])
    rebuilt = get_dataset("FashionMNIST-mini", str(tmp_path), zca=True)
    out = capsys.readouterr().out
    assert f"the cache {new_train_file} is damaged (" in out and "whitening again" in out
    assert torch.equal(rebuilt.images_train, first.images_train)


def test_decoding_into_a_log_file_prints_progress_lines(tmp_path):
    tiny_zip_layout(tmp_path, "JPEG")
    log = tmp_path / "log.txt"
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        data.get_dataset("Tiny", str(tmp_path))
    text = log.read_text()
    assert "\r" not in text
    cached = next((tmp_path / "cache").glob("Tiny-train-*"))
    assert text.startswith(f"decoding Tiny-train: 6 images, once: later starts read {cached}\n")
    for split, count in (("train", 6), ("test", 3)):
        bar = [line for line in text.splitlines() if line.startswith(f"decoding Tiny-{split}: ") and "%" in line]
        assert bar[0].startswith(f"decoding Tiny-{split}:   0% 0/{count} [00:00<?, ?img/s]")
        assert bar[-1].startswith(f"decoding Tiny-{split}: 100% {count}/{count} [")
        assert len(bar) == len(set(bar)) >= 2
