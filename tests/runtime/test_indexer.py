"""`index_gallery`'s output checks: every input of the run, the torch backend's checkpoint
included, is protected from `--force`."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from scan_deploy.bundle import load_bundle
from scan_deploy.errors import UserError

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def test_force_never_deletes_the_torch_backends_checkpoint(tmp_path):
    """A checkpoint kept inside the gallery folder was deleted with the old gallery."""
    from scan_deploy.runtime.backends import open_backend
    from scan_deploy.runtime.indexer import index_gallery

    from scan_deploy.checkpoint import save_checkpoint
    from scan_deploy.model import SCAN
    from tests.export.tiny_bundle import make_bundle

    bundle = load_bundle(make_bundle(tmp_path / "bundle"))
    torch.manual_seed(0)  # make_bundle's recipe: the bundle's weights
    save_checkpoint(tmp_path / "ckpt", SCAN(bundle.config).eval(), bundle.vocab)
    np.save(tmp_path / "ims.npy", np.random.default_rng(0).random((3, 5, 10), dtype=np.float32))
    gallery = tmp_path / "gallery"
    index_gallery(bundle, open_backend(bundle), tmp_path / "ims.npy", None, gallery, dtype="fp32")
    shutil.copytree(tmp_path / "ckpt", gallery / "ckpt")
    backend = open_backend(bundle, "torch", checkpoint=gallery / "ckpt")
    assert backend.checkpoint == gallery / "ckpt"
    with pytest.raises(UserError, match=f"^{gallery}: holds the input {gallery / 'ckpt'}; "):
        index_gallery(bundle, backend, tmp_path / "ims.npy", None, gallery, force=True)
    assert (gallery / "ckpt" / "model.safetensors").is_file()
