"""Official weights by name (registry, fetch through a loopback mirror, cache, offline) and fine-tuned PyTorch
models in (the study's `save_session` file, timm `head.*`, transformers Dinov2ForImageClassification).

Nothing here reaches beyond 127.0.0.1: files are served under their official paths by a local HTTP server and
fetched through MEDJAX_MIRROR.
"""

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from medjax import embed as embed_lib
from medjax import models, pretrained, trained
from medjax.conversion import CheckpointError
from medjax.convert import convert
from medjax.testing import PARITY_TOL, ROOT, fixture_path, perturb_
from medjax.weights import fetch as weights
from medjax.weights import registry

DINO_CKPT, DINO_CFG = fixture_path("dinov2", "checkpoint.pth"), fixture_path("dinov2", "config.json")
OFFICIAL = "https://dl.fbaipublicfiles.com/dinov2/test_tiny/tiny_dinov2_pretrain.pth"
DINO_KW = {k: v for k, v in json.load(open(DINO_CFG)).items() if k not in ("family", "format", "upstream", "fixture",
                                                                            "block_fn")}


# ------------------------------------------------------------------------------------------------ loopback server


class Mirror:
    """http.server in a thread serving {'/HOST/PATH': bytes} with Range support; `cut_first` closes the first
    response of a file after that fraction of it; `delay` sleeps between 64 KiB writes."""

    def __init__(self, files: dict):
        self.files, self.served, self.requests, self.cut_first, self.delay = dict(files), 0, [], None, 0.0
        self.redirects = {}  # path -> (location, X-Linked-Etag), as huggingface.co answers a resolve URL
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                mirror.requests.append((self.path, self.headers.get("Range")))
                if self.path in mirror.redirects:
                    location, etag = mirror.redirects[self.path]
                    self.send_response(302)
                    self.send_header("Location", location)
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = mirror.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m:
                    start = int(m.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                end = len(data)
                if mirror.cut_first is not None and not m:
                    end, mirror.cut_first = int(len(data) * mirror.cut_first), None
                    self.close_connection = True
                for i in range(start, end, 1 << 16):
                    chunk = data[i:min(i + (1 << 16), end)]
                    self.wfile.write(chunk)
                    mirror.served += len(chunk)
                    if mirror.delay:
                        time.sleep(mirror.delay)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _mirror_path(url):
    return "/" + url.split("://", 1)[1]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A fresh MEDJAX_HOME, a loopback mirror serving the tiny DINOv2 at its 'official' path, and a test-only
    registry name for it (with the file's real SHA-256 as the published digest)."""
    data = open(DINO_CKPT, "rb").read()
    mirror = Mirror({_mirror_path(OFFICIAL): data})
    monkeypatch.setenv("MEDJAX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDJAX_MIRROR", mirror.url)
    for var in ("MEDJAX_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(weights, "BACKOFF_S", 0.0)
    source = registry.Source("test_tiny_dinov2", "dinov2", (registry.File(OFFICIAL, len(data),
                                                                          weights.sha256_of(DINO_CKPT)),),
                             "Apache-2.0", config=DINO_KW)
    registry.register(source)
    yield mirror, source, data
    registry.unregister(source.name)
    mirror.close()


def _same_folder(a, b):
    ta, tb = load_file(os.path.join(a, pretrained.PARAMS_FILE)), load_file(os.path.join(b, pretrained.PARAMS_FILE))
    assert sorted(ta) == sorted(tb) and all(np.array_equal(ta[k], tb[k]) for k in ta)
    ma, mb = pretrained.read_metadata(a), pretrained.read_metadata(b)
    assert ma["digests"] == mb["digests"] and ma["architecture"] == mb["architecture"]


# ------------------------------------------------------------------------------------------------ registry


def test_registry_declares_every_study_checkpoint():
    names = registry.sources()
    for name in ["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "dinov2_vitb14_reg",
                 "dinov2_vitb14_lc", "dinov2_vitl14_reg_lc", "mae_pretrain_vit_huge", "aimv2_huge_patch14_224",
                 "sam2.1_hiera_base_plus", "sam2.1_hiera_large", "coca_ViT-L-14", "vssm_base_0229", "ViT-B-16",
                 "deit_base_patch16_224", "resnet50", "densenet121", "vgg16_bn", "sam_vit_l",
                 "vit-large-patch16-224-in21k", "vit-msn-large", "clip-vit-large-patch14", "ViT-H-14",
                 "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"]:
        assert name in names, name
    from medjax.models import VARIANTS

    for s in names.values():
        assert s.model in VARIANTS, (s.name, s.model)  # each converts with a known variant
        assert all(f.url.startswith("https://") for f in s.files) and s.licence
    assert names["resnet50"].checkpoint.sha256 == "0676ba61"  # torchvision's file-name hash prefix
    assert names["dinov2_vitb14"].checkpoint.sha256 is None  # no digest published
    lc = names["dinov2_vitb14_reg_lc"]
    assert [f.filename for f in lc.files] == ["dinov2_vitb14_reg4_pretrain.pth", "dinov2_vitb14_reg4_linear4_head.pth"]
    assert names["aimv2_large_patch14_224"].checkpoint.url == \
        "https://huggingface.co/apple/aimv2-large-patch14-224/resolve/main/model.safetensors"


def test_docs_table_matches_the_registry():
    """docs/weights.md carries the names table generated from the registry (scripts/weights_table.py)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import weights_table

    doc = open(os.path.join(ROOT, "docs", "weights.md")).read()
    assert weights_table.table() in doc, "docs/weights.md is stale: run python scripts/weights_table.py --write"


# ------------------------------------------------------------------------------------------------ fetch


def test_cut_transfer_resumes_and_matches_a_direct_conversion(env, tmp_path):
    mirror, source, data = env
    mirror.cut_first = 0.6
    folder = weights.fetch(source.name, quiet=True)
    assert mirror.served <= 1.2 * len(data)
    assert [r for _, r in mirror.requests] == [None, f"bytes={int(len(data) * 0.6)}-"]
    convert(DINO_CKPT, str(tmp_path / "direct"), "dinov2", DINO_CFG)
    _same_folder(folder, tmp_path / "direct")
    prov = json.load(open(os.path.join(folder, weights.PROVENANCE_FILE)))
    assert prov["files"][0]["url"] == OFFICIAL and prov["files"][0]["bytes"] == len(data)
    assert prov["files"][0]["sha256"] == weights.sha256_of(DINO_CKPT) and prov["medjax_version"]
    assert not os.path.exists(weights.download_dir(source.name))  # the raw file is not kept
    # a second fetch is served from the cache: no request reaches the network
    mirror.requests.clear()
    assert weights.fetch(source.name) == folder and mirror.requests == []


def test_cli_fetch_prints_the_folder_last_and_list_shows_it(env, capsys):
    from converters.__main__ import main

    _, source, _ = env
    assert main(["fetch", source.name, "--quiet"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == weights.cache_dir(source.name)
    assert main(["list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(source.name))
    assert "cached" in line and "Apache-2.0" in line and "dinov2" in line


def test_digest_mismatch_is_refused_and_caches_nothing(env, capsys):
    from converters.__main__ import main

    mirror, source, data = env
    registry.register(registry.Source("test_bad_digest", "dinov2", (registry.File(OFFICIAL, len(data), "0" * 64),),
                                      "Apache-2.0", config=DINO_KW))
    try:
        assert main(["fetch", "test_bad_digest", "--quiet"]) == 2
    finally:
        registry.unregister("test_bad_digest")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: test_bad_digest:") and "SHA-256" in err[0]
    assert OFFICIAL in err[0]
    assert weights.cached("test_bad_digest") is None
    assert not os.path.exists(weights.cache_dir("test_bad_digest"))
    assert not os.listdir(weights.download_dir("test_bad_digest"))


def test_hugging_face_linked_etag_is_the_published_digest(env):
    """A Hugging Face `resolve` URL redirects to storage with the LFS file's SHA-256 in `X-Linked-Etag`: the fetch
    checks the file against it (the registry records no digest for Hugging Face files)."""
    mirror, _, data = env
    url = registry.hf("test/tiny-dinov2", "model.pth", 1).url
    mirror.files["/cdn/blob"] = data
    registry.register(registry.Source("test_hf", "dinov2", (registry.File(url, len(data)),), "x", config=DINO_KW))
    try:
        mirror.redirects[_mirror_path(url)] = ("/cdn/blob", "0" * 64)
        with pytest.raises(weights.WeightsError, match="the publisher's digest is 0000"):
            weights.fetch("test_hf", quiet=True)
        assert weights.cached("test_hf") is None and not os.listdir(weights.download_dir("test_hf"))
        mirror.redirects[_mirror_path(url)] = ("/cdn/blob", weights.sha256_of(DINO_CKPT))
        folder = weights.fetch("test_hf", quiet=True)
        record = json.load(open(os.path.join(folder, weights.PROVENANCE_FILE)))["files"][0]
        assert record["published_digest"] == record["sha256"] == weights.sha256_of(DINO_CKPT)
        assert record["url"] == "https://huggingface.co/test/tiny-dinov2/resolve/main/model.pth"
    finally:
        registry.unregister("test_hf")


def test_404_names_the_url(env, capsys):
    from converters.__main__ import main

    _, _, data = env
    missing = "https://download.pytorch.org/models/nothing-00000000.pth"
    registry.register(registry.Source("test_missing", "dinov2", (registry.File(missing, 10),), "x", config=DINO_KW))
    try:
        assert main(["fetch", "test_missing", "--quiet"]) == 2
    finally:
        registry.unregister("test_missing")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HTTP 404" in err[0] and missing in err[0]


def test_offline_never_touches_the_network(env, monkeypatch, capsys, tmp_path):
    from converters.__main__ import main

    mirror, source, _ = env
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["fetch", source.name]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and OFFICIAL in err[0] and f"fetch {source.name} --from-file" in err[0]
    assert mirror.requests == []
    # --from-file: the same checks and conversion, offline
    assert main(["fetch", source.name, "--from-file", DINO_CKPT, "--quiet"]) == 0
    folder = capsys.readouterr().out.strip().splitlines()[-1]
    convert(DINO_CKPT, str(tmp_path / "direct"), "dinov2", DINO_CFG)
    _same_folder(folder, tmp_path / "direct")
    assert mirror.requests == []
    assert main(["fetch", "dinov2_vitb14"]) == 2  # a real name, not cached: one line, the official URL
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth" in capsys.readouterr().err


def test_mirror_maps_urls():
    os.environ["MEDJAX_MIRROR"] = "http://mirror.local/weights/"
    try:
        assert weights.mirrored("https://huggingface.co/apple/x/resolve/main/model.safetensors") == \
            "http://mirror.local/weights/huggingface.co/apple/x/resolve/main/model.safetensors"
    finally:
        del os.environ["MEDJAX_MIRROR"]
    assert weights.mirrored("https://a.b/c") == "https://a.b/c"


KILLED_FETCH = """
import json, sys
from medjax.weights import fetch, registry
kw = json.loads(sys.argv[2])
registry.register(registry.Source("test_tiny_dinov2", "dinov2", (registry.File(sys.argv[1], 1),), "x", config=kw))
fetch.fetch("test_tiny_dinov2")
"""


def test_sigkill_mid_download_leaves_nothing_trusted(env):
    mirror, source, data = env
    mirror.files[_mirror_path(OFFICIAL)] = data * 8  # a bigger file, served slowly
    mirror.delay = 0.05
    proc = subprocess.Popen([sys.executable, "-c", KILLED_FETCH, OFFICIAL, json.dumps(DINO_KW)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    part = os.path.join(weights.download_dir(source.name), os.path.basename(OFFICIAL) + ".part")
    deadline = time.time() + 60
    while time.time() < deadline and not (os.path.exists(part) and os.path.getsize(part) > len(data)):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.exists(part)  # a partial exists, and nothing trusts it:
    assert weights.cached(source.name) is None
    assert not os.path.exists(os.path.join(weights.download_dir(source.name), os.path.basename(OFFICIAL)))
    # the next fetch resumes the partial and checks the whole file against the digest: the truncated
    # 8x file is not the official one, so it is refused and deleted, never converted
    mirror.delay = 0.0
    with pytest.raises(weights.WeightsError, match="SHA-256"):
        weights.fetch(source.name, quiet=True)
    assert weights.cached(source.name) is None and not os.path.exists(part)
    mirror.files[_mirror_path(OFFICIAL)] = data
    assert weights.cached(source.name) is None
    assert weights.fetch(source.name, quiet=True) == weights.cache_dir(source.name)


TRAIN_FROM_NAME = """
import json, runpy, sys
from medjax.weights import registry
url, kw, digest, size = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
registry.register(registry.Source("test_tiny_dinov2", "dinov2", (registry.File(url, size, digest),), "x", config=kw))
sys.argv = ["medjax.main"] + sys.argv[5:]
runpy.run_module("medjax.main", run_name="__main__")
"""


def test_the_trainer_runs_from_a_name(env, tmp_path):
    mirror, source, data = env
    cmd = [sys.executable, "-c", TRAIN_FROM_NAME, OFFICIAL, json.dumps(DINO_KW), weights.sha256_of(DINO_CKPT),
           str(len(data)), "--config=configs/demo.py", f"--workdir={tmp_path / 'run'}",
           f"--config.data_root={tmp_path / 'data'}", "--config.fake_data=48", "--config.epochs=1",
           "--config.batch_size=8", "--config.progress_bar=False", "--config.bootstrap.resamples=0",
           "--config.image_size=28", "--config.model.convert_from.checkpoint=",
           f"--config.model.pretrained={source.name}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert weights.cached(source.name) and len(mirror.requests) == 1
    config = json.load(open(tmp_path / "run" / "run_config.json"))
    assert config["model.pretrained"] == weights.cache_dir(source.name)


# ------------------------------------------------------------------------------------------------ fine-tuned models in

STUDY_SAVE = """
import sys, types, torch
# The study's settings object, defined in a throwaway module medjax cannot import (as easydict.EasyDict pickles)
module = types.ModuleType("mtl_throwaway_easydict")
class EasyDict(dict):
    def __init__(self, d=None, **kwargs):
        super().__init__()
        for k, v in dict(d or {}, **kwargs).items():
            setattr(self, k, EasyDict(v) if isinstance(v, dict) else v)
    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        super().__setitem__(name, value)
EasyDict.__module__ = module.__name__
module.EasyDict = EasyDict
sys.modules[module.__name__] = module
state = torch.load(sys.argv[1], weights_only=True)
fc = torch.load(sys.argv[2], weights_only=True)
channels = int(sys.argv[4])
sd = {}
for k, v in state.items():
    if k == "patch_embed.proj.weight" and channels == 1:
        v = v[:, 0:1].clone()  # the study's grayscale stem: the red filter
    sd["backbone." + k] = v
    if k.startswith("blocks."):
        sd[k] = sd["backbone." + k]  # self.blocks = self.backbone.blocks
sd["fc.weight"], sd["fc.bias"] = fc["weight"], fc["bias"]
params = EasyDict({"dataset_params": {"dataset": sys.argv[5]}, "foundation_params": {"img_size": 224}})
torch.save({"iters": 10, "state_dict": sd, "original_state": sd, "optimizer": {"state": {}, "param_groups": []},
            "epoch": 1, "parameters": params, "scaler": {"scale": 65536.0}}, sys.argv[3])
"""


def _linear(num_classes, width, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_classes, width, generator=g) * 0.3, torch.randn(num_classes, generator=g) * 0.1


def _study_checkpoint(tmp_path, channels, dataset, num_classes, seed=5):
    w, b = _linear(num_classes, 48, seed)
    torch.save({"weight": w, "bias": b}, tmp_path / "fc.pth")
    out = tmp_path / f"MAE_dinov2_{dataset}"  # no extension, as the study names it
    subprocess.run([sys.executable, "-c", STUDY_SAVE, DINO_CKPT, str(tmp_path / "fc.pth"), str(out), str(channels),
                    dataset], check=True)
    return str(out), w, b


def test_study_checkpoint_converts_with_its_head(tmp_path):
    import importlib.util

    assert importlib.util.find_spec("mtl_throwaway_easydict") is None
    ckpt, w, b = _study_checkpoint(tmp_path, 3, "ISIC2019", 8)
    meta = convert(ckpt, str(tmp_path / "out"), "dinov2", DINO_CFG)
    assert meta["trained_head"]["layout"] == "medical_transfer_learning" and meta["trained_head"]["num_classes"] == 8
    images = np.load(fixture_path("dinov2", "images.npy"))
    got = embed_lib.embed(str(tmp_path / "out"), images)
    cls = torch.from_numpy(np.load(fixture_path("dinov2", "expected.npz"))["x_norm_clstoken"])  # upstream output
    reference = torch.nn.functional.linear(cls, w, b).numpy()
    assert np.abs(got["logits"] - reference).max() < PARITY_TOL
    facts = pretrained.read_metadata(str(tmp_path / "out"))["export"]
    assert facts["class_names"][0] == "MEL" and facts["run_config"]["dataset"] == "isic2019"
    assert facts["imported"]["dataset"] == "ISIC2019"  # read from the EasyDict, as plain data


def test_study_grayscale_checkpoint_keeps_one_channel(tmp_path):
    ckpt, w, b = _study_checkpoint(tmp_path, 1, "CheXpert", 14)
    convert(ckpt, str(tmp_path / "gray"), "dinov2", DINO_CFG)
    config, _, _ = models.load_pretrained(str(tmp_path / "gray"))
    assert config.in_chans == 1
    # a 1-channel stem W[:, 0:1] on x equals the 3-channel upstream stem on (x, 0, 0)
    images = np.load(fixture_path("dinov2", "images.npy"))
    rgb = np.zeros_like(images)
    rgb[:, 0] = images[:, 0]
    convert(DINO_CKPT, str(tmp_path / "rgb"), "dinov2", DINO_CFG)
    got = embed_lib.embed(str(tmp_path / "gray"), images[:, :1])
    ref = embed_lib.embed(str(tmp_path / "rgb"), rgb)
    reference = torch.nn.functional.linear(torch.from_numpy(ref["x_norm_clstoken"]), w, b).numpy()
    assert np.abs(got["logits"] - reference).max() < PARITY_TOL
    assert pretrained.read_metadata(str(tmp_path / "gray"))["export"]["task"] == "multilabel"


def test_timm_head_checkpoint(tmp_path):
    state = torch.load(DINO_CKPT, weights_only=True)
    w, b = _linear(5, 48, 7)
    torch.save({"model": {**state, "head.weight": w, "head.bias": b}, "epoch": 3}, tmp_path / "timm.pth")
    meta = convert(str(tmp_path / "timm.pth"), str(tmp_path / "out"), "dinov2", DINO_CFG)
    assert meta["trained_head"]["layout"] == "timm"
    got = embed_lib.embed(str(tmp_path / "out"), np.load(fixture_path("dinov2", "images.npy")))
    cls = torch.from_numpy(np.load(fixture_path("dinov2", "expected.npz"))["x_norm_clstoken"])
    assert np.abs(got["logits"] - torch.nn.functional.linear(cls, w, b).numpy()).max() < PARITY_TOL


def test_transformers_dinov2_for_image_classification(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                       intermediate_size=192, patch_size=14, image_size=56, num_labels=4)
    model = perturb_(transformers.Dinov2ForImageClassification(config), seed=11).eval()
    model.save_pretrained(tmp_path / "hf")
    meta = convert(str(tmp_path / "hf"), str(tmp_path / "out"), "dinov2")
    assert meta["trained_head"]["layout"] == "transformers_dinov2_classification"
    images = np.load(fixture_path("dinov2", "images.npy"))
    with torch.no_grad():
        reference = model(pixel_values=torch.from_numpy(images)).logits.numpy()
    got = embed_lib.embed(str(tmp_path / "out"), images)
    assert np.abs(got["logits"] - reference).max() < PARITY_TOL


EVIL_SAVE = """
import os, sys, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + sys.argv[3],))
state = torch.load(sys.argv[1], weights_only=True)
torch.save({"net": state, "hook": Evil()}, sys.argv[2])
"""


def test_a_pickle_that_calls_code_is_refused_and_the_hint_names_the_weights_key(tmp_path):
    marker = tmp_path / "pwned"
    subprocess.run([sys.executable, "-c", EVIL_SAVE, DINO_CKPT, str(tmp_path / "evil.pth"), str(marker)], check=True)
    with pytest.raises(CheckpointError) as info:
        convert(str(tmp_path / "evil.pth"), str(tmp_path / "out"), "dinov2", DINO_CFG)
    message = str(info.value)
    assert "refused to load" in message and "os.system" in message.replace("posix.system", "os.system")
    assert "under 'net'" in message and not marker.exists()


def test_imported_study_model_predicts_and_a_run_starts_from_its_head(tmp_path):
    """`medjax.predict` applies the imported model to image files (its probabilities are the softmax of the logits
    `medjax.embed` gives on the same eval-transformed images), and a run with the same head and classes starts from
    the trained head (a different class count starts fresh)."""
    from PIL import Image

    from medjax import classifier, predict

    ckpt, w, b = _study_checkpoint(tmp_path, 3, "ISIC2019", 8)
    folder = str(tmp_path / "out")
    convert(ckpt, folder, "dinov2", DINO_CFG)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 255, (70, 60, 3), dtype=np.uint8)).save(paths[-1])
    model = trained.load_model(folder)
    with predict_config(model, image_size=56):
        records = predict.image_records(paths, model)
        probs, readable, failures = predict.predict(model, records, batch_size=4)
        batch = next(iter(model.loader(records, 4)[0]))
    assert readable.all() and not failures and probs.shape == (3, 8)
    logits = embed_lib.embed(folder, np.transpose(batch["image"][:3], (0, 3, 1, 2)))["logits"]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    assert np.abs(probs - expected / expected.sum(1, keepdims=True)).max() < 1e-5
    config = model.config
    _, variables = classifier.build_classifier(config.model, 8, 3, 56, __import__("jax").random.key(0))
    assert np.array_equal(variables["params"]["head"]["kernel"], w.numpy().T)
    _, fresh = classifier.build_classifier(config.model, 5, 3, 56, __import__("jax").random.key(0))
    assert fresh["params"]["head"]["kernel"].shape == (48, 5)


class predict_config:
    """Run the imported model at a small image size (the tiny DINOv2's 56 px) for speed."""

    def __init__(self, model, image_size):
        self.model, self.size = model, image_size

    def __enter__(self):
        self.old = self.model.config.image_size
        with self.model.config.unlocked():
            self.model.config.image_size = self.size

    def __exit__(self, *exc):
        with self.model.config.unlocked():
            self.model.config.image_size = self.old


@pytest.mark.slow
def test_full_size_dinov2_for_image_classification(tmp_path):
    """Full-size (ViT-B/14, 518 px stored grid, 224 px input) transformers Dinov2ForImageClassification with 14
    classes: logits to 1e-4."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(image_size=518, num_labels=14)
    model = perturb_(transformers.Dinov2ForImageClassification(config), seed=21).eval()
    model.save_pretrained(tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "out"), "dinov2")
    images = np.random.default_rng(3).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        reference = model(pixel_values=torch.from_numpy(images)).logits.numpy()
    got = embed_lib.embed(str(tmp_path / "out"), images)
    assert np.abs(got["logits"] - reference).max() < 1e-4


def test_grid_fetch_names_every_cell_and_says_the_size_first(tmp_path, monkeypatch, capsys):
    from medjax import grid as grid_lib

    grid = grid_lib.load_grid()
    needed = grid_lib.cell_weights(grid, grid.cells())
    assert all(needed.values()), [f for f, n in needed.items() if n is None]  # every cell has an official source
    cells = grid_lib.select(grid.cells(), grid_lib.parse_filter("model=dinov2_b,dataset=chexpert", grid.FILTER_AXES))
    assert grid_lib.cell_weights(grid, cells) == {"dinov2_vitb14": "dinov2_vitb14",
                                                  "deit_base_patch16_224": "deit_base_patch16_224"}
    monkeypatch.setenv("MEDJAX_HOME", str(tmp_path / "home"))
    fetched = []

    def fake_fetch(name, **kw):
        fetched.append(name)
        os.makedirs(tmp_path / "home" / name, exist_ok=True)
        return str(tmp_path / "home" / name)

    monkeypatch.setattr(weights, "fetch", fake_fetch)
    assert grid_lib.fetch_cells(grid, cells, str(tmp_path / "w")) == 0
    lines = capsys.readouterr().out.splitlines()
    size = registry.get("dinov2_vitb14").size + registry.get("deit_base_patch16_224").size
    assert lines[0] == f"{len(cells)} cells need 2 checkpoints; 2 to fetch, about {size / 1e9:,.2f} GB"
    assert sorted(fetched) == ["deit_base_patch16_224", "dinov2_vitb14"]
    assert os.path.realpath(tmp_path / "w" / "dinov2_vitb14") == str(tmp_path / "home" / "dinov2_vitb14")


def test_other_training_checkpoints_name_the_key_holding_the_weights(tmp_path):
    state = torch.load(DINO_CKPT, weights_only=True)
    torch.save({"net": state, "epoch": 3, "optimizer": {"state": {}}}, tmp_path / "train.pth")
    with pytest.raises(CheckpointError, match=r"its weights look to be under 'net' \(35 tensors\)"):
        convert(str(tmp_path / "train.pth"), str(tmp_path / "out"), "dinov2", DINO_CFG)


def test_a_user_given_url_replaces_the_registry_address(env, capsys, tmp_path):
    """Licence-gated files (DINOv3): the link the publisher sends is given with --url; the file is checked against
    the registry's digest and converted like the official one."""
    from converters.__main__ import main

    mirror, source, data = env
    signed = "https://download.example.org/dinov3/after-licence/tiny.pth"
    mirror.files = {_mirror_path(signed): data}  # the registry's own address is gone
    assert main(["fetch", source.name, "--quiet", "--url", signed]) == 0
    folder = capsys.readouterr().out.strip().splitlines()[-1]
    direct = tmp_path / "direct"
    convert(DINO_CKPT, str(direct), "dinov2", DINO_CFG)
    _same_folder(folder, str(direct))
    assert main(["fetch", source.name, "test_other", "--url", signed]) == 2
    assert "--url goes with a single NAME" in capsys.readouterr().err
    with pytest.raises(weights.WeightsError, match="not an http"):
        weights.fetch(source.name, url="file:///etc/passwd")


def test_a_grid_folder_never_converted_is_fetched_by_its_registry_name(env, tmp_path, capsys):
    """`{weights_dir}/{folder}` of a grid cell that nobody converted by hand: the folder's registry name is fetched
    (weights_dir is optional); an existing path and an unknown missing path stay as they are."""
    _, source, _ = env
    missing = str(tmp_path / "nowhere" / source.name)
    assert weights.resolve(missing) == missing  # outside the grid a missing path stays the user's error
    assert weights.resolve(missing, grid_folder=True) == weights.cache_dir(source.name)
    assert f"using the official weights {source.name}" in capsys.readouterr().err
    assert weights.resolve(str(tmp_path), grid_folder=True) == str(tmp_path)
    other = str(tmp_path / "not_a_registry_folder")
    assert weights.resolve(other, grid_folder=True) == other
