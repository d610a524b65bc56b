"""GGUF files written by the tests from tiny native checkpoints, as llama.cpp's converter lays them out.

Names and keys follow ../shared/GGUF.md (llama.cpp's conversion): text tensors token_embd, blk.N.attn_q ...,
wq / wk rows in the native interleaved order (no permutation); the mmproj's v.*, mm.* under arch "clip".
The float and legacy types are written by gguf's own quantizer; gguf cannot write K types, so Q2_K, Q4_K,
Q5_K and Q6_K blocks are packed here by a plain min / max quantizer: real approximations of the float weights (a
random block would be noise), bit-packed as ggml lays them out and read back through gguf's dequantize.
"""
import base64

import re

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as GGML
from gguf.quants import dequantize, quantize

from checkpoints import real_text_shapes
from gguf_file import byte_alphabet

# Dims that whole 256-weight K blocks divide: D 512, H 4 x Dh 64 = 256 (!= D / H = 128), K 2 (GQA 2:1),
# hidden 768 = 3 x 256, an untied head.
QUANT_PARAMS = {"dim": 512, "n_layers": 2, "head_dim": 64, "hidden_dim": 768, "n_heads": 4, "n_kv_heads": 2,
                "rope_theta": 1000000000.0, "norm_eps": 1e-05, "vocab_size": 1000, "max_position_embeddings": 4096}

TEXT_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
              "attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
              "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
              "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down"}
VISION_NAMES = {"vision_encoder.patch_conv": "v.patch_embd", "vision_encoder.ln_pre": "v.pre_ln",
                "attention_norm": "ln1", "ffn_norm": "ln2", "attention.wq": "attn_q", "attention.wk": "attn_k",
                "attention.wv": "attn_v", "attention.wo": "attn_out", "feed_forward.w1": "ffn_gate",
                "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down",
                "pre_mm_projector_norm": "mm.input_norm", "patch_merger.merging_layer": "mm.patch_merger",
                "vision_language_adapter.w_in": "mm.1", "vision_language_adapter.w_out": "mm.2"}


def gguf_name(native: str) -> str:
    stem, _, suffix = native.rpartition(".")
    if stem.startswith("vision_encoder.transformer.layers."):
        i, part = stem[len("vision_encoder.transformer.layers."):].split(".", 1)
        return f"v.blk.{i}.{VISION_NAMES[part]}.{suffix}"
    if stem.startswith("layers."):
        i, part = stem[len("layers."):].split(".", 1)
        return f"blk.{i}.{TEXT_NAMES[part]}.{suffix}"
    return f"{VISION_NAMES.get(stem) or TEXT_NAMES[stem]}.{suffix}"


# ----------------------------------------------------------------------------- K-quant packing

def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(len(x), 2)


def _affine(x: np.ndarray, levels: int, scale_bits: int):
    """Sub-blocks x [N, S, n] as w = d * sc * q - dmin * m: q in 0..levels, sc and m of scale_bits bits.
    Returns d, dmin [N], sc, m [N, S] and q [N, S, n] as integers."""
    top = (1 << scale_bits) - 1
    lo = np.minimum(x.min(-1), 0)
    step = (x.max(-1) - lo) / levels                                     # [N, S]
    d = np.maximum(step.max(-1), 1e-12) / top
    dmin = np.maximum((-lo).max(-1), 1e-12) / top
    d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(step / d[:, None]), 1, top)
    m = np.clip(np.round(-lo / dmin[:, None]), 0, top)
    scale, offset = (d[:, None] * sc)[..., None], (dmin[:, None] * m)[..., None]
    q = np.clip(np.round((x + offset) / scale), 0, levels)
    return d, dmin, sc.astype(np.uint8), m.astype(np.uint8), q.astype(np.uint8)


def pack_q4_k(w: np.ndarray) -> np.ndarray:
    """float32 [R, C] -> Q4_K rows [R, C / 256 * 144]: d, dmin, 12 bytes of 6-bit scales and mins, 128
    bytes holding sub-blocks 2k (low nibbles) and 2k + 1 (high) in each 32."""
    rows = w.shape[0]
    d, dmin, sc, m, q = _affine(w.reshape(-1, 8, 32), 15, 6)
    qs = (q[:, 0::2] | q[:, 1::2] << 4).reshape(len(d), 128)
    return np.concatenate([_fp16(d), _fp16(dmin), _scales_k4(sc, m), qs], axis=1).reshape(rows, -1)


def pack_q2_k(w: np.ndarray) -> np.ndarray:
    """float32 [R, C] -> Q2_K rows [R, C / 256 * 84]: 16 bytes of (scale | min << 4), 64 bytes of 2-bit
    codes (each half of 128 weights: 32 bytes x 4 shifts), d, dmin."""
    rows = w.shape[0]
    d, dmin, sc, m, q = _affine(w.reshape(-1, 16, 16), 3, 4)
    q = q.reshape(len(d), 2, 4, 32)                                        # [N, half, shift, byte]
    qs = (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(len(d), 64)
    return np.concatenate([sc | m << 4, qs, _fp16(d), _fp16(dmin)], axis=1).reshape(rows, -1)


def _scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 scales and 8 mins of 6 bits [N, 8] -> the 12 bytes of Q4_K / Q5_K."""
    s = np.zeros((len(sc), 12), np.uint8)
    s[:, 0:4] = sc[:, :4] | (sc[:, 4:] >> 4) << 6
    s[:, 4:8] = m[:, :4] | (m[:, 4:] >> 4) << 6
    s[:, 8:12] = (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4
    return s


def pack_q5_k(w: np.ndarray) -> np.ndarray:
    """float32 [R, C] -> Q5_K rows [R, C / 256 * 176]: d, dmin, the 12 bytes of Q4_K's scales, qh[32] (bit j
    of byte l: the fifth bit of weight l of sub-block j), then Q4_K's 128 bytes of low nibbles."""
    rows = w.shape[0]
    d, dmin, sc, m, q = _affine(w.reshape(-1, 8, 32), 31, 6)
    qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[:, None]).sum(1, dtype=np.uint8)   # [N, 32]
    low = q & 15
    qs = (low[:, 0::2] | low[:, 1::2] << 4).reshape(len(d), 128)
    return np.concatenate([_fp16(d), _fp16(dmin), _scales_k4(sc, m), qh, qs], axis=1).reshape(rows, -1)


def pack_q6_k(w: np.ndarray) -> np.ndarray:
    """float32 [R, C] -> Q6_K rows [R, C / 256 * 210]: ql[128], qh[64], int8 scales[16], d. A weight
    128 h + 32 j + l of a block (j < 4, l < 32) is code - 32 with its low 4 bits in nibble j // 2 of ql byte
    64 h + 32 (j % 2) + l and its top 2 bits at bit 2 j of qh byte 32 h + l; scale (weight // 16)."""
    rows = w.shape[0]
    x = w.reshape(-1, 16, 16)
    step = np.abs(x).max(-1) / 31                                          # [N, 16]
    d = (np.maximum(step.max(-1), 1e-12) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(step / d[:, None]), 1, 127)
    q = (np.clip(np.round(x / (d[:, None] * sc)[..., None]), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(len(d), 2, 2, 2, 32)                                     # [N, h, j // 2, j % 2, l]
    ql = ((q[:, :, 0] & 15) | (q[:, :, 1] & 15) << 4).reshape(len(d), 128)
    qh = (q >> 4).reshape(len(d), 2, 4, 32)
    qh = (qh[:, :, 0] | qh[:, :, 1] << 2 | qh[:, :, 2] << 4 | qh[:, :, 3] << 6).reshape(len(d), 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _fp16(d)], axis=1).reshape(rows, -1)


PACKERS = {"Q4_K": pack_q4_k, "Q5_K": pack_q5_k, "Q6_K": pack_q6_k, "Q2_K": pack_q2_k}


def encode(w: np.ndarray, type_name: str) -> np.ndarray:
    """A float32 tensor in type_name: float32 as is, float16 as numpy's, the others as block bytes."""
    if type_name == "F32":
        return w.astype(np.float32)
    if type_name == "F16":
        return w.astype(np.float16)
    if type_name in PACKERS:
        return PACKERS[type_name](w.reshape(-1, w.shape[-1]))
    return quantize(w.reshape(-1, w.shape[-1]), GGML[type_name])


def decoded(w: torch.Tensor, type_name: str) -> torch.Tensor:
    """The float32 weights a reader gets back from `w` written as type_name (gguf's dequantize)."""
    raw = encode(w.numpy(), type_name)
    if raw.dtype != np.uint8:
        return torch.from_numpy(raw.astype(np.float32)).view(w.shape)
    if raw.shape != w.shape[:1] + raw.shape[1:]:   # a conv weight, written as rows
        raw = raw.reshape(-1, raw.shape[-1])
    return torch.from_numpy(dequantize(raw, GGML[type_name]).astype(np.float32)).view(w.shape)


def add_tensor(writer: GGUFWriter, name: str, w: torch.Tensor, type_name: str):
    raw = encode(w.numpy(), type_name)
    if raw.dtype == np.uint8:
        writer.add_tensor(name, raw, raw_dtype=GGML[type_name])
    else:
        writer.add_tensor(name, raw.reshape(w.shape))


# ----------------------------------------------------------------------------- files

def text_type(name: str, types) -> str:
    """The type of a native tensor under `types`: a type name for every matrix, or a function of the
    name; 1-D tensors (the norms) stay F32, as llama.cpp keeps them."""
    if name.endswith("norm.weight"):
        return "F32"
    return types(name) if callable(types) else types


def write_text_gguf(path, weights: dict, params: dict, types="F32", arch: str = "llama", tied: bool = False,
                    tokenizer: dict | None = None, permute=None, split: int = 0, key_length: bool = True):
    """Write the text model `weights` (native names) as a GGUF of `arch`. tied: no output.weight.
    permute(name, w): a mistake applied to a tensor before writing, for negative controls.
    split: at most this many tensors per file, as PATH-0000k-of-0000n.gguf (gguf's own splitting).
    key_length False: no attention.key_length / value_length (head_dim), as in files of other models."""
    w = GGUFWriter(str(path), arch, split_max_tensors=split)
    w.add_context_length(params.get("max_position_embeddings", 131072))
    w.add_embedding_length(params["dim"])
    w.add_block_count(params["n_layers"])
    w.add_feed_forward_length(params["hidden_dim"])
    w.add_head_count(params["n_heads"])
    w.add_head_count_kv(params["n_kv_heads"])
    if key_length:
        w.add_key_length(params["head_dim"])
        w.add_value_length(params["head_dim"])
    w.add_rope_dimension_count(params["head_dim"])
    w.add_rope_freq_base(params["rope_theta"])
    w.add_layer_norm_rms_eps(params["norm_eps"])
    w.add_vocab_size(params["vocab_size"])
    if tokenizer is not None:
        add_tokenizer(w, **tokenizer)
    for name, t in weights.items():
        if (tied and name == "output.weight") or name.startswith(VISION_PREFIXES):   # the mmproj's
            continue
        if permute is not None:
            t = permute(name, t)
        add_tensor(w, gguf_name(name), t.float(), text_type(name, types))
    finish(w)


VISION_PREFIXES = ("vision_encoder.", "pre_mm_projector_norm.", "patch_merger.", "vision_language_adapter.")


def mmproj_type(w: torch.Tensor, types: str) -> str:
    """As llama.cpp's converter: norms F32, the patch convolution F16 (its rows of 14 are no whole
    blocks) unless everything is F32, the matrices `types`."""
    if w.ndim == 1 or types == "F32":
        return "F32"
    return "F16" if w.ndim == 4 else types


def dequantized_mmproj(weights: dict, types: str) -> dict:
    """The vision weights as a reader of the mmproj gets them back (the others unchanged)."""
    return {name: decoded(w, mmproj_type(w, types)) if name.startswith(VISION_PREFIXES) else w
            for name, w in weights.items()}


def write_mmproj(path, weights: dict, params: dict, types="F16", activation: str = "silu"):
    """Write the vision weights of a native checkpoint as a Pixtral mmproj (arch "clip")."""
    v = params["vision_encoder"]
    w = GGUFWriter(str(path), "clip")
    w.add_string("general.type", "mmproj")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "pixtral")
    w.add_uint32("clip.vision.image_size", v["image_size"])
    w.add_uint32("clip.vision.patch_size", v["patch_size"])
    w.add_uint32("clip.vision.embedding_length", v["hidden_size"])
    w.add_uint32("clip.vision.feed_forward_length", v["intermediate_size"])
    w.add_uint32("clip.vision.block_count", v["num_hidden_layers"])
    w.add_uint32("clip.vision.attention.head_count", v["num_attention_heads"])
    w.add_uint32("clip.vision.projection_dim", params["dim"])
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    w.add_uint32("clip.vision.spatial_merge_size", v["spatial_merge_size"])
    w.add_bool(f"clip.use_{activation}", True)
    for name, t in weights.items():
        if name.startswith(VISION_PREFIXES):
            add_tensor(w, gguf_name(name), t.float(), mmproj_type(t, types))
    add_tensor(w, "v.token_embd.img_break", weights["tok_embeddings.weight"][12].float(), "F32")
    finish(w)


def tekken_tokens(tekken: dict) -> tuple[list[str], list[int]]:
    """tokenizer.ggml.tokens and token_type of a tekken.json document, as llama.cpp writes them: the
    control tokens by name, then each token's bytes in GPT-2's byte alphabet."""
    char = {b: c for c, b in byte_alphabet().items()}
    n_special = tekken["config"]["default_num_special_tokens"]
    n_regular = tekken["config"]["default_vocab_size"] - n_special
    names = [s["token_str"] for s in tekken["special_tokens"]][:n_special]
    regular = ["".join(char[b] for b in base64.b64decode(e["token_bytes"])) for e in tekken["vocab"][:n_regular]]
    return names + regular, [3] * n_special + [1] * n_regular


def add_tokenizer(w: GGUFWriter, tokens: list[str], types: list[int], pre: str = "tekken"):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def finish(w: GGUFWriter):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def random_q4_k(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K rows [rows, cols / 256 * 144] with small sane d and dmin (|w| < 0.2): fast to make
    in bulk, for tests where the values do not matter."""
    b = rng.integers(0, 256, (rows * cols // 256, 144), dtype=np.uint8)
    b[:, 0:4] = _fp16(rng.uniform(0, 2e-4, 2 * len(b))).reshape(len(b), 4)
    return b.reshape(rows, -1)


def random_q6_k(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q6_K rows [rows, cols / 256 * 210] with a small sane d (|w| < 0.1; the int8 sub-block
    scales and 6-bit codes random)."""
    b = rng.integers(0, 256, (rows * cols // 256, 210), dtype=np.uint8)
    b[:, 208:210] = _fp16(rng.uniform(0, 2.4e-5, len(b)))
    return b.reshape(rows, -1)


RANDOM_BLOCKS = {"Q4_K": random_q4_k, "Q6_K": random_q6_k}


def q4_k_m(name: str) -> str:
    """llama.cpp's Q4_K_M recipe as the real-shape benchmark file takes it: Q6_K for the embedding table
    and the output head, Q4_K for every other matrix. (llama.cpp also gives Q6_K to some layers'
    attn_v and ffn_down; here all of those stay Q4_K.)"""
    return "Q6_K" if name in ("tok_embeddings.weight", "output.weight") else "Q4_K"


def llama_q4_k_m(n_layers: int):
    """llama.cpp's own Q4_K_M recipe for this family (its llama_tensor_get_type), as the types function of
    write_random_gguf: Q6_K for the output head and for attn_v and ffn_down of the layers its use_more_bits
    picks (i < n / 8, i >= 7 n / 8, (i - n / 8) % 3 == 2: 20 of 40), Q4_K for the rest, the embedding too."""
    def more_bits(i: int) -> bool:
        return i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2

    def types(name: str) -> str:
        layer = re.match(r"layers\.(\d+)\.(attention\.wv|feed_forward\.w2)\.weight$", name)
        return "Q6_K" if name == "output.weight" or (layer and more_bits(int(layer[1]))) else "Q4_K"
    return types


def write_random_gguf(path, params: dict, types=lambda name: "Q4_K"):
    """A text GGUF of `params` whose every matrix is random blocks of types(native name) (Q4_K or Q6_K),
    the norms F32 ones, and no tokenizer (llama.cpp then takes vocab_size dummy tokens). Streamed to disk
    one tensor at a time: a 14 GB file of the real shapes never needs more than one tensor in memory."""
    w = GGUFWriter(str(path), "llama")
    for key, value in [("embedding_length", params["dim"]), ("block_count", params["n_layers"]),
                       ("feed_forward_length", params["hidden_dim"]), ("attention.head_count", params["n_heads"]),
                       ("attention.head_count_kv", params["n_kv_heads"]), ("attention.key_length", params["head_dim"]),
                       ("attention.value_length", params["head_dim"]), ("vocab_size", params["vocab_size"])]:
        w.add_uint32(f"llama.{key}", value)
    w.add_uint32("llama.context_length", params.get("max_position_embeddings", 4096))
    w.add_float32("llama.attention.layer_norm_rms_epsilon", params["norm_eps"])
    w.add_float32("llama.rope.freq_base", params["rope_theta"])
    w.add_tokenizer_model("none")
    shapes = real_text_shapes(params)
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.add_tensor_info(gguf_name(name), shape, np.dtype(np.float32), 4 * shape[0])
        else:
            kind = GGML[types(name)]
            block, size = GGML_QUANT_SIZES[kind]
            row_bytes = shape[1] // block * size   # gguf takes a quantized tensor's shape in bytes
            w.add_tensor_info(gguf_name(name), (shape[0], row_bytes), np.dtype(np.uint8), shape[0] * row_bytes, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        w.write_tensor_data(np.ones(shape, np.float32) if len(shape) == 1 else RANDOM_BLOCKS[types(name)](*shape, rng))
    w.close()


def write_random_q4_k(path, params: dict):
    """A text GGUF of `params` whose every matrix is random Q4_K blocks (norms F32 ones)."""
    write_random_gguf(path, params)
