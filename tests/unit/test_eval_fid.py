"""FID / KID / precision-recall (ldm.eval.metrics, the fid and ref_stats CLIs) against torch-fidelity's own numbers.

The Inception weights are torch-fidelity's network, randomly initialised and saved as a local file, so nothing is
downloaded; every image pass costs about half a second on 2 cores, so the sets are small and each is read as few
times as the checks allow.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from ldm.data.make_shards import make_shards
from ldm.errors import ConfigError
from ldm.eval import fid as fid_cli
from ldm.eval import ref_stats as ref_stats_cli
from ldm.eval.metrics import (
    compute_metrics,
    count_images,
    extract_features,
    features_to_stats,
    image_size_label,
    iter_images,
    load_stats,
    resolve_weights,
    save_stats,
)

N_GEN, N_REF = 8, 6
ENV_VARS = ("LDM_INCEPTION_WEIGHTS", "LDM_CLIP_WEIGHTS", "LDM_DINOV2_WEIGHTS")


def _close(a: float, b: float, rel: float = 5e-3) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


@pytest.fixture(autouse=True)
def _no_env_weights(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """torch-fidelity's InceptionV3 with seeded random weights (He-normal convolutions, so the features neither
    vanish nor explode), as a state dict its constructor loads from feature_extractor_weights_path."""
    root = tmp_path_factory.mktemp("weights")
    empty = root / "empty.pth"
    torch.save({}, empty)
    with torch.random.fork_rng(), mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict",
                                                     lambda self, state: None):
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = root / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def _image(rng: np.random.Generator, kind: str) -> Image.Image:
    x = np.arange(32, dtype=np.float64)[None, :, None] / 31
    y = np.arange(32, dtype=np.float64)[:, None, None] / 31
    if kind == "ramp":  # horizontal colour ramps with a little noise
        arr = rng.uniform(0, 255, (1, 1, 3)) * x + rng.uniform(0, 40, (32, 32, 3))
    else:  # noise fading in from the top
        arr = rng.uniform(0, 255, (32, 32, 3)) * y
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """GEN: 5 ramps + 3 noise images (so precision is neither 0 nor 1); REF: 6 noise images. Flat folders of
    32x32 PNGs, which torch-fidelity reads the same way (sorted paths)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    gen, ref = root / "gen", root / "ref"
    gen.mkdir()
    ref.mkdir()
    for i in range(N_GEN):
        _image(rng, "ramp" if i < 5 else "noise").save(gen / f"{i:03d}.png")
    for i in range(N_REF):
        _image(rng, "noise").save(ref / f"{i:03d}.png")
    return gen, ref


@pytest.fixture(scope="module")
def oracle(folders, weights) -> dict[str, float]:
    """torch-fidelity's calculate_metrics on the two folders (PRC with Inception features, as ldm computes it)."""
    gen, ref = folders
    return torch_fidelity.calculate_metrics(
        input1=str(gen), input2=str(ref), fid=True, kid=True, prc=True, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=weights, kid_subset_size=N_REF, cuda=False, verbose=False, cache=False,
        save_cpu_ram=True, batch_size=64)


@pytest.fixture(scope="module")
def stats_files(folders, weights, tmp_path_factory) -> tuple[Path, Path]:
    """ref_stats (the CLI) on REF's folder and on shards of GEN written by ldm's make_shards."""
    gen, ref = folders
    root = tmp_path_factory.mktemp("stats")
    (gen / "captions.json").write_text(json.dumps({f"{i:03d}.png": f"image {i}" for i in range(N_GEN)}))
    make_shards(gen, root / "gen_shards", maxcount=3, log=None)
    assert ref_stats_cli.main([str(ref), "--out", str(root / "ref.npz"), "--inception-weights", weights]) == 0
    assert ref_stats_cli.main([str(root / "gen_shards"), "--out", str(root / "gen.npz"),
                               "--inception-weights", weights]) == 0
    return root / "gen.npz", root / "ref.npz"


def test_oracle_is_informative(oracle):
    assert oracle["frechet_inception_distance"] > 1.0
    assert oracle["kernel_inception_distance_mean"] > 2 * oracle["kernel_inception_distance_std"] > 0
    assert 0 < oracle["precision"] < 1 and oracle["precision"] != oracle["recall"]


def test_compute_metrics_matches_torch_fidelity(folders, weights, oracle):
    gen, ref = folders
    m = compute_metrics(gen, ref, weights_path=weights, fid=True, kid=True, prc=True, kid_subset_size=N_REF)
    assert _close(m["fid"], oracle["frechet_inception_distance"])
    assert _close(m["kid_mean"], oracle["kernel_inception_distance_mean"])
    assert _close(m["kid_std"], oracle["kernel_inception_distance_std"])
    assert m["precision"] == oracle["precision"] and m["recall"] == oracle["recall"]
    assert (m["n_gen"], m["n_ref"]) == (N_GEN, N_REF)
    assert m.meta["extractor"] == "inception-v3-compat" and "299" in m.meta["resize"]
    assert "torch-fidelity" in m.protocol() and "100 subsets of 6" in m.protocol()


def test_cli_on_npz_reference_matches_torch_fidelity(folders, weights, oracle, stats_files, capsys):
    """fid GEN ref.npz (stats from ref_stats on the folder) prints torch-fidelity's FID and KID of GEN vs the folder."""
    gen, _ = folders
    _, ref_npz = stats_files
    capsys.readouterr()
    assert fid_cli.main([str(gen), str(ref_npz), "--inception-weights", weights, "--kid",
                         "--kid-subset-size", str(N_REF)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(f"n={N_GEN}" in line for line in lines[:-1]) and any("resize" in line for line in lines[:-1])
    last = lines[-1]
    fid_part, kid_part = last.split(" ")
    assert fid_part.startswith("fid=") and kid_part.startswith("kid=")
    assert _close(float(fid_part[4:]), oracle["frechet_inception_distance"])
    mean, std = kid_part[4:].split("±")
    assert _close(float(mean), oracle["kernel_inception_distance_mean"])
    assert _close(float(std), oracle["kernel_inception_distance_std"])


def test_ref_stats_contents(stats_files):
    gen_npz, ref_npz = stats_files
    stats = load_stats(ref_npz)
    assert stats["features"].shape == (N_REF, 2048) and stats["n"] == N_REF
    assert stats["extractor"] == "inception-v3-compat" and "299" in stats["resize"]
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    np.testing.assert_allclose(stats["mu"], stats["features"].double().mean(0).numpy(), rtol=1e-6, atol=1e-9)
    with np.load(ref_npz) as raw:  # what pytorch-fid / clean-fid readers look for
        assert {"mu", "sigma"} <= set(raw.files)


def test_image_sizes_are_recorded_and_compared(folders, weights, stats_files):
    """Statistics record the images' native size; the protocol names it, and sides of different sizes warn (the
    extractor resizes both, so the metric would also measure the resizing)."""
    gen, _ = folders
    gen_npz, ref_npz = stats_files
    assert load_stats(ref_npz)["image_size"] == load_stats(gen_npz)["image_size"] == "32x32"
    m = compute_metrics(gen_npz, ref_npz, fid=False, kid=True, kid_subset_size=N_REF)
    assert m.meta["image_size"] == "32x32" and "images 32x32" in m.protocol()
    big = torch.stack(list(iter_images(gen))[:4]).repeat_interleave(2, -1)  # 32 x 64
    with pytest.warns(UserWarning, match="GEN images are 32x64 and REF images 32x32"):
        m = compute_metrics(big, ref_npz, weights_path=weights, fid=False, kid=True, kid_subset_size=4)
    assert m.meta["image_size"] == "GEN 32x64, REF 32x32"
    assert image_size_label([(32, 32), (64, 64), (32, 32)]) == "mixed: 32x32, 64x64"
    assert image_size_label([(i, i) for i in range(1, 6)]) == "mixed: 1x1, 2x2, 3x3 and 2 more"
    assert image_size_label([]) is None


def test_shards_equal_folder(folders, weights, oracle, stats_files):
    """GEN read from ldm shards (folder and brace pattern) gives the folder's pixels and the oracle's numbers."""
    gen, _ = folders
    gen_npz, ref_npz = stats_files
    shards = gen_npz.parent / "gen_shards"
    folder_images = list(iter_images(gen))
    for spec in (shards, f"{shards}/{{000000..000002}}.tar"):
        shard_images = list(iter_images(spec))
        assert len(shard_images) == N_GEN
        assert all(torch.equal(a, b) for a, b in zip(folder_images, shard_images, strict=True))
    # both sides from stored features: no network (FID from the shards' statistics: test_pytorch_fid_style_npz,
    # as each FID costs seconds in torch-fidelity's 2048x2048 eigvals)
    m = compute_metrics(gen_npz, ref_npz, fid=False, kid=True, prc=True, kid_subset_size=N_REF)
    assert "fid" not in m
    assert _close(m["kid_mean"], oracle["kernel_inception_distance_mean"])
    assert m["precision"] == oracle["precision"] and m["recall"] == oracle["recall"]


def test_tensor_input(folders, weights, stats_files):
    gen, _ = folders
    gen_npz, _ = stats_files
    x = torch.stack(list(iter_images(gen))[:2])
    feats = extract_features(x, extractor="inception-v3-compat", weights_path=weights, batch_size=2, device="cpu")
    stored = load_stats(gen_npz)["features"][:2]
    torch.testing.assert_close(feats, stored, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="uint8"):
        extract_features(x.float(), extractor="inception-v3-compat", weights_path=weights, batch_size=2, device="cpu")


def test_kid_subset_clamped_with_warning(stats_files, oracle):
    gen_npz, ref_npz = stats_files
    with pytest.warns(UserWarning, match="clamped to 6"):
        m = compute_metrics(gen_npz, ref_npz, fid=False, kid=True)  # default subset 1000 > 6
    assert _close(m["kid_mean"], oracle["kernel_inception_distance_mean"])
    assert m.meta["kid_subset_size"] == N_REF
    for bad in (1, 0, -5, 2.5):  # KID was NaN at 1 and 0, a traceback below
        with pytest.raises(ConfigError, match="kid_subset_size must be an integer >= 2"):
            compute_metrics(gen_npz, ref_npz, fid=False, kid=True, kid_subset_size=bad)


def test_a_sample_folder_counts_its_samples_not_its_previews(folders, tmp_path):
    """sample.py writes _previews/grid.png (and GIFs) beside the samples: entries named _* or .* are skipped, so
    FID reads the samples alone."""
    import shutil

    gen, _ = folders
    folder = tmp_path / "samples"
    shutil.copytree(gen, folder)
    (folder / "_previews").mkdir()
    Image.new("RGB", (256, 32)).save(folder / "_previews" / "grid.png")
    Image.new("RGB", (32, 32)).save(folder / "_previews" / "00000.gif")
    Image.new("RGB", (32, 32)).save(folder / ".hidden.png")
    assert count_images(folder) == count_images(gen) == N_GEN


def test_statistics_in_memory_equal_the_files(stats_files, oracle):
    """A training callback's inputs: features gathered in memory against a reference loaded once."""
    gen_npz, ref_npz = stats_files
    gen = features_to_stats(load_stats(gen_npz)["features"], {"extractor": "inception-v3-compat"})
    m = compute_metrics(gen, load_stats(ref_npz), kid=True, kid_subset_size=N_REF)
    assert _close(m["fid"], oracle["frechet_inception_distance"])
    assert _close(m["kid_mean"], oracle["kernel_inception_distance_mean"])
    assert m["n_gen"] == N_GEN and m["n_ref"] == N_REF
    with pytest.raises(ValueError, match="overwrite"):
        features_to_stats(gen["features"], {"mu": 0})


def test_pytorch_fid_style_npz(stats_files, oracle, tmp_path):
    """An npz with only mu and sigma serves FID (with a warning that its protocol is unknown) and refuses KID.
    GEN's statistics come from ldm shards of the GEN folder: the FID is torch-fidelity's on the folders."""
    gen_npz, ref_npz = stats_files
    ref = load_stats(ref_npz)
    plain = tmp_path / "pytorch_fid.npz"
    np.savez(plain, mu=ref["mu"].astype(np.float32), sigma=ref["sigma"])
    with pytest.warns(UserWarning, match="does not say which extractor"):
        m = compute_metrics(gen_npz, plain)
    assert _close(m["fid"], oracle["frechet_inception_distance"])
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="KID need features.*only mu/sigma"):
        compute_metrics(gen_npz, plain, kid=True)


def test_save_load_stats_round_trip(tmp_path):
    feats = torch.randn(5, 7)
    save_stats(tmp_path / "s.npz", feats, {"extractor": "inception-v3-compat", "resize": "r"})
    s = load_stats(tmp_path / "s.npz")
    torch.testing.assert_close(s["features"], feats)
    np.testing.assert_allclose(s["sigma"], np.cov(feats.double().numpy(), rowvar=False))
    assert s["extractor"] == "inception-v3-compat" and s["n"] == 5
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary


# ---------------------------------------------------------------------------------------------- errors


def test_missing_weights_names_file_url_and_env(folders):
    gen, ref = folders
    with pytest.raises(ConfigError) as err:
        compute_metrics(gen, ref)
    msg = str(err.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and "LDM_INCEPTION_WEIGHTS" in msg
    assert "--inception-weights" in msg and "https://github.com/toshas/torch-fidelity/releases" in msg
    with pytest.raises(ConfigError) as err:
        resolve_weights("clip-vit-b-32")
    assert "LDM_CLIP_WEIGHTS" in str(err.value) and "ViT-B-32.pt" in str(err.value)


def test_weights_from_env_and_missing_path(monkeypatch, weights, tmp_path):
    monkeypatch.setenv("LDM_INCEPTION_WEIGHTS", weights)
    assert resolve_weights("inception-v3-compat") == weights
    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match=f"{missing}.*does not exist"):
        resolve_weights("inception-v3-compat", missing)
    monkeypatch.setenv("LDM_INCEPTION_WEIGHTS", str(missing))
    with pytest.raises(ConfigError, match=r"\$LDM_INCEPTION_WEIGHTS .*nope.pth does not exist"):
        resolve_weights("inception-v3-compat")
    with pytest.raises(ConfigError, match="unknown feature extractor"):
        resolve_weights("resnet-9000")


def test_dinov2_cannot_load_offline(tmp_path, folders):
    """torch-fidelity 0.4.0 raises NotImplementedError for a local DINOv2 file (torch.hub only): a clear error."""
    fake = tmp_path / "dinov2_vits14_pretrain.pth"
    fake.write_bytes(b"x")
    with pytest.raises(ConfigError, match="torch.hub"):
        extract_features(folders[0], extractor="dinov2-vit-s-14", weights_path=fake, batch_size=4, device="cpu")


def test_bad_weights_file(tmp_path, folders):
    bad = tmp_path / "bad.pth"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(ConfigError, match="not a weights file.*weights-inception-2015-12-05"):
        compute_metrics(folders[0], folders[1], weights_path=bad)


def test_cli_errors_exit_2(folders, weights, tmp_path, capsys):
    gen, ref = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (8, 8)).save(one / "a.png")
    cases = [
        ([str(tmp_path / "missing"), str(ref), "--inception-weights", weights], "does not exist"),
        ([str(empty), str(ref), "--inception-weights", weights], "no images in"),
        ([str(one), str(ref), "--inception-weights", weights], "only 1 image: FID needs at least 2"),
        ([str(gen), str(ref)], "LDM_INCEPTION_WEIGHTS"),
        ([str(gen), str(ref), "--inception-weights", str(tmp_path / "w.pth")], "w.pth does not exist"),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        assert fid_cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err, err
    assert ref_stats_cli.main([str(empty), "--out", str(tmp_path / "s.npz"), "--inception-weights", weights]) == 2
    assert "no images in" in capsys.readouterr().err


def test_statistics_of_other_weights_are_refused(folders, weights, stats_files, tmp_path):
    """A reference made with one weights file is not compared with features of another (by the file's digest: a
    renamed copy of the same weights passes), nor two statistics files made with different weights."""
    gen, _ = folders
    gen_npz, ref_npz = stats_files
    state = torch.load(weights, weights_only=True)
    other = tmp_path / "weights-inception-other.pth"
    torch.save({k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()}, other)
    with pytest.raises(ConfigError, match="features of two networks are not comparable"):
        compute_metrics(gen, ref_npz, weights_path=other)
    renamed = tmp_path / "renamed.pth"
    renamed.write_bytes(Path(weights).read_bytes())
    assert compute_metrics(gen, ref_npz, weights_path=renamed)["fid"] > 0
    assert ref_stats_cli.main([str(gen), "--out", str(tmp_path / "gen_other.npz"), "--inception-weights",
                               str(other)]) == 0
    with pytest.raises(ConfigError, match="weights-inception-random.pth .* weights-inception-other.pth"):
        compute_metrics(tmp_path / "gen_other.npz", ref_npz)
    m = compute_metrics(gen_npz, ref_npz)
    assert "weights weights-inception-random.pth" in m.protocol()  # named from the statistics


def test_statistics_in_memory_count_and_give_features(stats_files):
    """count_images and extract_features take loaded statistics, as compute_metrics does."""
    _, ref_npz = stats_files
    ref = load_stats(ref_npz)
    assert count_images(ref) == N_REF
    torch.testing.assert_close(extract_features(ref), ref["features"])

