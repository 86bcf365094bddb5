"""The PyTorch backend: the reference model, answering exactly what each graph outputs.

For checking the other backends against the model a bundle was exported from (and for running
where only PyTorch is installed). It needs the checkpoint (`checkpoint=`: a scan-deploy
checkpoint folder, or an original SCAN `.pth.tar`, read with the bundle's vocabulary) whose
config, vocabulary and weights must be the bundle's: the weights by the digest the export records
in the manifest (`weights.sha256`, see `scan_deploy.weights`); a bundle exported before digests were
recorded is opened with a warning that its weights cannot be checked. torch is imported when
this backend is opened, never by `import scan_deploy.runtime`.

The runners compute the graphs' outputs as `scan_deploy.export.verify.reference_outputs` does:
- image_encoder: regions = img_enc(features), region_gram(regions), pooled_embedding(regions);
- text_encoder: words = txt_enc(tokens, lengths), caption_gram(words),
  pooled_embedding(words, lengths);
- scorer: score_block(regions, words, lengths, config, gram) with the Gram the graph takes
  (`region_gram` for t2i, `caption_gram` for i2t).

Gallery blocks can stay on the device (`resident`): exhaustive search uploads each block once,
dequantized, and scores later queries against the device copy, so a block no longer goes
host → device for every query (`runtime.search.GalleryScorer`). Up to `resident_bytes`: on CUDA
half the device memory free when the backend opens, on the CPU 0 (the blocks are already in host
memory there; a copy would only save their dequantization).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from scan_deploy.runtime.backends.base import RunnerCache, as_output, prepare_feeds

from scan_deploy.bundle import MANIFEST, Bundle
from scan_deploy.choices import Graph, Precision
from scan_deploy.errors import UserError
from scan_deploy.weights import check_weights, weights_digest

LOG = logging.getLogger("scan_deploy.runtime")
INSTALL_HINT = "the torch backend needs PyTorch: pip install 'scan-deploy[reference]'"
_FP32_LOCK = threading.Lock()


def import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return torch


def check_checkpoint(bundle: Bundle, config: Any, vocab: Any, source: str | Path) -> None:
    """The checkpoint's config and vocabulary are the bundle's (one-line UserError otherwise)."""
    ours, theirs = bundle.config.to_dict(), config.to_dict()
    differing = [k for k in ours if ours[k] != theirs.get(k)]
    if differing:
        details = ", ".join(f"{k} {theirs.get(k)!r} (bundle: {ours[k]!r})" for k in differing)
        raise UserError(
            f"{source}: not the checkpoint of {bundle.path / MANIFEST}: its config has {details}"
        )
    if vocab != bundle.vocab:
        raise UserError(
            f"{source}: not the checkpoint of {bundle.path / MANIFEST}: its vocabulary "
            f"({len(vocab)} words, sha256 {vocab.sha256()[:12]}…) differs from the bundle's "
            f"({len(bundle.vocab)} words, sha256 {bundle.vocab.sha256()[:12]}…)"
        )


class TorchRunner:
    def __init__(self, graph: Graph, entry: Mapping[str, Any], backend: TorchBackend) -> None:
        self.graph = graph
        self.inputs: list[dict[str, Any]] = entry["inputs"]
        self.outputs: list[dict[str, Any]] = entry["outputs"]
        self._backend = backend
        self._names = [value["name"] for value in self.outputs]

    def close(self) -> None:
        """Nothing of its own: the model and the device budget are the backend's."""

    def run(self, feeds: Mapping[str, Any]) -> list[np.ndarray]:
        """Feeds are numpy arrays, or tensors `TorchBackend.resident` already put on the device
        (checked when they were read from the gallery)."""
        torch = self._backend.torch
        resident = {name: v for name, v in feeds.items() if isinstance(v, torch.Tensor)}
        host = [value for value in self.inputs if value["name"] not in resident]
        arrays = prepare_feeds(self.graph, host, feeds)
        device = self._backend.device
        tensors = {  # memory-mapped inputs are read-only: torch needs its own copy of those
            name: torch.from_numpy(array if array.flags.writeable else array.copy()).to(device)
            for name, array in arrays.items()
        }
        tensors.update(resident)
        with torch.inference_mode(), self._backend.fp32():
            results = self._backend.compute(self.graph, tensors)
        missing = [name for name in self._names if name not in results]
        if missing:  # the manifest names an output the reference does not compute
            raise UserError(f"{self.graph}: the torch backend has no output {missing[0]!r}")
        return [as_output(results[name].detach().cpu().numpy()) for name in self._names]


class TorchBackend(RunnerCache):
    def __init__(
        self,
        bundle: Bundle,
        precision: Precision = Precision.FP32,
        checkpoint: str | Path | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__()
        if precision != Precision.FP32:
            raise UserError(
                f"precision: the torch backend runs the fp32 reference, not {precision} "
                "(run fp16/int8 graphs on onnxruntime or tensorrt)"
            )
        if checkpoint is None:
            raise UserError(
                "the torch backend needs the checkpoint the bundle was exported from "
                "(pass checkpoint=, on the command line --checkpoint)"
            )
        self.torch = torch = import_torch()
        try:
            from scan_deploy import scoring
            from scan_deploy.checkpoint import load_checkpoint
        except ImportError as exc:  # safetensors
            raise UserError(f"{INSTALL_HINT} ({exc.name} is missing)") from None
        self._scoring = scoring
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise UserError(f"device: got {device!r}, expected cpu, cuda or cuda:N") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {device}: this PyTorch sees no CUDA device")
        if self.device.type == "cuda" and (self.device.index or 0) >= torch.cuda.device_count():
            raise UserError(
                f"device {device}: this PyTorch sees {torch.cuda.device_count()} CUDA device(s)"
            )
        loaded = load_checkpoint(checkpoint, bundle.path / bundle.manifest["vocab"]["file"])
        check_checkpoint(bundle, loaded.config, loaded.vocab, checkpoint)
        check_weights(bundle, weights_digest(loaded.model.state_dict()), checkpoint)
        self.bundle = bundle
        self.checkpoint = Path(checkpoint)  # an input `index --force` must not delete
        self.precision = precision
        self.config = loaded.config
        self.model = loaded.model.eval().to(self.device)
        self.name = f"torch {self.device}"
        self.resident_bytes = (
            torch.cuda.mem_get_info(self.device)[0] // 2 if self.device.type == "cuda" else 0
        )
        self._resident_used = 0
        self._resident_lock = threading.Lock()

    def resident(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
        """Device copies of one gallery block's scorer inputs (float32 / int64, as the scorer
        takes them; arrays it does not take, such as the region Gram of an i2t model, are left
        out), or None once they would pass `resident_bytes`."""
        inputs = {
            value["name"]: value["dtype"] for value in self.bundle.graph(Graph.SCORER)["inputs"]
        }
        host = {
            name: np.ascontiguousarray(array, dtype=inputs[name])
            for name, array in arrays.items()
            if name in inputs
        }
        size = sum(array.nbytes for array in host.values())
        with self._resident_lock:
            if self._resident_used + size > self.resident_bytes:
                return None
            self._resident_used += size
        torch = self.torch
        return {name: torch.from_numpy(array).to(self.device) for name, array in host.items()}

    def release(self, blocks: list[dict[str, Any]]) -> None:
        """Give back the budget of device blocks `resident` made, which a scorer dropped."""
        size = sum(t.element_size() * t.nelement() for block in blocks for t in block.values())
        with self._resident_lock:
            self._resident_used = max(0, self._resident_used - size)

    def close(self) -> None:
        """The runners, and the resident budget (its blocks are freed with the scorers that
        hold them, `GalleryScorer.close`)."""
        super().close()
        with self._resident_lock:
            self._resident_used = 0

    def _open(self, graph: Graph) -> TorchRunner:
        return TorchRunner(graph, self.bundle.graph(graph), self)

    @contextmanager
    def fp32(self) -> Iterator[None]:
        """On CUDA, cuDNN's RNNs in IEEE fp32 for the duration: PyTorch lets them use TF32 by
        default (`torch.backends.cudnn.rnn.fp32_precision == "tf32"`, 10-bit mantissas), which
        would take the reference GRU outside the export's 1e-5 tolerance. The setting is
        process-wide, so it is changed and restored under a lock (CUDA runs are serialized)."""
        if self.device.type != "cuda":
            yield
            return
        cudnn = self.torch.backends.cudnn
        rnn = getattr(cudnn, "rnn", None)
        # PyTorch >= 2.9 sets TF32 per operation; older versions have the one cuDNN flag.
        holder, name, value = (
            (rnn, "fp32_precision", "ieee")
            if hasattr(rnn, "fp32_precision")
            else (cudnn, "allow_tf32", False)
        )
        with _FP32_LOCK:
            saved = getattr(holder, name)
            setattr(holder, name, value)
            try:
                yield
            finally:
                setattr(holder, name, saved)

    def compute(self, graph: Graph, x: dict[str, Any]) -> dict[str, Any]:
        """The outputs of `graph` by name, from its inputs by name (torch tensors)."""
        scoring, model = self._scoring, self.model
        if graph == Graph.IMAGE_ENCODER:
            regions = model.img_enc(x["features"])
            return {
                "regions": regions,
                "region_gram": scoring.region_gram(regions),
                "global": scoring.pooled_embedding(regions),
            }
        if graph == Graph.TEXT_ENCODER:
            words = model.txt_enc(x["tokens"], x["lengths"])
            return {
                "words": words,
                "caption_gram": scoring.caption_gram(words),
                "global": scoring.pooled_embedding(words, x["lengths"]),
            }
        gram = x.get("region_gram" if self.config.cross_attn == "t2i" else "caption_gram")
        similarity = scoring.score_block(
            x["regions"], x["words"], x["lengths"], self.config, gram=gram
        )
        return {"similarity": similarity}
