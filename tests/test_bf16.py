"""bf16 on the CPU."""

import pytest
import torch


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_distillation_loss_is_computed_in_fp32_from_bf16_predictions(loss):
    from panda.models.distill import frame_distillation_losses

    torch.manual_seed(0)
    pred = torch.randn(2, 4, 4, 8).bfloat16().requires_grad_()  # the head's output under bf16 compute
    teacher = torch.randn(2, 8, 8, 8)  # fp32 features on a finer grid (pooled to the prediction's)
    out = frame_distillation_losses(pred, teacher, loss)
    # neither the teacher's features nor the loss are rounded to bf16 (as the LM loss: logits.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, frame_distillation_losses(pred.detach().float(), teacher, loss), rtol=0, atol=0)
    out.sum().backward()
    assert pred.grad.dtype == torch.bfloat16
