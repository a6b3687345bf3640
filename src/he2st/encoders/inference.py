"""Running an encoder on patches: device, precision, runtime, stain normalisation and TTA in one place.

Every path that turns tissue into features -- the patch caches of ``he2st embed`` and whole-slide
prediction -- goes through :class:`PatchEmbedder`, so a slide is encoded exactly the way the
training features were.
"""

from __future__ import annotations

import numpy as np
import torch

from he2st.data.embeddings import EmbedConfig
from he2st.data.views import tile_patches
from he2st.encoders.encoder import Encoder, pool_to_grid
from he2st.encoders.factory import create
from he2st.encoders.runtime import graph_runner, resolve_runtime
from he2st.encoders.stain import make_stain_normalizer
from he2st.encoders.tta import CHANNELS_FIRST, CHANNELS_LAST, embed_with_tta


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 on GPUs by default (pathology FMs are trained/used in half precision), fp32 on CPU."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "auto": torch.bfloat16}[precision]


def precision_label(config: EmbedConfig) -> str:
    """The arithmetic ``config`` embeds in, as embedding files record it: ``precision`` as set, except that
    ``auto`` on a GPU is written as the half precision it resolves to there (``auto`` on a CPU is fp32).

    ``auto`` means fp32 on one machine and bf16 on another, so a file made on a GPU must not pass for one
    made on a CPU (or be resumed there), and the reverse."""
    dtype = autocast_dtype(resolve_device(config.device), config.precision)
    if config.precision != "auto" or dtype is None:
        return config.precision
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def arithmetic(config: EmbedConfig) -> dict[str, str]:
    """What decides an embedding's floats beside the encoder and its weights: the precision (as files record
    it, :func:`precision_label`), the device type and the runtime ``config`` resolves to here. Work made under
    one must not be resumed, or reused, under another."""
    device = resolve_device(config.device)
    return {"precision": precision_label(config), "device": device.type,
            "runtime": resolve_runtime(config.runtime, device, autocast_dtype(device, config.precision))}


class PatchEmbedder:
    """uint8 patches ``(B, H, W, 3)`` -> float32 embeddings ``(B, D)`` (and token grids), encoded the
    way ``config`` says: device, precision, stain normalisation, test-time augmentation and runtime.

    Every path that turns tissue into features -- ``he2st embed`` and whole-slide prediction -- goes
    through this class, so a slide is encoded exactly the way the training features were. On a CPU
    the network runs in a validated ONNX graph (:mod:`he2st.encoders.runtime`) when
    ``config.runtime`` allows; :attr:`runtime` names the one in use, for the record.

    With ``tiles`` > 1 each patch is cut into ``tiles`` x ``tiles`` sub-patches, each enlarged to the
    encoder's input, and the patch's embedding is the mean of theirs (the ``tiles`` view; its token grid is
    not kept).
    """

    def __init__(self, encoder: Encoder, config: EmbedConfig, patch_px: int, token_grid: int = 0,
                 tiles: int = 1) -> None:
        self.encoder, self.tta, self.token_grid, self.tiles = encoder, config.tta, token_grid, tiles
        self.device = resolve_device(config.device)
        self.dtype = autocast_dtype(self.device, config.precision)
        self.stain = make_stain_normalizer(config.stain)[0] if config.stain != "none" else None
        encoder.to(self.device).eval()
        if self.device.type != "cpu":
            encoder.to(memory_format=torch.channels_last)
        self.runtime = resolve_runtime(config.runtime, self.device, self.dtype)
        # Patches already at the encoder's input size are normalised inside the graph.
        self._raw_input = patch_px // tiles == encoder.spec.input_size
        self._graph = None
        if self.runtime != "torch":
            self._graph = graph_runner(encoder, self.runtime, self._raw_input, bool(token_grid),
                                       torch.get_num_threads())
            if self._graph is None:
                self.runtime = "torch"

    def __call__(self, patches: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Embeddings ``(B, D)`` and, with ``token_grid`` > 0, the token grid ``(B, g², C)`` from the
        same forward pass (a second pass of the plain view under TTA)."""
        if self.stain is not None:
            patches = self.stain(np.asarray(patches))
        if self.tiles > 1:  # stain-normalised as a whole patch, then cut
            n = len(patches)
            pooled, _ = self._embed(tile_patches(np.asarray(patches), self.tiles))
            return pooled.reshape(n, self.tiles * self.tiles, -1).mean(1), None
        return self._embed(patches)

    def _embed(self, patches: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        if self._graph is None:
            x = self.encoder.preprocess(patches).to(self.device).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype,
                                                         enabled=self.dtype is not None):
                pooled, tokens = self._torch_forward(x)
        else:
            if self._raw_input:
                x = torch.from_numpy(np.ascontiguousarray(patches)) if isinstance(patches, np.ndarray) else patches
                dims = CHANNELS_LAST
            else:
                x, dims = self.encoder.preprocess(patches), CHANNELS_FIRST
            pooled, tokens = self._graph_forward(x, dims)
        return pooled.float().cpu().numpy(), None if tokens is None else tokens.float().cpu().numpy()

    def _torch_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.tta != "none":
            pooled = embed_with_tta(self.encoder, x, self.tta)
            features = self.encoder.forward_features(x) if self.token_grid else None
        else:
            features = self.encoder.forward_features(x)
            pooled = self.encoder.pool(features)
        tokens = self.encoder.grid_tokens(features, self.token_grid) if self.token_grid else None
        return pooled, tokens

    def _graph_forward(self, x: torch.Tensor, dims: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        def run(view: torch.Tensor) -> list[torch.Tensor]:
            return [torch.from_numpy(out) for out in self._graph(np.ascontiguousarray(view.numpy()))]

        if self.tta != "none":
            pooled = embed_with_tta(lambda view: run(view)[0], x, self.tta, dims)
            outputs = run(x) if self.token_grid else None
        else:
            outputs = run(x)
            pooled = outputs[0]
        tokens = pool_to_grid(outputs[1], self.token_grid, self.encoder.spec.name) if self.token_grid else None
        return pooled, tokens


def load_encoder(config: EmbedConfig) -> Encoder:
    return create(config.encoder, weights=config.weights)
