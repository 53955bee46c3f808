"""bfloat16 products where the hardware has them: the choice, what runs in which precision, and
a training run in bf16 that learns, records its precision and resumes exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minimind_v.config import MiniMindConfig
from minimind_v.model.llm import MiniMindForCausalLM
from minimind_v.train.checkpoint import CHECKPOINT
from minimind_v.precision import ENV, autocast, chosen_precision, native_bf16, training_precision
from test_training import fresh_vlm, run_fit, sft_dataset, step_losses  # noqa: F401 (a fixture)


def test_the_choice_comes_from_the_environment_and_is_checked():
    assert chosen_precision({}) == "auto" and chosen_precision({ENV: ""}) == "auto"
    assert chosen_precision({ENV: "bf16"}) == "bf16"
    with pytest.raises(ValueError, match=ENV):
        chosen_precision({ENV: "fp16"})
    assert training_precision("cpu", "fp32") == "fp32" and training_precision("cpu", "bf16") == "bf16"
    assert training_precision("cpu", "auto") == ("bf16" if native_bf16("cpu") else "fp32")
    with pytest.raises(ValueError, match="precision"):
        training_precision("cpu", "half")


def test_autocast_multiplies_in_bf16_and_fp32_leaves_everything_alone():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert torch.equal(a @ b, torch.mm(a, b))


def test_under_bf16_the_attention_kernel_gets_float32_and_the_loss_stays_close(monkeypatch):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2))
    ids = torch.randint(0, 97, (3, 20))
    reference = model(ids, labels=ids).loss
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with autocast("cpu", "bf16"):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert seen and all(d == (torch.float32,) * 3 for d in seen)
    assert loss.dtype == torch.float32
    assert loss.detach().item() == pytest.approx(reference.detach().item(), rel=2e-2)  # bf16 products: ~3 significant digits
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_a_bf16_run_learns_records_its_precision_and_resumes_exactly(make_tiny_vlm, tiny_encoder, sft_dataset,
                                                                      tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "bf16")
    summary, whole = run_fit(fresh_vlm(make_tiny_vlm, tiny_encoder), sft_dataset, tmp_path / "a", steps=6)
    assert summary["precision"] == "bf16"
    losses = step_losses(tmp_path / "a")
    assert losses[6] < losses[1]
    run_fit(fresh_vlm(make_tiny_vlm, tiny_encoder), sft_dataset, tmp_path / "b", steps=6, stop_at=3)
    _, resumed = run_fit(fresh_vlm(make_tiny_vlm, tiny_encoder, seed=7), sft_dataset, tmp_path / "b", steps=6,
                         resume=True)
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    # The same folder is not continued in float32: the precision is one of the run's settings.
    monkeypatch.setenv(ENV, "fp32")
    with pytest.raises(Exception, match="precision"):
        run_fit(fresh_vlm(make_tiny_vlm, tiny_encoder), sft_dataset, tmp_path / "b", steps=9, resume=True)


def test_fp32_runs_keep_the_settings_they_were_saved_with(make_tiny_vlm, tiny_encoder, sft_dataset, tmp_path,
                                                          monkeypatch):
    monkeypatch.setenv(ENV, "fp32")
    summary, _ = run_fit(fresh_vlm(make_tiny_vlm, tiny_encoder), sft_dataset, tmp_path / "a", steps=2)
    assert summary["precision"] == "fp32"
    saved = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)
    assert "precision" not in saved["settings"]
