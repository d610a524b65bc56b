"""The dump format and its comparison (dump.py)."""
import torch
from safetensors.torch import save_file

import dump
from dump import compare


def fake_dump(path, logits, prompt=(1, 3, 5), generated=(7, 2)):
    save_file({"prompt_ids": torch.tensor(prompt), "generated_ids": torch.tensor(generated), "logits": logits},
              str(path))


def test_compare_equal_dumps_reports_zero(tmp_path):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    fake_dump(tmp_path / "a.safetensors", logits)
    fake_dump(tmp_path / "b.safetensors", logits.clone())
    c = compare(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert (c.positions, c.max_abs_diff, c.max_kl, c.top1_agreement) == (4, 0.0, 0.0, 1.0)
    assert c.first_argmax_diff is None and c.first_token_diff is None


def test_compare_finds_the_first_differing_position(tmp_path, capsys):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    perturbed = logits.clone()
    perturbed[2, logits[2].argmin()] = 100.0       # a new argmax at position 2
    perturbed[3] += 1e-3 * torch.randn(50)
    fake_dump(tmp_path / "a.safetensors", logits)
    fake_dump(tmp_path / "b.safetensors", perturbed)
    assert dump.main(["compare", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]) == 1
    out = capsys.readouterr().out
    assert "first argmax diff   position 2" in out and "top-1 agreement     0.750000" in out
    c = compare(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert c.max_abs_diff > 50 and c.max_kl > 1


def test_compare_stops_where_the_tokens_differ(tmp_path):
    logits = torch.randn(4, 50)
    fake_dump(tmp_path / "a.safetensors", logits, generated=(7, 2))
    fake_dump(tmp_path / "b.safetensors", logits, generated=(8, 2))
    c = compare(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert c.first_token_diff == 3 and c.positions == 3
