"""The digest of a model's weights that `export` records in a bundle's manifest
(`weights.sha256`), and the check that a checkpoint holds the bundle's weights (`compare` and the
torch backend). Neither imports torch: the digest takes a state dict of tensors already loaded.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scan_deploy.bundle import MANIFEST, Bundle
from scan_deploy.errors import UserError
from scan_deploy.jsonfile import typed

LOG = logging.getLogger(__name__)


def weights_digest(state: Mapping[str, Any]) -> str:
    """The sha256 of a model's weights as loaded (its state dict), whatever file they came from:
    a scan-deploy checkpoint and an original `.pth.tar` of the same weights give the same digest.
    For each tensor in name order: `name`, `dtype` and `shape` (a line each), then its bytes in
    C order and the machine's byte order (little-endian on every platform PyTorch supports)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\n{tensor.dtype}\n{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def check_weights(bundle: Bundle, digest: str, source: str | Path) -> None:
    """The checkpoint's weights digest is the one recorded at export (one-line UserError
    otherwise); a bundle that records none gets one warning."""
    manifest_path = bundle.path / MANIFEST
    recorded = bundle.manifest.get("weights")
    if recorded is None:
        LOG.warning(
            "%s: records no weights digest (exported before bundles recorded one): cannot check "
            "that %s holds the bundle's weights (re-export the bundle to record it)",
            manifest_path,
            source,
        )
        return
    expected = typed(recorded, dict, "weights", manifest_path).get("sha256")
    typed(expected, str, "weights.sha256", manifest_path)
    if digest != expected:
        raise UserError(
            f"{source}: not the checkpoint of {manifest_path}: its weights digest is "
            f"{digest[:12]}…, the bundle was exported from weights with digest {expected[:12]}…"
        )
