"""The vision encoder and multimodal prompts against transformers' Mistral3ForConditionalGeneration;
both checkpoint layouts, the real configuration, negative controls and bad input."""
import json
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import load
import model as model_module
import vision
from checkpoints import (REAL_PARAMS, TINY_PARAMS, TINY_VISION_PARAMS, forward_in_chunks, hf_mistral3_model,
                         hf_pixels, image_tokens, real_text_shapes, real_vision_shapes, write_native)
from config import parse_params
from load import build_model, load_model

TOL = 1e-4
BOS, EOS, INST, END_INST = 1, 2, 3, 4
VISION_HEADS = TINY_VISION_PARAMS["vision_encoder"]["num_attention_heads"]

_g = torch.Generator().manual_seed(0)


def text(n: int) -> list[int]:
    """n ordinary tokens (ids from 20 up: no control token, no [IMG])."""
    return torch.randint(20, TINY_PARAMS["vocab_size"], (n,), generator=_g).tolist()


def image(height: int, width: int) -> torch.Tensor:
    return torch.randn(3, height, width, generator=_g)


def prompt(*parts) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Token ids [1, S] and images from parts: lists of ids, and images (pixels [3, H, W]) that become
    their chat layout of [IMG] / [IMG_BREAK] / [IMG_END] tokens."""
    ids, images = [], []
    for part in parts:
        if isinstance(part, torch.Tensor):
            ids += image_tokens(part.shape[1] // 28, part.shape[2] // 28)
            images.append(part)
        else:
            ids += part
    return torch.tensor([ids]), images


CASES = {
    "one square image": prompt([BOS, INST], image(56, 56), text(5), [END_INST]),
    "one non-square image": prompt([BOS, INST], image(84, 56), text(5), [END_INST]),
    "two images of different sizes": prompt([BOS, INST], image(56, 84), image(112, 56), text(4), [END_INST]),
    "images in two turns": prompt([BOS, INST], image(56, 84), text(3), [END_INST], text(4), [EOS, INST],
                                  image(84, 84), text(3), [END_INST]),
    "text between images": prompt([BOS, INST], text(3), image(56, 84), text(5), image(56, 56), text(2), [END_INST]),
}
TWO_IMAGES = CASES["two images of different sizes"]
BATCH = [prompt(image(56, 84), text(9)), prompt(text(8), image(84, 56))]   # two rows of 17 tokens


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    folder = tmp_path_factory.mktemp("native_vision")
    return folder, write_native(folder, TINY_VISION_PARAMS)


@pytest.fixture(scope="module")
def ours(native):
    return load_model(native[0])


@pytest.fixture(scope="module")
def theirs(native):
    return hf_mistral3_model(native[1], TINY_VISION_PARAMS)


def max_diff(a, b):
    return (a - b).abs().max().item()


@torch.no_grad()
def hf_logits(hf, tokens, images):
    pixels, sizes = hf_pixels(images)
    return hf(input_ids=tokens, pixel_values=pixels, image_sizes=sizes).logits.float()


@torch.no_grad()
def compare(ours, theirs, case) -> float:
    tokens, images = case
    return max_diff(ours(tokens, images=images), hf_logits(theirs, tokens, images))


# ----------------------------------------------------------------------------- against transformers

@pytest.mark.parametrize("name", CASES)
def test_logits_equal_transformers(ours, theirs, name):
    tokens, images = CASES[name]
    ref = hf_logits(theirs, tokens, images)
    diff = compare(ours, theirs, CASES[name])
    print(f"{name}: {tokens.shape[1]} tokens, {len(images)} image(s): max abs diff {diff:.2e} "
          f"(logit scale {ref.abs().max():.2f})")
    assert diff <= TOL


@torch.no_grad()
def test_batch_of_two_prompts(ours, theirs):
    """Images fill the [IMG] tokens row after row of the batch, as in transformers."""
    (a, images_a), (b, images_b) = BATCH
    tokens, images = torch.cat([a, b]), images_a + images_b
    diff = max_diff(ours(tokens, images=images), hf_logits(theirs, tokens, images))
    print(f"batch of 2: max abs diff {diff:.2e}")
    assert diff <= TOL


@torch.no_grad()
def test_image_features_equal_transformers(ours, theirs):
    _, images = TWO_IMAGES
    pixels, sizes = hf_pixels(images)
    ref = torch.cat(theirs.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output)
    features = ours.image_features(images)
    assert features.shape == (2 * 3 + 4 * 2, TINY_PARAMS["dim"])
    diff = max_diff(features, ref)
    print(f"image features: max abs diff {diff:.2e} (scale {ref.abs().max():.2f})")
    assert diff <= TOL


@torch.no_grad()
def test_adapter_bias(tmp_path):
    params = json.loads(json.dumps(TINY_VISION_PARAMS))
    params["vision_encoder"]["adapter_bias"] = True
    weights = write_native(tmp_path, params, seed=1)
    m = load_model(tmp_path)
    assert m.vision_language_adapter.w_in.bias is not None and m.vision_language_adapter.w_out.bias is not None
    diff = compare(m, hf_mistral3_model(weights, params), TWO_IMAGES)
    print(f"adapter with biases: max abs diff {diff:.2e}")
    assert diff <= TOL


@torch.no_grad()
def test_prefill_with_cache_takes_images_per_chunk(ours):
    """Turn by turn through the cache, each chunk with the images of its own [IMG] tokens, then decoding:
    the same logits as one full forward."""
    tokens, images = CASES["images in two turns"]
    split = tokens[0].tolist().index(EOS) + 1                # the first turn and its answer
    full = ours(tokens, images=images)
    S = tokens.shape[1]
    chunked = forward_in_chunks(ours, tokens, [split, S - 3, S - 2, S - 1, S],
                                [images[:1], images[1:], None, None, None])
    diff = max_diff(chunked, full)
    print(f"two prefill chunks with one image each + 3 decode steps vs full forward: max abs diff {diff:.2e}")
    assert diff <= 1e-5


@torch.no_grad()
def test_bfloat16_load(native):
    m = load_model(native[0], dtype=torch.bfloat16)
    tokens, images = TWO_IMAGES
    assert m.image_features(images).dtype == torch.bfloat16
    logits = m(tokens, images=images)                    # float32 pixels, as preprocess_image makes them
    assert logits.dtype == torch.float32 and logits.isfinite().all()


# ----------------------------------------------------------------------------- negative controls

def _images_see_each_other(ours, monkeypatch):
    """All images through the tower as one sequence, unmasked: patches attend to the other images too."""
    enc = ours.vision_encoder

    def forward(images):
        patches = [enc.patch_conv(image[None])[0] for image in images]
        patch_grids = [tuple(p.shape[1:]) for p in patches]
        x = enc.ln_pre(torch.cat([p.flatten(1).T for p in patches]))
        tables = [vision.rope_2d(h, w, enc.args.head_dim, enc.args.rope_theta, x.device) for h, w in patch_grids]
        cos, sin = (torch.cat(t) for t in zip(*tables))
        return enc.transformer(x[None], cos, sin)[0], patch_grids
    monkeypatch.setattr(enc, "forward", forward)


def _row_major_merge(x, h, w, m):
    C = x.shape[-1]
    return x.view(h // m, m, w // m, m, C).permute(0, 2, 1, 3, 4).reshape(h // m * (w // m), C * m * m)


def _rope_2d_frequency_halves(h, w, head_dim, theta, device):
    """Rows on the first half of the frequencies, columns on the second (instead of alternating)."""
    freqs = model_module.rope_frequencies(head_dim, theta)
    rows = torch.arange(h).repeat_interleave(w).float()
    cols = torch.arange(w).repeat(h).float()
    half = freqs.shape[0] // 2
    angles = torch.cat((rows[:, None] * freqs[:half], cols[:, None] * freqs[half:]), dim=-1)
    return angles.cos(), angles.sin()


def _gelu_tower(ours, monkeypatch):
    for layer in ours.vision_encoder.transformer.layers:
        ff = layer.feed_forward
        monkeypatch.setattr(ff, "forward", lambda x, ff=ff: ff.w2(F.gelu(ff.w1(x)) * ff.w3(x)))


BREAKAGES = {
    "images attending to each other": _images_see_each_other,
    "GELU instead of SiLU in the tower": _gelu_tower,
    "row-major merger order": lambda ours, mp: mp.setattr(vision, "merge_patches", _row_major_merge),
    "2-D RoPE on frequency halves": lambda ours, mp: mp.setattr(vision, "rope_2d", _rope_2d_frequency_halves),
}


@pytest.mark.parametrize("name", BREAKAGES)
def test_negative_control(ours, theirs, monkeypatch, name):
    BREAKAGES[name](ours, monkeypatch)
    diff = compare(ours, theirs, TWO_IMAGES)
    print(f"{name}: max abs diff {diff:.2e}")
    assert diff > 100 * TOL


def test_negative_control_causal_tower(ours, theirs, monkeypatch):
    """One image runs the tower without a mask: its attention must still be full, not causal."""
    for layer in ours.vision_encoder.transformer.layers:
        monkeypatch.setattr(layer.attention, "causal", True)
    diff = compare(ours, theirs, CASES["one non-square image"])
    print(f"causal attention in the tower, one image: max abs diff {diff:.2e}")
    assert diff > 100 * TOL


def test_transformers_tower_wants_rotate_half_qk(native, ours):
    """Left in the native row order, the tower's wq / wk give transformers other logits: the Hugging Face
    layout permutes them, per vision head, as it does the text model's."""
    diff = compare(ours, hf_mistral3_model(native[1], TINY_VISION_PARAMS, permute_vision_qk=False), TWO_IMAGES)
    print(f"vision wq / wk not permuted for transformers: max abs diff {diff:.2e}")
    assert diff > 100 * TOL


# ----------------------------------------------------------------------------- the Hugging Face layout

@pytest.fixture(scope="module")
def hf_folder(theirs, tmp_path_factory):
    """transformers' own save_pretrained: sharded, with the official file's key names."""
    folder = tmp_path_factory.mktemp("hf_vision")
    theirs.save_pretrained(folder, max_shard_size="100KB")
    return folder


@torch.no_grad()
def test_hf_layout_equals_native(hf_folder, ours):
    keys = set()
    for path in hf_folder.glob("model-*.safetensors"):
        with safe_open(path, "pt") as f:
            keys |= set(f.keys())
    assert {"vision_tower.patch_conv.weight", "multi_modal_projector.linear_1.weight",
            "language_model.lm_head.weight"} <= keys
    from_hf = load_model(hf_folder)
    # config.json has no [IMG_BREAK] / [IMG_END] ids, which the model does not use
    assert from_hf.args == ours.args
    assert from_hf.vision_args == replace(ours.vision_args, image_break_token_id=None, image_end_token_id=None)
    tokens, images = CASES["images in two turns"]
    diff = max_diff(from_hf(tokens, images=images), ours(tokens, images=images))
    print(f"Hugging Face layout (official key names) vs native: max abs diff {diff:.2e}")
    assert diff == 0.0


@torch.no_grad()
def test_hf_layout_newer_key_names(hf_folder, ours, theirs, tmp_path):
    """model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*, lm_head."""
    shutil.copy(hf_folder / "config.json", tmp_path)
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, tmp_path / "model.safetensors")
    tokens, images = TWO_IMAGES
    diff = max_diff(load_model(tmp_path)(tokens, images=images), ours(tokens, images=images))
    print(f"Hugging Face layout (newer key names) vs native: max abs diff {diff:.2e}")
    assert diff == 0.0


@torch.no_grad()
def test_negative_control_loader_keeps_vision_qk_rotate_half(hf_folder, ours, monkeypatch):
    real = load.unpermute_rotary
    monkeypatch.setattr(load, "unpermute_rotary", lambda w, n: w if n == VISION_HEADS else real(w, n))
    tokens, images = TWO_IMAGES
    diff = max_diff(load_model(hf_folder)(tokens, images=images), ours(tokens, images=images))
    print(f"loader without the vision un-permutation: max abs diff {diff:.2e}")
    assert diff > 100 * TOL


def test_hf_config_with_gelu_tower(hf_folder, tmp_path):
    for path in hf_folder.iterdir():
        shutil.copy(path, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vision_config.hidden_act is 'gelu'; this model needs 'silu'"):
        load_model(tmp_path)


# ----------------------------------------------------------------------------- the real configuration

def test_real_configuration_on_meta_device():
    with torch.device("meta"):
        m = build_model(*parse_params(REAL_PARAMS))
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == real_text_shapes() | real_vision_shapes()
    assert len(shapes) == 585
    counts = {"text": 0, "vision tower": 0, "projector": 0}
    for name, p in m.named_parameters():
        part = ("vision tower" if name.startswith("vision_encoder.") else
                "projector" if name.startswith(("pre_mm_projector_norm.", "patch_merger.", "vision_language_adapter."))
                else "text")
        counts[part] += p.numel()
    assert counts == {"text": 23_572_403_200, "vision tower": 403_305_472, "projector": 35_652_608}
    assert sum(counts.values()) == 24_011_361_280


# ----------------------------------------------------------------------------- text-only models

@pytest.fixture(scope="module")
def text_only(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text_only")
    write_native(folder, TINY_PARAMS)
    return load_model(folder)


def test_text_only_model_rejects_images(text_only):
    tokens, images = CASES["one square image"]
    assert text_only(tokens).shape == (1, tokens.shape[1], TINY_PARAMS["vocab_size"])   # [IMG] is a token like any
    with pytest.raises(ValueError, match="text-only .* cannot take images"):
        text_only(tokens, images=images)
    with pytest.raises(ValueError, match="text-only .* cannot take images"):
        text_only.image_features(images)


def test_vision_weights_for_a_text_only_params(native, tmp_path):
    shutil.copy(native[0] / "consolidated.safetensors", tmp_path)
    (tmp_path / "params.json").write_text(json.dumps(TINY_PARAMS))
    with pytest.raises(ValueError, match="unexpected tensor 'patch_merger.merging_layer.weight': .* no such weight"):
        load_model(tmp_path)


def test_params_without_patch_merger(native, tmp_path):
    shutil.copy(native[0] / "consolidated.safetensors", tmp_path)
    params = json.loads(json.dumps(TINY_VISION_PARAMS))
    params["vision_encoder"]["mm_projector_id"] = ""
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="mm_projector_id '' .* not supported"):
        load_model(tmp_path)


# ----------------------------------------------------------------------------- bad input

SQUARE, WIDE = image(56, 56), image(56, 84)
BAD = {
    "more [IMG] tokens than images": (prompt(SQUARE, text(2), WIDE)[0], [SQUARE], "image 1 is missing"),
    "[IMG] tokens and no images": (prompt(SQUARE)[0], None, "image 0 is missing"),
    "more images than [IMG] tokens": (prompt(SQUARE)[0], [SQUARE, WIDE], r"image 1: no \[IMG\] tokens left"),
    "an image of another shape than its tokens": (prompt(WIDE)[0], [image(84, 56)],
                                                  r"image 0: its 3 x 2 image tokens need 3 runs of 2"),
    "a size not a multiple of 28": (prompt(SQUARE, WIDE)[0], [SQUARE, image(56, 70)],
                                    r"image 1: size 56x70 \(H x W\) is not a multiple of 28"),
    "4 channels": (prompt(SQUARE, SQUARE)[0], [SQUARE, torch.randn(4, 56, 56)],
                   r"image 1: expected pixels \[3, H, W\], got \(4, 56, 56\)"),
    "channels last": (prompt(SQUARE)[0], [torch.randn(56, 56, 3)], r"image 0: expected pixels \[3, H, W\]"),
    "a batch dimension": (prompt(SQUARE)[0], [torch.randn(1, 3, 56, 56)], r"image 0: expected pixels \[3, H, W\]"),
    "uint8 pixels": (prompt(SQUARE)[0], [torch.zeros(3, 56, 56, dtype=torch.uint8)],
                     "image 0: expected normalized float pixels"),
    "a tensor, not a list": (prompt(SQUARE)[0], SQUARE[None], "images: expected a list"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input(ours, name):
    tokens, images, message = BAD[name]
    with pytest.raises(ValueError, match=message):
        ours(tokens, images=images)


def test_image_features_bad_input(ours):
    with pytest.raises(ValueError, match=r"image 1: size 56x70"):
        ours.image_features([SQUARE, image(56, 70)])
