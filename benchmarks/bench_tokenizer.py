"""Speed of tokenizer.py against mistral-common on 1 MB of mixed text (both run tiktoken's BPE).

    python benchmarks/bench_tokenizer.py

Both load the same exact v11 tekken.json; the ids are checked equal before timing. Times are the
best of several interleaved runs, so both see the same machine load.
"""
import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy  # noqa: E402
from mistral_common.tokens.tokenizers.tekken import Tekkenizer  # noqa: E402

from tekken_files import write_tekken  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

PARAGRAPHS = [
    "The committee met on Tuesday to review the 2024 budget; several members asked for more detail.",
    "Le comité s'est réuni mardi pour examiner le budget ; plusieurs membres ont demandé des précisions.",
    "Der Ausschuss trat am Dienstag zusammen, um den Haushalt zu prüfen. Größere Änderungen gab es nicht.",
    "委员会于周二召开会议，审查了二零二四年的预算。东京と大阪の会議は来週です。회의는 다음 주에 열립니다.",
    "اجتمعت اللجنة يوم الثلاثاء لمراجعة الميزانية، وطلب عدة أعضاء مزيدًا من التفاصيل.",
    "समिति ने मंगलवार को बजट की समीक्षा के लिए बैठक की; कई सदस्यों ने अधिक विवरण मांगा।",
    "Комитет собрался во вторник, чтобы рассмотреть бюджет; несколько членов попросили подробностей.",
    "def mean(xs):\r\n\tif not xs:\r\n\t\treturn 0.0\r\n\treturn sum(xs) / len(xs)\r\n",
    'for (size_t i = 0; i < n; ++i) {\n    out[i] = a[i] * b[i] + c;   // fused\n}\n',
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}, "id": "abcDEF123"}',
    "Great job 👍🏽 see you at 10:30 🎉👩‍👩‍👧‍👦 🇫🇷 ❤️ — cafe\u0301 naïve coöperate",
    "    \n\n\n        \t\t  \n",
]


def mixed_text(n_bytes: int = 1_000_000, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        part = rng.choice(PARAGRAPHS) + rng.choice([" ", "\n", "\n\n", ""])
        parts.append(part)
        size += len(part.encode("utf-8"))
    return "".join(parts)


def best_times(functions: dict, repeats: int = 7) -> dict:
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7, help="timed runs of each side, interleaved; the best counts "
                                                          "(default: %(default)s)")
    repeats = p.parse_args().repeats
    if repeats < 1:
        p.error(f"--repeats {repeats}: expected 1 or more")
    with tempfile.TemporaryDirectory() as folder:
        path = write_tekken(folder, "v11")
        ours, theirs = Tokenizer.from_file(path), Tekkenizer.from_file(path)
    text = mixed_text()
    ids = ours.encode(text)
    assert ids == theirs.encode(text, bos=False, eos=False), "ids differ from mistral-common"
    assert ours.decode(ids) == theirs.decode(ids, SpecialTokenPolicy.IGNORE) == text
    print(f"text: {len(text.encode('utf-8')) / 1e6:.2f} MB of mixed text, {len(ids)} tokens (ids equal)")
    tasks = {
        "encode": {"ours": lambda: ours.encode(text),
                   "mistral-common": lambda: theirs.encode(text, bos=False, eos=False)},
        "decode": {"ours": lambda: ours.decode(ids), "mistral-common": lambda: theirs.decode(ids)},
    }
    for task, functions in tasks.items():
        t = best_times(functions, repeats)
        ratio = t["mistral-common"] / t["ours"]
        print(f"{task}: ours {t['ours'] * 1e3:7.1f} ms   mistral-common {t['mistral-common'] * 1e3:7.1f} ms"
              f"   mistral-common / ours = {ratio:.2f} (above 1: ours is faster)")


if __name__ == "__main__":
    main()
