"""Exact Tekken tokenizer files for the tests, built from the vocabulary mistral-common ships.

The BPE vocabulary is the same across Tekken releases; an official v7, v11 or v13 tekken.json is that
vocabulary plus the special-token list and the image section (docs/model.md, "The official files"). The v13
files of the reasoning models (Magistral Small 2507 and 2509) add [THINK] and [/THINK].
"""
import json
import os
from pathlib import Path

import mistral_common

SHIPPED = Path(os.path.dirname(mistral_common.__file__)) / "data"
SHIPPED_TEKKEN = sorted(SHIPPED.glob("tekken_*.json"))
SHIPPED_SENTENCEPIECE = sorted(p for p in SHIPPED.iterdir() if ".model" in p.name)

BUILTIN_SPECIALS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
]
V11_EXTRA = {32: "[ARGS]", 33: "[CALL_ID]"}
THINK_EXTRA = {34: "[THINK]", 35: "[/THINK]"}
IMAGE_SECTION = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}


def special_list(version: str, n: int = 1000, think: bool = True) -> list[dict]:
    names = {i: name for i, name in enumerate(BUILTIN_SPECIALS)}
    if version in ("v11", "v13"):
        names.update(V11_EXTRA)
    if version == "v13" and think:
        names.update(THINK_EXTRA)
    return [{"rank": i, "token_str": names.get(i, f"<SPECIAL_{i}>"), "is_control": True} for i in range(n)]


def write_tekken(folder, version: str = "v11", image: bool = True, specials: bool = True,
                 name: str = "tekken.json", think: bool = True) -> Path:
    """Write an official-layout tekken.json of `version` into `folder`; return its path. think: a v13 file
    with [THINK] and [/THINK] (a reasoning model's)."""
    data = json.loads((SHIPPED / "tekken_240911.json").read_text(encoding="utf-8"))
    data["config"]["version"] = version
    data.pop("image", None)
    if image:
        data["image"] = dict(IMAGE_SECTION)
    if specials:
        data["special_tokens"] = special_list(version, think=think)
    path = Path(folder) / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path
