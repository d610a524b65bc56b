"""The text transformer against transformers' MistralForCausalLM, the cache, both layouts, bad input."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import load
import model as model_module
from checkpoints import (REAL_TEXT_PARAMS, TINY_PARAMS, forward_in_chunks, hf_text_model, native_to_hf_text,
                         real_text_shapes, write_native)
from config import parse_params
from load import build_model, load_model

TOL = 1e-4
LENGTHS = (1, 7, 64)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    folder = tmp_path_factory.mktemp("native")
    weights = write_native(folder)
    return folder, weights


@pytest.fixture(scope="module")
def ours(native):
    return load_model(native[0])


@pytest.fixture(scope="module")
def theirs(native):
    return hf_text_model(native[1], TINY_PARAMS)


def tokens(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed + length)
    return torch.randint(0, TINY_PARAMS["vocab_size"], (batch, length), generator=g)


def max_diff(a, b):
    return (a - b).abs().max().item()


@torch.no_grad()
def hf_logits(hf, toks):
    return hf(toks).logits.float()


@torch.no_grad()
@pytest.mark.parametrize("length", LENGTHS)
def test_logits_equal_transformers(ours, theirs, length):
    toks = tokens(3, length)
    ref = hf_logits(theirs, toks)
    out = ours(toks)
    assert out.dtype == torch.float32 and out.shape == (3, length, TINY_PARAMS["vocab_size"])
    diff = max_diff(out, ref)
    print(f"length {length}: max abs diff {diff:.2e} (logit scale {ref.abs().max():.2f})")
    assert diff <= TOL


@torch.no_grad()
def test_cache_decode_equals_full_forward(ours):
    toks = tokens(2, 40, seed=1)
    full = ours(toks)
    decoded = forward_in_chunks(ours, toks, [9] + list(range(10, 41)))   # prefill 9, then one token at a time
    diff = max_diff(decoded, full)
    print(f"prefill 9 + 31 decode steps vs full forward: max abs diff {diff:.2e}")
    assert diff <= 1e-5


@torch.no_grad()
def test_negative_control_rotate_half_rope(ours, theirs, monkeypatch):
    """A rotate-half RoPE on native weights must be caught."""
    def rotate_half_rope(x, cos, sin):
        x1, x2 = x.float().chunk(2, dim=-1)
        cos, sin = cos[:, None, :], sin[:, None, :]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)
    monkeypatch.setattr(model_module, "apply_rope", rotate_half_rope)
    toks = tokens(2, 16)
    assert max_diff(ours(toks), hf_logits(theirs, toks)) > 100 * TOL


@torch.no_grad()
def test_negative_control_wk_permuted_with_query_heads(native, ours):
    """Permuting wk with n_heads instead of n_kv_heads (a classic GQA conversion bug) must be caught."""
    wrong = hf_text_model(native[1], TINY_PARAMS, kv_heads_for_wk=TINY_PARAMS["n_heads"])
    toks = tokens(2, 16)
    assert max_diff(ours(toks), hf_logits(wrong, toks)) > 100 * TOL


@torch.no_grad()
def test_negative_control_loader_unpermutes_wk_with_query_heads(native, ours, theirs, tmp_path, monkeypatch):
    theirs.save_pretrained(tmp_path)
    real = load.unpermute_rotary
    monkeypatch.setattr(load, "unpermute_rotary", lambda w, n: real(w, TINY_PARAMS["n_heads"]))
    toks = tokens(2, 16)
    assert max_diff(load_model(tmp_path)(toks), ours(toks)) > 100 * TOL


@torch.no_grad()
def test_negative_control_no_causal_mask(ours, theirs, monkeypatch):
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def unmasked(q, k, v, attn_mask=None, is_causal=False, **kw):
        return real_sdpa(q, k, v, **kw)
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", unmasked)
    toks = tokens(2, 16)
    assert max_diff(ours(toks), hf_logits(theirs, toks)) > 100 * TOL


@torch.no_grad()
def test_hf_layout_equals_native(native, ours, theirs, tmp_path):
    """transformers' own save_pretrained (sharded, with an index) loads to the same logits."""
    theirs.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    from_hf = load_model(tmp_path)
    toks = tokens(2, 24)
    assert max_diff(from_hf(toks), ours(toks)) == 0.0


@torch.no_grad()
def test_split_consolidated_files(native, ours, tmp_path):
    weights = native[1]
    names = sorted(weights)
    shutil.copy(native[0] / "params.json", tmp_path)
    save_file({k: weights[k] for k in names[:10]}, tmp_path / "consolidated-00001-of-00002.safetensors")
    save_file({k: weights[k] for k in names[10:]}, tmp_path / "consolidated-00002-of-00002.safetensors")
    toks = tokens(1, 8)
    assert max_diff(load_model(tmp_path)(toks), ours(toks)) == 0.0


def test_bfloat16_load(native):
    m = load_model(native[0], dtype=torch.bfloat16)
    assert m.output.weight.dtype == torch.bfloat16
    assert m(tokens(1, 5)).dtype == torch.float32


def test_tall_float32_matrices_are_held_column_major(native, ours):
    """The layout that one-token matrix-vector products read fastest on the CPU (model._column_major):
    tall float32 weights column-major, wide ones, the embedding table and bfloat16 weights row-major."""
    def column_major(w):
        return w.stride() == (1, w.shape[0])
    layer = ours.layers[0]
    assert all(column_major(w) for w in (ours.output.weight, layer.attention.wq.weight, layer.feed_forward.w1.weight,
                                         layer.feed_forward.w3.weight))
    assert not any(column_major(w) for w in (ours.tok_embeddings.weight, layer.attention.wk.weight,
                                             layer.attention.wo.weight, layer.feed_forward.w2.weight))
    assert not column_major(load_model(native[0], dtype=torch.bfloat16).layers[0].feed_forward.w1.weight)


def test_real_configuration_on_meta_device():
    args, vision = parse_params(REAL_TEXT_PARAMS)
    with torch.device("meta"):
        m = build_model(args, vision)
    assert sum(p.numel() for p in m.parameters()) == 23_572_403_200
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == real_text_shapes()
    assert len(shapes) == 363


# ----------------------------------------------------------------------------- bad input

def _copy(native, tmp_path):
    shutil.copy(native[0] / "params.json", tmp_path)
    shutil.copy(native[0] / "consolidated.safetensors", tmp_path)
    return tmp_path


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_model(tmp_path / "nope")


def test_folder_without_params(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.json"):
        load_model(tmp_path)


def test_folder_without_weights(native, tmp_path):
    shutil.copy(native[0] / "params.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="consolidated.safetensors"):
        load_model(tmp_path)


def test_params_not_json(native, tmp_path):
    _copy(native, tmp_path)
    (tmp_path / "params.json").write_text("{dim: 5120")
    with pytest.raises(ValueError, match="params.json: not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "params.json").write_bytes(b"\xff\xfe{")                 # not UTF-8 either
    with pytest.raises(ValueError, match="params.json: not valid JSON"):
        load_model(tmp_path)


def test_params_missing_field(native, tmp_path):
    _copy(native, tmp_path)
    params = dict(TINY_PARAMS)
    del params["n_kv_heads"]
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"params.json: missing required field\(s\) \['n_kv_heads'\]"):
        load_model(tmp_path)


def test_params_unknown_field_warns(native, tmp_path):
    _copy(native, tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({**TINY_PARAMS, "shiny_new_thing": 1}))
    with pytest.warns(UserWarning, match="shiny_new_thing"):
        load_model(tmp_path)


def test_params_unsupported_field(native, tmp_path):
    _copy(native, tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({**TINY_PARAMS, "sliding_window": 4096}))
    with pytest.raises(ValueError, match="sliding_window"):
        load_model(tmp_path)


def _rewrite(native, tmp_path, change):
    shutil.copy(native[0] / "params.json", tmp_path)
    weights = dict(native[1])
    change(weights)
    save_file(weights, tmp_path / "consolidated.safetensors")
    return tmp_path


def test_missing_tensor(native, tmp_path):
    _rewrite(native, tmp_path, lambda w: w.pop("layers.1.ffn_norm.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['layers.1.ffn_norm.weight'\]"):
        load_model(tmp_path)


def test_unexpected_tensor(native, tmp_path):
    _rewrite(native, tmp_path, lambda w: w.update({"layers.7.attention.wq.weight": torch.zeros(64, 48)}))
    with pytest.raises(ValueError, match="unexpected tensor 'layers.7.attention.wq.weight'"):
        load_model(tmp_path)


def test_wrong_shape(native, tmp_path):
    _rewrite(native, tmp_path, lambda w: w.update({"layers.0.attention.wk.weight": torch.zeros(64, 48)}))
    with pytest.raises(ValueError, match=r"'layers.0.attention.wk.weight' has shape \(64, 48\), expected \(16, 48\)"):
        load_model(tmp_path)


def test_truncated_safetensors(native, tmp_path):
    _copy(native, tmp_path)
    path = tmp_path / "consolidated.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="consolidated.safetensors: not a readable safetensors file"):
        load_model(tmp_path)


def test_context_too_long_for_cache(ours):
    with pytest.raises(ValueError, match="exceeds the model's context of 4096"):
        ours.setup_cache(1, 4097)


def test_input_pos_without_cache(native):
    m = load_model(native[0])
    with pytest.raises(ValueError, match="setup_cache"):
        m(tokens(1, 3), input_pos=torch.arange(3))


@torch.no_grad()
def test_last_only_logits_are_the_last_position(ours):
    toks = tokens(2, 12)
    last = ours(toks, last_only=True)
    assert last.shape == (2, 1, TINY_PARAMS["vocab_size"])
    assert max_diff(last, ours(toks)[:, -1:]) <= 1e-5


def test_hf_config_without_head_dim_is_refused(ours, theirs, tmp_path):
    """transformers would take dim / n_heads (6 here, 160 for the real model): wrong for this model."""
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: missing required field\(s\) \['head_dim'\]"):
        load_model(tmp_path)
